"""ARC, S3-FIFO and W-TinyLFU shadow caches compiled with numba, for the predictive policy's batch replay.

After the learned expert (:mod:`tierstore.predict.compiled_learn`), W-TinyLFU, ARC and S3-FIFO are
the costliest members of the predictive policy's panel in pure Python (about 25%, 15% and 12% of a
replay). These classes keep the same state as :class:`tierstore.predict.shadow_caches.ShadowWTinyLFU`,
:class:`~tierstore.predict.shadow_caches.ShadowARC` and :class:`~tierstore.predict.shadow_caches.ShadowS3FIFO`,
with each ``OrderedDict`` or ``deque`` as a doubly linked list over dense int keys (each key sits in
at most one list of a shadow), and make the same
decisions access for access (``tests/test_predict_compiled.py``); the Python classes stay the
reference. Keys are non-negative ints; the arrays grow to the largest one seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from .compiled_learn import iheap_down, iheap_remove, iheap_set, njit
from .compiled_lists import Buffers, out_of_range
from .compiled_lists import append as _append
from .compiled_lists import pop_front as _pop_front
from .compiled_lists import unlink as _unlink

__all__ = ["CompiledARC", "CompiledLRFU", "CompiledS3FIFO", "CompiledWTinyLFU", "compiled_shadow"]

I64 = npt.NDArray[np.int64]

# Linked lists over dense int keys: tierstore.predict.compiled_lists (`where`, `prev`, `nxt`, `ends`, `size`).


@njit(cache=True)
def _wtinylfu(keys: I64, ints: I64, freq: I64, where: I64, prev: I64, nxt: I64, ends: I64, size: I64,
              ev_at: I64, ev_key: I64) -> tuple[int, int]:  # pragma: no cover - compiled
    if out_of_range(keys, len(where)):
        return -1, 0
    seen, sample, window_cap, main_cap, protected_cap = ints[0], ints[1], ints[2], ints[3], ints[4]
    hits = 0
    events = 0
    for i in range(len(keys)):
        key = keys[i]
        if freq[key] < 15:
            freq[key] += 1
        seen += 1
        if seen >= sample:  # age the counts (the Python dict drops the keys that fall to 0)
            for j in range(len(freq)):
                freq[j] >>= 1
            seen //= 2
        w = where[key]
        if w == 1 or w == 3:
            _unlink(where, prev, nxt, ends, size, key)
            _append(where, prev, nxt, ends, size, w, key)
            hits += 1
            continue
        if w == 2:
            hits += 1
            _unlink(where, prev, nxt, ends, size, key)
            _append(where, prev, nxt, ends, size, 3, key)
            if size[3] > protected_cap:
                demoted = _pop_front(where, prev, nxt, ends, size, 3)
                _append(where, prev, nxt, ends, size, 2, demoted)
            continue
        _append(where, prev, nxt, ends, size, 1, key)
        if size[1] <= window_cap:
            continue
        candidate = _pop_front(where, prev, nxt, ends, size, 1)
        if size[2] + size[3] < main_cap:
            _append(where, prev, nxt, ends, size, 2, candidate)
            continue
        queue = 2 if size[2] else 3
        victim = ends[queue, 0]
        if freq[candidate] > freq[victim]:
            _unlink(where, prev, nxt, ends, size, victim)
            _append(where, prev, nxt, ends, size, 2, candidate)
            gone = victim
        else:
            gone = candidate
        ev_at[events], ev_key[events] = i, gone
        events += 1
    ints[0] = seen
    return hits, events


@njit(cache=True, inline="always")
def _replace(where: I64, prev: I64, nxt: I64, ends: I64, size: I64, in_b2: bool, p: float) -> int:  # pragma: no cover
    t1 = size[1]
    if t1 and (t1 > p or (in_b2 and t1 == p)):
        gone = _pop_front(where, prev, nxt, ends, size, 1)
        _append(where, prev, nxt, ends, size, 3, gone)
    else:
        gone = _pop_front(where, prev, nxt, ends, size, 2)
        _append(where, prev, nxt, ends, size, 4, gone)
    return gone


@njit(cache=True)
def _arc(keys: I64, c: int, state: Any, where: I64, prev: I64, nxt: I64, ends: I64, size: I64,
         ev_at: I64, ev_key: I64) -> tuple[int, int]:  # pragma: no cover - compiled
    if out_of_range(keys, len(where)):
        return -1, 0
    p = state[0]
    hits = 0
    events = 0
    for i in range(len(keys)):
        key = keys[i]
        w = where[key]
        gone = -1
        if w == 2:
            _unlink(where, prev, nxt, ends, size, key)
            _append(where, prev, nxt, ends, size, 2, key)
            hits += 1
            continue
        if w == 1:
            _unlink(where, prev, nxt, ends, size, key)
            hits += 1
        elif w == 3:
            p = min(float(c), p + max(size[4] / size[3], 1.0))
            gone = _replace(where, prev, nxt, ends, size, False, p)
            _unlink(where, prev, nxt, ends, size, key)
        elif w == 4:
            p = max(0.0, p - max(size[3] / size[4], 1.0))
            gone = _replace(where, prev, nxt, ends, size, True, p)
            _unlink(where, prev, nxt, ends, size, key)
        else:
            l1 = size[1] + size[3]
            if l1 >= c:
                if size[1] < c:
                    _pop_front(where, prev, nxt, ends, size, 3)
                    gone = _replace(where, prev, nxt, ends, size, False, p)
                else:
                    gone = _pop_front(where, prev, nxt, ends, size, 1)
            elif l1 + size[2] + size[4] >= c:
                if l1 + size[2] + size[4] >= 2 * c:
                    _pop_front(where, prev, nxt, ends, size, 4)
                gone = _replace(where, prev, nxt, ends, size, False, p)
            _append(where, prev, nxt, ends, size, 1, key)
            if gone >= 0:
                ev_at[events], ev_key[events] = i, gone
                events += 1
            continue
        _append(where, prev, nxt, ends, size, 2, key)
        if gone >= 0:
            ev_at[events], ev_key[events] = i, gone
            events += 1
    state[0] = p
    return hits, events


@njit(cache=True, inline="always")
def _s3fifo_main(where: I64, prev: I64, nxt: I64, ends: I64, size: I64, freq: I64) -> int:  # pragma: no cover
    while size[2]:
        key = _pop_front(where, prev, nxt, ends, size, 2)
        if freq[key]:
            freq[key] -= 1
            _append(where, prev, nxt, ends, size, 2, key)
        else:
            freq[key] = -1
            return key
    return -1


@njit(cache=True)
def _s3fifo(keys: I64, caps: I64, freq: I64, where: I64, prev: I64, nxt: I64, ends: I64, size: I64,
            ev_at: I64, ev_key: I64) -> tuple[int, int]:  # pragma: no cover - compiled
    if out_of_range(keys, len(where)):
        return -1, 0
    capacity, small_cap, main_cap = caps[0], caps[1], caps[2]
    hits = 0
    events = 0
    for i in range(len(keys)):
        key = keys[i]
        count = freq[key]  # -1: not resident
        if count >= 0:
            if count < 3:
                freq[key] = count + 1
            hits += 1
            continue
        if size[1] + size[2] >= capacity:
            gone = -1
            if size[1] and (size[1] >= small_cap or not size[2]):
                while size[1]:
                    k = _pop_front(where, prev, nxt, ends, size, 1)
                    if freq[k]:  # touched while on probation: earns a place in main
                        freq[k] = 0
                        _append(where, prev, nxt, ends, size, 2, k)
                        if size[2] > main_cap:
                            gone = _s3fifo_main(where, prev, nxt, ends, size, freq)
                            break
                    else:
                        freq[k] = -1
                        _append(where, prev, nxt, ends, size, 3, k)
                        if size[3] > main_cap:
                            _pop_front(where, prev, nxt, ends, size, 3)
                        gone = k
                        break
                else:
                    gone = _s3fifo_main(where, prev, nxt, ends, size, freq)
            else:
                gone = _s3fifo_main(where, prev, nxt, ends, size, freq)
            if gone >= 0:
                ev_at[events], ev_key[events] = i, gone
                events += 1
        freq[key] = 0
        if where[key] == 3:
            _unlink(where, prev, nxt, ends, size, key)
            _append(where, prev, nxt, ends, size, 2, key)
        else:
            _append(where, prev, nxt, ends, size, 1, key)
    return hits, events


class _Lists(Buffers):
    """Linked lists over dense int keys (the arrays the kernels above share)."""

    held: tuple[int, ...] = (1, 2)  # the lists whose keys are resident

    def __init__(self, lists: int) -> None:
        super().__init__()
        self.ends = np.full((lists + 1, 2), -1, dtype=np.int64)
        self.size = np.zeros(lists + 1, dtype=np.int64)
        self.where = np.zeros(0, dtype=np.int64)
        self.prev = np.zeros(0, dtype=np.int64)
        self.nxt = np.zeros(0, dtype=np.int64)

    def _grow_to(self, top: int) -> None:
        if top > len(self.where):
            more = max(top, 2 * len(self.where), 1024) - len(self.where)
            self.where = np.concatenate([self.where, np.zeros(more, dtype=np.int64)])
            self.prev = np.concatenate([self.prev, np.full(more, -1, dtype=np.int64)])
            self.nxt = np.concatenate([self.nxt, np.full(more, -1, dtype=np.int64)])
            self._grown(more)

    def _grown(self, more: int) -> None:
        pass

    def missing_from(self, tier: I64) -> int:
        """How many keys this shadow holds that are not among ``tier`` (distinct keys it has seen)."""
        where = self.where[tier]
        inside = sum(int(np.count_nonzero(where == lst)) for lst in self.held)
        return int(sum(int(self.size[lst]) for lst in self.held)) - inside

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and 0 <= key < len(self.where) and int(self.where[key]) in self.held

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(np.isin(self.where, self.held)).tolist())


class CompiledWTinyLFU(_Lists):
    """:class:`tierstore.predict.shadow_caches.ShadowWTinyLFU`, compiled (lists 1 window, 2 probation, 3 protected)."""

    held = (1, 2, 3)
    name = "wtinylfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(3)
        self.capacity = max(1, capacity)
        window_cap = max(1, self.capacity // 100)
        main_cap = max(1, self.capacity - window_cap)
        self.ints = np.array([0, 10 * self.capacity, window_cap, main_cap, max(1, int(main_cap * 0.8))],
                             dtype=np.int64)
        self.freq = np.zeros(0, dtype=np.int64)

    def _grown(self, more: int) -> None:
        self.freq = np.concatenate([self.freq, np.zeros(more, dtype=np.int64)])

    def _kernel(self, keys: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:
        return _wtinylfu(keys, self.ints, self.freq, self.where, self.prev, self.nxt,
                         self.ends, self.size, ev_at, ev_key)


class CompiledARC(_Lists):
    """:class:`tierstore.predict.shadow_caches.ShadowARC`, compiled (lists 1 T1, 2 T2, 3 B1, 4 B2)."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(4)
        self.capacity = max(1, capacity)
        self.state = np.zeros(1)

    def _kernel(self, keys: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:
        return _arc(keys, self.capacity, self.state, self.where, self.prev, self.nxt,
                    self.ends, self.size, ev_at, ev_key)


class CompiledS3FIFO(_Lists):
    """:class:`tierstore.predict.shadow_caches.ShadowS3FIFO`, compiled (lists 1 small, 2 main, 3 ghost)."""

    name = "s3fifo"

    def __init__(self, capacity: int) -> None:
        super().__init__(3)
        self.capacity = max(1, capacity)
        small = max(1, self.capacity // 10)
        self.caps = np.array([self.capacity, small, max(1, self.capacity - small)], dtype=np.int64)
        self.freq = np.zeros(0, dtype=np.int64)

    def _grown(self, more: int) -> None:
        self.freq = np.concatenate([self.freq, np.full(more, -1, dtype=np.int64)])

    def _kernel(self, keys: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:
        return _s3fifo(keys, self.caps, self.freq, self.where, self.prev, self.nxt,
                       self.ends, self.size, ev_at, ev_key)


def compiled_shadow(expert: Any) -> Any:
    """The compiled twin of a fresh Python shadow (same capacity), or ``expert`` itself if it has none."""
    from .compiled_recency import CompiledLIRS, CompiledLRU
    from .shadow_caches import ShadowARC, ShadowLIRS, ShadowLRU, ShadowS3FIFO, ShadowWTinyLFU

    if hasattr(expert, "compiled"):  # the KV policy's adaptive LRFU: its twin on compiled LRFUs
        return expert.compiled()
    if isinstance(expert, ShadowS3FIFO):
        return CompiledS3FIFO(expert.capacity)
    if isinstance(expert, ShadowWTinyLFU):
        return CompiledWTinyLFU(expert.capacity)
    if isinstance(expert, ShadowARC):
        return CompiledARC(expert.capacity)
    if isinstance(expert, ShadowLIRS):
        return CompiledLIRS(expert.capacity)
    if isinstance(expert, ShadowLRU):
        return CompiledLRU(expert.capacity)
    return expert


@njit(cache=True)
def _lrfu(keys: I64, ints: I64, rate: float, value: Any, at: I64, version: I64, hval: Any, hser: I64, hkey: I64,
          pos: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:  # pragma: no cover - compiled
    if out_of_range(keys, len(version)):
        return -1, 0
    tick, serial, n, capacity = ints[0], ints[1], ints[2], ints[4]
    hits = 0
    events = 0
    for i in range(len(keys)):
        key = keys[i]
        tick += 1
        v = 1.0 if at[key] == 0 else value[key] * 2.0 ** ((at[key] - tick) * rate) + 1.0
        value[key], at[key] = v, tick
        if version[key] != 0:
            hits += 1
        elif n >= capacity:  # the heap holds exactly the resident keys: its top is the victim
            gone = hkey[0]
            n = iheap_remove(hval, hser, hkey, pos, n, gone)
            version[gone] = 0
            ev_at[events], ev_key[events] = i, gone
            events += 1
        serial += 1
        version[key] = serial
        n = iheap_set(hval, hser, hkey, pos, n, key, math.log2(v) + tick * rate, serial)
    ints[0], ints[1], ints[2], ints[3] = tick, serial, n, n
    return hits, events


@njit(cache=True)
def _rerank(ints: I64, rate: float, value: Any, at: I64, version: I64, hval: Any, hser: I64,
            hkey: I64, pos: I64) -> None:  # pragma: no cover - compiled
    n = 0
    for k in range(len(version)):
        if version[k]:
            hval[n], hser[n], hkey[n] = math.log2(value[k]) + at[k] * rate, version[k], k
            pos[k] = n
            n += 1
    for j in range((n >> 1) - 1, -1, -1):
        iheap_down(hval, hser, hkey, pos, n, j)
    ints[2], ints[3] = n, n


class CompiledLRFU(Buffers):
    """:class:`tierstore.predict.kv_policy.ShadowLRFU`, compiled (the same decisions on dense int keys).

    The Python shadow's heap is lazy (an access pushes a new entry; stale ones are popped when they
    reach the top, or dropped by a compaction once the heap is 4x the capacity); this one is indexed
    (``pos[k]`` is key ``k``'s slot, -1 if it has none: an access updates its one entry in place,
    an eviction removes it), so it holds exactly the resident keys and never pops or compacts a
    stale entry. Both order by (rank, serial), a total order since serials are unique, and a key's
    one entry here is its latest (only valid) entry there, so the top, the victim, is the same.
    """

    def __init__(self, capacity: int, half_life: float) -> None:
        super().__init__()
        self.capacity = max(1, capacity)
        self.half_life = max(1.0, float(half_life))
        self.name = f"lrfu{half_life / self.capacity:g}"
        self._rate = 1.0 / self.half_life
        self.ints = np.array([0, 0, 0, 0, self.capacity], dtype=np.int64)  # tick, serial, held, heap size, capacity
        heap = self.capacity + 1
        self.hval, self.hser, self.hkey = np.zeros(heap), np.zeros(heap, dtype=np.int64), np.zeros(heap, dtype=np.int64)
        self.value, self.at, self.version = np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self.pos = np.zeros(0, dtype=np.int64)

    def _grow_to(self, top: int) -> None:
        if top > len(self.version):
            more = max(top, 2 * len(self.version), 1024) - len(self.version)
            self.value = np.concatenate([self.value, np.zeros(more)])
            self.at = np.concatenate([self.at, np.zeros(more, dtype=np.int64)])
            self.version = np.concatenate([self.version, np.zeros(more, dtype=np.int64)])
            self.pos = np.concatenate([self.pos, np.full(more, -1, dtype=np.int64)])

    def rerank(self, half_life: float) -> None:
        """As :meth:`tierstore.predict.kv_policy.ShadowLRFU.rerank`."""
        self.half_life = max(1.0, float(half_life))
        self._rate = 1.0 / self.half_life
        _rerank(self.ints, self._rate, self.value, self.at, self.version, self.hval, self.hser, self.hkey, self.pos)

    def _kernel(self, keys: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:
        return _lrfu(keys, self.ints, self._rate, self.value, self.at, self.version,
                     self.hval, self.hser, self.hkey, self.pos, ev_at, ev_key)

    def missing_from(self, tier: I64) -> int:
        """How many keys this shadow holds that are not among ``tier`` (distinct keys it has seen)."""
        return int(self.ints[2]) - int(np.count_nonzero(self.version[tier]))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and 0 <= key < len(self.version) and bool(self.version[key])

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.version).tolist())
