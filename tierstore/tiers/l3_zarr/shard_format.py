"""The bytes of a shard file beside its chunks: the shard index (zarr's ``sharding_indexed``, at the end)
and writes that finish or fail with the OS's reason.

An index is ``(offset, size)`` as little-endian uint64 per inner chunk, then its crc32c; an
empty slot is ``2**64 - 1`` twice.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import crc32c
import numpy as np

__all__ = ["EMPTY_SLOT", "write_all", "index_bytes", "valid_index", "rebuilt_index"]

EMPTY_SLOT = np.uint64(2**64 - 1)
"""An index entry with no chunk."""


def write_all(fd: int, pieces: list[Any], offset: int) -> int:
    """``pwritev`` every byte of ``pieces`` at ``offset``; returns the byte count.

    A short write (a full disk, a file size limit) is finished piece by piece, so the failure
    surfaces as the ``OSError`` with its real errno (``ENOSPC``, ``EFBIG``), which callers turn
    into ``StoreFullError``, instead of a write that silently stopped early.
    """
    total = sum(len(memoryview(p).cast("B")) for p in pieces)
    written = os.pwritev(fd, pieces, offset)
    if written < total:  # rare: copy the rest once and keep writing until the OS says why it stops
        rest = memoryview(b"".join(bytes(p) for p in pieces))[written:]
        while rest:
            n = os.pwrite(fd, rest, offset + written)
            if n <= 0:
                raise OSError(errno.ENOSPC, "no progress writing", str(fd))
            written += n
            rest = rest[n:]
    return written


def index_bytes(index: np.ndarray) -> bytes:
    raw = index.astype("<u8", copy=False).tobytes()
    return raw + crc32c.crc32c(raw).to_bytes(4, "little")


def valid_index(data: bytes, start: int, slots: int, *, end: int | None = None) -> bool:
    """Whether ``data[start:]`` begins with a shard index whose crc32c holds and whose chunks end before it."""
    body = data[start:start + slots * 16]
    crc = data[start + slots * 16:start + slots * 16 + 4]
    if len(crc) != 4 or crc32c.crc32c(body) != int.from_bytes(crc, "little"):
        return False
    pairs = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
    used = pairs[pairs[:, 0] != EMPTY_SLOT]
    limit = start if end is None else end
    return bool(len(used) == 0 or int((used[:, 0] + used[:, 1]).max()) <= limit)


def rebuilt_index(old: np.ndarray, slots: int, chunks: list[tuple[int, int]],
                   known: dict[tuple[int, int], int] | None = None) -> np.ndarray:
    index = np.full((slots, 2), EMPTY_SLOT, dtype=np.uint64)
    wanted = set(chunks)
    placed: set[tuple[int, int]] = set()
    for chunk, slot in (known or {}).items():
        if chunk in wanted and index[slot, 0] == EMPTY_SLOT:
            index[slot] = chunk
            placed.add(chunk)
    for slot, (offset, size) in enumerate(old.tolist()[:slots]):
        if index[slot, 0] != EMPTY_SLOT:
            continue
        if (offset, size) in wanted and (offset, size) not in placed:
            index[slot] = (offset, size)
            placed.add((offset, size))
    free = [s for s in range(slots) if index[s, 0] == EMPTY_SLOT]
    for offset, size in (c for c in chunks if c not in placed):
        before = [s for s in range(slots) if index[s, 0] != EMPTY_SLOT and int(index[s, 0]) < offset]
        after = [s for s in range(slots) if index[s, 0] != EMPTY_SLOT and int(index[s, 0]) > offset]
        lo, hi = (max(before) if before else -1), (min(after) if after else slots)
        gap = [s for s in free if lo < s < hi]
        if gap:
            index[gap[0]] = (offset, size)
            free.remove(gap[0])
    return index

