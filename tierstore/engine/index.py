"""The block index: what the running store knows about its committed blocks, in memory.

One object owns the committed rows cached for the hot path (with their L3 locations), the byte
totals, block-id allocation, the generation that tells a lookup whether a commit raced it, and the
version (block id) of each key whose newest committed version is cache-only (held in L1/L2 only).
The handle, the migrator and upkeep (compaction) share one index and change it only through these
methods.

:attr:`BlockIndex.lock` is the store's index lock (lock order: writer mutex -> L1 -> L2 -> index
lock -> catalog/L3). Every catalog commit that changes a key's row holds it from its check through
the commit and the index update that follows (:meth:`committed`, :meth:`spilled`, :meth:`moved`),
so a spill planned from an older version sees the newer one and is dropped; no tier lock is taken
while it is held.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..catalog import BlockRow, Catalog
from ..errors import BlockNotFoundError, CorruptBlockError, StoreFullError, UnsupportedTensorError
from ..tensors import dtype_from_name
from ..tiers.l3_zarr import Location
from .transaction import location_of

__all__ = ["BlockIndex", "ROW_CACHE"]

ROW_CACHE = 1 << 16
"""Committed rows kept in memory for the hot path (cleared whole when full: simple and O(1))."""

Located = tuple[BlockRow, Location]


class BlockIndex:
    """Cached rows, totals and block ids of one store (see the module docstring)."""

    def __init__(self, catalog: Catalog, path: Path, *, readonly: bool, l3_capacity: int | None) -> None:
        self._catalog = catalog
        self._path = path
        self._readonly = readonly
        self._l3_capacity = l3_capacity
        next_block_id, totals, data_version = catalog.next_block_id(), catalog.totals(), catalog.data_version()
        self._next_block_id = next_block_id
        self._ids_lock = threading.Lock()
        self._rows: dict[str, Located] = {}
        self._lock = threading.Lock()
        """Guards the row cache and the totals (innermost: taken by readers too)."""
        self.lock = threading.Lock()
        """The index lock: held across each catalog commit that changes a key's row and the update that follows."""
        self._volatile: dict[str, int] = {}
        """Block id of each key whose newest committed version is cache-only (in L1/L2, not in L3)."""
        self._settling = threading.Condition(threading.Lock())
        self._unsettled = 0
        """Commits whose catalog part is done and whose tier admissions are not (see await_settled)."""
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

    def check_room(self, key: str, nbytes: int) -> None:
        """``StoreFullError`` if ``nbytes`` more in L3 would pass ``l3_cache_size``."""
        cap = self._l3_capacity
        stored = self._stored_bytes
        if cap is not None and stored + nbytes > cap:
            raise StoreFullError(
                f"put {key!r}: L3 holds {stored} of l3_cache_size={cap} bytes and the block "
                f"needs up to {nbytes}; delete blocks or raise l3_cache_size", key=key, tier="L3")

    # -- the row cache ------------------------------------------------------------------------------

    def lookup(self, key: str) -> Located:
        """The committed row of ``key`` with its L3 location (cached); ``BlockNotFoundError`` if none."""
        self.refresh()
        hit = self._rows.get(key)
        if hit is not None:
            return hit
        generation = self._generation
        row = self._catalog.get_block(key)
        if row is None:
            raise BlockNotFoundError(f"no block {key!r} in {self._path}", key=key)
        located = (_checked_size(row), location_of(row))
        self.remember(key, located, generation)  # unless a commit raced this lookup
        return located

    def refresh(self) -> None:
        """Read-only handles: forget cached rows and totals once a writer (another process) has committed."""
        if not self._readonly:
            return
        version = self._catalog.data_version()
        if version != self._data_version:
            totals = self._catalog.totals()
            with self._lock:
                self._rows.clear()
                self._generation += 1
                self._data_version = version
                self._count, self._logical_bytes, self._stored_bytes = totals

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

    def committed(self, rows: Sequence[Located], deletes: Sequence[str], replaced: Sequence[BlockRow],
                  versions: Mapping[str, int | None]) -> None:
        """A writer's catalog commit put ``rows`` (each with its L3 location), deleted ``deletes`` and
        replaced ``replaced`` (index lock held).

        ``versions``: for every key the transaction touched, the block id of its new cache-only
        version, or None when the key now has a committed row or none at all.
        """
        for key, version in versions.items():
            if version is not None:
                self._volatile[key] = version
            else:
                self._volatile.pop(key, None)
        with self._lock:
            self._generation += 1
            if len(self._rows) + len(rows) > ROW_CACHE:
                self._rows.clear()
            for located in rows[-ROW_CACHE:]:
                self._rows[located[0].key] = located
            for key in deletes:
                self._rows.pop(key, None)
            existed = {row.key for row in replaced}  # cache-only keys kept in L2 are counted as volatile
            self._count += sum(r.key not in existed for r, _ in rows) - sum(key in existed for key in deletes)
            self._logical_bytes += sum(r.nbytes for r, _ in rows) - sum(r.nbytes for r in replaced)
            self._stored_bytes += sum(r.stored_bytes for r, _ in rows) - sum(r.stored_bytes for r in replaced)

    def spilled(self, row: BlockRow, loc: Location) -> None:
        """A cache-only block was committed to L3 (a new key for the catalog; index lock held)."""
        self._volatile.pop(row.key, None)
        with self._lock:
            self._generation += 1
            self._rows[row.key] = (row, loc)
            self._count += 1
            self._logical_bytes += row.nbytes
            self._stored_bytes += row.stored_bytes

    def moved(self, rows: Sequence[BlockRow]) -> None:
        """Compaction committed the same blocks at new L3 places (index lock held)."""
        with self._lock:
            self._generation += 1
            for row in rows:
                if row.key in self._rows:
                    self._rows[row.key] = (row, location_of(row))

    # -- cache-only versions ------------------------------------------------------------------------

    def volatile_version(self, key: str) -> int | None:
        """The block id of ``key``'s newest committed version if that is cache-only (read under :attr:`lock`)."""
        return self._volatile.get(key)

    def volatile_keys(self) -> set[str]:
        """Keys whose newest committed version is cache-only (a snapshot)."""
        with self.lock:
            return set(self._volatile)

    def counted(self) -> int:
        """Committed blocks plus cache-only keys, in one step (a spill moves a key from one to the other)."""
        with self.lock:
            return self._count + len(self._volatile)

    def commit_spill(self, row: BlockRow, loc: Location, journal_id: int, version: int) -> bool:
        """Commit the row of a cache-only block the migrator copied to L3, if it is still the key's newest.

        ``version`` is the block id of the cache-only version that was copied. A writer that replaced or
        deleted the key since then changed its version under the same lock, so a stale spill is refused
        here (False, its journal entry closed) and never overwrites a newer row or brings a deleted key back.
        """
        with self.lock:
            if self._volatile.get(row.key) != version:
                self._catalog.journal_end([journal_id])
                return False
            if not self._catalog.commit_moved(row, journal_id, self._next_block_id):
                return False  # pragma: no cover - a committed row always clears the version above
            self.spilled(row, loc)
        return True

    def forget_volatile(self, key: str, version: int) -> None:
        """Cache-only version ``version`` of ``key`` is dropped without a copy: the key is gone."""
        with self.lock:
            if self._volatile.get(key) == version:
                del self._volatile[key]

    # -- commits between their catalog part and their tier admissions ------------------------------

    def begin_settling(self) -> None:
        """A commit's catalog part is done (index lock held); its L1/L2 admissions follow."""
        with self._settling:
            self._unsettled += 1

    def end_settling(self) -> None:
        """That commit's admissions are done."""
        with self._settling:
            self._unsettled -= 1
            self._settling.notify_all()

    def await_settled(self, key: str) -> bool:
        """After a reader found ``key`` in no tier and no row: whether it should look again.

        True when the key has a cache-only version (after waiting while commits in flight are
        between their catalog part and their admission: a cache-only put removes the key's row,
        then makes its L1/L2 entry resident, and a reader that looks in between finds neither), or
        when it has a committed row now: a cache-only version the reader missed while it left L2
        was spilled to L3 meanwhile (its row committed and its version cleared after the miss,
        before this call). False: the key is gone.
        """
        with self.lock:  # a commit that removed the row the caller missed has set the version too
            volatile = key in self._volatile
        if volatile:
            with self._settling:
                self._settling.wait_for(lambda: self._unsettled == 0, timeout=5.0)
            return True
        try:
            self.lookup(key)
        except BlockNotFoundError:
            return False
        return True


def _checked_size(row: BlockRow) -> BlockRow:
    """``row`` if its byte count is what its dtype and shape need (a damaged catalog row is refused)."""
    try:
        itemsize = dtype_from_name(row.dtype).itemsize
    except UnsupportedTensorError as exc:
        raise UnsupportedTensorError(f"block {row.key!r}: {exc.message}", key=row.key) from None
    if math.prod(row.shape) * itemsize != row.nbytes:
        raise CorruptBlockError(
            f"block {row.key!r}: its catalog row is damaged ({row.nbytes} bytes for {row.dtype} {row.shape}); "
            "restore the catalog or delete the key", key=row.key, tier="L3")
    return row
