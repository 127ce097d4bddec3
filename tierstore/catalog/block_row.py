"""``BlockRow``: one row of the ``blocks`` table, checked as it is read and built by named constructors.

The L3 columns (array, shard, offset, chunk sizes, inner chunk size, codec, stored bytes) are L3's to
interpret: the catalog keeps them as an opaque :data:`L3Columns` tuple that
:meth:`tierstore.tiers.l3_zarr.Location.to_columns` makes and ``Location.from_columns`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptBlockError

__all__ = ["BlockRow", "L3Columns", "NO_L3"]

L3Columns = tuple[str, str | None, int | None, int | None, bytes | None, int | None, int, int | None]
"""``(codec, array, shard, offset, sizes, inner, stored_bytes, chunk)``: where L3 keeps a block, as the catalog
stores it (``chunk`` is the ``l3_chunk`` column)."""
NO_L3: L3Columns = ("raw", None, None, None, None, None, 0, None)
"""The L3 columns of a block with no bytes in L3 (cache-only, in L1 or L2)."""


@dataclass(frozen=True, slots=True)
class BlockRow:
    """One row of ``blocks``, as the store reads it."""

    key: str
    block_id: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int
    durable: bool
    codec: str
    l3_array: str | None
    l3_shard: int | None
    l3_offset: int | None
    l3_sizes: bytes | None
    l3_inner: int | None
    stored_bytes: int
    tiers: int
    created: float
    updated: float
    parent: str | None = None
    """The key of the block this one extends in a chain (``put(..., parent=...)``); it may be gone."""
    l3_chunk: int | None = None
    """The block's first inner chunk along axis 0 of ``l3_array`` (for zarr readers); None: unknown."""

    @staticmethod
    def stored(key: str, block_id: int, dtype: str, shape: tuple[int, ...], nbytes: int, checksum: int, *,
               durable: bool, l3: L3Columns, tiers: int, created: float, updated: float,
               parent: str | None) -> BlockRow:
        """A row whose bytes are where ``l3`` says (``Location.to_columns()``; nowhere for a cache-only block in L2)."""
        codec, array, shard, offset, sizes, inner, stored_bytes, chunk = l3
        return BlockRow(key, block_id, dtype, shape, nbytes, checksum, durable, codec, array, shard, offset, sizes,
                        inner, stored_bytes, tiers, created, updated, parent, chunk)

    @staticmethod
    def cache_only(key: str, block_id: int, dtype: str, shape: tuple[int, ...], nbytes: int, checksum: int, *,
                   tier: int, created: float, updated: float, parent: str | None) -> BlockRow:
        """The row of a cache-only block whose only copy is in the volatile tier ``tier`` (a tier bit)."""
        return BlockRow.stored(key, block_id, dtype, shape, nbytes, checksum, durable=False, l3=NO_L3, tiers=tier,
                               created=created, updated=updated, parent=parent)

    @property
    def l3_columns(self) -> L3Columns:
        """Where L3 keeps the bytes, for ``Location.from_columns()``."""
        return (self.codec, self.l3_array, self.l3_shard, self.l3_offset, self.l3_sizes, self.l3_inner,
                self.stored_bytes, self.l3_chunk)

    def moved(self, l3: L3Columns) -> BlockRow:
        """The same block at another place in L3 (compaction copies its encoded chunks as they are)."""
        codec, array, shard, offset, sizes, inner, stored_bytes, chunk = l3
        return dataclasses.replace(self, codec=codec, l3_array=array, l3_shard=shard, l3_offset=offset,
                                   l3_sizes=sizes, l3_inner=inner, stored_bytes=stored_bytes, l3_chunk=chunk)

    @staticmethod
    def from_tuple(row: Sequence[Any]) -> BlockRow:
        """Build from a ``SELECT {BLOCK_COLUMNS}`` row."""
        (key, block_id, dtype, shape, nbytes, checksum, durable, codec, array, shard, offset, sizes, inner,
         stored, tiers, created, updated, parent, chunk) = row
        _check_location(key, nbytes, array, shard, offset, sizes, inner)
        if not isinstance(parent, str) or not parent:
            parent = None  # only an eviction hint: a damaged link is no link, never a damaged block
        return BlockRow(key, block_id, dtype, _checked_shape(key, shape), nbytes, checksum, bool(durable), codec,
                        array, shard, offset, sizes, inner, stored, tiers, created, updated, parent,
                        chunk if type(chunk) is int and chunk >= 0 else None)

    def to_tuple(self) -> tuple[Any, ...]:
        """Values in ``BLOCK_COLUMNS`` order."""
        return (self.key, self.block_id, self.dtype, json.dumps(list(self.shape)), self.nbytes, self.checksum,
                int(self.durable), self.codec, self.l3_array, self.l3_shard, self.l3_offset, self.l3_sizes,
                self.l3_inner, self.stored_bytes, self.tiers, self.created, self.updated, self.parent,
                self.l3_chunk)


_ARRAY_NAME = re.compile(r"packs/[a-z0-9-]+|blocks/[0-9a-f]{16}")
"""The only L3 array names tierstore writes: a row naming anything else (``blocks/../..``) is damaged."""


def _damaged(key: str, what: str) -> CorruptBlockError:
    return CorruptBlockError(f"block {key!r}: its catalog row is damaged ({what}); restore the catalog or "
                             "delete the key", key=key, tier="L3")


def _checked_shape(key: str, text: Any) -> tuple[int, ...]:
    try:
        shape = json.loads(text)
    except (TypeError, ValueError):
        shape = None
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _damaged(key, f"shape {str(text)[:60]!r}")
    return tuple(shape)


def _check_location(key: str, nbytes: Any, array: Any, shard: Any, offset: Any, sizes: Any, inner: Any) -> None:
    """CorruptBlockError unless the L3 columns of a row can describe a block tierstore wrote."""
    if type(nbytes) is not int or nbytes < 0:
        raise _damaged(key, f"nbytes {nbytes!r}")
    if array is None:
        return
    if not isinstance(array, str) or not _ARRAY_NAME.fullmatch(array):
        raise _damaged(key, f"L3 array {str(array)[:60]!r}")
    if any(type(v) is not int or v < 0 for v in (shard, offset)) or type(inner) is not int or inner <= 0:
        raise _damaged(key, f"L3 shard/offset/inner {shard!r}/{offset!r}/{inner!r}")
    if not isinstance(sizes, bytes) or len(sizes) % 4:
        raise _damaged(key, "L3 chunk sizes")
    chunks = len(sizes) // 4
    if not 0 < nbytes <= chunks * inner:
        raise _damaged(key, f"{nbytes} bytes cannot be {chunks} chunks of {inner}")


