"""L3: the durable tier, a compressed Zarr v3 hierarchy on the local disk.

Layout under ``<store>/l3`` (every folder is a zarr v3 group or array, so
zarr-python and tensorstore read it as is)::

    zarr.json                       group
    packs/<codec>/zarr.json         one uint8 array per codec for small blocks
    packs/<codec>/<n>.0             shard n: 4 KiB inner chunks, appended to in place
    blocks/<block id>/zarr.json     one uint8 array per commit's large blocks of one codec and chunk size
    blocks/<block id>/0.0           its single shard: ~1 MiB inner chunks, the blocks in put order

Every array is 2-D, ``(elements, element size)`` bytes, so that byte-grouped
codecs are the spec's ``transpose`` (see :mod:`tierstore.tiers.codecs`). A pack's shape
covers the shards it has; each 4 KiB granule is one inner chunk, and a packed
block is the run of chunks from its ``Location.chunk``. A large block's array
holds the large blocks of one commit with one codec and inner chunk size (a *run*, named by its
first block), each from a chunk boundary at its ``Location.chunk``, so a later read of them reads
one file front to back; its attributes name each block's key, dtype and shape (a run of one block
is exactly the block, as before). A run is complete at ``prepare`` (index and ``zarr.json``) and
never appended to again; the engine frees it only with the last block that names it.
Layout 1 (stores written before) had 1-D arrays, shard files ``<n>``, a pack
shape of 2^50 bytes and ``numcodecs.shuffle``; :meth:`ZarrL3.relink` turns
one into layout 2 without rewriting any chunk (the bytes are the same).

Everything is a *sharded* array so that one file holds many independently
compressed chunks and an index at its end (zarr's ``sharding_indexed``).
Small blocks are appended to the active shard of their codec's pack: an
append writes the new chunks, then (at ``prepare``) a fresh index after them,
so the file stays a valid shard after every commit and a torn append is cut
off on recovery by truncating to the length the catalog committed.

File names come from block ids and shard numbers, never from keys. This
module knows nothing of the catalog: the store tells it what is committed.
Zarr's own I/O is not on the hot path (it costs a metadata file per array and
milliseconds per call); reads are one ``pread`` of contiguous chunks.

The parts, one job each: :mod:`.layout` (constants and values: :class:`Location`, ...),
:mod:`.metadata` (the ``zarr.json`` documents), :mod:`.shard_format` (shard index bytes),
:mod:`.files` (names and shared read descriptors), :mod:`.writer`, :mod:`.reader`,
:mod:`.repair` (recovery, index upkeep, the layout upgrade) and :mod:`.tier`, the facade
:class:`ZarrL3` the engine holds.
"""

from __future__ import annotations

from .layout import (
    ARRAY_CHUNK,
    EMPTY_LOCATION,
    GRANULE,
    LAYOUT,
    OPEN_FILES,
    PACK_INDEX_BYTES,
    PACK_MAX,
    PACK_SLOTS,
    Contents,
    L3Columns,
    Location,
    RecoveryReport,
    chunk_count,
)
from .tier import ZarrL3

__all__ = ["GRANULE", "PACK_SLOTS", "PACK_MAX", "OPEN_FILES", "PACK_INDEX_BYTES", "LAYOUT", "EMPTY_LOCATION",
           "ARRAY_CHUNK", "Contents", "L3Columns", "Location", "RecoveryReport", "ZarrL3", "chunk_count"]
