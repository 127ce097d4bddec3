"""An offset allocator: slabs of size classes for small objects, page runs for large ones.

:class:`SlabAllocator` hands out byte ranges of ``[0, capacity)``; it never touches
memory, so the host tier (L2, an mmap) and the GPU tier (L1, a device buffer) share it.

* Small requests (up to about ``slab_size // 8``) round up to a size class. Classes step
  four times per power of two and are multiples of ``min_align``, so every slot is aligned
  to ``min_align`` and, from 4 * ``min_align`` up, rounding wastes at most 25%. A slab is
  ``slab_size`` bytes taken from the page runs for one class on demand and given back
  when it empties (or, for the slab a class is filling, as soon as the pages are needed).
* Large requests take a contiguous run of pages (``page_size``-aligned), best fit with
  ties to the lowest address; freed runs merge with free neighbours at once.

Every operation is O(1) or O(log n) (``bisect`` over a sorted list of free runs); nothing
walks all free runs or pages.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left, insort
from dataclasses import dataclass

import torch

from ..errors import ConfigError, UnsupportedTensorError

__all__ = ["Allocation", "AllocatorStats", "ClassStats", "SlabAllocator", "view_nbytes"]

# Each allocator (and each reset()) gets a fresh token, so an Allocation from another
# allocator, or from before a reset, is refused instead of freeing someone else's bytes.
_owner_tokens = itertools.count(1)

_LARGE = -1  # Allocation.slab for a page run


@dataclass(frozen=True, slots=True)
class Allocation:
    """A range ``[offset, offset + size)`` handed out by a :class:`SlabAllocator`.

    ``nbytes`` is what was asked for, ``size >= nbytes`` what was reserved. ``slab`` is
    the offset of the slab holding the slot, or -1 for a page run; ``owner`` identifies
    the allocator (and its reset generation). Both are internal bookkeeping.
    """

    offset: int
    size: int
    nbytes: int
    slab: int
    owner: int


# A frozen dataclass's __init__ routes each field through object.__setattr__, which costs
# ~1 us here, a third of an alloc/free pair; the slot descriptors do the same job in half.
_set_offset, _set_size, _set_nbytes, _set_slab, _set_owner = (
    getattr(Allocation, f).__set__ for f in ("offset", "size", "nbytes", "slab", "owner"))


def _new_allocation(offset: int, size: int, nbytes: int, slab: int, owner: int) -> Allocation:
    a = object.__new__(Allocation)
    _set_offset(a, offset)
    _set_size(a, size)
    _set_nbytes(a, nbytes)
    _set_slab(a, slab)
    _set_owner(a, owner)
    return a


_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


def view_nbytes(a: Allocation, dtype: torch.dtype, shape: tuple[int, ...], tier: str) -> int:
    """Bytes a ``dtype`` tensor of ``shape`` takes, checked against the slot ``a`` (for a tier's ``view``)."""
    if dtype in _QUANTIZED:
        raise UnsupportedTensorError(f"quantized dtype {dtype} cannot be viewed from raw bytes", tier=tier)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > a.nbytes:
        raise ValueError(f"a {dtype} tensor of shape {shape} needs {nbytes} bytes, "
                         f"but the slot holds {a.nbytes}; allocate a bigger slot")
    return nbytes


@dataclass(frozen=True, slots=True)
class ClassStats:
    """Occupancy of one size class."""

    size: int
    slabs: int
    slots_used: int
    slots_total: int


@dataclass(frozen=True, slots=True)
class AllocatorStats:
    """A snapshot of a :class:`SlabAllocator`.

    ``used`` counts reserved bytes (with rounding), ``requested`` the bytes asked for,
    ``free = capacity - used`` (free slots inside slabs included). ``largest_free_run`` is
    the biggest request that can be served now; ``fragmentation`` is
    ``1 - largest_free_run / free`` (0 when nothing is free).
    """

    capacity: int
    used: int
    requested: int
    free: int
    largest_free_run: int
    fragmentation: float
    per_class: tuple[ClassStats, ...]


class _Slab:
    """Mutable state of one slab: never-used slots from ``bump`` up, freed ones on a stack."""

    __slots__ = ("base", "bump", "cls", "free", "nslots", "size", "used")

    def __init__(self, base: int, cls: int, size: int, nslots: int) -> None:
        self.base = base
        self.cls = cls
        self.size = size
        self.nslots = nslots
        self.used = 0
        self.bump = 0  # no O(nslots) free list up front
        self.free: list[int] = []


class _PageRuns:
    """Free page runs over ``[0, capacity)``, best fit, merged with neighbours on free."""

    __slots__ = ("by_end", "by_size", "by_start")

    def __init__(self, capacity: int) -> None:
        self.by_size: list[tuple[int, int]] = []  # sorted (length, start)
        self.by_start: dict[int, int] = {}  # start -> length
        self.by_end: dict[int, int] = {}  # end -> start
        if capacity:
            self._add(0, capacity)

    def largest(self) -> int:
        return self.by_size[-1][0] if self.by_size else 0

    def take(self, length: int) -> int | None:
        """Start of a run of exactly ``length`` bytes, or None."""
        i = bisect_left(self.by_size, (length, -1))
        if i == len(self.by_size):
            return None
        run, start = self.by_size.pop(i)
        del self.by_start[start], self.by_end[start + run]
        if run > length:
            self._add(start + length, run - length)
        return start

    def give(self, start: int, length: int) -> None:
        """Return ``[start, start + length)``, merging it with free neighbours."""
        right = self.by_start.get(start + length)
        if right is not None:
            self._remove(start + length, right)
            length += right
        left = self.by_end.get(start)
        if left is not None:
            self._remove(left, start - left)
            length += start - left
            start = left
        self._add(start, length)

    def take_at(self, start: int, length: int) -> bool:
        """Take exactly ``[start, start + length)`` if it is free (a restore; O(free runs))."""
        for run_start, run in list(self.by_start.items()):
            if run_start <= start and start + length <= run_start + run:
                self._remove(run_start, run)
                if start > run_start:
                    self._add(run_start, start - run_start)
                if run_start + run > start + length:
                    self._add(start + length, run_start + run - start - length)
                return True
        return False

    def _add(self, start: int, length: int) -> None:
        insort(self.by_size, (length, start))
        self.by_start[start] = length
        self.by_end[start + length] = start

    def _remove(self, start: int, length: int) -> None:
        del self.by_size[bisect_left(self.by_size, (length, start))]
        del self.by_start[start], self.by_end[start + length]


def _class_sizes(min_align: int, max_small: int) -> tuple[int, ...]:
    """1..4 granules, then four steps per power of two, all multiples of ``min_align``."""
    sizes = [k * min_align for k in range(1, 5)]
    power = 4 * min_align
    while power < max_small:
        sizes.extend(power + k * (power // 4) for k in range(1, 5))
        power *= 2
    return tuple(s for s in sizes if s <= max_small)


def _class_lookup(classes: tuple[int, ...], granule: int) -> list[int]:
    """Class index for every request size in granules (0 included), for O(1) lookup."""
    lut: list[int] = []
    ci = 0
    for k in range(classes[-1] // granule + 1 if classes else 0):
        while classes[ci] < k * granule:
            ci += 1
        lut.append(ci)
    return lut


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class SlabAllocator:
    """Offset allocator over ``[0, capacity)``: size-class slabs plus best-fit page runs.

    ``capacity`` is rounded down to a multiple of ``page_size``; ``stats().capacity`` is
    the rounded value. ``slab_size`` is clamped so at least eight slabs fit (never below a
    page). A small request that finds no slab and no room for a new one falls back to a
    page run, so a nearly full allocator still serves it.

    The slab a class is filling stays with the class when it empties, so alternating
    alloc/free does not take and return a slab each time; such idle slabs go back to the
    page runs whenever a request finds no room, and before ``stats()``/``can_fit()``
    answer, so nothing they report depends on them.

    ``alloc(0)`` is allowed: it reserves one minimum slot, so the result has a unique
    offset like any other allocation.

    Not thread-safe: the tier that owns the allocator serialises calls under its lock.
    """

    def __init__(self, capacity: int, *, page_size: int = 4096, slab_size: int = 1 << 20,
                 min_align: int = 64) -> None:
        if capacity < 0:
            raise ConfigError(f"allocator capacity must be >= 0 bytes, got {capacity}")
        if not _is_power_of_two(page_size):
            raise ConfigError(f"page_size must be a power of two, got {page_size}")
        if not _is_power_of_two(min_align) or min_align > page_size:
            raise ConfigError(f"min_align must be a power of two <= page_size ({page_size}), got {min_align}")
        if slab_size < page_size or slab_size % page_size:
            raise ConfigError(f"slab_size must be a positive multiple of page_size ({page_size}), "
                              f"got {slab_size}")
        self._page = page_size
        self._capacity = capacity - capacity % page_size
        self._slab_size = max(page_size, min(slab_size, self._capacity // 8 // page_size * page_size))
        self._align = min_align
        self._shift = min_align.bit_length() - 1
        fits = min_align * 8 <= self._slab_size  # else no class fits and every request takes pages
        self._classes = _class_sizes(min_align, self._slab_size // 8) if fits else ()
        self._max_small = self._classes[-1] if self._classes else -1
        self._lut = _class_lookup(self._classes, min_align)
        self._nslots = tuple(self._slab_size // s for s in self._classes)
        self.reset()

    def reset(self) -> None:
        """Forget every allocation; allocations handed out before are refused by free()."""
        self._owner = next(_owner_tokens)
        self._runs = _PageRuns(self._capacity)
        self._live: dict[int, Allocation] = {}
        self._slabs: dict[int, _Slab] = {}
        self._active: list[_Slab | None] = [None] * len(self._classes)
        # Partially used slabs per class; a dict as an ordered set whose popitem() is O(1).
        self._partial: list[dict[int, _Slab]] = [{} for _ in self._classes]
        self._class_slabs = [0] * len(self._classes)
        self._class_used = [0] * len(self._classes)
        self._used = 0
        self._requested = 0

    @property
    def capacity(self) -> int:
        """Managed bytes (the constructor's capacity rounded down to a page)."""
        return self._capacity

    @property
    def class_sizes(self) -> tuple[int, ...]:
        """Slot sizes of the small-object classes, ascending."""
        return self._classes

    @property
    def page_size(self) -> int:
        """Alignment and granule of large allocations."""
        return self._page

    @property
    def slab_size(self) -> int:
        """Bytes per slab after clamping to the capacity."""
        return self._slab_size

    def class_index(self, nbytes: int) -> int:
        """Index into ``class_sizes`` serving ``nbytes``, or -1 when it takes a page run."""
        if nbytes < 0 or nbytes > self._max_small:
            return -1
        return self._lut[(nbytes + self._align - 1) >> self._shift]

    def alloc(self, nbytes: int) -> Allocation | None:
        """Reserve at least ``nbytes`` bytes; None when there is no room."""
        if nbytes <= self._max_small:
            if nbytes < 0:
                raise ValueError(f"cannot allocate a negative size ({nbytes} bytes)")
            ci = self._lut[(nbytes + self._align - 1) >> self._shift]
            slab = self._active[ci]
            if slab is not None and slab.used < slab.nslots:
                a: Allocation | None = self._take_slot(slab, nbytes)
            else:
                a = self._alloc_slow(ci, nbytes)
        elif nbytes > self._capacity:
            return None
        else:
            a = self._alloc_slow(-1, nbytes)
        if a is None:
            return None
        self._live[a.offset] = a
        self._used += a.size
        self._requested += nbytes
        return a

    def free(self, a: Allocation) -> None:
        """Give ``a`` back; a double free or an allocation from elsewhere raises ValueError."""
        live = self._live.get(a.offset)
        if live is not a and (live is None or live != a):  # == compares owner too
            raise ValueError(f"{a!r} is not a live allocation of this allocator "
                             "(double free, freed after reset(), or from another allocator)")
        del self._live[a.offset]
        self._used -= a.size
        self._requested -= a.nbytes
        if a.slab == _LARGE:
            self._runs.give(a.offset, a.size)
        else:
            self._free_slot(self._slabs[a.slab], (a.offset - a.slab) // a.size)

    def is_live(self, a: Allocation) -> bool:
        """Whether ``a`` is allocated here now (not freed, not from before a reset)."""
        live = self._live.get(a.offset)
        return live is a or (live is not None and live == a)

    def can_fit(self, nbytes: int) -> bool:
        """Whether ``alloc(nbytes)`` would succeed now."""
        if nbytes < 0 or nbytes > self._capacity:
            return False
        ci = self.class_index(nbytes)
        if ci >= 0:
            active = self._active[ci]
            if (active is not None and active.used < active.nslots) or self._partial[ci]:
                return True
        self._trim()
        largest = self._runs.largest()
        return (ci >= 0 and largest >= self._slab_size) or largest >= self._round_pages(nbytes)

    def stats(self) -> AllocatorStats:
        """A snapshot of usage, fragmentation and per-class occupancy."""
        self._trim()
        per_class = tuple(
            ClassStats(size=s, slabs=self._class_slabs[i], slots_used=self._class_used[i],
                       slots_total=self._class_slabs[i] * self._nslots[i])
            for i, s in enumerate(self._classes)
        )
        largest = self._runs.largest()
        for c in per_class:  # a free slot can be bigger than every free page run
            if c.slots_used < c.slots_total and c.size > largest:
                largest = c.size
        free = self._capacity - self._used
        return AllocatorStats(
            capacity=self._capacity, used=self._used, requested=self._requested, free=free,
            largest_free_run=largest, fragmentation=1.0 - largest / free if free else 0.0,
            per_class=per_class,
        )

    def restore(self, records: list[tuple[int, int, int]]) -> list[Allocation | None]:
        """Re-create allocations made by an allocator of the same geometry (an L2 file reopened).

        ``records`` are ``(offset, nbytes, slab)`` of allocations that allocator handed out; the
        result holds the matching live allocation, or None where a record does not fit this
        allocator's state (overlap, wrong geometry). Meant for a fresh allocator.
        """
        restored: list[Allocation | None] = []
        touched: dict[int, set[int]] = {}
        for offset, nbytes, slab_base in records:
            a = self._restore_one(offset, nbytes, slab_base, touched)
            if a is not None:
                self._live[a.offset] = a
                self._used += a.size
                self._requested += nbytes
            restored.append(a)
        for base, used in touched.items():
            slab = self._slabs[base]
            slab.bump = max(used, default=-1) + 1  # a slab whose only record was refused is empty
            slab.free = [i for i in range(slab.bump) if i not in used]
            if slab.used < slab.nslots:
                self._partial[slab.cls][base] = slab
        return restored

    def _restore_one(self, offset: int, nbytes: int, slab_base: int,
                     touched: dict[int, set[int]]) -> Allocation | None:
        if offset in self._live or nbytes < 0:
            return None
        if slab_base == _LARGE:
            size = self._round_pages(nbytes)
            if nbytes <= self._max_small or offset % self._page or not self._runs.take_at(offset, size):
                return None
            return _new_allocation(offset, size, nbytes, _LARGE, self._owner)
        ci = self.class_index(nbytes)
        if ci < 0:
            return None
        slab = self._slabs.get(slab_base)
        if slab is None:
            if slab_base % self._page or not self._runs.take_at(slab_base, self._slab_size):
                return None
            slab = self._slabs[slab_base] = _Slab(slab_base, ci, self._classes[ci], self._nslots[ci])
            self._class_slabs[ci] += 1
            touched[slab_base] = set()
        slot, rest = divmod(offset - slab_base, slab.size)
        if slab.cls != ci or rest or not 0 <= slot < slab.nslots or slot in touched.get(slab_base, ()):
            return None
        touched.setdefault(slab_base, set()).add(slot)
        slab.used += 1
        self._class_used[ci] += 1
        return _new_allocation(offset, slab.size, nbytes, slab_base, self._owner)

    def _round_pages(self, nbytes: int) -> int:
        page = self._page
        return max(page, (nbytes + page - 1) // page * page)

    def _alloc_slow(self, ci: int, nbytes: int) -> Allocation | None:
        """A slot from another or a new slab, else a page run; trims idle slabs if short."""
        if ci >= 0:
            slab = self._next_slab(ci)
            if slab is None and self._trim():
                slab = self._next_slab(ci)
            if slab is not None:
                self._active[ci] = slab
                return self._take_slot(slab, nbytes)
        start = self._runs.take(self._round_pages(nbytes))
        if start is None and self._trim():
            start = self._runs.take(self._round_pages(nbytes))
        if start is None:
            return None
        return _new_allocation(start, self._round_pages(nbytes), nbytes, _LARGE, self._owner)

    def _take_slot(self, slab: _Slab, nbytes: int) -> Allocation:
        if slab.free:
            slot = slab.free.pop()
        else:
            slot = slab.bump
            slab.bump += 1
        slab.used += 1
        self._class_used[slab.cls] += 1
        return _new_allocation(slab.base + slot * slab.size, slab.size, nbytes, slab.base, self._owner)

    def _next_slab(self, ci: int) -> _Slab | None:
        if self._partial[ci]:
            return self._partial[ci].popitem()[1]
        base = self._runs.take(self._slab_size)
        if base is None:
            return None
        slab = _Slab(base, ci, self._classes[ci], self._nslots[ci])
        self._slabs[base] = slab
        self._class_slabs[ci] += 1
        return slab

    def _free_slot(self, slab: _Slab, slot: int) -> None:
        ci = slab.cls
        was_full = slab.used == slab.nslots
        slab.used -= 1
        self._class_used[ci] -= 1
        is_active = self._active[ci] is slab
        if slab.used == 0 and not is_active:
            self._partial[ci].pop(slab.base, None)
            self._release(slab)
            return
        slab.free.append(slot)
        if was_full and not is_active:
            self._partial[ci][slab.base] = slab

    def _release(self, slab: _Slab) -> None:
        del self._slabs[slab.base]
        self._class_slabs[slab.cls] -= 1
        self._runs.give(slab.base, self._slab_size)

    def _trim(self) -> bool:
        """Give idle (empty, still active) slabs back to the page runs; True if any went."""
        released = False
        for ci, slab in enumerate(self._active):
            if slab is not None and slab.used == 0:
                self._active[ci] = None
                self._release(slab)
                released = True
        return released
