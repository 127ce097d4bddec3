"""Restart-warm L2: what a file-backed L2 held at a clean close, and taking it back on open.

At close the writer lists, next to ``l2.slab``, every durable block it leaves in
the file (``l2.index``: block id, slot, checksum) with the store id and the L2
generation. On the next open the list is read once and deleted; a block comes
back only if the store id and generation match the catalog, its block id is
still the committed version of its key with the same checksum, and the bytes in
the file hash to that checksum. Anything else is discarded, never trusted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import crc32c

from .alloc import Allocation
from .catalog import Catalog
from .fsguard import open_nofollow
from .residency import Residency
from .tensors import dtype_from_name
from .tiers.l2_slab import HostArena

__all__ = ["WarmEntry", "save_index", "load_index", "warm_l2", "drop_l2_files", "INDEX_NAME", "TMP_INDEX_NAME"]

INDEX_NAME = "l2.index"
TMP_INDEX_NAME = INDEX_NAME + ".tmp"
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class WarmEntry:
    """A block a previous process left in the L2 file."""

    block_id: int
    offset: int
    nbytes: int
    slab: int
    checksum: int


def save_index(store_dir: Path, store_id: str, generation: int, l2: Residency[HostArena]) -> int:
    """Write the list of durable resident blocks; returns how many were listed."""
    entries = [[e.block_id, e.alloc.offset, e.alloc.nbytes, e.alloc.slab, e.checksum]
               for e in l2 if not e.volatile and not e.dead]
    doc = {"format": _FORMAT, "store_id": store_id, "generation": generation,
           "capacity": l2.arena.capacity, "entries": entries}
    path = store_dir / INDEX_NAME
    tmp = path.with_name(TMP_INDEX_NAME)
    try:
        # O_NOFOLLOW: a planted l2.index.tmp link must not have this written into its target
        with os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # (a full disk): the next open starts cold, and nothing is left behind
        raise
    return len(entries)


def drop_l2_files(store_dir: Path, *, slab: str, keep_slab: bool) -> None:
    """At a read-write open: remove a temporary index a killed close left, and the L2 file and its
    index when the store is no longer file-backed (they would hold disk and stale bytes for ever)."""
    names = [TMP_INDEX_NAME] if keep_slab else [TMP_INDEX_NAME, INDEX_NAME, slab]
    for name in names:
        (store_dir / name).unlink(missing_ok=True)


def load_index(store_dir: Path, store_id: str, generation: int, capacity: int) -> list[WarmEntry]:
    """The entries of a matching index (consumed: the file is removed), or none."""
    path = store_dir / INDEX_NAME
    try:
        with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as fh:
            raw = fh.read()
    except OSError:  # gone, or a link (ELOOP): either way a cold start
        return []
    finally:  # unlink takes a link itself away, never what it points at
        path.unlink(missing_ok=True)
        path.with_name(TMP_INDEX_NAME).unlink(missing_ok=True)
    try:
        doc = json.loads(raw)
        if (doc.get("format") != _FORMAT or doc.get("store_id") != store_id
                or doc.get("generation") != generation or doc.get("capacity") != capacity):
            return []
        return [WarmEntry(*(int(v) for v in item)) for item in doc["entries"]]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return []  # a damaged index only costs a cold start (UnicodeDecodeError is a ValueError)


def warm_l2(store_dir: Path, catalog: Catalog, l2: Residency[HostArena]) -> tuple[int, int]:
    """Take back what the last clean close left in the L2 file; returns (new generation, blocks)."""
    store_id = catalog.meta("store_id") or ""
    generation = int(catalog.meta("l2_generation") or 0)
    entries = load_index(store_dir, store_id, generation, l2.arena.capacity)
    catalog.set_meta({"l2_generation": str(generation + 1)})
    restore = l2.arena.restore
    allocs: list[Allocation | None] = restore([(e.offset, e.nbytes, e.slab) for e in entries])
    warm = 0
    for entry, alloc in zip(entries, allocs, strict=True):
        if alloc is None:
            continue
        row = catalog.block_by_id(entry.block_id)
        if (row is None or row.checksum != entry.checksum or row.nbytes != entry.nbytes
                or crc32c.crc32c(l2.arena.as_numpy(alloc).data) != entry.checksum):
            l2.release(alloc)
            continue
        l2.admit(row.key, row.block_id, alloc, dtype_from_name(row.dtype), row.shape, row.checksum,
                 parent=row.parent)
        warm += 1
    return generation + 1, warm
