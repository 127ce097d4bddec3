"""Opening a store after whatever came before: a crash, a lost catalog, a torn write.

Run by the writer at open, before anything else touches the store: cache-only
rows go, shard rows the catalog lost or shortened are rebuilt from the bytes,
shard files are cut back to their committed length, files no row points at are
removed, rows whose data is missing are reported. No byte a committed block row
points at is ever removed or cut: an inconsistency between catalog rows is
repaired from the bytes, never by deleting them. A catalog that
is missing beside L3 data stops the open, so that a lost catalog is never taken
for a new store (which would delete every block file as an orphan).
"""

from __future__ import annotations

from pathlib import Path

from ..catalog import Catalog
from ..engine.transaction import location_of
from ..errors import CatalogError, translate_os_error
from ..tiers.l3_zarr import LAYOUT, PACK_INDEX_BYTES, PACK_SLOTS, Contents, Location, RecoveryReport, ZarrL3

__all__ = ["recover", "rebuild_shard_rows", "upgrade_layout", "refuse_orphaned_data"]


def recover(catalog: Catalog, l3: ZarrL3) -> RecoveryReport:
    """Finish what a crashed writer left: drop cache-only rows, cut torn appends, remove orphans."""
    catalog.drop_volatile()
    catalog.forget_unused_shards()
    try:
        rebuilt = rebuild_shard_rows(catalog, l3, _at_risk(catalog, l3))  # first: what follows trusts them
        lengths = catalog.shard_lengths()
        report = l3.recover(lengths, catalog.live_arrays())
    except OSError as exc:
        raise translate_os_error(exc, what="recover the L3 tier", path=l3.root) from None
    report.rebuilt = rebuilt
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


def rebuild_shard_rows(catalog: Catalog, l3: ZarrL3,
                       short: list[tuple[str, int, int, int | None]] | None = None) -> list[str]:
    """Rebuild the rows of pack shards that blocks use but the catalog lost or shortened.

    A missing row would make the file an orphan (deleted) and a short one a torn append (cut),
    destroying blocks that read fine; the bytes say how long the shard really is. ``short``
    lists the shards to look at (default: every one, a scan of all packed rows). Returns one
    line per row rebuilt.
    """
    lengths: dict[tuple[str, int], int] = {}
    lines = []
    for array, shard, extent, length in short if short is not None else catalog.short_shards(PACK_INDEX_BYTES):
        end = l3.shard_end(array, shard, extent)
        if end is None:
            continue  # the file is gone: its blocks are missing, which is reported, not invented
        end = max(end, length or 0)
        if end != length:
            lengths[(array, shard)] = end
            was = "no row" if length is None else f"row said {length} bytes"
            lines.append(f"l3/{array}/{shard}: {was}, its blocks end at {extent}; rebuilt as {end} bytes from the file")
    if lengths:
        catalog.set_shard_lengths(lengths)
    return lines


def _at_risk(catalog: Catalog, l3: ZarrL3) -> list[tuple[str, int, int, int | None]]:
    """The shards whose files :meth:`ZarrL3.recover` would delete (no row) or cut (the last of each pack)
    although blocks use more of them than their row says: one indexed query each, not a scan of all rows."""
    lengths = catalog.shard_lengths()
    last: dict[str, int] = {}
    for array, number in lengths:
        last[array] = max(last.get(array, -1), number)
    candidates = {k for k in l3.pack_shard_files() if k not in lengths} | set(last.items())
    found = []
    for array, number in sorted(candidates):
        extent = catalog.shard_extent(array, number)
        length = lengths.get((array, number))
        if extent is not None and (length is None or length < extent + PACK_INDEX_BYTES):
            found.append((array, number, extent, length))
    return found


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
