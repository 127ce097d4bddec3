"""The store's reports: a block's :meth:`info`, the access :meth:`history`, the :meth:`stats` per tier.

:class:`Reports` is a part of :class:`tierstore.engine.handle.TierStore` (the handle delegates these
methods to it); it only reads the store's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c

from ..catalog import BlockRow, Catalog
from ..catalog.tier_bits import L1_BIT, UNHASHED
from ..config import CacheConfig
from ..tensors import check_key, dtype_from_name
from ..tiers.l1_cuda import DevicePool
from ..tiers.l2_slab import HostArena
from ..tiers.l3_zarr import RecoveryReport
from .access_recorder import Access, AccessRecorder
from .handle_reads import Reads
from .index import BlockIndex
from .mover import Mover
from .residency import Residency
from .shared_coordinator import SharedCoordinator
from .values import BlockInfo, StoreStats

__all__ = ["Reports"]


class Reports:
    """The reports of a :class:`~tierstore.engine.handle.TierStore` (``info``, ``tiers_of``, ``history``, ``stats``).

    It only reads the parts it is given; blocks are looked up as a read does (through ``reads``).
    """

    def __init__(self, *, path: Path, readonly: bool, config: CacheConfig, recovery: RecoveryReport,
                 catalog: Catalog, recorder: AccessRecorder, l1: Residency[DevicePool] | None,
                 l2: Residency[HostArena] | None, shared: SharedCoordinator | None, counts: dict[str, int],
                 hits: dict[str, int], hit_bytes: dict[str, int], index: BlockIndex, mover: Mover, reads: Reads,
                 check_open: Callable[[], None]) -> None:
        self.path = path
        self.readonly = readonly
        self.config = config
        self.recovery = recovery
        self._catalog = catalog
        self._recorder = recorder
        self._l1 = l1
        self._l2 = l2
        self._shared = shared
        self._counts = counts
        self._hits = hits
        self._hit_bytes = hit_bytes
        self._index = index
        self._mover = mover
        self._reads = reads
        self._check_open = check_open

    def info(self, key: str) -> BlockInfo:
        """Everything the catalog knows of ``key``."""
        self._check_open()
        check_key(key)
        row = self._reads.lookup(key)
        if row.checksum == UNHASHED and (entry := self._reads.volatile(key)) is not None and row.tiers == L1_BIT:
            row = dataclasses.replace(row, checksum=crc32c.crc32c(self._mover.l1_bytes(entry).data))
        committed = self._catalog.get_block(key)
        if committed is not None and committed.block_id == row.block_id:
            row = committed  # the catalog's row has the first `created` (the row cache has the latest put's)
        if not self.readonly:
            self._recorder.flush()
        stats = self._catalog.block_stats(key) or {}
        pending = [a for a in self._recorder.pending() if a[1] == key and a[2] != "delete"]
        count = int(stats.get("access_count", 0)) + len(pending)
        last = max([stats.get("last_access") or 0.0] + [a[0] for a in pending]) or None
        return BlockInfo(
            key=key, dtype=dtype_from_name(row.dtype), shape=row.shape, nbytes=row.nbytes,
            tiers=self._tiers_of(row), checksum=row.checksum,
            stored_bytes=row.stored_bytes, codec=row.codec, durable=row.durable, block_id=row.block_id,
            access_count=count, last_access=last, created=row.created, updated=row.updated, parent=row.parent)

    def tiers_of(self, key: str) -> tuple[str, ...]:
        """The tiers holding ``key``'s current version now ("L1", "L2", "L3"), without the catalog
        round trip and history flush :meth:`info` makes: cheap enough to ask once per streamed weight."""
        self._check_open()
        check_key(key)
        return self._tiers_of(self._reads.lookup(key))

    def _tiers_of(self, row: BlockRow) -> tuple[str, ...]:
        tiers = []
        if self._l1 is not None:
            entry1 = self._l1.entries.get(row.key)
            if entry1 is not None and entry1.block_id == row.block_id:
                tiers.append("L1")
        if self._l2 is not None:
            entry = self._l2.entries.get(row.key)
            if entry is not None and entry.block_id == row.block_id and not entry.dead:
                tiers.append("L2")
        if row.l3_array is not None or row.nbytes == 0:
            tiers.append("L3")
        return tuple(tiers)

    def history(self, key: str | None = None, limit: int = 100) -> list[Access]:
        """The newest ``limit`` accesses (of ``key``), newest first."""
        self._check_open()
        if not self.readonly:
            self._recorder.flush()
        return self._catalog.history(key, limit)

    def stats(self) -> StoreStats:
        """Counts, sizes and activity, per tier."""
        self._check_open()
        self._index.refresh()
        index = self._index
        ratio = index.logical_bytes / index.stored_bytes if index.stored_bytes else 1.0
        error = self._recorder.last_error
        return StoreStats(
            path=str(self.path), readonly=self.readonly, blocks=index.count, logical_bytes=index.logical_bytes,
            stored_bytes=index.stored_bytes, compression_ratio=ratio, gets=self._counts["get"],
            puts=self._counts["put"], deletes=self._counts["delete"], hits=dict(self._hits),
            hit_bytes=dict(self._hit_bytes), mapped=self._counts["mapped"],
            tiers=self.tier_stats(),
            recovery={"removed": list(self.recovery.removed_files), "truncated": list(self.recovery.truncated),
                      "missing": list(self.recovery.missing), "links": list(self.recovery.links)},
            history_error=None if error is None else str(error))

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        tiers: dict[str, dict[str, Any]] = {}
        if self._l2 is not None:
            residency = self._l2.stats()  # first: it returns the slots of collected views to the arena
            arena = self._l2.arena.stats()
            alloc = arena.allocator
            tiers["L2"] = {"capacity": arena.capacity, "used": alloc.used, "requested": alloc.requested,
                           "free": alloc.free, "fragmentation": alloc.fragmentation, "pinned": arena.pinned,
                           "pin_reason": arena.pin_reason, "memlock_limit": arena.memlock_limit,
                           "file": arena.path, "policy": self.config.l2_eviction_policy,
                           "size_classes": [dataclasses.asdict(c) for c in alloc.per_class if c.slabs],
                           **residency}
        if self._l1 is not None:
            residency = self._l1.stats()  # first: it returns the slots of collected views to the arena
            pool = self._l1.arena.stats()
            tiers["L1"] = {"capacity": pool.capacity, "reserved": pool.reserved, "used": pool.used,
                           "requested": pool.requested, "free": pool.free, "fragmentation": pool.fragmentation,
                           "device": str(pool.device), "capability": pool.capability, "chunks": pool.chunks,
                           "bf16_native": pool.bf16_native, "oom_events": pool.oom_events,
                           "policy": self.config.l1_eviction_policy,
                           "size_classes": [dataclasses.asdict(c) for c in pool.per_class if c.slabs],
                           **residency}
        tiers["L3"] = {"capacity": self.config.l3_cache_size, "used": self._index.stored_bytes,
                       "blocks": self._index.count, "compression": self.config.l3_compression}
        if self._shared is not None:
            tiers["shared"] = self._shared.stats()
        return tiers
