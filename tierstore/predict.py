"""Access statistics -> predictions (reuse, next access, successors) and the predictive policy.

Pure: no I/O, no threads, no clocks. The caller passes ``now`` with each access (seconds in the
store, the access index in the simulator); everything else is counted in *ticks*, one per access.

* :class:`AccessPatternTracker` (from :mod:`tierstore.access_tracker`) keeps per-key statistics
  online: count, last access, an EWMA of the gap between accesses, a bounded "which key followed
  which" table and a window of the last ``prediction_window`` keys.
* :class:`SimpleMLPredictor` is an online logistic regression over the tracker's features, trained
  on the stream itself: each access is a sample, labelled 1 when the key comes back within
  ``horizon`` ticks and 0 when the horizon passes first. Logistic regression, not something
  heavier, because it trains in O(features) per access in pure Python, never needs a batch, and its
  output is a probability that ``prediction_threshold`` can gate directly.
* :class:`PredictivePolicy` follows whichever of a panel of policies run as sampled shadows
  (:mod:`tierstore.shadow_caches`: the classics and a predicted-next-use expert) currently scores
  best on the recent stream.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

from .access_tracker import AccessPatternTracker, KeyStats
from .errors import ConfigError, TierFullError
from .shadow_caches import SHADOWS, ShadowCache, ShadowNextUse

__all__ = ["KeyStats", "AccessPatternTracker", "SimpleMLPredictor", "PredictivePolicy", "SuccessorTable"]

K = TypeVar("K", bound=Hashable)


_FEATURES = 8
EXPERTS = tuple(SHADOWS)


class SimpleMLPredictor(Generic[K]):
    """Online logistic regression: P(a key is accessed again within ``horizon`` ticks).

    Call :meth:`observe` after each ``tracker.record``. Each access becomes one training sample
    (features as of that access), labelled when its key returns (1) or when ``horizon`` ticks pass
    without it (0); at most one sample per key is pending, so memory is bounded by the horizon.
    """

    def __init__(self, tracker: AccessPatternTracker[K], *, horizon: int = 1000, threshold: float = 0.7,
                 learning_rate: float = 0.05) -> None:
        self.tracker = tracker
        self.horizon = max(1, horizon)
        self.threshold = threshold
        self.learning_rate = learning_rate
        self.weights = [0.0] * _FEATURES
        self.samples = 0
        self._log_horizon = math.log1p(self.horizon)
        self._pending: dict[K, tuple[int, list[float]]] = {}
        self._expiry: deque[tuple[int, K]] = deque()
        self._probability: dict[K, float] = {}

    def features(self, key: K, transition: float = 0.0) -> list[float]:
        """The features of ``key`` as of its last access; ``transition``: P(it followed its predecessor)."""
        tracker = self.tracker
        state = tracker.state(key)
        if state is None:
            return [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        log_h = self._log_horizon
        repeat = state.count > 1
        return [
            1.0,
            math.log1p(state.count) * 0.25,
            0.0 if repeat else 1.0,
            min(2.0, math.log1p(state.gap) / log_h) if repeat else 1.0,
            min(2.0, math.log1p(state.last_gap) / log_h) if repeat else 1.0,
            1.0 if repeat and state.gap <= self.horizon else 0.0,
            transition,
            min(1.0, (tracker.in_window(key) - 1) * 0.25),
        ]

    def _score(self, x: list[float]) -> float:
        w = self.weights  # unrolled: this runs twice per access, a generator costs 3x more
        z = (w[0] * x[0] + w[1] * x[1] + w[2] * x[2] + w[3] * x[3]
             + w[4] * x[4] + w[5] * x[5] + w[6] * x[6] + w[7] * x[7])
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def _train(self, x: list[float], label: float) -> None:
        step = self.learning_rate * (label - self._score(x))
        w = self.weights
        for i in range(_FEATURES):
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
        x = self.features(key, self.tracker.transition)
        pending[key] = (tick, x)
        expiry.append((tick, key))
        p = self._probability[key] = self._score(x)
        return p

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


_MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads consecutive ids over the sample space
_SPACE = 1 << 24
_MASK = _SPACE - 1


def _spot(key: Hashable) -> int:
    """Where ``key`` falls in ``[0, 2**24)``: a key is sampled when this is below rate * 2**24."""
    return ((hash(key) * _MIX) >> 20) & _MASK


class PredictivePolicy(Generic[K]):
    """Follow whichever of a panel of policies currently scores best, scored on a sample of keys.

    The panel: shadow copies (:mod:`tierstore.shadow_caches`) of LRU, FIFO, LFU, ARC, S3-FIFO,
    W-TinyLFU and a predicted-next-use expert (:class:`~tierstore.shadow_caches.ShadowNextUse`,
    Belady's rule on each key's last reuse gap, which is what wins on loops and scans). Like the
    miniature simulations of Waldspurger et al. (ATC'17, SHARDS), the panel sees only the keys whose
    hash falls in a spatial sample of rate ``sample_entries / capacity`` (all keys for small caches),
    each shadow scaled down to ``capacity * rate`` entries, so scoring costs one hash per access plus
    panel work on a few percent of them.

    One full-size copy of the leading expert runs on every access, and the tier follows its
    *contents*: it evicts first the resident keys the leader no longer holds (oldest first) and
    admits only what the leader admitted, so under a steady leader the tier holds exactly what that
    policy would. Every ``epoch`` accesses the panel's hit counts decay (a memory of about
    ``window`` accesses); a challenger takes over only when it leads by more than ``switch_cost``
    times the number of keys the candidate holds and the tier lacks (a switch costs up to one miss
    for each of them), and by more than ``confidence`` standard deviations of the sampled counts;
    while the tier is still filling, switching is free. A candidate is built and warmed by
    replaying the last ``4 * capacity`` accesses through it; a rejected one is retried after an
    exponentially growing number of epochs, so building candidates stays rare.

    ``capacity`` is in the unit of the sizes given to ``insert`` (entries by default). With byte
    sizes, pass ``block_size``, a typical block's size: the experts count ``capacity // block_size``
    entries. ``prediction_window`` and ``prediction_threshold`` (the config's knobs) are kept as
    attributes for the store's successor prefetch; the panel itself does not use them.

    Chains: ``insert(key, parent=...)`` links a key to the prefix it extends. The victim is always
    a key with no resident extensions: when the chosen key has some, its chain tail goes first,
    because a block is useless once any block before it is gone.
    """

    name = "predictive"

    def __init__(self, capacity: int, *, prediction_window: int = 200, prediction_threshold: float = 0.7,
                 experts: tuple[str, ...] = ("s3fifo", "arc", "wtinylfu", "nextuse", "lru", "lfu", "fifo"),
                 epoch: int | None = None, window: int | None = None, switch_cost: float = 1.0,
                 sample_entries: int = 1024, confidence: float = 2.0, patience: float = 2.0,
                 block_size: int = 1) -> None:
        if capacity < 1 or block_size < 1:
            raise ConfigError(f"the predictive policy needs a capacity of at least 1 entry, got {capacity} "
                              f"with block_size={block_size}")
        unknown = [e for e in experts if e not in SHADOWS]
        if unknown or not experts:
            raise ConfigError(f"unknown expert {', '.join(unknown) or '(none)'}; choose from {', '.join(SHADOWS)}")
        self.capacity = capacity
        entries = max(1, capacity // block_size)  # the experts count entries
        self.entries = entries
        self.prediction_window = prediction_window
        self.prediction_threshold = prediction_threshold
        self.names = tuple(experts)
        self.patience = patience
        self.rate = min(1.0, max(1, sample_entries) / entries)
        self._cut = int(self.rate * _SPACE) if self.rate < 1.0 else _SPACE
        self.experts: list[ShadowCache[K]] = [self._make(name, max(1, round(entries * self.rate)))
                                              for name in experts]
        self.epoch = epoch or max(64, entries // 8)
        self.window = max(window or max(8192, 16 * entries), 2 * self.epoch)
        self.decay = 1.0 - self.epoch / self.window
        self.switch_cost = switch_cost
        self.confidence = confidence
        self._wait = 0
        self._backoff = 1
        self.scores = [0.0] * len(experts)
        self.switches = 0
        self._hits = [0] * len(experts)
        self._leader = 0
        self._lead: ShadowCache[K] = self._make(experts[0], entries)
        self._history: deque[K] = deque(maxlen=4 * entries)
        self._countdown = self.epoch
        self._resident: OrderedDict[K, int] = OrderedDict()  # key -> size, least recently used first
        self._outside: OrderedDict[K, None] = OrderedDict()  # resident, but not held by the leader
        self._used = 0
        self._parent: dict[K, K] = {}
        # resident extensions of each key; dicts, not sets, so the walk to a tail is reproducible
        self._children: dict[K, dict[K, None]] = {}

    def _make(self, name: str, entries: int) -> ShadowCache[K]:
        if name == "nextuse":
            return ShadowNextUse(entries, patience=self.patience)
        shadow: ShadowCache[K] = SHADOWS[name](entries)
        return shadow

    @property
    def used(self) -> int:
        return self._used

    @property
    def leader(self) -> str:
        """Name of the expert the tier currently follows."""
        return self.names[self._leader]

    def __contains__(self, key: object) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def record_access(self, key: K, now: float) -> None:
        if self._cut == _SPACE or ((hash(key) * _MIX) >> 20) & _MASK < self._cut:  # _spot, inlined
            hits = self._hits
            for i, expert in enumerate(self.experts):
                if key in expert:
                    hits[i] += 1
                expert.access(key)
        self._history.append(key)
        lead = self._lead
        gone = lead.access(key)
        resident, outside = self._resident, self._outside
        if gone is not None and gone in resident:
            outside[gone] = None
        if key in resident:
            resident.move_to_end(key)
            if key in outside and key in lead:
                del outside[key]
        self._countdown -= 1
        if not self._countdown:
            self._choose_leader()

    def _choose_leader(self) -> None:
        self._countdown = self.epoch
        scores, hits = self.scores, self._hits
        for i, count in enumerate(hits):
            scores[i] = scores[i] * self.decay + count  # ~ sampled hits over the last `window` accesses
            hits[i] = 0
        best = max(range(len(scores)), key=scores.__getitem__)
        if best == self._leader:
            self._wait = 0
            return
        lead_gain = scores[best] - scores[self._leader]
        gain = lead_gain / self.rate  # in hits at full scale
        noise = self.confidence * math.sqrt(scores[best] + scores[self._leader])  # of sampled counts
        if gain < 1.0 or lead_gain <= noise or self._wait > 0:
            self._wait -= 1
            return
        lead = self._make(self.names[best], self.entries)
        for key in self._history:  # warm the candidate on the recent stream
            lead.access(key)
        # Switching is not free: the tier misses once on each key the new leader holds and the tier
        # lacks, when it comes back. Switch only when the lead outweighs that (free while filling).
        resident = self._resident
        missing = sum(1 for key in lead if key not in resident)
        if self._used >= self.capacity and gain <= self.switch_cost * missing:
            self._backoff = min(2 * self._backoff, 64)
            self._wait = self._backoff  # do not rebuild a candidate every epoch
            return
        self._backoff = 1
        self._leader = best
        self.switches += 1
        self._lead = lead
        self._outside = OrderedDict((k, None) for k in resident if k not in lead)

    def admit(self, key: K, size: int = 1) -> bool:
        return key in self._lead or self._used + size <= self.capacity

    def insert(self, key: K, size: int = 1, parent: K | None = None) -> None:
        old = self._resident.get(key)
        self._resident[key] = size
        self._used += size - (old or 0)
        if key not in self._lead:
            self._outside[key] = None
        if parent is not None and parent != key and old is None:
            self._parent[key] = parent
            self._children.setdefault(parent, {})[key] = None

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
        if self._children:
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
