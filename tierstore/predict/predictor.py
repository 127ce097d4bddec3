"""Access statistics -> predictions (reuse, next access, successors) and the predictive policy.

Pure: no I/O, no threads, no clocks. The caller passes ``now`` with each access (seconds in the
store, the access index in the simulator); everything else is counted in *ticks*, one per access.

* :class:`AccessPatternTracker` (from :mod:`tierstore.predict.access_tracker`) keeps per-key statistics
  online: count, last access, an EWMA of the gap between accesses and, where asked, a bounded
  "which key followed which" table and a window of the latest keys.
* :class:`SimpleMLPredictor` is an online logistic regression over the tracker's features, trained
  on the stream itself: each access is a sample, labelled 1 when the key comes back within
  ``horizon`` ticks and 0 when the horizon passes first. Logistic regression, not something
  heavier, because it trains in O(features) per access in pure Python, never needs a batch, and its
  output is a probability that ``prediction_threshold`` can gate directly.
* :class:`PredictedNextUse` applies Belady's rule to those predictions (evict the key expected back
  last); :class:`PredictivePolicy` follows it or, where they do better on the recent stream, one of
  a panel of classic policies run as shadows (:mod:`tierstore.predict.shadow_caches`).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, TierFullError
from . import batch_replay
from .access_tracker import AccessPatternTracker, KeyStats
from .batch_replay import CROWDED
from .replay_state import BeladyState, PanelState, PredictorState
from .shadow_caches import Evictions, ShadowARC, ShadowCache, ShadowLIRS, ShadowLRU, ShadowS3FIFO, ShadowWTinyLFU
from .takeover import TakeoverRule

if TYPE_CHECKING:
    from .compiled_learn import CompiledLearner

__all__ = ["KeyStats", "AccessPatternTracker", "SimpleMLPredictor", "PredictivePolicy", "SuccessorTable",
           "next_access_estimate"]

K = TypeVar("K", bound=Hashable)


_FEATURES = 6
EXPERTS = ("predicted", "lru", "arc", "s3fifo", "wtinylfu", "lirs")


class SimpleMLPredictor(Generic[K]):
    """Online logistic regression: P(a key is accessed again within ``horizon`` ticks).

    Call :meth:`observe` after each ``tracker.record``. One access in ``sample_every``, drawn at
    random (a seeded linear congruential generator, so a replay is reproducible; not every n-th
    access, which aliases with periodic traces: on a loop interleaved with one-hit wonders it would
    sample only the one-hit wonders), becomes a training sample (features as of that access),
    labelled when its key returns (1) or when ``horizon`` ticks pass without it (0); at most one
    sample per key is pending, so memory is bounded by the horizon. Every access is scored.
    Training on half the accesses learns the six weights (they settle within a few thousand
    samples) at half the cost; on a quarter, orm-busy at 5% lost 0.005 of hit rate on its first
    200k accesses and zigzag 0.002 at 5% (``tools/replay_results.md``).

    The features of a key, as of its latest access: a bias, its access count (log), whether this
    was its first access, its gap EWMA and its latest gap (log, in units of the horizon), and
    whether the gap EWMA is within the horizon. The tracker's successor and window statistics are
    not features any more: they cost about a third of the learned expert's time, and without them
    (and with half the samples) the 44 cells of the replay table moved by -0.0013 (zigzag 10%) to
    +0.0017 (multi2 1%), every other cell by at most 0.0001.
    """

    def __init__(self, tracker: AccessPatternTracker[K], *, horizon: int = 1000, threshold: float = 0.7,
                 learning_rate: float = 0.05, sample_every: int = 2) -> None:
        self.tracker = tracker
        self.horizon = max(1, horizon)
        self.threshold = threshold
        self.learning_rate = learning_rate
        self.sample_every = max(1, sample_every)
        self._cut = (1 << 32) // self.sample_every  # a draw below it samples the access
        self._draw = 1  # the generator's state
        self.weights = [0.0] * _FEATURES
        self.samples = 0
        self._log_horizon = math.log1p(self.horizon)
        self._pending: dict[K, tuple[int, tuple[float, ...]]] = {}
        self._expiry: deque[tuple[int, K]] = deque()
        self._probability: dict[K, float] = {}

    def features(self, key: K) -> tuple[float, ...]:
        """The features of ``key`` as of its last access (the first is the bias, 1.0)."""
        state = self.tracker.state(key)
        if state is None or state.count == 1:
            return (1.0, 0.0 if state is None else math.log1p(1) * 0.25, 1.0, 1.0, 1.0, 0.0)
        log_h = self._log_horizon
        return (
            1.0,
            math.log1p(state.count) * 0.25,
            0.0,
            min(2.0, math.log1p(state.gap) / log_h),
            min(2.0, math.log1p(state.last_gap) / log_h),
            1.0 if state.gap <= self.horizon else 0.0,
        )

    def _score(self, x: tuple[float, ...]) -> float:
        w = self.weights  # unrolled, in the order batch_replay.learn sums (the same float result)
        z = w[0] + w[1] * x[1] + w[2] * x[2] + w[3] * x[3] + w[4] * x[4] + w[5] * x[5]
        z = 30.0 if z > 30.0 else (-30.0 if z < -30.0 else z)
        return 1.0 / (1.0 + math.exp(-z))

    def _train(self, x: tuple[float, ...], label: float) -> None:
        step = self.learning_rate * (label - self._score(x))
        w = self.weights
        w[0] += step
        for i in range(1, _FEATURES):
            w[i] += step * x[i]
        self.samples += 1

    def observe(self, key: K) -> float:
        """Learn from the access just recorded for ``key``; return its new reuse probability."""
        tick = self.tracker.tick
        pending = self._pending
        sample = pending.pop(key, None)
        if sample is not None:
            self._train(sample[1], 1.0)
        expiry, limit = self._expiry, tick - self.horizon
        while expiry and expiry[0][0] < limit:
            born, old = expiry.popleft()
            stale = pending.get(old)
            if stale is not None and stale[0] == born:
                del pending[old]
                self._train(stale[1], 0.0)
        x = self.features(key)
        self._draw = draw = (self._draw * 1664525 + 1013904223) & 0xFFFFFFFF
        if draw < self._cut:
            pending[key] = (tick, x)
            expiry.append((tick, key))
        p = self._probability[key] = self._score(x)
        return p

    def export_state(self) -> PredictorState[K]:
        """The regression's working state, its containers shared (for the batch replay's fused loop)."""
        return PredictorState(self._pending, self._expiry, self._probability, self._draw, self._cut,
                              self._log_horizon)

    def load_state(self, state: PredictorState[K]) -> None:
        """Take ``state`` (from :meth:`export_state`, its draw advanced by a replay) as the regression's own.

        ``cut`` and ``log_horizon`` are derived from the settings and stay as they are.
        """
        self._pending, self._expiry, self._probability = state.pending, state.expiry, state.probability
        self._draw = state.draw

    def reuse_probability(self, key: K) -> float:
        """P(``key`` is accessed within ``horizon`` ticks of its last access), decayed past that horizon."""
        p = self._probability.get(key)
        state = self.tracker.state(key)
        if p is None or state is None:
            return self._score(self.features(key))
        age = self.tracker.tick - state.last_tick
        return p if age <= self.horizon else p * self.horizon / age

    def expected_next_tick(self, key: K) -> float:
        """Expected tick of the next access: soon (one gap) with the reuse probability, far otherwise."""
        state = self.tracker.state(key)
        if state is None:
            return float(self.tracker.tick + 2 * self.horizon)
        gap = state.gap if state.count > 1 else max(1.0, self.tracker.first_gap)
        p = self._probability.get(key, 0.5)
        return state.last_tick + p * gap + (1.0 - p) * max(2.0 * self.horizon, 2.0 * gap)

    def expected_next_access(self, key: K) -> float | None:
        """Expected time of the next access in the caller's ``now`` unit, or None for an unseen key."""
        state = self.tracker.state(key)
        if state is None:
            return None
        ticks = self.expected_next_tick(key) - state.last_tick
        per_tick = state.time_gap / state.gap if state.gap > 0 else self.tracker.time_per_tick
        return state.last_time + ticks * per_tick

    def likely_successors(self, key: K, k: int = 4) -> list[tuple[K, float]]:
        """Up to ``k`` keys likely to be accessed right after ``key``, with probability >= threshold."""
        return [(other, p) for other, p in self.tracker.successors(key)[:k] if p >= self.threshold]


