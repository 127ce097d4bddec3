"""Zero-copy maps of raw L3 blocks: a block stored without a codec, viewed straight from its shard file.

A raw block's chunks are its bytes in order, each ``inner`` long (the last one zero-padded), contiguous
from ``Location.offset`` (:mod:`.writer` writes packs and arrays that way), so the block is the file
region ``[offset, offset + nbytes)``. :func:`map_raw` maps that region (its start rounded down to the
page size) ``MAP_PRIVATE`` with read and write access: the holder may write into the tensor, and the
writes land in its private copy-on-write pages, never in the file. The mapping is populated at once
(``MADV_POPULATE_READ``: the disk read happens here, in the caller's thread, and a page that cannot
be read is an error of this call rather than a ``SIGBUS`` later) and unmapped when the last array or
tensor over it is garbage-collected.

Why a mapped block never changes under its holder: L3 never writes a committed chunk in place.
Packs are append-only (a shard index is written after the chunks, dead blocks stay as dead space);
compaction copies live blocks to a fresh shard and deletes the old file; a freed large block's
folder is deleted; block ids and shard names are never reused while a file exists; truncation (a
rollback, recovery at open, ``verify --fix``) cuts only bytes past every committed block. A deleted
file's pages stay valid for as long as a mapping holds its inode (its disk space comes back then),
and the region mapped always lies inside the committed part of the file, so no later store
activity can make an access fault. A mapping made while another process truncates the file under
the committed length (no tierstore code does) would fail to populate: ``None``, and the caller
reads the block the ordinary way.

Whether a map will read from the disk (``l3_verify_maps="disk"``): before mapping, :func:`map_raw`
asks ``cachestat(2)`` (Linux 6.5+) how many of the block's pages are in the page cache and tells its
``before_map`` callback. When they all are
and the block is the only one in its file, they were brought there only by reads of that very
block (a map or a ``pread``, each checked by the store) or by another program reading the file: no
tierstore read of a neighbour pulled them in with the kernel's read-ahead, because there is none.

Linux only (``MADV_POPULATE_READ`` needs 5.14); elsewhere :func:`map_raw` returns None.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import CorruptBlockError
from .files import L3Files
from .layout import Location

__all__ = ["can_see_page_cache", "raw_extent", "map_raw"]

_PAGE = mmap.ALLOCATIONGRANULARITY
_MADV_POPULATE_READ = 22
"""Linux 5.14+: fault the range in now; EFAULT/EIO instead of a SIGBUS on a page that cannot be read."""
_MAP_FAILED = ctypes.c_void_p(-1).value
_SYS_CACHESTAT: int | None = 451 if os.uname().machine in ("x86_64", "aarch64") else None
"""``cachestat(2)``'s number (Linux 6.5+: the same in x86-64's table and the generic one)."""


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64)
                for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - every Linux Python links libc
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()


class _Region:
    """Owns one mapping; unmaps it when collected (the last array over it is gone).

    Arrays made from it (``np.asarray``) keep it as their base, through numpy's array interface.
    """

    __slots__ = ("address", "length")

    def __init__(self, address: int, length: int) -> None:
        self.address, self.length = address, length

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return {"data": (self.address, False), "shape": (self.length,), "typestr": "|u1", "version": 3}

    def __del__(self) -> None:
        if _LIBC is not None:
            _LIBC.munmap(self.address, self.length)


def raw_extent(loc: Location, nbytes: int) -> tuple[int, int] | None:
    """``(file offset, bytes)`` of a block stored raw and contiguous, else None (a codec, an odd layout)."""
    if loc.codec != "raw" or not loc.sizes or nbytes <= 0 or not loc.array:
        return None
    if any(size != loc.inner for size in loc.sizes) or len(loc.sizes) * loc.inner < nbytes:
        return None  # not the layout this code writes (padded chunks of one size): read it the ordinary way
    return loc.offset, nbytes


def _all_cached(fd: int, start: int, span: int) -> bool:
    """Whether every page of ``[start, start + span)`` of ``fd``'s file is in the page cache (cachestat)."""
    global _SYS_CACHESTAT
    if _LIBC is None or _SYS_CACHESTAT is None:
        return False
    where, stat = _CacheRange(start, span), _CacheStat()
    if _LIBC.syscall(_SYS_CACHESTAT, fd, ctypes.byref(where), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # before 6.5, or a sandbox: stop asking
            _SYS_CACHESTAT = None
        return False
    return int(stat.nr_cache) >= -(-span // _PAGE)


def can_see_page_cache() -> bool:
    """Whether this kernel answers ``cachestat(2)`` (else ``l3_verify_maps="disk"`` checks every map)."""
    fd = os.open(__file__, os.O_RDONLY)
    try:
        _all_cached(fd, 0, _PAGE)
    finally:
        os.close(fd)
    return _LIBC is not None and _SYS_CACHESTAT is not None


def _cached_alone(fd: int, size: int, loc: Location, start: int, span: int) -> bool:
    """Whether the raw block at ``loc`` (pages ``[start, start + span)``) is alone in its file of ``size``
    bytes and every page of it is in the page cache now.

    Alone: the file holds only the block's chunks and the shard index after them (16 bytes a chunk
    and a crc32c, read forward from its own offset). Files only grow, so this is asked at every map.
    """
    tail = size - loc.offset - len(loc.sizes) * loc.inner
    if loc.offset >= _PAGE or not 0 <= tail <= 16 * len(loc.sizes) + _PAGE:
        return False
    return _all_cached(fd, start, span)


def map_raw(files: L3Files, loc: Location, nbytes: int, *,
            before_map: Callable[[bool], None] | None = None) -> np.ndarray | None:
    """A flat uint8 array viewing the raw block at ``loc`` in its shard file, populated; None if not mappable.

    ``before_map``, if given, is called before the block is mapped with whether it is alone in its file
    and every page of it is in the page cache already (one ``cachestat``; False where the kernel lacks it):
    whether this map will read nothing from the disk.

    None when the block is not stored raw and contiguous (see :func:`raw_extent`), on a platform
    without the calls, or when the kernel refuses the mapping or cannot populate it (out of map
    areas, an old kernel, a page it cannot read): the caller then reads the block as usual and
    gets that read's error, if any. Raises ``FileNotFoundError`` when the shard file is gone (as
    :meth:`L3Reader.read_into <.reader.L3Reader.read_into>` does) and ``CorruptBlockError`` when the
    file is shorter than the block. The bytes are not checked here: the caller holds the checksum.
    """
    extent = raw_extent(loc, nbytes)
    if extent is None or _LIBC is None:
        return None
    offset, length = extent
    path = files.shard_file(loc.array, loc.shard)
    fd = files.descriptors.acquire(path)
    try:
        size = os.fstat(fd).st_size
        if offset + length > size:
            raise CorruptBlockError(f"{path} is truncated: {max(0, size - offset)} of {length} bytes at offset "
                                    f"{offset}", path=path, tier="L3")
        start = offset - offset % _PAGE
        span = offset + length - start
        if before_map is not None:
            before_map(_cached_alone(fd, size, loc, start, span))
        address = _LIBC.mmap(None, span, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
    finally:
        files.descriptors.release(path, fd)  # the mapping holds the file itself
    if address is None or address == _MAP_FAILED:
        return None
    region = _Region(address, span)
    if _LIBC.madvise(address, span, _MADV_POPULATE_READ) != 0:
        code = ctypes.get_errno()
        if code != errno.EINVAL:  # EFAULT/EIO/ENOMEM: a page it cannot read now; the ordinary read says why
            return None
        _LIBC.madvise(address, span, mmap.MADV_WILLNEED)  # a kernel before 5.14: read ahead, fault on use
    skip = offset - start
    return np.asarray(region)[skip:skip + length]
