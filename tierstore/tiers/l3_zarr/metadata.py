"""The ``zarr.json`` documents of L3, built and checked by zarr's own metadata classes, and how they are written.

Every array is 2-D, ``(elements, element size)`` bytes, so that byte-grouped codecs are the spec's
``transpose`` (see :mod:`tierstore.tiers.codecs`). Only zarr readers need these documents:
tierstore itself reads by the catalog's offsets.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.chunk_key_encodings import V2ChunkKeyEncoding
from zarr.core.dtype import UInt8
from zarr.core.metadata.v3 import ArrayV3Metadata

from ...fsguard import NOFOLLOW
from ..codecs import Codec
from .layout import GRANULE, PACK_MAX, Contents

__all__ = ["write_json", "fsync_dir", "group_meta", "pack_meta", "block_meta", "run_meta"]


def write_json(path: Path, doc: dict[str, Any], *, sync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # O_NOFOLLOW: a planted zarr.json.tmp link must not have this written into its target;
    # the rename then replaces a link at ``path`` itself, never what it points at.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644), "w",
                   encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.flush()
        if sync:
            os.fdatasync(fh.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _array_meta(nbytes: int, shard: int, inner: int, codec: Codec, attributes: dict[str, Any]) -> dict[str, Any]:
    """The ``zarr.json`` of a 2-D ``(elements, element size)`` uint8 array of ``nbytes`` bytes.

    ``shard`` and ``inner`` are in bytes; zarr's own metadata classes build and check the document.
    """
    return {**_geometry_meta(nbytes, shard, inner, codec), "attributes": {"tierstore": attributes}}


@functools.lru_cache(maxsize=256)
def _geometry_meta(nbytes: int, shard: int, inner: int, codec: Codec) -> dict[str, Any]:
    # Cached: zarr's validation costs ~0.2-0.5 ms a document, a fifth of a 300 KiB block's put, and
    # a model's blocks come in few sizes. Attributes are plain JSON that zarr passes through as given.
    size = codec.elementsize
    meta = ArrayV3Metadata(
        shape=(nbytes // size, size), data_type=UInt8(),
        chunk_grid={"name": "regular", "configuration": {"chunk_shape": [shard // size, size]}},
        chunk_key_encoding=V2ChunkKeyEncoding(separator="."), fill_value=0,
        codecs=[ShardingCodec(chunk_shape=(inner // size, size), codecs=codec.zarr_codecs(),
                              index_codecs=[BytesCodec(), Crc32cCodec()], index_location="end")],
        attributes={}, dimension_names=("element", "byte"), storage_transformers=())
    return meta.to_dict()


def pack_meta(codec: Codec, shards: int) -> dict[str, Any]:
    """The ``zarr.json`` of a pack of ``shards`` shards of 4 KiB granules."""
    return _array_meta(max(shards, 1) * PACK_MAX, PACK_MAX, GRANULE, codec, {
        "kind": "pack", "codec": codec.id, "granule": GRANULE,
        "blocks": "many small blocks; the catalog's blocks table (l3_array, l3_chunk) says which chunks hold each"})


def block_meta(nbytes: int, shard: int, inner: int, codec: Codec, contents: Contents | None) -> dict[str, Any]:
    """The ``zarr.json`` of a large block's array (``contents`` go to its attributes)."""
    attributes: dict[str, Any] = {"kind": "block", "codec": codec.id}
    if contents is not None:
        attributes.update(key=contents.key, dtype=contents.dtype, shape=list(contents.shape))
    return _array_meta(nbytes, shard, inner, codec, attributes)


def run_meta(inner: int, chunks: int, codec: Codec, blocks: list[tuple[int, int, Contents | None]]) -> dict[str, Any]:
    """The ``zarr.json`` of the array a commit's large blocks share: ``blocks`` are ``(first chunk, bytes,
    contents)`` in file order, each starting on a chunk; ``chunks`` inner chunks of ``inner`` bytes in all.

    One block: exactly :func:`block_meta`'s document (the array is the block). Several: the array spans
    every chunk (a block's padded last chunk reads as zeros), and its attributes list the blocks.
    """
    if len(blocks) == 1:
        return block_meta(blocks[0][1], chunks * inner, inner, codec, blocks[0][2])
    listed = [{"chunk": first, "nbytes": nbytes, **({} if c is None else {"key": c.key, "dtype": c.dtype,
                                                                         "shape": list(c.shape)})}
              for first, nbytes, c in blocks]
    return _array_meta(chunks * inner, chunks * inner, inner, codec,
                       {"kind": "run", "codec": codec.id, "blocks": listed})


def group_meta(attributes: dict[str, Any]) -> dict[str, Any]:
    """The ``zarr.json`` of a group."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}