class PredictedNextUse(Generic[K]):
    """Shadow expert: Belady's rule on predictions, evicting the key expected back last.

    A key expected back sooner than everything resident is kept; a newcomer expected back later
    than every resident key is not admitted at all (on a loop longer than the cache that keeps a
    fixed subset and scores like OPT, where LRU scores zero). A key that overstays twice its
    expected gap is taken for dead and goes first, so stale predictions cannot pin it forever.
    Two lazy heaps (furthest expected access, earliest deadline) make each access O(log n).
    """

    name = "predicted"

    def __init__(self, capacity: int, predictor: SimpleMLPredictor[K], *, patience: float = 2.0) -> None:
        self.capacity = max(1, capacity)
        self.predictor = predictor
        self.patience = patience
        self._version: dict[K, int] = {}
        self._far: list[tuple[float, int, K]] = []  # (-expected tick, version, key)
        self._due: list[tuple[float, int, K]] = []  # (deadline tick, version, key)
        self._serial = 0

    def __contains__(self, key: object) -> bool:
        return key in self._version

    def __iter__(self) -> Iterator[K]:
        return iter(self._version)

    def export_state(self) -> BeladyState[K]:
        """The expert's contents and heaps, shared (for the batch replay's fused loop)."""
        return BeladyState(self._version, self._far, self._due, self._serial)

    def load_state(self, state: BeladyState[K]) -> None:
        """Take ``state`` (from :meth:`export_state`, as a replay left it: heaps compacted, serial advanced)."""
        self._version, self._far, self._due, self._serial = state.version, state.far, state.due, state.serial

    def _push(self, key: K, expected: float, now: int) -> None:
        self._serial += 1
        serial = self._version[key] = self._serial
        heapq.heappush(self._far, (-expected, serial, key))
        heapq.heappush(self._due, (now + self.patience * max(1.0, expected - now), serial, key))
        if len(self._far) > CROWDED * self.capacity + 64:  # drop stale entries now and then
            self._far = [e for e in self._far if self._version.get(e[2]) == e[1]]
            self._due = [e for e in self._due if self._version.get(e[2]) == e[1]]
            heapq.heapify(self._far)
            heapq.heapify(self._due)

    def _top(self, heap: list[tuple[float, int, K]]) -> tuple[float, int, K]:
        version = self._version
        while version.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return heap[0]

    def run(self, keys: Sequence[K], evicted: Evictions[K] | None = None) -> int:
        """Record ``keys`` in the predictor (as the policy does first), then process them here.

        The batch form of ``tracker.record``, ``predictor.observe`` and :meth:`access` per key, fused
        (:func:`tierstore.predict.batch_replay.learn`); a key not admitted is reported as its own eviction.
        """
        return batch_replay.learn(self.predictor, keys, self, evicted)

    def access(self, key: K) -> K | None:
        now = self.predictor.tracker.tick
        expected = self.predictor.expected_next_tick(key)
        if key in self._version or len(self._version) < self.capacity:
            self._push(key, expected, now)
            return None
        deadline, _, victim = self._top(self._due)
        if deadline >= now:
            far, _, victim = self._top(self._far)
            if -far <= expected:
                return None  # the newcomer is expected back last: do not admit it
        del self._version[victim]
        self._push(key, expected, now)
        return victim


