"""Codecs of the L3 tier: how a block's bytes are compressed in a chunk.

Each codec is a chain of codecs from the zarr v3 spec, so the L3 arrays open
in zarr-python and tensorstore as they are. ``shuffle-zstd`` is the
byte-grouped zstd of DESIGN.md: every element's high (sign and exponent) byte
goes apart from its mantissa bytes, which is what lets bf16 weights compress
~1.49x instead of ~1.29x. In the spec that grouping is the ``transpose``
codec on a chunk viewed as ``(elements, element size)`` bytes: the same bytes
as numcodecs' shuffle, which tierstore's own path computes (see
``_shuffle_into_scratch``) because zarr's codec pipeline costs milliseconds a
call. Layout-1 stores named it ``numcodecs.shuffle`` (not in the spec); the
bytes are the same, so only their metadata changes on upgrade.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard
from numcodecs import Blosc, Zstd
from zarr.abc.codec import Codec as ZarrCodec
from zarr.codecs import BloscCodec, BytesCodec, TransposeCodec, ZstdCodec

__all__ = ["Codec", "RAW", "codec_from_id", "choose_codec", "MIN_RATIO"]

MIN_RATIO = 1.1
"""Below this compression ratio a block is stored raw (decoding would cost more than it saves)."""



@dataclass(frozen=True, slots=True)
class Codec:
    """One chunk codec: ``kind`` is raw, zstd, shuffle-zstd or blosc-lz4."""

    kind: str
    level: int = 0
    elementsize: int = 1

    @property
    def id(self) -> str:
        """A short stable name, used in the catalog and as the pack array's folder name."""
        if self.kind == "raw":
            return "raw"
        if self.kind == "zstd":
            return f"zstd{self.level}"
        if self.kind == "shuffle-zstd":
            return f"shuffle{self.elementsize}-zstd{self.level}"
        return f"blosclz4-{self.elementsize}"

    def zarr_codecs(self) -> list[ZarrCodec]:
        """The zarr v3 codecs of an inner chunk, a ``(rows, elementsize)`` uint8 array, encoded by this codec."""
        zstd = ZstdCodec(level=self.level, checksum=False)
        if self.kind == "raw":
            return [BytesCodec()]
        if self.kind == "zstd":
            return [BytesCodec(), zstd]
        if self.kind == "shuffle-zstd":
            grouped: list[ZarrCodec] = [TransposeCodec(order=(1, 0))] if self.elementsize > 1 else []
            return [*grouped, BytesCodec(), zstd]
        return [BytesCodec(), BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=self.elementsize,
                                         blocksize=0)]

    def encode(self, chunk: np.ndarray) -> bytes | np.ndarray:
        """Encode one chunk (a flat uint8 array)."""
        if self.kind == "raw":
            return chunk
        if self.kind == "zstd":
            return _compressor(self.level).compress(chunk.data)
        if self.kind == "shuffle-zstd":
            return _compressor(self.level).compress(_shuffle_into_scratch(chunk, self.elementsize).data)
        encoded: bytes = _blosc(self.elementsize).encode(chunk)  # numcodecs is untyped; Blosc.encode returns bytes
        return encoded

    def decode_into(self, data: Any, out: np.ndarray) -> None:
        """Decode one encoded chunk into ``out`` (exactly the chunk's decoded size).

        Raises ``ValueError`` when ``data`` does not decode to exactly ``out.nbytes`` bytes.
        """
        if self.kind == "raw":
            if len(data) != out.nbytes:
                raise ValueError(f"raw chunk is {len(data)} bytes, expected {out.nbytes}")
            out[:] = np.frombuffer(data, dtype=np.uint8)
        elif self.kind == "zstd":
            if out.nbytes >= _LARGE:
                _zstd(self.level).decode(data, out=out)  # straight into out, without the GIL
            else:
                out[:] = np.frombuffer(_decompress(data, out.nbytes), dtype=np.uint8)
        elif self.kind == "shuffle-zstd":
            if out.nbytes >= _LARGE:
                scratch = _scratch(out.nbytes)
                _zstd(self.level).decode(data, out=scratch)  # without the GIL, into reused memory
                _unshuffle(scratch, out, self.elementsize)
            else:
                _unshuffle(np.frombuffer(_decompress(data, out.nbytes), dtype=np.uint8), out, self.elementsize)
        else:
            _blosc(self.elementsize).decode(data, out=out)


RAW = Codec("raw")

_LARGE = 256 << 10
"""From this chunk size on, numcodecs' zstd (decodes into the output, releases the GIL) beats python-zstandard."""
_LOCAL = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # python-zstandard contexts are not thread-safe: one per thread and level. They are ~2x faster
    # than numcodecs' on small chunks because a context is reused instead of made per call.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_LOCAL, "compressors", None)
    if cache is None:
        cache = _LOCAL.compressors = {}
    codec = cache.get(level)
    if codec is None:
        if level == 1:
            # Weights are near-random mantissas beside a few exponent values: what compresses is the
            # exponents' skew, which the literals' Huffman code takes; matches buy little and cost the
            # decoder a sequence pass. The smallest hash table and the longest minimum match leave
            # almost only literals: bf16 1 MiB chunks 1.465x (level 1) -> 1.498x, and decoding ~20%
            # faster than with the hash_log=10 this used before (same zstd frames: old data reads).
            params = zstandard.ZstdCompressionParameters(
                window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7,
                strategy=zstandard.STRATEGY_FAST, write_content_size=1)
            codec = zstandard.ZstdCompressor(compression_params=params)
        else:
            codec = zstandard.ZstdCompressor(level=level, write_content_size=True)
        cache[level] = codec
    return codec


