"""What the compiled shadows share: doubly linked lists over dense int keys, and the wrapper plumbing.

A shadow's ``OrderedDict`` or ``deque`` becomes a list here: ``where[k]`` is the list holding key
``k`` (0: none), ``prev[k]``/``nxt[k]`` its neighbours (-1: none), ``ends[l] = head, tail`` and
``size[l]`` describe list ``l`` (1-based, as ``where``). A key sits in at most one list of a set
of arrays; a policy whose key can be in two structures at once (LIRS) keeps two sets.

:class:`Buffers` is the Python side every compiled expert shares: eviction buffers reused from
one batch to the next (a batch of the replay is an epoch, as short as 64 accesses, so the
per-call costs around a kernel matter as much as the kernel: allocating two buffers and finding a
batch's smallest and largest key cost more than an ARC kernel's 64 accesses), and growing the key
arrays only when a kernel reports, through :func:`out_of_range`, a key past them.

The list operations are inlined into each kernel at numba's level (``inline="always"``): numba
compiles every function into a module of its own, so LLVM never inlines a call across them, and
a called ``append``/``unlink`` made the LRU kernel 1.8x slower (180 against 99 ns an access).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from .compiled_learn import AVAILABLE, njit

if TYPE_CHECKING:
    from .shadow_caches import Evictions

__all__ = ["Buffers", "append", "out_of_range", "pop_front", "unlink"]

I64 = npt.NDArray[np.int64]


@njit(cache=True)
def out_of_range(keys: I64, size: int) -> bool:  # pragma: no cover - compiled
    """Whether a key is negative or not below ``size`` (the kernels check before touching any state)."""
    for i in range(len(keys)):  # noqa: SIM110 - a loop numba compiles
        if keys[i] < 0 or keys[i] >= size:
            return True
    return False


@njit(cache=True, inline="always")
def append(where: I64, prev: I64, nxt: I64, ends: I64, size: I64, lst: int, k: int) -> None:  # pragma: no cover
    tail = ends[lst, 1]
    where[k], prev[k], nxt[k] = lst, tail, -1
    if tail >= 0:
        nxt[tail] = k
    else:
        ends[lst, 0] = k
    ends[lst, 1] = k
    size[lst] += 1


@njit(cache=True, inline="always")
def unlink(where: I64, prev: I64, nxt: I64, ends: I64, size: I64, k: int) -> None:  # pragma: no cover
    lst, p, n = where[k], prev[k], nxt[k]
    if p >= 0:
        nxt[p] = n
    else:
        ends[lst, 0] = n
    if n >= 0:
        prev[n] = p
    else:
        ends[lst, 1] = p
    where[k] = 0
    size[lst] -= 1


@njit(cache=True, inline="always")
def pop_front(where: I64, prev: I64, nxt: I64, ends: I64, size: I64, lst: int) -> int:  # pragma: no cover
    k = int(ends[lst, 0])
    unlink(where, prev, nxt, ends, size, k)
    return k


class Buffers(ABC):
    """The Python side of a compiled expert (a base class): :meth:`run` around its kernel.

    A subclass implements ``_kernel(keys, ev_at, ev_key) -> (hits, events)`` (hits -1, touching
    nothing, when a key is out of range: :func:`out_of_range`) and ``_grow_to(top)`` (make every
    per-key array at least ``top`` long, if it is not). The eviction buffers are reused from one
    batch to the next, and the key arrays grow only when the kernel asks.
    """

    name = "compiled"
    dense = True  # run() takes an int64 array (the batch replay passes its dense slice)

    def __init__(self) -> None:
        if not AVAILABLE:
            raise ConfigError("the compiled shadows need numba: pip install numba (or replay without compiled=True)")
        self._ev_at = np.zeros(0, dtype=np.int64)
        self._ev_key = np.zeros(0, dtype=np.int64)

    @abstractmethod
    def _kernel(self, keys: I64, ev_at: I64, ev_key: I64) -> tuple[int, int]:
        """Run the compiled kernel over ``keys``: ``(hits, evictions written)``, hits -1 if a key is out of range."""

    @abstractmethod
    def _grow_to(self, top: int) -> None:
        """Make every per-key array at least ``top`` long."""

    def run(self, keys: I64, evicted: Evictions[int] | None = None) -> int:
        """Process ``keys`` (an int64 array); the hits; evictions into ``evicted``."""
        if len(self._ev_at) < len(keys):
            self._ev_at = np.zeros(max(len(keys), 2 * len(self._ev_at)), dtype=np.int64)
            self._ev_key = np.zeros(len(self._ev_at), dtype=np.int64)
        ev_at, ev_key = self._ev_at, self._ev_key
        hits, events = self._kernel(keys, ev_at, ev_key)
        if hits < 0:  # a key past the arrays, or a negative one
            if int(keys.min()) < 0:
                raise ConfigError("the compiled replay takes non-negative int keys (dense ids); got a negative one")
            self._grow_to(int(keys.max()) + 1)
            hits, events = self._kernel(keys, ev_at, ev_key)
        if evicted is not None and events:
            evicted.extend(zip(ev_at[:events].tolist(), ev_key[:events].tolist(), strict=True))
        return int(hits)

    def access(self, key: int) -> int | None:
        """Not available: the compiled experts replay batches (:meth:`run`)."""
        raise ConfigError(f"the compiled {self.name} replays batches (simulate); it has no per-access path")
