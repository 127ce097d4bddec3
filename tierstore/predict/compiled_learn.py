"""The learned expert's replay (:func:`tierstore.predict.batch_replay.learn`) compiled with numba.

:func:`tierstore.predict.batch_replay.learn` is ~2/3 of the predictive policy's batch replay (the
tracker, the online logistic regression and the Belady expert's two heaps, sequential per access in
pure Python; BENCHMARKS.md, trace replay). :class:`CompiledLearner` keeps the same state in numpy
arrays indexed by the key (dense non-negative ints, as the trace simulator passes) and runs the same
loop as one numba kernel: the same floating-point operations in the same order (no fastmath, so
LLVM neither reassociates nor fuses them), the same sampling draws, the same heap order, so the
same weights, predictions and evictions. The pure-Python ``learn`` stays the reference:
``tests/test_predict_compiled.py`` checks that a policy replayed through this class makes the same
decisions on random traces.

The Python expert's heaps are lazy (a key's stale entries stay until they reach the top or a
compaction drops them); these are indexed (``pos[k]`` is key ``k``'s slot: an access updates its
one entry in place, an eviction removes it), so they hold only the keys the expert holds and never
pop or compact stale entries, which cost ~4/5 of the lazy kernel's time. Both are ordered by
(value, serial), a total order since serials are unique, and a key's one entry here is its latest
(only valid) entry there: whatever the layout, the top is the same entry the Python heap returns.

numba is optional at run time: :data:`AVAILABLE` says whether it imported; without it the policy
uses the Python path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError

if TYPE_CHECKING:
    from .predictor import PredictedNextUse, SimpleMLPredictor
    from .shadow_caches import Evictions

try:  # pragma: no branch - one of the two
    from numba import njit

    AVAILABLE = True
except ImportError:  # pragma: no cover - a core dependency, but the Python path does not need it
    AVAILABLE = False

    def njit(*args: Any, **kwargs: Any) -> Any:  # type: ignore[no-redef]
        """Without numba the kernels stay plain Python (the classes refuse to run them)."""
        return lambda f: f

__all__ = ["AVAILABLE", "CompiledLearner", "njit", "iheap_down", "iheap_remove", "iheap_set", "iheap_up"]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

# slots of the scalar state arrays
# (_CROWDED, the lazy heaps' compaction size, is no longer read: the heaps are indexed)
(_TICK, _DRAW, _CUT, _SAMPLES, _HORIZON, _SERIAL, _HELD, _CAPACITY, _FAR_N, _DUE_N, _EX_HEAD, _EX_LEN,
 _CROWDED) = range(13)
_FIRST_GAP, _ALPHA, _RATE, _LOG_H, _PATIENCE, _N1 = range(6)


@njit(cache=True, inline="always")
def iheap_up(val: F64, ser: I64, key: I64, pos: I64, i: int) -> int:  # pragma: no cover - compiled
    """Move slot ``i``'s entry up to its place (a hole moves down, the entry is written once)."""
    v, s, k = val[i], ser[i], key[i]
    while i > 0:
        parent = (i - 1) >> 1
        if v < val[parent] or (v == val[parent] and s < ser[parent]):
            val[i], ser[i], key[i] = val[parent], ser[parent], key[parent]
            pos[key[i]] = i
            i = parent
        else:
            break
    val[i], ser[i], key[i] = v, s, k
    pos[k] = i
    return i


@njit(cache=True, inline="always")
def iheap_down(val: F64, ser: I64, key: I64, pos: I64, n: int, i: int) -> None:  # pragma: no cover - compiled
    """Move slot ``i``'s entry down to its place."""
    v, s, k = val[i], ser[i], key[i]
    while True:
        small = 2 * i + 1
        if small >= n:
            break
        right = small + 1
        if right < n and (val[right] < val[small] or (val[right] == val[small] and ser[right] < ser[small])):
            small = right
        if val[small] < v or (val[small] == v and ser[small] < s):
            val[i], ser[i], key[i] = val[small], ser[small], key[small]
            pos[key[i]] = i
            i = small
        else:
            break
    val[i], ser[i], key[i] = v, s, k
    pos[k] = i


@njit(cache=True, inline="always")
def iheap_set(val: F64, ser: I64, key: I64, pos: I64, n: int, k: int, v: float, s: int) -> int:  # pragma: no cover
    """Give key ``k`` the entry (``v``, ``s``), in place if it has one; the heap's new length."""
    i = pos[k]
    if i < 0:
        i = n
        n += 1
    val[i], ser[i], key[i] = v, s, k
    if iheap_up(val, ser, key, pos, i) == i:
        iheap_down(val, ser, key, pos, n, i)
    return n