def _scratch(size: int) -> np.ndarray:
    """This thread's scratch for one chunk, exactly ``size`` bytes long: a prefix of one reused buffer.

    One buffer per thread, grown to the largest chunk the thread has handled (~1 MiB: L3 chunks
    are ``ARRAY_CHUNK`` or smaller), not one per distinct chunk size: L3's chunk sizes vary by
    block, and a buffer kept per size grew with every new one.
    """
    buf: np.ndarray | None = getattr(_LOCAL, "scratch", None)
    if buf is None or buf.nbytes < size:
        buf = _LOCAL.scratch = np.empty(size, dtype=np.uint8)
    return buf[:size]


def scratch_bytes() -> int:
    """Bytes of chunk scratch this thread holds (for tests: bounded by its largest chunk)."""
    buf: np.ndarray | None = getattr(_LOCAL, "scratch", None)
    return 0 if buf is None else buf.nbytes


def _shuffle_into_scratch(chunk: np.ndarray, elementsize: int) -> np.ndarray:
    """numcodecs' byte shuffle (byte 0 of every element, then byte 1, ...) into a reused buffer."""
    grouped = _scratch(chunk.nbytes)
    if elementsize == 1 or chunk.nbytes % elementsize:
        np.copyto(grouped, chunk)
        return grouped
    count = chunk.nbytes // elementsize
    for byte in range(elementsize):  # one strided read per byte of the element
        np.copyto(grouped[byte * count:(byte + 1) * count], chunk[byte::elementsize])
    return grouped


def _unshuffle(grouped: np.ndarray, out: np.ndarray, elementsize: int) -> None:
    """Inverse of numcodecs' byte shuffle, in numpy (which, unlike numcodecs' wrapper, drops the GIL).

    ``grouped`` holds byte 0 of every element, then byte 1, ...; ``out`` gets the elements back.
    """
    if elementsize == 1:
        np.copyto(out, grouped)
        return
    count = out.nbytes // elementsize
    if elementsize == 2 and out.nbytes % 2 == 0:  # bf16/fp16: high * 256 | low, ~3x a strided copy
        pairs = out.view(np.uint16)
        pairs[:] = grouped[count:]  # widen, then multiply in place: ~20% faster than a widening shift
        np.multiply(pairs, np.uint16(256), out=pairs)
        np.bitwise_or(pairs, grouped[:count], out=pairs)
        return
    columns = out.reshape(-1, elementsize)
    for byte in range(elementsize):  # one strided copy per byte of the element, not per element
        columns[:, byte] = grouped[byte * count:(byte + 1) * count]


def _decompress(data: Any, size: int) -> bytes:
    codec: zstandard.ZstdDecompressor | None = getattr(_LOCAL, "decompressor", None)
    if codec is None:
        codec = _LOCAL.decompressor = zstandard.ZstdDecompressor()
    try:
        out = codec.decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd: {exc}") from None
    if len(out) != size:
        raise ValueError(f"chunk decodes to {len(out)} bytes, expected {size}")
    return out

_ZSTD: dict[int, Zstd] = {}
_BLOSC: dict[int, Blosc] = {}


def _zstd(level: int) -> Zstd:
    codec = _ZSTD.get(level)
    if codec is None:
        codec = _ZSTD[level] = Zstd(level=level)
    return codec


def _blosc(typesize: int) -> Blosc:
    codec = _BLOSC.get(typesize)
    if codec is None:
        codec = _BLOSC[typesize] = Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE, typesize=typesize)
    return codec


@functools.lru_cache(maxsize=64)
def codec_from_id(codec_id: str) -> Codec:
    """Inverse of ``Codec.id``; raises ``ValueError`` for an unknown id."""
    if codec_id == "raw":
        return RAW
    if codec_id.startswith("zstd"):
        return Codec("zstd", int(codec_id[4:]))
    if codec_id.startswith("shuffle"):
        size, _, level = codec_id[7:].partition("-zstd")
        return Codec("shuffle-zstd", int(level), int(size))
    if codec_id.startswith("blosclz4-"):
        return Codec("blosc-lz4", 0, int(codec_id[9:]))
    raise ValueError(f"unknown codec id {codec_id!r}")


def choose_codec(setting: str, itemsize: int) -> Codec:
    """The codec the ``l3_compression`` setting asks for, for elements of ``itemsize`` bytes.

    ``setting`` is normalised by ``CacheConfig``: off, auto, zstd[:N], shuffle-zstd[:N] or blosc-lz4.
    Whether compression pays for a given block is decided by the caller on real bytes.
    """
    name, _, level_text = setting.partition(":")
    if name == "off":
        return RAW
    if name == "blosc-lz4":
        return Codec("blosc-lz4", 0, itemsize)
    level = int(level_text) if level_text else 1
    if name == "zstd" or (name in ("auto", "shuffle-zstd") and itemsize == 1):
        return Codec("zstd", level)
    return Codec("shuffle-zstd", level, itemsize)
