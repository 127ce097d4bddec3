"""Reading L3: a block's chunks by the catalog's offsets, decoded into the caller's buffer.

Zarr's own I/O is not on the hot path (it costs a metadata file per array and milliseconds per
call); a read is one ``pread`` of contiguous chunks, decoded on the codec pool. Thread-safe: reads
share descriptors through :class:`~tierstore.tiers.open_files.OpenFiles`.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np

from ...errors import CorruptBlockError
from ..codecs import codec_from_id
from .codec_pool import codec_pool
from .files import L3Files
from .layout import BATCH, Location

__all__ = ["L3Reader"]


class L3Reader:
    """The read side of one L3 tier."""

    def __init__(self, files: L3Files) -> None:
        self.files = files

    def read_into(self, loc: Location, out: np.ndarray) -> None:
        """Decode the block at ``loc`` into ``out`` (flat uint8 of the block's exact size).

        Raises ``FileNotFoundError`` when the shard file is gone (the caller decides whether the
        catalog moved on or the data is lost) and ``CorruptBlockError`` when bytes are damaged.
        """
        if not loc.sizes:
            return
        path = self.files.shard_file(loc.array, loc.shard)
        fd = self.files.descriptors.acquire(path)
        try:
            if len(loc.sizes) <= BATCH:
                self._read_chunks(fd, path, loc, 0, len(loc.sizes), loc.offset, out)
                return
            offset = loc.offset
            for first in range(0, len(loc.sizes), BATCH):  # bounded memory for huge blocks
                last = min(first + BATCH, len(loc.sizes))
                self._read_chunks(fd, path, loc, first, last, offset, out)
                offset += sum(loc.sizes[first:last])
        finally:
            self.files.descriptors.release(path, fd)

    def _read_chunks(self, fd: int, path: str, loc: Location, first: int, last: int, offset: int,
                     out: np.ndarray) -> None:
        length = sum(loc.sizes[first:last])
        lo, hi = first * loc.inner, min(last * loc.inner, out.nbytes)
        if loc.codec == "raw":  # no decoding: read straight into the output
            buffers: list[Any] = [out[lo:hi]]
            if last * loc.inner > hi:
                buffers.append(bytearray(last * loc.inner - hi))
            got = os.preadv(fd, buffers, offset)
        else:
            data = os.pread(fd, length, offset)
            got = len(data)
        if got != length:
            raise CorruptBlockError(f"{path} is truncated: {got} of {length} bytes at offset {offset}",
                                    path=path, tier="L3")
        if loc.codec != "raw":
            sub = Location(loc.array, loc.shard, offset, loc.sizes[first:last], loc.inner, loc.codec)
            self._decode(sub, memoryview(data), out[lo:hi], path)

    def _decode(self, loc: Location, data: memoryview, out: np.ndarray, path: str) -> None:
        try:
            codec = codec_from_id(loc.codec)
        except ValueError as exc:
            raise CorruptBlockError(f"{path}: {exc}", path=path, tier="L3") from None
        inner, nbytes = loc.inner, out.nbytes
        if len(loc.sizes) == 1:  # the common small block: one granule, no bookkeeping
            try:
                if nbytes == inner:
                    codec.decode_into(data, out)
                else:
                    scratch = np.empty(inner, dtype=np.uint8)
                    codec.decode_into(data, scratch)
                    out[:] = scratch[:nbytes]
            except (RuntimeError, ValueError, TypeError) as exc:
                raise CorruptBlockError(f"{path}: chunk does not decode ({exc})", path=path, tier="L3") from None
            return
        starts = list(itertools.accumulate(loc.sizes[:-1], initial=0))

        def one(i: int) -> None:
            piece = data[starts[i]:starts[i] + loc.sizes[i]]
            lo = i * inner
            if lo + inner <= nbytes:
                codec.decode_into(piece, out[lo:lo + inner])
            else:
                scratch = np.empty(inner, dtype=np.uint8)
                codec.decode_into(piece, scratch)
                out[lo:] = scratch[:nbytes - lo]

        try:
            if len(loc.sizes) > 2 and loc.codec != "raw":
                list(codec_pool().map(one, range(len(loc.sizes))))
            else:
                for i in range(len(loc.sizes)):
                    one(i)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CorruptBlockError(f"{path}: chunk does not decode ({exc})", path=path, tier="L3") from None
