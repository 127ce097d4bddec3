"""The values of the L3 layout: its constants, where a block is (:class:`Location`) and what recovery found.

Pure values: nothing here touches a file. The catalog keeps a :class:`Location` as opaque columns
(:meth:`Location.to_columns`); only L3 knows what they mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LAYOUT", "GRANULE", "PACK_SLOTS", "PACK_MAX", "PACK_INDEX_BYTES", "ARRAY_CHUNK", "BATCH", "OPEN_FILES",
           "EMPTY_LOCATION", "L3Columns", "Location", "Contents", "RecoveryReport", "chunk_count"]

LAYOUT = 2
"""The L3 layout this code writes (the catalog's ``store_meta`` says which one a store has)."""

GRANULE = 4096
"""Inner chunk of a pack: small blocks take whole granules."""
PACK_SLOTS = 64
"""Inner chunks per pack shard (a 1 KiB index per append)."""
PACK_MAX = GRANULE * PACK_SLOTS
"""Blocks up to this many bytes are packed; larger ones get an array of their own."""
PACK_INDEX_BYTES = PACK_SLOTS * 16 + 4
"""The shard index written after every append to a pack (offset and size per slot, then its crc32c)."""
ARRAY_CHUNK = 1 << 20
"""Target inner chunk of a large block: big enough to compress well, small enough to decode in parallel."""
BATCH = 64
"""Chunks encoded, written or read at a time for a large block: bounds the memory beside the block."""
OPEN_FILES = 64
"""Read descriptors one tier keeps open, shared by its threads (least recently used closed first).

Shard files are append-only and never reuse a name, so a kept descriptor never goes stale; one is
closed as soon as its file is deleted (compaction, gc, a freed large block) and no read uses it.
"""



L3Columns = tuple[str, str | None, int | None, int | None, bytes | None, int | None, int, int | None]
"""A :class:`Location` as the catalog keeps it: ``(codec, array, shard, offset, sizes, inner, stored bytes,
chunk)``.

The catalog stores the tuple without reading it (``BlockRow.l3_columns``); only L3 knows what it means.
"""


@dataclass(frozen=True, slots=True)
class Location:
    """Where a block's encoded bytes are: contiguous chunks in one shard file."""

    array: str
    """``packs/<codec>`` or ``blocks/<id>``; empty for a zero-byte block (nothing stored)."""
    shard: int
    offset: int
    sizes: tuple[int, ...]
    """Encoded size of each inner chunk, in file order."""
    inner: int
    """Decoded size of one inner chunk."""
    codec: str
    chunk: int | None = None
    """Index of the block's first inner chunk along axis 0 of ``array`` (0 for a large block); None when
    not known (a block of a layout-1 store whose shard index could not be read at the upgrade)."""

    @property
    def length(self) -> int:
        """Encoded bytes on disk."""
        return sum(self.sizes)

    def sizes_blob(self) -> bytes:
        """``sizes`` packed for the catalog."""
        return np.asarray(self.sizes, dtype="<u4").tobytes()

    @staticmethod
    def sizes_from_blob(blob: bytes) -> tuple[int, ...]:
        """Inverse of :meth:`sizes_blob`."""
        return tuple(int(x) for x in np.frombuffer(blob, dtype="<u4"))

    def to_columns(self) -> L3Columns:
        """``(codec, array, shard, offset, sizes, inner, stored bytes, chunk)`` as the catalog keeps them (opaque
        to it)."""
        return (self.codec, self.array or None, self.shard, self.offset, self.sizes_blob(), self.inner, self.length,
                self.chunk)

    @staticmethod
    def from_columns(columns: L3Columns) -> Location:
        """Inverse of :meth:`to_columns` (an empty location for a block with no bytes in L3)."""
        codec, array, shard, offset, sizes, inner, _stored, chunk = columns
        if array is None or sizes is None:
            return Location("", 0, 0, (), 0, codec)
        return Location(array, shard or 0, offset or 0, Location.sizes_from_blob(sizes), inner or 0, codec, chunk)


EMPTY_LOCATION = Location("", 0, 0, (), GRANULE, "raw")


@dataclass(frozen=True, slots=True)
class Contents:
    """What a large block's array holds, for its attributes (zarr readers see no catalog)."""

    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class RecoveryReport:
    """What :meth:`ZarrL3.recover` found and did."""

    removed_files: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    """Symbolic links found in L3: left alone (never followed, never removed); ``tierstore verify --fix``
    removes the links themselves and drops the blocks whose bytes they stand for."""
    rebuilt: list[str] = field(default_factory=list)
    """Shard rows the catalog lost or shortened, rebuilt from the bytes (their files were kept)."""
    catalog_rollback: str = ""
    """Non-empty when the catalog lost commits it had acknowledged (a damaged WAL): what was lost."""


def chunk_count(nbytes: int) -> int:
    """How many inner chunks a block of ``nbytes`` takes (for stats and planning)."""
    if nbytes <= PACK_MAX:
        return -(-nbytes // GRANULE)
    return math.ceil(nbytes / ARRAY_CHUNK)
