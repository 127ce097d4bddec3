"""Per-key access statistics, kept online: the raw material of :mod:`tierstore.predict.predictor`.

Pure and cheap: a few dict operations per access, no I/O, no clock (the caller passes ``now``).
Gaps are counted in *ticks*, one per recorded access, and also in the caller's time unit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["KeyStats", "KeyState", "TrackerState", "AccessPatternTracker"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class KeyStats:
    """What the tracker knows about one key."""

    count: int
    last_tick: int
    last_time: float
    gap: float
    """EWMA of the ticks between consecutive accesses (0 until the second access)."""
    time_gap: float
    """The same in the caller's time unit."""


class KeyState:
    """The tracker's live, mutable record of one key (read it, never write it).

    Slotted because there is one per key ever seen; :meth:`AccessPatternTracker.state` hands it out
    without a copy so the predictor's per-access feature code stays cheap.
    """

    __slots__ = ("count", "gap", "last_gap", "last_tick", "last_time", "out", "time_gap")

    def __init__(self, tick: int, now: float) -> None:
        self.count = 1
        self.last_tick = tick
        self.last_time = now
        self.gap = 0.0
        self.time_gap = 0.0
        self.last_gap = 0
        self.out = 0  # transitions from this key to the next accessed one


@dataclass(slots=True)
class TrackerState(Generic[K]):
    """The tracker's working state, for a loop that does :meth:`AccessPatternTracker.record`'s work inline.

    From :meth:`AccessPatternTracker.export_state`; the containers are the tracker's own, not copies
    (see :mod:`tierstore.predict.replay_state`). ``tick``, ``first_gap``, ``transition`` and
    ``previous`` are the tracker's public attributes of those names.
    """

    keys: dict[K, KeyState]
    """Each key's live record."""
    successors: dict[K, dict[K, int]]
    """Each key's successor table (Misra-Gries counts)."""
    recent: deque[K]
    """The latest ``window`` keys, oldest first."""
    in_window: dict[K, int]
    """How often each key occurs in ``recent``."""
    tick: int
    first_gap: float
    transition: float
    previous: K | None
    previous_state: KeyState | None
    """The record of ``previous``."""


class AccessPatternTracker(Generic[K]):
    """Per-key access statistics, kept online in O(1) per access (amortised).

    ``max_successors`` bounds each key's successor table: it is a Misra-Gries summary, so every
    successor that follows a key more than ``1/(max_successors+1)`` of the time is kept, and the
    counts (hence the probabilities) are never overestimated. ``window`` is how many of the latest
    keys :meth:`recent` and :meth:`in_window` remember. Either at 0 turns that bookkeeping off (the
    predictive policy's tracker keeps neither: its regression does not read them, and they were a
    third of its per-access cost).
    """

    def __init__(self, window: int = 200, *, max_successors: int = 8, alpha: float = 0.3) -> None:
        self.window = max(0, window)
        self.max_successors = max(0, max_successors)
        self.alpha = alpha
        self.tick = 0
        self.time_per_tick = 0.0
        """EWMA of the caller's time elapsed per access: converts ticks to time for a new key."""
        self._last_now: float | None = None
        self.first_gap = 0.0
        """EWMA over keys of the gap between their first and second access: the prior for a new key."""
        self.previous: K | None = None
        """The key of the latest access."""
        self.transition = 0.0
        """How likely the latest key was to follow the one before it, estimated before seeing it."""
        self._previous_state: KeyState | None = None
        self._keys: dict[K, KeyState] = {}
        self._recent: deque[K] = deque()
        self._in_window: dict[K, int] = {}
        self._successors: dict[K, dict[K, int]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def record(self, key: K, now: float) -> KeyState:
        """Note one access to ``key`` at time ``now``; return the key's updated record."""
        self.tick += 1
        tick, alpha = self.tick, self.alpha
        if self._last_now is not None:
            self.time_per_tick += 0.01 * (now - self._last_now - self.time_per_tick)
        self._last_now = now
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = KeyState(tick, now)
        else:
            gap = tick - state.last_tick
            if state.count == 1:
                state.gap, state.time_gap = float(gap), now - state.last_time
                first = self.first_gap
                self.first_gap = gap if first == 0.0 else first + 0.01 * (gap - first)
            else:
                state.gap += alpha * (gap - state.gap)
                state.time_gap += alpha * (now - state.last_time - state.time_gap)
            state.count += 1
            state.last_gap = gap
            state.last_tick, state.last_time = tick, now
        if self.window:
            self._slide(key)
        previous = self.previous
        if self.max_successors:
            self.transition = self.successor_probability(previous, key)
            if previous is not None and self._previous_state is not None:
                self._follow(previous, self._previous_state, key)
        self.previous, self._previous_state = key, state
        return state

    def _slide(self, key: K) -> None:
        recent, counts = self._recent, self._in_window
        recent.append(key)
        counts[key] = counts.get(key, 0) + 1
        if len(recent) > self.window:
            old = recent.popleft()
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]

    def _follow(self, previous: K, state: KeyState, key: K) -> None:
        state.out += 1
        table = self._successors.get(previous)
        if table is None:
            self._successors[previous] = {key: 1}
        elif key in table:
            table[key] += 1
        elif len(table) < self.max_successors:
            table[key] = 1
        else:  # Misra-Gries: a newcomer decrements everyone instead of taking a seat
            for other in [k for k, c in table.items() if c == 1]:
                del table[other]
            for other in table:
                table[other] -= 1

    def export_state(self) -> TrackerState[K]:
        """The tracker's working state, its containers shared (for the batch replay's fused loop)."""
        return TrackerState(self._keys, self._successors, self._recent, self._in_window, self.tick,
                            self.first_gap, self.transition, self.previous, self._previous_state)

    def load_state(self, state: TrackerState[K]) -> None:
        """Take ``state`` (from :meth:`export_state`, its scalars advanced by a replay) as the tracker's own.

        The caller-time statistics (``time_per_tick``, the last ``now``) are left as they were.
        """
        self._keys, self._successors, self._recent, self._in_window = (state.keys, state.successors,
                                                                       state.recent, state.in_window)
        self.tick, self.first_gap, self.transition = state.tick, state.first_gap, state.transition
        self.previous, self._previous_state = state.previous, state.previous_state

    def state(self, key: K) -> KeyState | None:
        """The live record of ``key`` (do not modify it), or None if it was never accessed."""
        return self._keys.get(key)

    def stats(self, key: K) -> KeyStats | None:
        """The statistics of ``key``, or None if it was never accessed."""
        s = self._keys.get(key)
        if s is None:
            return None
        return KeyStats(s.count, s.last_tick, s.last_time, s.gap, s.time_gap)

    def successors(self, key: K) -> list[tuple[K, float]]:
        """Keys seen right after ``key``, with the estimated probability of each, most likely first."""
        state, table = self._keys.get(key), self._successors.get(key)
        if state is None or not table or not state.out:
            return []
        pairs = [(other, count / state.out) for other, count in table.items()]
        return sorted(pairs, key=lambda pair: -pair[1])

    def successor_probability(self, previous: K | None, key: K) -> float:
        """Estimated probability that ``key`` follows ``previous``."""
        if previous is None:
            return 0.0
        state, table = self._keys.get(previous), self._successors.get(previous)
        if state is None or table is None or not state.out:
            return 0.0
        return table.get(key, 0) / state.out

    def in_window(self, key: K) -> int:
        """How often ``key`` occurs among the last ``window`` accesses."""
        return self._in_window.get(key, 0)

    def recent(self) -> list[K]:
        """The last ``window`` keys accessed, oldest first."""
        return list(self._recent)
