"""Opening a store after whatever came before: a crash, a lost catalog, a torn write.

Run by the writer at open, before anything else touches the store: cache-only
rows go, shard files are cut back to their committed length, files no row
points at are removed, rows whose data is missing are reported. A catalog that
is missing beside L3 data stops the open, so that a lost catalog is never taken
for a new store (which would delete every block file as an orphan).
"""

from __future__ import annotations

from pathlib import Path

from .catalog import Catalog
from .errors import CatalogError, translate_os_error
from .tiers.l3_zarr import LAYOUT, PACK_SLOTS, Contents, Location, RecoveryReport, ZarrL3
from .txn import location_of

__all__ = ["recover", "upgrade_layout", "refuse_orphaned_data"]


def recover(catalog: Catalog, l3: ZarrL3) -> RecoveryReport:
    """Finish what a crashed writer left: drop cache-only rows, cut torn appends, remove orphans."""
    catalog.drop_volatile()
    catalog.forget_unused_shards()
    lengths = catalog.shard_lengths()
    try:
        report = l3.recover(lengths, catalog.live_arrays())
    except OSError as exc:
        raise translate_os_error(exc, what="recover the L3 tier", path=l3.root) from None
    last: dict[str, int] = {}
    for array, shard in lengths:
        last[array] = max(last.get(array, -1), shard)
    l3.start_shards_after(last)
    return report


def upgrade_layout(catalog: Catalog, l3: ZarrL3) -> None:
    """Move a layout-1 store's L3 to layout 2 (writer only, at open, after :func:`recover`).

    No chunk is rewritten: the encoded bytes are the same in both layouts. Each shard file gets its
    layout-2 name as a hard link and each array its new ``zarr.json``; then one catalog commit
    records every block's chunk and the new layout; then the old names go. A crash before the commit
    leaves layout 1 whole (the next open upgrades again), a crash after it only leaves old names,
    which recovery removes as files no row points at.
    """
    shards = catalog.shard_lengths()
    slots = {(array, n): l3.pack_slots(array, n, length) for (array, n), length in shards.items()}
    chunks: list[tuple[int | None, int]] = []
    blocks: list[tuple[Location, int, Contents]] = []
    for row in catalog.l3_rows():
        loc = location_of(row)
        if loc.array.startswith("packs/"):
            slot = slots.get((loc.array, loc.shard), {}).get(loc.offset)
            chunks.append((None if slot is None else loc.shard * PACK_SLOTS + slot, row.block_id))
        else:
            chunks.append((0, row.block_id))
            blocks.append((loc, row.nbytes, Contents(row.key, row.dtype, row.shape)))
    try:
        l3.relink(shards, blocks)
        catalog.commit_l3_layout(chunks, LAYOUT)
        l3.drop_layout1_names(shards, [loc.array for loc, _, _ in blocks])
    except OSError as exc:
        raise translate_os_error(exc, what="upgrade the L3 layout", path=l3.root) from None


def refuse_orphaned_data(store_dir: Path, catalog_path: Path) -> None:
    """A missing or empty catalog beside L3 data means a lost catalog, not a new store.

    Opening would treat every block file as an orphan of an uncommitted write and delete it,
    so refuse instead and leave the data for a restore.
    """
    if catalog_path.exists() and catalog_path.stat().st_size > 0:
        return
    l3 = store_dir / "l3"
    data = [p for sub in ("packs", "blocks") if (l3 / sub).is_dir()
            for p in (l3 / sub).iterdir() if p.name != "zarr.json"]
    if data:
        raise CatalogError(
            f"store {store_dir} has L3 data but its catalog {catalog_path.name} is missing or empty; "
            "restore the catalog from a backup (opening now would delete the data as orphans)",
            path=str(catalog_path))
