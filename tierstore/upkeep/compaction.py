"""Giving disk space back: garbage collection and compaction of L3 packs.

Small blocks live in append-only pack shards, so a replaced or deleted small
block leaves dead bytes behind (and every commit leaves a 1 KiB shard index).
:func:`gc` deletes shard files no block points at any more; :func:`compact`
also rewrites the live blocks of sparse shards into fresh ones.

Compaction is copy-on-write, like every other write: the encoded chunks are
copied (not re-encoded) after the active shard of their pack and synced, one
catalog commit points the rows at the copies (same block ids, same bytes),
and only then are the old shard files deleted. A crash before the commit
leaves the old rows and a torn append that the next open cuts off; a crash
after it leaves old shard files no row points at, which the next open
removes. Readers that still hold an old location find the file gone, read
the row again and follow it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..catalog import BlockRow, Catalog
from ..engine.mover import checksum_ok
from ..engine.transaction import location_of
from ..errors import ConfigError, CorruptBlockError, UnsafePathError, translate_os_error
from ..tiers.l3_zarr import PACK_SLOTS

if TYPE_CHECKING:
    from ..engine.handle import TierStore

__all__ = ["ShardUsage", "MaintenanceReport", "shard_usage", "fragmentation", "compact", "gc", "disk_usage"]

INDEX_BYTES = PACK_SLOTS * 16 + 4
"""The shard index a pack file ends with (64 offset/size pairs and a crc32c)."""

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ShardUsage:
    """How much of one pack shard file the catalog still points at."""

    array: str
    shard: int
    length: int
    """Committed bytes of the file."""
    blocks: int
    live_bytes: int
    """Encoded bytes of the blocks in it."""

    @property
    def dead_bytes(self) -> int:
        """Bytes no block needs: replaced or deleted blocks and the shard indexes of older commits."""
        return max(0, self.length - self.live_bytes - (INDEX_BYTES if self.blocks else 0))

    @property
    def fill(self) -> float:
        """Live share of the file (1.0: nothing to reclaim)."""
        return 1.0 - self.dead_bytes / self.length if self.length else 1.0


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    """What :func:`gc` or :func:`compact` did."""

    shards_rewritten: int
    blocks_moved: int
    files_removed: int
    bytes_before: int
    """Bytes of the L3 folder before."""
    bytes_after: int
    skipped: tuple[str, ...] = ()
    """Shards left alone because a block in them is damaged (``tierstore verify --fix`` them)."""

    @property
    def reclaimed(self) -> int:
        """Disk bytes given back."""
        return self.bytes_before - self.bytes_after


def shard_usage(catalog: Catalog) -> list[ShardUsage]:
    """Every pack shard with its committed length and the bytes its blocks still use."""
    return [ShardUsage(a, int(s), int(n), int(c), int(live)) for a, s, n, c, live in catalog.shard_usage_rows()
            if str(a).startswith("packs/")]


def fragmentation(catalog: Catalog) -> tuple[float, int]:
    """``(dead share of pack bytes, dead bytes)``: what :func:`compact` could give back."""
    usage = shard_usage(catalog)
    total = sum(u.length for u in usage)
    dead = sum(u.dead_bytes for u in usage)
    return (dead / total if total else 0.0), dead


def disk_usage(folder: Path) -> int:
    """Bytes of the files under ``folder`` (a link counts as nothing: what it points at is not the store's)."""
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) \
        if folder.is_dir() else 0


def gc(db: TierStore) -> MaintenanceReport:
    """Delete the pack shard files of ``db`` that no block points at any more.

    Runs under the writer lock of the handle (other threads' writes wait). Large blocks need no
    collection: their files go as soon as the block is replaced or deleted.
    """
    with db.exclusive("compact() and gc()"):
        before = disk_usage(db.l3.root)
        removed = _drop_unused(db)
        return MaintenanceReport(0, 0, removed, before, disk_usage(db.l3.root))


def _drop_unused(db: TierStore) -> int:
    """Forget shard rows without blocks (each pack keeps its last) and delete their files."""
    catalog, l3 = db.catalog, db.l3
    known = set(catalog.shard_lengths())
    catalog.forget_unused_shards()
    gone = known - set(catalog.shard_lengths())
    active = l3.active_shards()
    try:
        l3.remove_shards(sorted(gone - active))
    except OSError as exc:
        raise translate_os_error(exc, what="remove unused shard files", path=l3.root) from None
    return len(gone - active)


def compact(db: TierStore, *, min_fill: float = 0.5, progress: Progress | None = None) -> MaintenanceReport:
    """Rewrite the live blocks of every pack shard filled below ``min_fill``, then delete the old files.

    Each moved block is checked against its checksum before it is copied; a shard holding a
    damaged block is left as it is (and listed in ``skipped``). ``progress(done, total)`` is called
    with encoded bytes copied so far. One catalog commit switches every moved block.
    """
    if isinstance(min_fill, bool) or not isinstance(min_fill, (int, float)) or not 0.0 <= min_fill <= 1.0:
        raise ConfigError(f"min_fill must be a share in [0, 1], got {min_fill!r}")
    catalog, l3 = db.catalog, db.l3
    with db.exclusive("compact() and gc()"):
        before = disk_usage(l3.root)
        active = l3.active_shards()
        victims = [u for u in shard_usage(catalog)
                   if (u.array, u.shard) not in active and u.blocks and u.fill < min_fill]
        total = sum(u.live_bytes for u in victims)
        moved: list[BlockRow] = []
        skipped: list[str] = []
        done = 0
        try:
            for usage in victims:
                rows = catalog.rows_in_shard(usage.array, usage.shard)
                damaged = _first_damaged(db, rows)
                if damaged is not None:
                    skipped.append(f"l3/{l3.shard_path(usage.array, usage.shard).relative_to(l3.root)} "
                                   f"(block {damaged!r} is damaged)")
                    continue
                for row in rows:
                    loc = l3.copy_packed(location_of(row))
                    moved.append(row.moved(loc.to_columns()))
                done += usage.live_bytes
                if progress is not None:
                    progress(done, total)
            if moved:
                lengths = l3.prepare()
                with db.index.lock:  # the store's lock order: docs/ARCHITECTURE.md
                    catalog.commit_blocks(moved, [], lengths, db.index.next_block_id)
                    l3.commit()
                    db.index.moved(moved)
        except OSError as exc:
            l3.rollback()
            raise translate_os_error(exc, what="compact L3 packs", path=l3.root) from None
        except BaseException:
            l3.rollback()
            raise
        removed = _drop_unused(db)
        return MaintenanceReport(len(victims) - len(skipped), len(moved), removed, before, disk_usage(l3.root),
                                 tuple(skipped))


def _first_damaged(db: TierStore, rows: list[BlockRow]) -> str | None:
    """The key of the first row whose bytes do not match its checksum (None when all do)."""
    for row in rows:
        out = np.empty(row.nbytes, dtype=np.uint8)
        try:
            db.l3.read_into(location_of(row), out)
        except (CorruptBlockError, FileNotFoundError, UnsafePathError):  # a link: its bytes are not the store's
            return row.key
        if not checksum_ok(out, row.checksum):
            return row.key
    return None
