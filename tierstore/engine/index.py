"""The block index: what the running store knows about its committed blocks, in memory.

One object owns the committed rows cached for the hot path (with their L3 locations), the byte
totals, block-id allocation and the generation that tells a lookup whether a commit raced it. The
handle, the migrator and upkeep (compaction) share one index and change it only through these
methods, each under the index's own lock, so the cache and the totals always follow the catalog
commit that changed them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..catalog import BlockRow
from ..tiers.l3_zarr import Location
from .transaction import location_of

__all__ = ["BlockIndex", "ROW_CACHE"]

ROW_CACHE = 1 << 16
"""Committed rows kept in memory for the hot path (cleared whole when full: simple and O(1))."""

Located = tuple[BlockRow, Location]


class BlockIndex:
    """Cached rows, totals and block ids of one store (see the module docstring)."""

    def __init__(self, next_block_id: int, totals: tuple[int, int, int], data_version: int) -> None:
        self._next_block_id = next_block_id
        self._ids_lock = threading.Lock()
        self._rows: dict[str, Located] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self._data_version = data_version
        self._count, self._logical_bytes, self._stored_bytes = totals

    # -- block ids ----------------------------------------------------------------------------------

    def new_block_id(self) -> int:
        """A block id never used before in this store (ids are never reused: copy-on-write)."""
        with self._ids_lock:
            block_id = self._next_block_id
            self._next_block_id += 1
            return block_id

    @property
    def next_block_id(self) -> int:
        """The next id :meth:`new_block_id` hands out (what a catalog commit records)."""
        return self._next_block_id

    # -- totals -------------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Committed blocks (cache-only blocks held only in L1/L2 are not counted here)."""
        return self._count

    @property
    def logical_bytes(self) -> int:
        """Raw bytes of the committed blocks."""
        return self._logical_bytes

    @property
    def stored_bytes(self) -> int:
        """Encoded bytes of the committed blocks in L3."""
        return self._stored_bytes

    # -- the row cache ------------------------------------------------------------------------------

    def cached(self, key: str) -> Located | None:
        """``key``'s committed row and L3 location, if cached (a dict read: no lock on the hot path)."""
        return self._rows.get(key)

    @property
    def generation(self) -> int:
        """Bumped by every change of committed rows: read it before a catalog lookup, pass it to :meth:`remember`."""
        return self._generation

    def remember(self, key: str, located: Located, generation: int) -> None:
        """Cache a row read from the catalog, unless a commit happened since ``generation`` was read."""
        with self._lock:
            if generation == self._generation:
                if len(self._rows) >= ROW_CACHE:
                    self._rows.clear()
                self._rows[key] = located

    def committed(self, rows: Sequence[BlockRow], deletes: Sequence[str], replaced: Sequence[BlockRow]) -> None:
        """A writer's catalog commit put ``rows``, deleted ``deletes`` and replaced ``replaced``."""
        with self._lock:
            self._generation += 1
            if len(self._rows) + len(rows) > ROW_CACHE:
                self._rows.clear()
            for row in rows[-ROW_CACHE:]:
                self._rows[row.key] = (row, location_of(row))
            for key in deletes:
                self._rows.pop(key, None)
            existed = {row.key for row in replaced}  # cache-only keys kept in L2 are counted as volatile
            self._count += sum(row.key not in existed for row in rows) - sum(key in existed for key in deletes)
            self._logical_bytes += sum(r.nbytes for r in rows) - sum(r.nbytes for r in replaced)
            self._stored_bytes += sum(r.stored_bytes for r in rows) - sum(r.stored_bytes for r in replaced)

    def spilled(self, row: BlockRow, loc: Location) -> None:
        """A cache-only block was committed to L3 (a new key for the catalog)."""
        with self._lock:
            self._generation += 1
            self._rows[row.key] = (row, loc)
            self._count += 1
            self._logical_bytes += row.nbytes
            self._stored_bytes += row.stored_bytes

    def moved(self, rows: Sequence[BlockRow]) -> None:
        """Compaction committed the same blocks at new L3 places."""
        with self._lock:
            self._generation += 1
            for row in rows:
                if row.key in self._rows:
                    self._rows[row.key] = (row, location_of(row))

    def refresh(self, data_version: int, totals: tuple[int, int, int]) -> None:
        """A read-only handle saw another process commit (``data_version``): forget cached rows, take ``totals``."""
        with self._lock:
            self._rows.clear()
            self._generation += 1
            self._data_version = data_version
            self._count, self._logical_bytes, self._stored_bytes = totals

    @property
    def data_version(self) -> int:
        """The catalog's ``data_version`` the cached rows and totals are from (read-only handles)."""
        return self._data_version
