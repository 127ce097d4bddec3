"""LRU and LIRS shadow caches compiled with numba, for the predictive policy's batch replay.

Once the learned expert and the ARC, S3-FIFO and W-TinyLFU shadows were compiled
(:mod:`tierstore.predict.compiled_learn`, :mod:`tierstore.predict.compiled_shadows`), the pure-Python
:class:`tierstore.predict.shadow_caches.ShadowLIRS` and :class:`~tierstore.predict.shadow_caches.ShadowLRU`
were the costliest members of the panel left (about a third and a tenth of a compiled replay of
orm-busy at 1% of its keys). These twins keep the same state with each ``OrderedDict`` as a doubly
linked list over dense int keys (LIRS's stack and queue as two separate lists, since a resident
HIR key sits in both) and make the same decisions access for access
(``tests/test_predict_compiled.py``); the Python classes stay the reference. Keys are non-negative
ints; the arrays grow to the largest one seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from .compiled_learn import njit
from .compiled_lists import Buffers, append, out_of_range, pop_front, unlink

__all__ = ["CompiledLIRS", "CompiledLRU"]

I64 = npt.NDArray[np.int64]

# LIRS states, as ShadowLIRS._state (0: not remembered)
_LIR, _HIR, _GHOST = 1, 2, 3
# slots of CompiledLIRS.ints
_LIRS, _GHOSTS, _CAPACITY, _LIR_CAP = range(4)


@njit(cache=True)
def _lru(keys: I64, capacity: int, where: I64, prev: I64, nxt: I64, ends: I64, size: I64, ev_at: I64,
         ev_key: I64) -> tuple[int, int]:  # pragma: no cover - compiled
    if out_of_range(keys, len(where)):
        return -1, 0
    hits = 0
    events = 0
    for i in range(len(keys)):
        key = keys[i]
        if where[key]:
            unlink(where, prev, nxt, ends, size, key)
            append(where, prev, nxt, ends, size, 1, key)
            hits += 1
            continue
        if size[1] >= capacity:
            ev_at[events], ev_key[events] = i, pop_front(where, prev, nxt, ends, size, 1)
            events += 1
        append(where, prev, nxt, ends, size, 1, key)
    return hits, events


@njit(cache=True, inline="always")
def _to_end(where: I64, prev: I64, nxt: I64, ends: I64, size: I64, k: int) -> None:  # pragma: no cover
    """``od[k] = None; od.move_to_end(k)`` on list 1."""
    if where[k]:
        unlink(where, prev, nxt, ends, size, k)
    append(where, prev, nxt, ends, size, 1, k)


@njit(cache=True, inline="always")
def _set(where: I64, prev: I64, nxt: I64, ends: I64, size: I64, k: int) -> None:  # pragma: no cover
    """``od[k] = None`` on list 1 (a key already there keeps its place)."""
    if not where[k]:
        append(where, prev, nxt, ends, size, 1, k)


@njit(cache=True, inline="always")
def _prune(ints: I64, state: I64, s_in: I64, s_prev: I64, s_nxt: I64, s_ends: I64,
           s_size: I64) -> None:  # pragma: no cover - compiled
    while s_size[1]:
        k = s_ends[1, 0]
        if state[k] == _LIR:
            return
        unlink(s_in, s_prev, s_nxt, s_ends, s_size, k)
        if state[k] == _GHOST:
            state[k] = 0
            ints[_GHOSTS] -= 1


@njit(cache=True, inline="always")
def _promote(key: int, ints: I64, state: I64, s_in: I64, s_prev: I64, s_nxt: I64, s_ends: I64, s_size: I64,
             q_in: I64, q_prev: I64, q_nxt: I64, q_ends: I64, q_size: I64) -> None:  # pragma: no cover
    _to_end(s_in, s_prev, s_nxt, s_ends, s_size, key)
    state[key] = _LIR
    ints[_LIRS] += 1
    bottom = pop_front(s_in, s_prev, s_nxt, s_ends, s_size, 1)  # ShadowLIRS._demote_bottom
    state[bottom] = _HIR
    _set(q_in, q_prev, q_nxt, q_ends, q_size, bottom)
    ints[_LIRS] -= 1
    _prune(ints, state, s_in, s_prev, s_nxt, s_ends, s_size)


@njit(cache=True, inline="always")
def _forget_ghosts(ints: I64, state: I64, s_in: I64, s_prev: I64, s_nxt: I64, s_ends: I64,
                   s_size: I64) -> None:  # pragma: no cover - compiled
    drop = ints[_GHOSTS] - ints[_CAPACITY]  # the oldest `drop` ghosts, bottom of the stack first
    k = s_ends[1, 0]
    while k >= 0 and drop > 0:
        after = s_nxt[k]
        if state[k] == _GHOST:
            unlink(s_in, s_prev, s_nxt, s_ends, s_size, k)
            state[k] = 0
            ints[_GHOSTS] -= 1
            drop -= 1
        k = after
    _prune(ints, state, s_in, s_prev, s_nxt, s_ends, s_size)


@njit(cache=True)
def _lirs(keys: I64, ints: I64, state: I64, s_in: I64, s_prev: I64, s_nxt: I64, s_ends: I64, s_size: I64,
          q_in: I64, q_prev: I64, q_nxt: I64, q_ends: I64, q_size: I64, ev_at: I64,
          ev_key: I64) -> tuple[int, int]:  # pragma: no cover - compiled
    if out_of_range(keys, len(state)):
        return -1, 0
    capacity, lir_cap = ints[_CAPACITY], ints[_LIR_CAP]
    hits = 0
    events = 0
    for i in range(len(keys)):
        key = keys[i]
        was = state[key]
        if was == _LIR:
            hits += 1
            bottom = s_ends[1, 0] == key
            _to_end(s_in, s_prev, s_nxt, s_ends, s_size, key)
            if bottom:
                _prune(ints, state, s_in, s_prev, s_nxt, s_ends, s_size)
            continue
        if was == _HIR:
            hits += 1
            unlink(q_in, q_prev, q_nxt, q_ends, q_size, key)
            if s_in[key]:  # its reuse is recent enough: it becomes LIR
                _promote(key, ints, state, s_in, s_prev, s_nxt, s_ends, s_size, q_in, q_prev, q_nxt, q_ends, q_size)
            else:
                _set(s_in, s_prev, s_nxt, s_ends, s_size, key)
                _set(q_in, q_prev, q_nxt, q_ends, q_size, key)
            continue
        if ints[_LIRS] < lir_cap and not q_size[1]:  # filling up: the first keys are LIR
            if was == _GHOST:
                ints[_GHOSTS] -= 1
            _to_end(s_in, s_prev, s_nxt, s_ends, s_size, key)
            state[key] = _LIR
            ints[_LIRS] += 1
            continue
        if ints[_LIRS] + q_size[1] >= capacity:
            gone = pop_front(q_in, q_prev, q_nxt, q_ends, q_size, 1)
            if s_in[gone]:
                state[gone] = _GHOST
                ints[_GHOSTS] += 1
            else:
                state[gone] = 0
            ev_at[events], ev_key[events] = i, gone
            events += 1
        if was == _GHOST:  # back while still remembered: its reuse distance beats the bottom LIR key's
            ints[_GHOSTS] -= 1
            _promote(key, ints, state, s_in, s_prev, s_nxt, s_ends, s_size, q_in, q_prev, q_nxt, q_ends, q_size)
        else:
            _set(s_in, s_prev, s_nxt, s_ends, s_size, key)
            _set(q_in, q_prev, q_nxt, q_ends, q_size, key)
            state[key] = _HIR
        if ints[_GHOSTS] > 2 * capacity:
            _forget_ghosts(ints, state, s_in, s_prev, s_nxt, s_ends, s_size)
    return hits, events


class _List:
    """One doubly linked list over dense int keys (``where[k]``: 1 if k is on it)."""

    def __init__(self) -> None:
        self.ends = np.full((2, 2), -1, dtype=np.int64)
        self.size = np.zeros(2, dtype=np.int64)
        self.where = np.zeros(0, dtype=np.int64)
        self.prev = np.zeros(0, dtype=np.int64)
        self.nxt = np.zeros(0, dtype=np.int64)

    def grow(self, more: int) -> None:
        self.where = np.concatenate([self.where, np.zeros(more, dtype=np.int64)])
        self.prev = np.concatenate([self.prev, np.full(more, -1, dtype=np.int64)])
        self.nxt = np.concatenate([self.nxt, np.full(more, -1, dtype=np.int64)])


class CompiledLRU(Buffers):
    """:class:`tierstore.predict.shadow_caches.ShadowLRU`, compiled (one list, least recent first)."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(1, capacity)
        self.order = _List()

    def _grow_to(self, top: int) -> None:
        if top > len(self.order.where):
            self.order.grow(max(top, 2 * len(self.order.where), 1024) - len(self.order.where))

    def _kernel(self, keys: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:
        o = self.order
        return _lru(keys, self.capacity, o.where, o.prev, o.nxt, o.ends, o.size, ev_at, ev_key)

    def missing_from(self, tier: I64) -> int:
        """How many keys this shadow holds that are not among ``tier`` (distinct keys it has seen)."""
        return int(self.order.size[1]) - int(np.count_nonzero(self.order.where[tier]))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and 0 <= key < len(self.order.where) and bool(self.order.where[key])

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.order.where).tolist())


