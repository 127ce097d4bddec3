"""L2: a host-memory arena, one ``mmap`` carved up by a :class:`~tierstore.tiers.slab_allocator.SlabAllocator`.

The arena is mapped once, prefaulted and (on CUDA machines) registered as pinned memory, so
copies into it run at memcpy speed and host-to-device copies can be asynchronous. Slots
are handed out as :class:`~tierstore.tiers.slab_allocator.Allocation` values and read or written through
``buffer()``, ``as_numpy()`` or ``view()``, a zero-copy torch tensor whose ``on_release``
callback tells the owner when the last tensor derived from it is gone, so the slot is
never reused under a holder.

A file-backed arena reserves its blocks with ``posix_fallocate`` before mapping: a full
disk is a clean :class:`~tierstore.errors.StoreFullError` at open, never a SIGBUS on a
later write. The file is never truncated.

Like the allocator, the arena is not thread-safe: the store calls it under its lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import resource
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..config import parse_size
from ..errors import (
    ConfigError,
    StoreClosedError,
    TierFullError,
    UnsupportedTensorError,
    translate_os_error,
)
from .slab_allocator import Allocation, AllocatorStats, SlabAllocator, view_nbytes

__all__ = ["ArenaStats", "HostArena"]

# Python 3.11's mmap module lacks the constant; Linux >= 5.14 knows the advice, older
# kernels answer EINVAL and we fall back to touching each page.
_MADV_POPULATE_WRITE: int | None = getattr(
    mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not just the current one


@dataclass(frozen=True, slots=True)
class ArenaStats:
    """A snapshot of a :class:`HostArena`.

    ``memlock_limit`` is the soft ``RLIMIT_MEMLOCK`` in bytes, None when unlimited;
    ``locked`` says whether the arena was ``mlock``-ed (tried only when it is not
    CUDA-pinned and the limit allows).
    """

    capacity: int
    path: str | None
    pinned: bool
    pin_reason: str
    locked: bool
    memlock_limit: int | None
    prefaulted: bool
    allocator: AllocatorStats


class _Mapping:
    """What close() must undo; kept apart from the arena so a finalizer can own it."""

    __slots__ = ("addr", "cuda_registered", "live", "live_lock", "locked", "mm", "size")

    def __init__(self, mm: mmap.mmap, size: int) -> None:
        self.mm: mmap.mmap | None = mm
        self.size = size
        self.addr = _address_of(mm)
        self.cuda_registered = False
        self.locked = False
        self.live: dict[tuple[int, int], int] = {}
        """(offset, nbytes) of each slot range tensors still view, with how many views."""
        self.live_lock = threading.Lock()  # finalizers run in whichever thread collects the view

    def viewed(self, offset: int, nbytes: int) -> None:
        key = (offset, nbytes)
        with self.live_lock:
            self.live[key] = self.live.get(key, 0) + 1

    def unviewed(self, offset: int, nbytes: int) -> None:
        key = (offset, nbytes)
        with self.live_lock:
            count = self.live.get(key, 0) - 1
            if count > 0:
                self.live[key] = count
            else:
                self.live.pop(key, None)

    def viewed_ranges(self) -> list[tuple[int, int]]:
        with self.live_lock:
            return list(self.live)


def _address_of(mm: mmap.mmap) -> int:
    probe = np.frombuffer(mm, dtype=np.uint8, count=1)
    return int(probe.ctypes.data)


def _teardown(m: _Mapping) -> None:
    """Unregister and unmap; a mapping that live views still export stays until they die."""
    mm, m.mm = m.mm, None
    if mm is None:
        return
    if m.cuda_registered:
        m.cuda_registered = False
        with contextlib.suppress(Exception):  # at interpreter exit CUDA may already be gone
            _cudart().cudaHostUnregister(m.addr)
    if m.locked:
        m.locked = False
        _libc().munlock(ctypes.c_void_p(m.addr), ctypes.c_size_t(m.size))
    try:
        mm.close()
    except BufferError:
        # Tensors still view it, so munmap waits for the last one; meanwhile give the memory of
        # every page they do not view back to the system, so a closed store's L2 does not stay
        # resident behind a few live tensors.
        _release_unviewed(mm, m.size, m.viewed_ranges())


def _release_unviewed(mm: mmap.mmap, size: int, live: list[tuple[int, int]]) -> None:
    page = mmap.PAGESIZE
    keep = sorted((offset // page * page, -(-(offset + nbytes) // page) * page) for offset, nbytes in live)
    start = 0
    for lo, hi in [*keep, (size, size)]:
        if lo > start:
            with contextlib.suppress(OSError, ValueError):  # advice only: the pages stay valid if refused
                mm.madvise(mmap.MADV_DONTNEED, start, lo - start)
        start = max(start, hi)


def _released(m: _Mapping, offset: int, nbytes: int, on_release: Callable[[], None] | None) -> None:
    m.unviewed(offset, nbytes)
    if on_release is not None:
        on_release()


def _cudart() -> Any:
    """torch's libcudart bindings; only ever called once torch.cuda.is_available()."""
    cudart: Callable[[], Any] = torch.cuda.cudart  # unannotated in torch; returns its cudart module
    return cudart()


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("mlock", "munlock"):
        fn = getattr(libc, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return libc


def _map_file(path: str, size: int) -> mmap.mmap:
    """Open or create ``path``, reserve ``size`` bytes of real blocks, map them shared."""
    created = False
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            created = True
        except FileExistsError:  # never through a link: it would map (and overwrite) another file
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise translate_os_error(exc, what="opening the L2 arena file", path=path) from exc
    try:
        # Blocks reserved now make a full disk fail here, not as SIGBUS on a later write
        # into a hole. An existing longer file keeps its length: never truncate.
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise translate_os_error(exc, what=f"reserving {size} bytes for the L2 arena", path=path) from exc
    finally:
        os.close(fd)


def _prefault(mm: mmap.mmap) -> None:
    """Fault in every page writable now, so the first copy into a slot is not a page fault per 4 KiB."""
    if _MADV_POPULATE_WRITE is not None:
        try:
            mm.madvise(_MADV_POPULATE_WRITE)
            return
        except OSError as exc:
            if exc.errno == errno.ENOMEM:  # touching the pages would only wake the OOM killer
                raise _no_memory(len(mm), exc) from exc
            # EINVAL: a kernel before 5.14; touch the pages instead
    pages = np.frombuffer(mm, dtype=np.uint8)[:: mmap.PAGESIZE]
    np.bitwise_or(pages, 0, out=pages)  # one write per page, done in C, content unchanged
    del pages


def _no_memory(size: int, exc: OSError) -> TierFullError:
    return TierFullError(f"cannot back a {size}-byte L2 arena with host memory ({exc.strerror}); "
                         "lower the L2 capacity or free memory", tier="L2")


def _memlock_limit() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def _pin_cuda(m: _Mapping) -> str | None:
    """Register the mapping with CUDA; None on success, else why not."""
    err = int(_cudart().cudaHostRegister(m.addr, m.size, _CUDA_HOST_REGISTER_PORTABLE))
    if err != 0:
        return f"cudaHostRegister failed with cudaError {err}"
    m.cuda_registered = True
    return None


def _lock(m: _Mapping, limit: int | None) -> str:
    """mlock the mapping when RLIMIT_MEMLOCK allows; the text says what happened."""
    if limit is not None and limit < m.size:
        return f"not locked: RLIMIT_MEMLOCK soft limit is {limit} bytes, below the arena's {m.size}"
    if _libc().mlock(ctypes.c_void_p(m.addr), ctypes.c_size_t(m.size)) != 0:
        return f"mlock failed: {os.strerror(ctypes.get_errno())}"
    m.locked = True
    return "locked in RAM with mlock"


class HostArena:
    """L2 host memory: one ``mmap`` of ``capacity`` bytes managed by a :class:`SlabAllocator`.

    ``capacity`` takes bytes or a size string (``"512MiB"``) and is rounded down to a page.
    With ``path`` the arena is file-backed (created if missing, its blocks reserved up
    front); without, anonymous. ``pin`` registers the arena with CUDA when a device is
    available (else it is ``mlock``-ed when ``RLIMIT_MEMLOCK`` allows); ``prefault`` faults
    every page in at open.

    Not thread-safe: the caller serialises calls. ``close()`` is idempotent.
    """

    def __init__(self, capacity: int | str, *, path: str | os.PathLike[str] | None = None,
                 pin: bool = True, prefault: bool = True) -> None:
        size = parse_size(capacity, name="L2 arena capacity")
        size -= size % mmap.PAGESIZE
        if size <= 0:
            raise ConfigError(f"L2 arena capacity must be at least one page ({mmap.PAGESIZE} bytes), "
                              f"got {capacity!r}; raise it or disable the L2 tier")
        self._path = os.fspath(path) if path is not None else None
        if self._path is None:
            try:
                mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise _no_memory(size, exc) from exc
        else:
            mm = _map_file(self._path, size)
        self._map = _Mapping(mm, size)
        self._finalizer = weakref.finalize(self, _teardown, self._map)
        self._capacity = size
        self._prefaulted = prefault
        if prefault:
            _prefault(mm)
        self._memlock_limit = _memlock_limit()
        self._pinned, self._pin_reason = self._pin(pin)
        self._alloc = SlabAllocator(size, page_size=mmap.PAGESIZE)

    def _pin(self, want: bool) -> tuple[bool, str]:
        if not want:
            return False, "pinning not requested (pin=False)"
        if torch.cuda.is_available():
            failure = _pin_cuda(self._map)
            if failure is None:
                return True, "registered with cudaHostRegister (page-locked, portable)"
            return False, f"{failure}; {_lock(self._map, self._memlock_limit)}"
        locked = _lock(self._map, self._memlock_limit)
        return False, f"no CUDA device (torch.cuda.is_available() is False); {locked}"

    @property
    def capacity(self) -> int:
        """Mapped bytes (the requested capacity rounded down to a page)."""
        return self._capacity

    @property
    def path(self) -> str | None:
        """The backing file, or None for an anonymous arena."""
        return self._path

    @property
    def pinned(self) -> bool:
        """Whether the arena is registered with CUDA as page-locked memory."""
        return self._pinned

    @property
    def pin_reason(self) -> str:
        """Why the arena is or is not pinned (and whether it is mlock-ed)."""
        return self._pin_reason

    @property
    def closed(self) -> bool:
        """Whether close() has run."""
        return self._map.mm is None

    def alloc(self, nbytes: int) -> Allocation | None:
        """Reserve a slot of at least ``nbytes`` bytes; None when the arena has no room."""
        self._mm()
        return self._alloc.alloc(nbytes)

    def free(self, a: Allocation) -> None:
        """Return a slot; views over it must already be released (see ``view``)."""
        self._mm()
        self._alloc.free(a)

    def restore(self, records: list[tuple[int, int, int]]) -> list[Allocation | None]:
        """Re-create allocations recorded as ``(offset, nbytes, slab)`` by an earlier arena on this file."""
        self._mm()
        return self._alloc.restore(records)

    def can_fit(self, nbytes: int) -> bool:
        """Whether ``alloc(nbytes)`` would succeed now."""
        self._mm()
        return self._alloc.can_fit(nbytes)

    def buffer(self, a: Allocation) -> memoryview:
        """A writable memoryview of exactly the ``a.nbytes`` requested bytes of the slot."""
        mm = self._mm()
        self._check(a)
        return memoryview(mm)[a.offset : a.offset + a.nbytes]

    def as_numpy(self, a: Allocation) -> npt.NDArray[np.uint8]:
        """A writable uint8 array over the ``a.nbytes`` requested bytes of the slot."""
        mm = self._mm()
        self._check(a)
        return np.frombuffer(mm, dtype=np.uint8, count=a.nbytes, offset=a.offset)

    def view(self, a: Allocation, dtype: torch.dtype, shape: tuple[int, ...],
             on_release: Callable[[], None] | None = None) -> torch.Tensor:
        """A zero-copy tensor of ``dtype`` and ``shape`` over the start of the slot.

        ``on_release`` runs exactly once, when the last tensor sharing this view's storage
        (slices, reshapes, ``.view(dtype)``, ``.numpy()`` of them) is garbage-collected;
        the owner keeps the slot allocated until then. It does not run at interpreter exit.
        """
        mm = self._mm()
        self._check(a)
        nbytes = view_nbytes(a, dtype, shape, "L2")
        # torch.from_numpy keeps `raw` alive for as long as any tensor shares its storage,
        # so a finalizer on `raw` fires after the last derived tensor is gone.
        raw = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=a.offset)
        try:
            tensor = torch.from_numpy(raw).view(dtype).reshape(shape)
        except RuntimeError as exc:
            raise UnsupportedTensorError(f"cannot view slot bytes as {dtype}: {exc}", tier="L2") from exc
        self._map.viewed(a.offset, nbytes)
        weakref.finalize(raw, _released, self._map, a.offset, nbytes, on_release).atexit = False
        return tensor

    def stats(self) -> ArenaStats:
        """A snapshot of the arena and its allocator."""
        self._mm()
        return ArenaStats(
            capacity=self._capacity, path=self._path, pinned=self._pinned, pin_reason=self._pin_reason,
            locked=self._map.locked, memlock_limit=self._memlock_limit, prefaulted=self._prefaulted,
            allocator=self._alloc.stats(),
        )

    def close(self) -> None:
        """Unregister and unmap. Live views keep their memory readable until they die.

        While views live the mapping cannot be unmapped; every page no view covers is given back
        (``MADV_DONTNEED``) at once, so only the viewed slots stay resident. Other exports
        (``buffer``, ``as_numpy``) must not be used after close: their pages may read as zeros.
        """
        self._finalizer()
        self._pinned = False

    def __enter__(self) -> HostArena:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _mm(self) -> mmap.mmap:
        mm = self._map.mm
        if mm is None:
            raise StoreClosedError("the L2 arena is closed; open a new one", tier="L2")
        return mm

    def _check(self, a: Allocation) -> None:
        if not self._alloc.is_live(a):
            raise ValueError(f"{a!r} is not a live allocation of this L2 arena (freed, or from elsewhere)")