def _build_experts(names: tuple[str, ...], capacity: int, patience: float,
                   predictor: SimpleMLPredictor[K]) -> list[ShadowCache[K]]:
    experts: list[ShadowCache[K]] = []
    if len(set(names)) != len(names):
        raise ConfigError(f"each expert may sit on the panel once, got {names!r}")
    for name in names:
        if name == PredictedNextUse.name:
            experts.append(PredictedNextUse(capacity, predictor, patience=patience))
        elif name == "lru":
            experts.append(ShadowLRU(capacity))
        elif name == "arc":
            experts.append(ShadowARC(capacity))
        elif name == "s3fifo":
            experts.append(ShadowS3FIFO(capacity))
        elif name == "wtinylfu":
            experts.append(ShadowWTinyLFU(capacity))
        elif name == "lirs":
            experts.append(ShadowLIRS(capacity))
        else:
            raise ConfigError(f"unknown expert {name!r}; choose from {', '.join(EXPERTS)}")
    return experts


class PredictivePolicy(Generic[K]):
    """Evict by prediction, following whichever expert of a small panel currently scores best.

    The panel: the predictor's own Belady approximation (:class:`PredictedNextUse`) plus shadow
    copies of S3-FIFO, ARC, W-TinyLFU, LRU and LIRS (:mod:`tierstore.predict.shadow_caches`). LIRS is there
    for mixes of loops and scans (multi2: 0.522/0.644 at 10%/25% of the keys, where the best of the
    other classics reaches 0.502/0.617) and for Mooncake at 1% (0.046 against ARC's 0.042). Every access is fed to
    all of them; each counts the hits it would have had at ``capacity``. Every ``epoch`` accesses
    the scores decay (a memory of about ``window`` accesses) and the leader may change. The real
    tier follows the leader's *contents*: it evicts first the resident keys the leader no longer
    holds (oldest first) and admits only what the leader admitted, so under a steady leader the tier
    holds exactly what that expert would, and under a changing workload it tracks the best one.

    Changing leader costs one miss for each key the new leader holds and the tier lacks (measured
    on the traces: it is that expensive), so a challenger must be ahead by more hits than that,
    and of the challengers that are, the one ahead by most *after* that cost is followed
    (:meth:`switch_target`).
    The first expert leads until then: S3-FIFO, the best classic policy on most traces measured.

    ``takeover=(margin, epochs[, noise])`` (off by default; :class:`tierstore.predict.kv_policy.KVPolicy`
    turns it on) lets the tier *become* an expert instead (:class:`tierstore.predict.takeover.TakeoverRule`,
    with a warm-up of one score window and a floor of one capacity of hits): once one has led the
    panel by that much for ``epochs`` epochs, the tier drops every key it does not hold and loads
    every key it holds that the tier lacks (``takeovers`` and ``loaded`` count them), so it is the
    expert's exact copy and following it costs no misses on old contents. It loads keys the caller
    never inserted, as one entry each: it is for an owner that can bring keys in on the policy's
    word and whose keys all have size 1 (the trace simulator); a tier found holding other sizes
    skips it.

    ``capacity`` is in the unit of the sizes given to ``insert`` (entries by default). With byte
    sizes, pass ``block_size``, a typical block's size: the experts count ``capacity // block_size``
    entries. The knobs after it are the panel's tuning, measured in ``tools/replay.py``.

    Chains: ``insert(key, parent=...)`` links a key to the prefix it extends. The victim is always
    a key with no resident extensions: when the chosen key has some, its chain tail goes first,
    because a block is useless once any block before it is gone.
    """

    name = "predictive"

    def __init__(self, capacity: int, *, prediction_window: int = 200, prediction_threshold: float = 0.7,
                 experts: tuple[str, ...] = ("s3fifo", "arc", "wtinylfu", "predicted", "lru", "lirs"),
                 epoch: int | None = None, window: int | None = None, switch_cost: float = 1.0,
                 horizon_factor: int = 2, patience: float = 2.0, block_size: int = 1,
                 compiled: bool = False, shadows: Sequence[ShadowCache[K]] = (),
                 takeover: tuple[float, int] | tuple[float, int, float] | None = None) -> None:
        if capacity < 1 or block_size < 1:
            raise ConfigError(f"the predictive policy needs a capacity of at least 1 entry, got {capacity} "
                              f"with block_size={block_size}")
        self.capacity = capacity
        capacity = max(1, capacity // block_size)  # the experts count entries
        # no successor table nor window: the regression does not read them (the store's prefetcher
        # learns successors in its own SuccessorTable)
        self.tracker: AccessPatternTracker[K] = AccessPatternTracker(0, max_successors=0)
        horizon = max(prediction_window, horizon_factor * capacity)
        self.predictor = SimpleMLPredictor(self.tracker, horizon=horizon, threshold=prediction_threshold)
        self.experts = [*shadows, *_build_experts(experts, capacity, patience, self.predictor)]
        self._compiled: CompiledLearner | None = None
        if compiled:  # the learned expert's state as arrays, replayed by numba (simulate only)
            # imported here: numba costs ~65 MiB of RSS (llvmlite) in every process that imports it,
            # and only the trace simulator asks for compiled replays
            from . import compiled_learn, compiled_shadows

            belady = next((e for e in self.experts if isinstance(e, PredictedNextUse)), None)
            self._compiled = compiled_learn.CompiledLearner(self.predictor, belady)
            if belady is not None:
                self.experts[self.experts.index(belady)] = self._compiled  # type: ignore[call-overload]
            self.experts = [compiled_shadows.compiled_shadow(e) for e in self.experts]
        self.epoch = epoch or max(64, capacity // 8)
        self.window = max(window or max(8192, 16 * capacity), 2 * self.epoch)
        self.decay = 1.0 - self.epoch / self.window
        self.switch_cost = switch_cost
        self.scores = [0.0] * len(self.experts)
        self.switches = 0
        self.takeover = None if takeover is None else TakeoverRule(*takeover, warmup=self.window // self.epoch,
                                                                   floor=capacity)
        self.takeovers = 0  # times the tier became an expert
        self.loaded = 0  # keys those takeovers brought into the tier
        self._copy_of = 0  # the expert the tier is an exact copy of, -1 for none (empty, it copies the first)
        self._hits = [0] * len(self.experts)
        self._leader = 0
        self._countdown = self.epoch
        self._resident: OrderedDict[K, int] = OrderedDict()  # key -> size, least recently used first
        self._outside: OrderedDict[K, None] = OrderedDict()  # resident, but not held by the leader
        self._used = 0
        self._parent: dict[K, K] = {}
        # resident extensions of each key; dicts, not sets, so the walk to a tail is reproducible
        self._children: dict[K, dict[K, None]] = {}
        self._lineage: dict[K, K] = {}  # each chained key's parent, kept after eviction (a takeover reloads links)

    @property
    def used(self) -> int:
        return self._used

    @property
    def leader(self) -> str:
        """Name of the expert the tier currently follows."""
        return self.experts[self._leader].name

    def __contains__(self, key: object) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def record_access(self, key: K, now: float) -> None:
        if self._compiled is not None:
            raise ConfigError("a compiled predictive policy replays traces through simulate() only; "
                              "create it with compiled=False to drive it access by access")
        self.tracker.record(key, now)
        self.predictor.observe(key)
        lead = self.experts[self._leader]
        resident, outside, hits = self._resident, self._outside, self._hits
        for i, expert in enumerate(self.experts):
            if key in expert:
                hits[i] += 1
            gone = expert.access(key)
            if expert is lead and gone is not None and gone in resident:
                outside[gone] = None
        if key in resident:
            resident.move_to_end(key)
            if key in outside and key in lead:
                del outside[key]
        self._countdown -= 1
        if not self._countdown:
            self.choose_leader()

    def simulate(self, keys: Sequence[K], parents: Sequence[K | None] | None = None) -> bytearray:
        """Replay ``keys`` as unit-size accesses to a tier of ``capacity`` entries; 1 per hit, 0 per miss.

        The same decisions as ``access(policy, keys[i], i, policy.capacity, 1, parents[i])`` for each
        ``i`` (:func:`tierstore.predict.policies.access`), 2-3x faster: the panel runs an epoch at a
        time (:mod:`tierstore.predict.batch_replay`). ``parents``: each key's chain parent, or None. Time is
        counted in accesses; the tracker's caller-time statistics are left as they were.
        """
        if self._compiled is not None:
            return batch_replay.simulate(self, keys, parents, None, self._compiled)
        belady = next((e for e in self.experts if isinstance(e, PredictedNextUse)), None)
        return batch_replay.simulate(self, keys, parents, belady)

    def export_state(self) -> PanelState[K]:
        """The tier's keys and the epoch's state, the containers shared (for the batch replay's loop)."""
        return PanelState(self._resident, self._outside, self._parent, self._children, self._hits, self._used,
                          self._leader, self._countdown, self._lineage if self.takeover is not None else None)

    def load_state(self, state: PanelState[K]) -> None:
        """Take ``state`` (from :meth:`export_state`, advanced by a replay) as the policy's own."""
        self._resident, self._outside, self._parent, self._children = (state.resident, state.outside,
                                                                       state.parent, state.children)
        self._hits, self._used, self._leader, self._countdown = state.hits, state.used, state.leader, state.countdown

    def choose_leader(self) -> None:
        """End an epoch: decay the experts' scores and maybe change leader (both paths call this).

        Restarts the epoch's countdown, zeroes the epoch's hits and, on a change of leader, rebuilds
        the set of resident keys the new leader does not hold; or, when the takeover rule says so,
        makes the tier a copy of an expert (:meth:`_become`).
        """
        self._countdown = self.epoch
        scores, hits = self.scores, self._hits
        for i, count in enumerate(hits):
            scores[i] = scores[i] * self.decay + count  # ~ hits over the last `window` accesses
            hits[i] = 0
        if self.takeover is not None:
            expert = self.takeover.step(scores, self._leader, self._copy_of)
            if expert >= 0 and self._used == len(self._resident) and self._become(expert):  # unit sizes only
                return
        best = self.switch_target()
        if best == self._leader:
            return
        lead, resident = self.experts[best], self._resident
        self._leader = best
        self._copy_of = -1
        self.switches += 1
        self._outside = OrderedDict((k, None) for k in resident if k not in lead)

    def _become(self, index: int) -> bool:
        """Make the tier a copy of expert ``index`` and follow it: drop what it lacks, load what it holds.

        False, changing nothing, where the expert holds more keys than the tier fits (W-TinyLFU and
        LIRS at a capacity of 1 keep 2).

        Loaded keys go to the least recently used end, in sorted order where the keys sort (the
        experts list their keys in different orders compiled and in Python; the tier's order must
        not depend on that), each with its remembered chain parent.
        """
        expert, resident = self.experts[index], self._resident
        held = list(expert)
        if len(held) > self.capacity:
            return False
        self._leader = self._copy_of = index  # first: insert() checks the leader holds what it loads
        for key in [k for k in resident if k not in expert]:
            self.remove(key)
        missing = [k for k in held if k not in resident]
        try:
            missing.sort()  # type: ignore[call-arg]
        except TypeError:  # keys of mixed types: the expert's own order
            pass
        lineage, touch = self._lineage, resident.move_to_end
        for key in reversed(missing):
            self.insert(key, 1, lineage.get(key))
            touch(key, last=False)
        self._outside = OrderedDict()  # the tier now holds only what the expert holds
        self.takeovers += 1
        self.loaded += len(missing)
        return True

    def switch_target(self) -> int:
        """The expert to follow from now on: the leader itself unless switching pays for itself.

        Switching is not free: the tier lacks what a challenger holds and misses once on each of
        those keys that comes back. So each challenger ahead of the leader on score is worth its
        lead minus ``switch_cost`` per key it holds that the tier lacks, and the one worth most
        wins; if none is worth more than zero the leader stays. (Asking only whether the top scorer
        pays, as before, can pick a dearer, worse expert: on multi2 at 25% of the keys W-TinyLFU
        and LIRS both paid for a switch at the same epoch, W-TinyLFU scoring higher and LIRS worth
        more after cost; following W-TinyLFU first left the tier at 0.604, LIRS directly 0.617.)
        """
        scores, lead, resident = self.scores, self._leader, self._resident
        best, best_net = lead, 0.0
        tier: npt.NDArray[np.int64] | None = None  # the tier's keys as an array, for compiled experts
        for i, expert in enumerate(self.experts):
            gain = scores[i] - scores[lead]
            if i == lead or gain < 1.0 or gain <= best_net:  # net <= gain: it cannot win
                continue
            missing_from = getattr(expert, "missing_from", None)
            if missing_from is not None:  # a compiled expert counts over the tier's keys, not its own
                if tier is None:
                    # the underlying dict's keys, in its storage order (any order counts the same): walking
                    # the OrderedDict's own links after many move_to_end calls is a cache miss a key, 8x slower
                    tier = np.fromiter(dict.keys(resident), dtype=np.int64, count=len(resident))
                lacking = missing_from(tier)
            else:
                held = list(expert)  # the keys it holds that the tier lacks, counted at C speed
                lacking = len(held) - sum(map(resident.__contains__, held))
            net = gain - self.switch_cost * lacking
            if net > best_net:
                best, best_net = i, net
        return best

    def admit(self, key: K, size: int = 1) -> bool:
        return key in self.experts[self._leader] or self._used + size <= self.capacity

    def insert(self, key: K, size: int = 1, parent: K | None = None) -> None:
        old = self._resident.get(key)
        self._resident[key] = size
        self._used += size - (old or 0)
        if key not in self.experts[self._leader]:
            self._outside[key] = None
        if parent is not None and parent != key and old is None:
            self._parent[key] = parent
            self._children.setdefault(parent, {})[key] = None
            if self.takeover is not None:
                self._lineage[key] = parent

    def remove(self, key: K) -> None:
        size = self._resident.pop(key, None)
        if size is None:
            return
        self._used -= size
        self._outside.pop(key, None)
        parent = self._parent.pop(key, None)
        if parent is not None:
            siblings = self._children[parent]
            siblings.pop(key, None)
            if not siblings:
                del self._children[parent]

    def victim(self) -> K:
        if not self._resident:
            raise TierFullError("predictive policy has no resident key to evict; the block is larger "
                                "than the tier's free space or the tier is empty: raise the capacity")
        key = next(iter(self._outside)) if self._outside else next(iter(self._resident))
        for _ in range(len(self._resident)):  # walk to the chain's tail; bounded against cycles
            children = self._children.get(key)
            if not children:
                break
            key = next(iter(children))
        return key


class SuccessorTable(Generic[K]):
    """Which key follows which, with counts: what the store's prefetcher predicts from.

    Fed from the access history in batches (and, at open, from the catalog's ``successors`` table,
    so a reopened store predicts from what the last process saw). Each key keeps at most
    ``max_successors`` followers as a Misra-Gries summary (a frequent follower is never lost, a
    count is never overestimated) and at most ``max_keys`` keys are tracked, the least recently fed
    going first. :meth:`likely` answers from a cache refreshed on every :meth:`add`, so the hot
    path (one lookup per get) does no arithmetic.
    """

    def __init__(self, *, threshold: float = 0.7, min_count: int = 2, max_successors: int = 8,
                 max_keys: int = 1 << 20) -> None:
        self.threshold = threshold
        self.min_count = max(1, min_count)
        self.max_successors = max(1, max_successors)
        self.max_keys = max(1, max_keys)
        self._followers: OrderedDict[K, dict[K, int]] = OrderedDict()
        self._out: dict[K, int] = {}
        self._likely: dict[K, tuple[K, ...]] = {}

    def __len__(self) -> int:
        return len(self._followers)

    def add(self, key: K, follower: K, count: int = 1) -> None:
        """Note that ``follower`` came right after ``key`` ``count`` more times."""
        table = self._followers.get(key)
        if table is None:
            table = self._followers[key] = {}
            if len(self._followers) > self.max_keys:
                gone, _ = self._followers.popitem(last=False)
                self._out.pop(gone, None)
                self._likely.pop(gone, None)
        else:
            self._followers.move_to_end(key)
        self._out[key] = self._out.get(key, 0) + count
        if follower in table or len(table) < self.max_successors:
            table[follower] = table.get(follower, 0) + count
        else:  # Misra-Gries: a newcomer wears everyone down instead of taking a seat
            cut = min(count, min(table.values()))
            for other in list(table):
                table[other] -= cut
                if table[other] <= 0:
                    del table[other]
            if count > cut and len(table) < self.max_successors:
                table[follower] = count - cut
        total = self._out[key]
        likely = tuple(k for k, n in sorted(table.items(), key=lambda kv: -kv[1])
                       if n >= self.min_count and n >= self.threshold * total)
        if likely:
            self._likely[key] = likely
        else:
            self._likely.pop(key, None)

    def probability(self, key: K, follower: K) -> float:
        """Estimated P(``follower`` comes right after ``key``)."""
        total = self._out.get(key, 0)
        table = self._followers.get(key)
        return table.get(follower, 0) / total if total and table else 0.0

    def likely(self, key: K) -> tuple[K, ...]:
        """Followers of ``key`` seen at least ``min_count`` times with probability >= ``threshold``."""
        return self._likely.get(key, ())


def next_access_estimate(access_count: int, last_access: float | None, interarrival_ewma: float | None,
                         now: float) -> dict[str, float | bool | None]:
    """What a block's statistics say of its next access (seconds; the catalog's ``block_stats`` row).

    ``expected_at`` is the last access plus the smoothed gap between accesses (None with fewer
    than two accesses); ``due_in`` how far that is from ``now`` (negative: overdue); ``overdue_by``
    how many gaps late it is. A block long overdue is what idle demotion and eviction give up first.
    """
    if access_count < 2 or last_access is None or not interarrival_ewma:
        return {"expected_at": None, "due_in": None, "overdue_gaps": None, "likely_soon": False}
    expected = last_access + interarrival_ewma
    overdue = max(0.0, (now - expected) / interarrival_ewma)
    return {"expected_at": expected, "due_in": expected - now, "overdue_gaps": overdue,
            "likely_soon": overdue < 1.0}