class CompiledLIRS(Buffers):
    """:class:`tierstore.predict.shadow_caches.ShadowLIRS`, compiled (a stack list and a queue list)."""

    name = "lirs"

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(2, capacity)
        hir_cap = max(1, self.capacity // 100)
        self.ints = np.array([0, 0, self.capacity, self.capacity - hir_cap], dtype=np.int64)
        self.state = np.zeros(0, dtype=np.int64)
        self.stack, self.queue = _List(), _List()

    def _grow_to(self, top: int) -> None:
        if top > len(self.state):
            more = max(top, 2 * len(self.state), 1024) - len(self.state)
            self.state = np.concatenate([self.state, np.zeros(more, dtype=np.int64)])
            self.stack.grow(more)
            self.queue.grow(more)

    def _kernel(self, keys: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:
        s, q = self.stack, self.queue
        return _lirs(keys, self.ints, self.state, s.where, s.prev, s.nxt, s.ends, s.size,
                     q.where, q.prev, q.nxt, q.ends, q.size, ev_at, ev_key)

    def missing_from(self, tier: I64) -> int:
        """How many keys this shadow holds that are not among ``tier`` (distinct keys it has seen)."""
        state = self.state[tier]
        inside = int(np.count_nonzero((state == _LIR) | (state == _HIR)))
        return int(self.ints[_LIRS]) + int(self.queue.size[1]) - inside

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and 0 <= key < len(self.state) and int(self.state[key]) in (_LIR, _HIR)

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero((self.state == _LIR) | (self.state == _HIR)).tolist())