@njit(cache=True, inline="always")
def iheap_remove(val: F64, ser: I64, key: I64, pos: I64, n: int, k: int) -> int:  # pragma: no cover - compiled
    """Drop key ``k``'s entry; the heap's new length."""
    i = pos[k]
    pos[k] = -1
    n -= 1
    if i != n:
        val[i], ser[i], key[i] = val[n], ser[n], key[n]
        if iheap_up(val, ser, key, pos, i) == i:
            iheap_down(val, ser, key, pos, n, i)
    return n


@njit(cache=True)
def _learn(keys: I64, ints: I64, floats: F64, weights: F64, count: I64, last_tick: I64, gap: F64,
           last_gap: I64, pend_tick: I64, pend_x: F64, ex_tick: I64, ex_key: I64, probability: F64,
           belady: bool, version: I64, far_val: F64, far_ser: I64, far_key: I64, far_pos: I64, due_val: F64,
           due_ser: I64, due_key: I64, due_pos: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:  # pragma: no cover
    for i in range(len(keys)):  # a key past the arrays: touch nothing, the caller grows them
        if keys[i] < 0 or keys[i] >= len(count):
            return -1, 0
    tick, draw, cut, samples, horizon = ints[_TICK], ints[_DRAW], ints[_CUT], ints[_SAMPLES], ints[_HORIZON]
    serial, held, capacity = ints[_SERIAL], ints[_HELD], ints[_CAPACITY]
    far_n, due_n, ex_head, ex_len = ints[_FAR_N], ints[_DUE_N], ints[_EX_HEAD], ints[_EX_LEN]
    first_gap, alpha, rate, log_h = floats[_FIRST_GAP], floats[_ALPHA], floats[_RATE], floats[_LOG_H]
    patience, n1 = floats[_PATIENCE], floats[_N1]
    ring = len(ex_tick)
    w0, w1, w2, w3, w4, w5 = weights[0], weights[1], weights[2], weights[3], weights[4], weights[5]
    far_horizon = 2.0 * horizon
    hits = 0
    events = 0
    for i in range(len(keys)):
        key = keys[i]
        tick += 1
        repeat = count[key] > 0
        if not repeat:
            count[key] = 1
            last_tick[key] = tick
            gap[key] = 0.0
            last_gap[key] = 0
        else:
            g_ = tick - last_tick[key]
            if count[key] == 1:
                gap[key] = float(g_)
                first_gap = g_ if first_gap == 0.0 else first_gap + 0.01 * (g_ - first_gap)
            else:
                gap[key] += alpha * (g_ - gap[key])
            count[key] += 1
            last_gap[key] = g_
            last_tick[key] = tick
        # the returned key's sample (label 1) first, then the expired ones (label 0)
        for phase in range(2):
            while True:
                if phase == 0:
                    if pend_tick[key] < 0:
                        break
                    row = key
                    label = 1.0
                    pend_tick[key] = -1
                else:
                    if ex_len == 0 or ex_tick[ex_head] >= tick - horizon:
                        break
                    born, gone = ex_tick[ex_head], ex_key[ex_head]
                    ex_head = ex_head + 1 if ex_head + 1 < ring else 0
                    ex_len -= 1
                    if pend_tick[gone] != born:
                        continue
                    pend_tick[gone] = -1
                    row = gone
                    label = 0.0
                x1, x2, x3, x4, x5 = pend_x[row, 0], pend_x[row, 1], pend_x[row, 2], pend_x[row, 3], pend_x[row, 4]
                z = w0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5
                z = 30.0 if z > 30.0 else (-30.0 if z < -30.0 else z)
                step = rate * (label - 1.0 / (1.0 + math.exp(-z)))
                w0 += step
                w1 += step * x1
                w2 += step * x2
                w3 += step * x3
                w4 += step * x4
                w5 += step * x5
                samples += 1
                if phase == 0:
                    break
        if repeat:
            g = gap[key]
            x3 = math.log1p(g) / log_h
            if x3 > 2.0:
                x3 = 2.0
            x4 = math.log1p(last_gap[key]) / log_h
            if x4 > 2.0:
                x4 = 2.0
            x1 = math.log1p(count[key]) * 0.25
            x5 = 1.0 if g <= horizon else 0.0
            z = w0 + w1 * x1 + w2 * 0.0 + w3 * x3 + w4 * x4 + w5 * x5
            draw = (draw * 1664525 + 1013904223) & 0xFFFFFFFF
            if draw < cut:
                pend_tick[key] = tick
                pend_x[key, 0], pend_x[key, 1], pend_x[key, 2], pend_x[key, 3], pend_x[key, 4] = x1, 0.0, x3, x4, x5
                slot = ex_head + ex_len
                ex_tick[slot % ring], ex_key[slot % ring] = tick, key
                ex_len += 1
        else:
            z = w0 + w1 * n1 + w2 * 1.0 + w3 * 1.0 + w4 * 1.0 + w5 * 0.0
            draw = (draw * 1664525 + 1013904223) & 0xFFFFFFFF
            if draw < cut:
                pend_tick[key] = tick
                pend_x[key, 0], pend_x[key, 1], pend_x[key, 2], pend_x[key, 3], pend_x[key, 4] = n1, 1.0, 1.0, 1.0, 0.0
                slot = ex_head + ex_len
                ex_tick[slot % ring], ex_key[slot % ring] = tick, key
                ex_len += 1
        z = 30.0 if z > 30.0 else (-30.0 if z < -30.0 else z)
        p = 1.0 / (1.0 + math.exp(-z))
        probability[key] = p
        if not belady:
            continue
        gap_ = gap[key] if repeat else (first_gap if first_gap > 1.0 else 1.0)
        double = 2.0 * gap_
        expected = tick + p * gap_ + (1.0 - p) * (double if double > far_horizon else far_horizon)
        if version[key] != 0:
            hits += 1
        elif held >= capacity:  # the heaps hold exactly the `held` keys: their tops are valid
            if due_val[0] >= tick:
                if -far_val[0] <= expected:
                    ev_at[events], ev_key[events] = i, key  # expected back last: not admitted
                    events += 1
                    continue
                victim = far_key[0]
            else:
                victim = due_key[0]
            version[victim] = 0
            held -= 1
            far_n = iheap_remove(far_val, far_ser, far_key, far_pos, far_n, victim)
            due_n = iheap_remove(due_val, due_ser, due_key, due_pos, due_n, victim)
            ev_at[events], ev_key[events] = i, victim
            events += 1
        if version[key] == 0:
            held += 1
        serial += 1
        version[key] = serial
        far_n = iheap_set(far_val, far_ser, far_key, far_pos, far_n, key, -expected, serial)
        ahead = expected - tick
        due_n = iheap_set(due_val, due_ser, due_key, due_pos, due_n, key,
                          tick + patience * (ahead if ahead > 1.0 else 1.0), serial)
    ints[_TICK], ints[_DRAW], ints[_SAMPLES], ints[_SERIAL], ints[_HELD] = tick, draw, samples, serial, held
    ints[_FAR_N], ints[_DUE_N], ints[_EX_HEAD], ints[_EX_LEN] = far_n, due_n, ex_head, ex_len
    floats[_FIRST_GAP] = first_gap
    weights[0], weights[1], weights[2], weights[3], weights[4], weights[5] = w0, w1, w2, w3, w4, w5
    return hits, events


class CompiledLearner:
    """The predictor's tracker, regression and Belady expert as arrays, replayed by one numba kernel.

    Built from a *fresh* predictor (and its Belady expert, if the panel has one) and used instead of
    :func:`tierstore.predict.batch_replay.learn` from then on; the Python objects are left as they
    were. Keys must be non-negative ints (the simulator's dense key ids); the arrays grow to the
    largest key seen. ``in``/``iter`` answer for the Belady expert's contents, as the panel asks.
    """

    name = "predicted"
    dense = True  # run() takes an int64 array (the batch replay passes its dense slice)

    def __init__(self, predictor: SimpleMLPredictor[Any], expert: PredictedNextUse[Any] | None) -> None:
        if not AVAILABLE:
            raise ConfigError("the compiled replay needs numba: pip install numba (or replay without compiled=True)")
        if predictor.tracker.tick or predictor.samples:
            raise ConfigError("the compiled replay starts from a fresh policy; this one has already seen accesses")
        tracker = predictor.tracker
        self.belady = expert is not None
        capacity = expert.capacity if expert is not None else 1
        crowded = 4 * capacity + 64  # batch_replay.CROWDED, as the Python expert compacts
        self.ints = np.zeros(13, dtype=np.int64)
        learned = predictor.export_state()
        self.ints[[_DRAW, _CUT, _HORIZON, _CAPACITY, _CROWDED]] = (learned.draw, learned.cut,
                                                                  predictor.horizon, capacity, crowded)
        self.floats = np.array([tracker.first_gap, tracker.alpha, predictor.learning_rate, learned.log_horizon,
                                expert.patience if expert is not None else 2.0, math.log1p(1) * 0.25])
        self.weights = np.array(predictor.weights, dtype=np.float64)
        self._size = 0
        self.ex_tick = np.zeros(predictor.horizon + 2, dtype=np.int64)
        self.ex_key = np.zeros(predictor.horizon + 2, dtype=np.int64)
        heap = capacity + 1  # indexed heaps: one entry per key the expert holds
        self.far = (np.zeros(heap), np.zeros(heap, dtype=np.int64), np.zeros(heap, dtype=np.int64))
        self.due = (np.zeros(heap), np.zeros(heap, dtype=np.int64), np.zeros(heap, dtype=np.int64))
        self._ev_at = np.zeros(0, dtype=np.int64)
        self._ev_key = np.zeros(0, dtype=np.int64)
        self._grow(1024)

    def _grow(self, size: int) -> None:
        old = self._size

        def extend(a: Any, fill: float, shape: tuple[int, ...] = ()) -> Any:
            more = np.full((size - old, *shape), fill, dtype=a.dtype)
            return np.concatenate([a, more]) if old else more

        i64, f64 = np.zeros(0, dtype=np.int64), np.zeros(0)
        self.count = extend(getattr(self, "count", i64), 0)
        self.last_tick = extend(getattr(self, "last_tick", i64), 0)
        self.gap = extend(getattr(self, "gap", f64), 0.0)
        self.last_gap = extend(getattr(self, "last_gap", i64), 0)
        self.pend_tick = extend(getattr(self, "pend_tick", i64), -1)
        self.pend_x = extend(getattr(self, "pend_x", np.zeros((0, 5))), 0.0, (5,))
        self.probability = extend(getattr(self, "probability", f64), 0.0)
        self.version = extend(getattr(self, "version", i64), 0)
        self.far_pos = extend(getattr(self, "far_pos", i64), -1)  # each key's slot in the heaps (-1: none)
        self.due_pos = extend(getattr(self, "due_pos", i64), -1)
        self._size = size

    def run(self, keys: I64, evicted: Evictions[int] | None) -> int:
        """Process ``keys`` (an int64 array); the Belady expert's hits; its evictions into ``evicted``."""
        if len(self._ev_at) < len(keys):  # eviction buffers, reused: an epoch can be 64 accesses
            self._ev_at = np.zeros(max(len(keys), 2 * len(self._ev_at)), dtype=np.int64)
            self._ev_key = np.zeros(len(self._ev_at), dtype=np.int64)
        ev_at, ev_key = self._ev_at, self._ev_key
        hits, events = self._kernel(keys, ev_at, ev_key)
        if hits < 0:  # a key past the arrays (the kernel checks first and touches nothing), or a negative one
            if int(keys.min()) < 0:
                raise ConfigError("the compiled replay takes non-negative int keys (dense ids); got a negative one")
            self._grow(max(int(keys.max()) + 1, 2 * self._size))
            hits, events = self._kernel(keys, ev_at, ev_key)
        if evicted is not None and events:
            evicted.extend(zip(ev_at[:events].tolist(), ev_key[:events].tolist(), strict=True))
        return int(hits)

    def _kernel(self, keys: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:
        return _learn(keys, self.ints, self.floats, self.weights, self.count, self.last_tick,
                      self.gap, self.last_gap, self.pend_tick, self.pend_x, self.ex_tick, self.ex_key,
                      self.probability, self.belady, self.version, *self.far, self.far_pos, *self.due, self.due_pos,
                      ev_at, ev_key)

    def access(self, key: int) -> int | None:
        """Not available: the compiled state is replayed a batch at a time (:meth:`run`)."""
        raise ConfigError("the compiled learner replays batches (simulate); it has no per-access path")

    def missing_from(self, tier: I64) -> int:
        """How many keys the Belady expert holds that are not among ``tier`` (distinct keys it has seen)."""
        return int(self.ints[_HELD]) - int(np.count_nonzero(self.version[tier]))

    @property
    def samples(self) -> int:
        """Training samples the regression has taken."""
        return int(self.ints[_SAMPLES])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and 0 <= key < self._size and bool(self.version[key])

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.version).tolist())
