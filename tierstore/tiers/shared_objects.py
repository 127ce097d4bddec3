"""The shared tier's objects: names, the block format and content hashes (no I/O).

Under the tier's prefix::

    blocks/<h[:2]>/<h>        one object per block, named by the SHA-256 of its dtype, shape and
                              raw bytes: magic, header length, a JSON header, then the bytes
                              encoded by an L3 codec (raw when that saves < ``MIN_RATIO``)
    refs/<k[:2]>/<k>          a small JSON pointer from a store key (k = SHA-256 of the key) to
                              the content hash of its block (last publisher wins)
    manifests/<name>.json     one per published name: store keys -> content hashes, written last

A body is checked against its name when decoded, so a damaged or swapped object is never used.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptBlockError, SharedTierError
from .l3_codecs import MIN_RATIO, RAW, Codec, codec_from_id

__all__ = ["BlockHeader", "content_hash", "encode_block", "decode_block", "parse_shared_url", "block_path",
           "ref_path", "manifest_path", "parse_json"]

_MAGIC = b"TSB1"
_HEAD = struct.Struct("<4sI")


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


def content_hash(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> str:
    """SHA-256 (hex) of a block's dtype, shape and raw bytes: its name in the shared tier."""
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


def encode_block(data: np.ndarray, header: BlockHeader, codec: Codec) -> tuple[BlockHeader, bytes]:
    """The object body of a block: magic, header length, JSON header, then the encoded bytes.

    ``codec`` is tried and dropped for raw when it saves less than ``MIN_RATIO``.
    """
    payload: Any = data
    if codec is not RAW and data.nbytes:
        encoded = codec.encode(data)
        if len(encoded) * MIN_RATIO <= data.nbytes:
            payload, header = encoded, BlockHeader(**{**_fields(header), "codec": codec.id})
    head = json.dumps(header.to_json(), separators=(",", ":")).encode()
    return header, b"".join((_HEAD.pack(_MAGIC, len(head)), head, memoryview(payload).cast("B")))


def _fields(header: BlockHeader) -> dict[str, Any]:
    return {name: getattr(header, name) for name in BlockHeader.__slots__}


def decode_block(body: memoryview | bytes | bytearray, expected: str) -> tuple[BlockHeader, np.ndarray]:
    """Decode an object body and check it against its name ``expected`` (the content hash).

    Raises ``CorruptBlockError`` when the body is damaged or is not the block it is named for.
    """
    view = memoryview(body)
    try:
        magic, size = _HEAD.unpack_from(view)
        if magic != _MAGIC:
            raise ValueError("not a tierstore block object")
        header = BlockHeader.from_json(json.loads(bytes(view[_HEAD.size:_HEAD.size + size])))
        payload = view[_HEAD.size + size:]
        if header.codec == "raw" and isinstance(body, bytearray) and len(payload) == header.nbytes:
            out = np.frombuffer(body, dtype=np.uint8, offset=_HEAD.size + size)  # ours and writable: no copy
        else:
            out = np.empty(header.nbytes, dtype=np.uint8)
            codec_from_id(header.codec).decode_into(payload, out)
    except (ValueError, struct.error, SharedTierError, RuntimeError) as exc:
        raise CorruptBlockError(f"shared block {expected[:16]}... is damaged ({exc})", tier="shared") from None
    if header.hash != expected or content_hash(out, header.dtype, header.shape) != expected:
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
