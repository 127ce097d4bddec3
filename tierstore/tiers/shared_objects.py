"""The shared tier's objects: names, the block format and content hashes (no I/O).

Under the tier's prefix::

    blocks/<h[:2]>/<h>        one object per block, named by its content hash (below): magic,
                              header length, a JSON header, then the bytes encoded by an L3 codec
                              (raw when that saves < ``MIN_RATIO``)
    refs/<k[:2]>/<k>          a small JSON pointer from a store key (k = SHA-256 of the key) to
                              the content hash of its block (last publisher wins)
    manifests/<name>.json     one per published name: store keys -> content hashes, written last

Two versions of a block object, both read:

- ``TSB1`` (blocks of at most ``CHUNK`` bytes, and every block written before format 2): the
  payload is one encoded blob; the content hash is the SHA-256 of ``tierstore-block-v1``, the
  dtype, the shape and the raw bytes.
- ``TSB2`` (blocks larger than ``CHUNK``): the raw bytes are cut in ``CHUNK``-sized chunks, each
  encoded on its own and stored back to back; the header lists each chunk's encoded length and the
  SHA-256 of its raw bytes. The content hash is the SHA-256 of ``tierstore-block-v2``, the dtype,
  the shape, ``CHUNK`` and the chunk digests in order (a hash list), so the chunks can be hashed,
  encoded, fetched (ranged GETs) and decoded in parallel, and each is checked as it arrives.

A body is checked against its name when decoded, so a damaged or swapped object is never used.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..errors import CorruptBlockError, SharedTierError
from .codecs import MIN_RATIO, RAW, Codec, codec_from_id

__all__ = ["BlockHeader", "ChunkLayout", "CHUNK", "content_hash", "encode_block", "decode_block", "parse_head",
           "decode_chunk", "finish_chunked", "chunk_pool", "parse_shared_url", "block_path", "ref_path",
           "manifest_path", "parse_json"]

_MAGIC = b"TSB1"
_MAGIC2 = b"TSB2"
_HEAD = struct.Struct("<4sI")
CHUNK = 2 << 20
"""Raw bytes per chunk of a format-2 (chunked) block; blocks of at most this size are one blob (format 1)."""
_T = TypeVar("_T")
_R = TypeVar("_R")
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def chunk_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that hash, encode and decode chunks (zstd and hashlib release the GIL)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 1)),
                                                          thread_name_prefix="tierstore-chunks")
        return _POOL


def _map(fn: Callable[[_T], _R], items: Iterable[_T], pool: concurrent.futures.Executor | None) -> list[_R]:
    items = list(items)
    if pool is None or len(items) < 2:
        return [fn(item) for item in items]
    return list(pool.map(fn, items))


def _spans(nbytes: int) -> list[tuple[int, int]]:
    return [(start, min(nbytes, start + CHUNK)) for start in range(0, nbytes, CHUNK)]


def _combine(dtype: str, shape: tuple[int, ...], digests: Iterable[bytes]) -> str:
    digest = hashlib.sha256(f"tierstore-block-v2\0{dtype}\0{list(shape)}\0{CHUNK}\0".encode())
    for part in digests:
        digest.update(part)
    return digest.hexdigest()


def parse_shared_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not url.startswith("s3://"):
        raise SharedTierError(f"shared_url={url!r} is not an s3:// URL", tier="shared")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def block_path(digest: str) -> str:
    """Object name of the block whose content hash is ``digest``."""
    return f"blocks/{digest[:2]}/{digest}"


def ref_path(key: str) -> str:
    """Object name of the pointer for store key ``key`` (the key itself is hashed: any str is safe)."""
    digest = _hex(key)
    return f"refs/{digest[:2]}/{digest}"


def manifest_path(name: str) -> str:
    """Object name of the manifest of ``name`` (``model/tiny`` -> ``manifests/model/tiny.json``)."""
    if not name or name.startswith("/") or ".." in name.split("/") or "\0" in name or len(name) > 512:
        raise SharedTierError(f"manifest name {name!r} must be a relative path without '..' (at most 512 chars)",
                              tier="shared")
    return f"manifests/{name}.json"


def content_hash(data: np.ndarray, dtype: str, shape: tuple[int, ...], *,
                 pool: concurrent.futures.Executor | None = None) -> str:
    """SHA-256 (hex) naming a block in the shared tier (see the module's docstring for the two forms).

    A block larger than ``CHUNK`` is hashed chunk by chunk, on ``pool`` when given.
    """
    if data.nbytes > CHUNK:
        flat = data.reshape(-1).view(np.uint8)
        return _combine(dtype, shape, _map(lambda span: hashlib.sha256(flat[span[0]:span[1]].data).digest(),
                                           _spans(data.nbytes), pool))
    return _hash_v1(data, dtype, shape)


def _hash_v1(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> str:
    digest = hashlib.sha256(f"tierstore-block-v1\0{dtype}\0{list(shape)}\0".encode())
    digest.update(data.data)  # hashlib drops the GIL for large buffers
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """What an object says of its block (and a manifest or ref of each key)."""

    hash: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    crc32c: int
    durable: bool = True
    codec: str = "raw"

    def to_json(self) -> dict[str, Any]:
        """As a JSON-able dict."""
        return {"hash": self.hash, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes,
                "crc32c": self.crc32c, "durable": self.durable, "codec": self.codec}

    @classmethod
    def from_json(cls, obj: Any) -> BlockHeader:
        """Inverse of :meth:`to_json`; raises ``SharedTierError`` on a malformed entry."""
        try:
            header = cls(str(obj["hash"]), str(obj["dtype"]), tuple(int(s) for s in obj["shape"]),
                         int(obj["nbytes"]), int(obj["crc32c"]), bool(obj.get("durable", True)),
                         str(obj.get("codec", "raw")))
        except (KeyError, TypeError, ValueError) as exc:
            raise SharedTierError(f"malformed shared-tier entry ({exc!r})", tier="shared") from None
        if not re.fullmatch(r"[0-9a-f]{64}", header.hash) or header.nbytes < 0:
            raise SharedTierError(f"malformed shared-tier entry (hash {header.hash[:80]!r})", tier="shared")
        return header


def encode_block(data: np.ndarray, header: BlockHeader, codec: Codec, *,
                 pool: concurrent.futures.Executor | None = None) -> tuple[BlockHeader, bytes]:
    """The object body of a block: magic, header length, JSON header, then the encoded bytes.

    ``codec`` is tried and dropped for raw when it saves less than ``MIN_RATIO``. A block larger
    than ``CHUNK`` is written in format 2: its chunks are hashed and encoded on ``pool`` (when
    given) in one pass. ``header.hash`` may be left empty: it is filled in; when given, it must be
    the block's content hash (``ValueError`` otherwise).
    """
    if data.nbytes > CHUNK:
        return _encode_chunked(data, header, codec, pool)
    if not header.hash:
        header = BlockHeader(**{**_fields(header), "hash": _hash_v1(data, header.dtype, header.shape)})
    payload: Any = data
    if codec is not RAW and data.nbytes:
        encoded = codec.encode(data)
        if len(encoded) * MIN_RATIO <= data.nbytes:
            payload, header = encoded, BlockHeader(**{**_fields(header), "codec": codec.id})
    head = json.dumps(header.to_json(), separators=(",", ":")).encode()
    return header, b"".join((_HEAD.pack(_MAGIC, len(head)), head, memoryview(payload).cast("B")))


def _encode_chunked(data: np.ndarray, header: BlockHeader, codec: Codec,
                    pool: concurrent.futures.Executor | None) -> tuple[BlockHeader, bytes]:
    flat = data.reshape(-1).view(np.uint8)

    def one(span: tuple[int, int]) -> tuple[bytes, Any]:
        chunk = flat[span[0]:span[1]]
        digest = hashlib.sha256(chunk.data).digest()
        return digest, (chunk if codec is RAW else codec.encode(chunk))

    done = _map(one, _spans(data.nbytes), pool)
    digests = [digest for digest, _ in done]
    digest_hex = _combine(header.dtype, header.shape, digests)
    if header.hash and header.hash != digest_hex:
        raise ValueError("header.hash is not the block's content hash")
    payloads: list[Any] = [payload for _, payload in done]
    codec_id = codec.id
    if codec is not RAW and sum(len(p) for p in payloads) * MIN_RATIO > data.nbytes:
        payloads = [flat[a:b] for a, b in _spans(data.nbytes)]  # compression does not pay: raw chunks
        codec_id = RAW.id
    header = BlockHeader(**{**_fields(header), "hash": digest_hex, "codec": codec_id})
    head = json.dumps({**header.to_json(), "chunk": CHUNK,
                       "chunks": [[len(p), d.hex()] for p, d in zip(payloads, digests, strict=True)]},
                      separators=(",", ":")).encode()
    return header, b"".join((_HEAD.pack(_MAGIC2, len(head)), head, *(memoryview(p).cast("B") for p in payloads)))


def _fields(header: BlockHeader) -> dict[str, Any]:
    return {name: getattr(header, name) for name in BlockHeader.__slots__}


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """Where a format-2 object's chunks lie: ``(start, end)`` in the object, raw span, raw SHA-256."""

    header: BlockHeader
    body_size: int
    chunks: tuple[tuple[int, int, int, int, bytes], ...]
    """``(object_start, object_end, raw_start, raw_end, sha256)`` of each chunk."""


def _damaged(expected: str, why: object) -> CorruptBlockError:
    return CorruptBlockError(f"shared block {expected[:16]}... is damaged ({why})", tier="shared")


def parse_head(view: memoryview | bytes | bytearray, expected: str) -> tuple[int, BlockHeader | ChunkLayout | None]:
    """The header at the start of an object body, from as much of the body as ``view`` holds.

    Returns ``(header_end, what)``: ``what`` is a ``BlockHeader`` (format 1: the payload follows,
    one blob), a ``ChunkLayout`` (format 2), or None when ``view`` is too short to hold the header
    (``header_end`` is then how many bytes it needs). Raises ``CorruptBlockError`` for a body that
    is not a block object or whose header names another block than ``expected``.
    """
    view = memoryview(view)
    if len(view) < _HEAD.size:
        return _HEAD.size, None
    try:
        magic, size = _HEAD.unpack_from(view)
        if magic not in (_MAGIC, _MAGIC2):
            raise ValueError("not a tierstore block object")
        end = _HEAD.size + size
        if len(view) < end:
            return end, None
        obj = json.loads(bytes(view[_HEAD.size:end]))
        header = BlockHeader.from_json(obj)
        if header.hash != expected:
            raise CorruptBlockError(f"shared block {expected[:16]}... failed its content hash (damaged or replaced "
                                    "in the bucket); it was not used", tier="shared")
        if magic == _MAGIC:
            return end, header
        if int(obj["chunk"]) != CHUNK:
            raise ValueError(f"chunk size {obj['chunk']} (this version reads {CHUNK})")
        spans = _spans(header.nbytes)
        listed = obj["chunks"]
        if not isinstance(listed, list) or len(listed) != len(spans):
            raise ValueError("chunk list does not match the block's size")
        chunks = []
        at = end
        for (raw_start, raw_end), (length, digest) in zip(spans, listed, strict=True):
            length = int(length)
            if length < 0 or not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
                raise ValueError("malformed chunk entry")
            chunks.append((at, at + length, raw_start, raw_end, bytes.fromhex(digest)))
            at += length
        if _combine(header.dtype, header.shape, (c[4] for c in chunks)) != expected:
            raise CorruptBlockError(f"shared block {expected[:16]}... failed its content hash (its chunk list was "
                                    "damaged or replaced in the bucket); it was not used", tier="shared")
        return end, ChunkLayout(header, at, tuple(chunks))
    except (ValueError, struct.error, SharedTierError, KeyError, TypeError) as exc:
        if isinstance(exc, CorruptBlockError):
            raise
        raise _damaged(expected, exc) from None


def decode_chunk(layout: ChunkLayout, index: int, payload: memoryview | bytes | bytearray, out: np.ndarray,
                 expected: str) -> None:
    """Decode chunk ``index`` of a format-2 block into its span of ``out`` and check its SHA-256.

    Raises ``CorruptBlockError`` when the chunk does not decode or is not the chunk listed.
    """
    start, end, raw_start, raw_end, digest = layout.chunks[index]
    if len(payload) != end - start:
        raise _damaged(expected, f"chunk {index} is {len(payload)} bytes, expected {end - start}")
    target = out[raw_start:raw_end]
    try:
        codec_from_id(layout.header.codec).decode_into(payload, target)
    except (ValueError, RuntimeError) as exc:
        raise _damaged(expected, f"chunk {index}: {exc}") from None
    if hashlib.sha256(target.data).digest() != digest:
        raise CorruptBlockError(f"shared block {expected[:16]}... chunk {index} failed its hash (damaged in the "
                                "bucket); it was not used", tier="shared")


def finish_chunked(layout: ChunkLayout, body_size: int, expected: str) -> None:
    """Check that an object of ``body_size`` bytes holds exactly the chunks its header lists."""
    if body_size != layout.body_size:
        raise _damaged(expected, f"object is {body_size} bytes, its chunk list says {layout.body_size}"
                       + (" (a chunk is missing)" if body_size < layout.body_size else ""))


def decode_block(body: memoryview | bytes | bytearray, expected: str, *,
                 pool: concurrent.futures.Executor | None = None) -> tuple[BlockHeader, np.ndarray]:
    """Decode an object body and check it against its name ``expected`` (the content hash).

    The chunks of a format-2 body are decoded and checked on ``pool`` when given. Raises
    ``CorruptBlockError`` when the body is damaged or is not the block it is named for.
    """
    view = memoryview(body)
    end, what = parse_head(view, expected)
    if what is None:
        raise _damaged(expected, "object is shorter than its header")
    if isinstance(what, ChunkLayout):
        finish_chunked(what, len(view), expected)
        out = np.empty(what.header.nbytes, dtype=np.uint8)
        _map(lambda i: decode_chunk(what, i, view[what.chunks[i][0]:what.chunks[i][1]], out, expected),
             range(len(what.chunks)), pool)
        return what.header, out
    header = what
    try:
        payload = view[end:]
        if header.codec == "raw" and isinstance(body, bytearray) and len(payload) == header.nbytes:
            out = np.frombuffer(body, dtype=np.uint8, offset=end)  # ours and writable: no copy
        else:
            out = np.empty(header.nbytes, dtype=np.uint8)
            codec_from_id(header.codec).decode_into(payload, out)
    except (ValueError, RuntimeError) as exc:
        raise _damaged(expected, exc) from None
    if _hash_v1(out, header.dtype, header.shape) != expected:  # format 1, whatever the size
        raise CorruptBlockError(f"shared block {expected[:16]}... failed its content hash (damaged or replaced "
                                "in the bucket); it was not used", tier="shared")
    return header, out


def parse_json(body: bytes, path: str) -> dict[str, Any]:
    """``body`` as a JSON object; ``SharedTierError`` if it is not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise SharedTierError(f"shared object {path} is not a JSON object", tier="shared")
    return obj
