"""Reading L3: a block's chunks by the catalog's offsets, decoded into the caller's buffer.

Zarr's own I/O is not on the hot path (it costs a metadata file per array and milliseconds per
call). A block is read in *pieces*, runs of whole chunks of about :data:`PIECE` encoded bytes,
each one ``preadv`` into a per-thread buffer and decoded straight into the output. A block of
one piece is read in the caller's thread; the pieces of a larger block, or of several blocks
given to :meth:`L3Reader.read_many`, go through the read pool with a bounded number in flight,
so the disk reads the next pieces while the ones before decode: read-ahead overlapped with
decoding (``pread``, zstd and the numpy unshuffle all release the GIL). Raw pieces are read
straight into the output, with no copy.

Thread-safe: reads share descriptors through :class:`~tierstore.tiers.open_files.OpenFiles`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np

from ...errors import CorruptBlockError, UnsafePathError
from ..codecs import Codec, codec_from_id
from .codec_pool import read_pool
from .files import L3Files
from .layout import Location

__all__ = ["PIECE", "L3Reader"]

PIECE = 1 << 20
"""Encoded bytes one read task takes (at least one whole chunk): small enough that the first
decode starts early and the last one ends soon after the disk, large enough to keep the disk busy."""
_IN_FLIGHT_PER_THREAD = 2
"""Pieces submitted ahead per read-pool thread: bounds the memory beside the outputs."""
_LOCAL = threading.local()


@dataclass(frozen=True, slots=True)
class _Piece:
    first: int
    """Index of its first chunk in the block."""
    last: int
    offset: int
    """Where it starts in the shard file."""
    length: int
    """Encoded bytes."""


@dataclass(slots=True)
class _Open:
    """A request of :meth:`L3Reader.read_many` with pieces in flight."""

    path: str
    fd: int
    pieces: list[_Piece]
    inner: int
    out: np.ndarray
    finished: set[int] = field(default_factory=set)
    hashed: int = 0
    """Pieces the checksum covers (a prefix of ``pieces``)."""
    crc: int = 0


def _pieces(loc: Location) -> Iterator[_Piece]:
    first, offset, length = 0, loc.offset, 0
    for i, size in enumerate(loc.sizes):
        if length and length + size > PIECE:
            yield _Piece(first, i, offset, length)
            first, offset, length = i, offset + length, 0
        length += size
    yield _Piece(first, len(loc.sizes), offset, length)


def _input_buffer(size: int) -> np.ndarray:
    """This thread's buffer for encoded bytes, at least ``size`` long (reused: no allocation per read).

    It grows to the largest piece the thread read (about :data:`PIECE` on the read pool), so a
    caller's thread that reads only small blocks keeps a small one.
    """
    buf: np.ndarray | None = getattr(_LOCAL, "input", None)
    if buf is None or buf.nbytes < size:
        buf = _LOCAL.input = np.empty(max(size, 2 * (0 if buf is None else buf.nbytes), 64 << 10), dtype=np.uint8)
    return buf[:size]


class L3Reader:
    """The read side of one L3 tier."""

    def __init__(self, files: L3Files) -> None:
        self.files = files

    def read_into(self, loc: Location, out: np.ndarray) -> int:
        """Decode the block at ``loc`` into ``out`` (flat uint8 of the block's exact size); returns its crc32c.

        The checksum is of ``out`` as decoded, computed while later pieces are still being read, so a
        caller that verifies the block need not hash it again. Raises ``FileNotFoundError`` when the
        shard file is gone (the caller decides whether the catalog moved on or the data is lost) and
        ``CorruptBlockError`` when bytes are damaged.
        """
        sizes = loc.sizes
        if not sizes:
            return int(crc32c.crc32c(out.data))
        length = sum(sizes)
        if length > PIECE and len(sizes) > 1:
            result = self.read_many([(loc, out)])[0]
            if isinstance(result, BaseException):
                raise result
            return result
        path = self.files.shard_file(loc.array, loc.shard)
        codec = self._codec(loc, path)
        descriptors = self.files.descriptors
        fd = descriptors.acquire(path)
        if len(sizes) == 1 and loc.codec != "raw":  # a small block: one chunk, decoded after the descriptor is back
            try:
                view = _read_encoded(fd, path, loc.offset, length)
            finally:
                descriptors.release(path, fd)
            _decode_chunk(codec, view, out, 0, loc.inner, path)
            return int(crc32c.crc32c(out.data))
        try:
            self._read_piece(fd, path, loc, codec, _Piece(0, len(sizes), loc.offset, length), out)
        finally:
            descriptors.release(path, fd)
        return int(crc32c.crc32c(out.data))

    def read_many(self, requests: Sequence[tuple[Location, np.ndarray]]) -> list[int | BaseException]:
        """Decode each ``(location, out)`` into its ``out``, the pieces of all of them through one pipeline.

        Pieces are read in the order given, a bounded number ahead of the decoding, so a caller that
        needs several blocks (a layer's weights, a prefetch) pays the disk and the decoding once,
        overlapped, rather than one after the other per block. Returns one entry per request: the
        crc32c of its ``out`` when that holds the block, else what :meth:`read_into` would have
        raised for it (``FileNotFoundError``, ``CorruptBlockError``, ``UnsafePathError``); the
        others are read regardless.
        """
        results: list[int | BaseException] = [0] * len(requests)
        pool, limit = read_pool()
        limit *= _IN_FLIGHT_PER_THREAD
        flying: dict[Future[None], tuple[int, int]] = {}
        """Future -> (request, piece number)."""
        open_: dict[int, _Open] = {}

        def settle(done: set[Future[None]]) -> None:
            for future in done:
                index, number = flying.pop(future)
                state = open_[index]
                error = future.exception()
                if error is not None and not isinstance(results[index], BaseException):
                    results[index] = error
                state.finished.add(number)
                while state.hashed in state.finished:  # the checksum follows the finished prefix, in order
                    piece = state.pieces[state.hashed]
                    if not isinstance(results[index], BaseException):
                        lo, hi = piece.first * state.inner, min(piece.last * state.inner, state.out.nbytes)
                        state.crc = crc32c.crc32c(state.out[lo:hi].data, state.crc)
                    state.hashed += 1
                if state.hashed == len(state.pieces):
                    del open_[index]
                    self.files.descriptors.release(state.path, state.fd)
                    if not isinstance(results[index], BaseException):
                        results[index] = int(state.crc)

        try:
            for index, (loc, out) in enumerate(requests):
                if not loc.sizes:
                    results[index] = int(crc32c.crc32c(out.data))
                    continue
                path = self.files.shard_file(loc.array, loc.shard)
                try:
                    codec = self._codec(loc, path)
                    fd = self.files.descriptors.acquire(path)
                except (OSError, CorruptBlockError, UnsafePathError) as exc:
                    results[index] = exc
                    continue
                pieces = list(_pieces(loc))
                open_[index] = _Open(path, fd, pieces, loc.inner, out)
                for number, piece in enumerate(pieces):
                    while len(flying) >= limit:
                        settle(wait(flying, return_when=FIRST_COMPLETED).done)
                    flying[pool.submit(self._read_piece, fd, path, loc, codec, piece, out)] = (index, number)
        finally:
            while flying:  # also on an exception here: no task may outlive the descriptors it uses
                settle(wait(flying).done)
            for state in open_.values():  # requests cut short by that exception
                self.files.descriptors.release(state.path, state.fd)
        return results

    def _codec(self, loc: Location, path: str) -> Codec:
        try:
            return codec_from_id(loc.codec)
        except ValueError as exc:
            raise CorruptBlockError(f"{path}: {exc}", path=path, tier="L3") from None

    def _read_piece(self, fd: int, path: str, loc: Location, codec: Codec, piece: _Piece, out: np.ndarray) -> None:
        """Read ``piece`` of the block at ``loc`` and decode it into its part of ``out``."""
        inner = loc.inner
        lo, hi = piece.first * inner, min(piece.last * inner, out.nbytes)
        if loc.codec == "raw":  # no decoding: read straight into the output
            buffers: list[Any] = [out[lo:hi]]
            if piece.last * inner > hi:  # the padding of the last chunk
                buffers.append(bytearray(piece.last * inner - hi))
            got = os.preadv(fd, buffers, piece.offset)
            if got != piece.length:
                raise _truncated(path, got, piece.length, piece.offset)
            return
        view = _read_encoded(fd, path, piece.offset, piece.length)
        start = 0
        for i in range(piece.first, piece.last):
            size = loc.sizes[i]
            _decode_chunk(codec, view[start:start + size], out, i * inner, inner, path)
            start += size


def _read_encoded(fd: int, path: str, offset: int, length: int) -> memoryview:
    """``length`` encoded bytes at ``offset`` of the shard file ``fd``, in this thread's input buffer."""
    view = _input_buffer(length).data
    got = os.preadv(fd, [view], offset)
    if got != length:
        raise _truncated(path, got, length, offset)
    return view


def _truncated(path: str, got: int, length: int, offset: int) -> CorruptBlockError:
    return CorruptBlockError(f"{path} is truncated: {got} of {length} bytes at offset {offset}", path=path, tier="L3")


def _decode_chunk(codec: Codec, data: Any, out: np.ndarray, chunk_lo: int, inner: int, path: str) -> None:
    """Decode one encoded chunk into ``out[chunk_lo:chunk_lo + inner]`` (the part of it inside ``out``)."""
    try:
        if chunk_lo + inner <= out.nbytes:
            codec.decode_into(data, out[chunk_lo:chunk_lo + inner] if chunk_lo or inner != out.nbytes else out)
        else:  # the padded last chunk: decode it whole, keep the block's part
            scratch = np.empty(inner, dtype=np.uint8)
            codec.decode_into(data, scratch)
            out[chunk_lo:] = scratch[:out.nbytes - chunk_lo]
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CorruptBlockError(f"{path}: chunk does not decode ({exc})", path=path, tier="L3") from None
