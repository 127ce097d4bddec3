"""Hostile store folders: symbolic links inside a store are never followed out of it.

Each case plants a link to a folder or file outside the store (as a tarball or another user could),
then opens, recovers, collects, compacts and repairs, and checks that every outside file keeps its
bytes and mtime and that what went wrong surfaces as a typed error or a reported problem:

- a link among the fixed entries (``LOCK``, ``l2.slab``, ``catalog.sqlite-headroom``, ``l2.index``,
  the catalog's own files) refuses the open with ``UnsafePathError`` before anything is touched;
- a link deeper in L3 (a pack folder, a shard file, a block folder) is left alone, listed in
  ``db.recovery.links`` and by ``verify``; ``verify --fix`` removes the link itself and drops the
  blocks whose bytes were behind it as lost.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import tierstore
from tierstore.catalog import Catalog
from tierstore.engine.writer_lock import WriterLock
from tierstore.tiers.l2_slab import HostArena


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mtime, and every folder."""
    out: dict[str, tuple[bytes, int]] = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(here) / name
            rel = str(path.relative_to(root))
            out[rel] = (b"<dir>" if path.is_dir() else path.read_bytes(), path.lstat().st_mtime_ns)
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder of someone else's files next to the store: names a store might use, and a subfolder."""
    folder = tmp_path / "outside"
    (folder / "7").mkdir(parents=True)
    for name in ("0", "1", "junk", "zarr.json", "7/x"):
        (folder / name).write_bytes(f"not the store's: {name}\n".encode() * 100)
    return folder


def make_store(path: Path, **config: object) -> None:
    with tierstore.open(path, fsync=False, l2_cache_size="4MiB", **config) as db:
        with db.transaction():
            for i in range(150):
                db.put(f"k{i}", torch.full((300,), i, dtype=torch.int32))
        db.put("big", torch.arange(200_000, dtype=torch.float32))


def big_folder(store: Path) -> Path:
    (folder,) = [p for p in (store / "l3" / "blocks").iterdir() if p.name != "zarr.json"]
    return folder


def kinds(report: tierstore.VerifyReport) -> set[tuple[str, str]]:
    return {(p.kind, p.subject) for p in report.problems}


def test_linked_folder_in_packs_survives_open_verify_and_fix(tmp_path: Path, outside: Path) -> None:
    store = tmp_path / "store"
    make_store(store)
    (store / "l3" / "packs" / "evil").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with tierstore.open(store, fsync=False) as db:  # recovery used to take the files for orphans
        assert db.recovery.links == [str(store / "l3" / "packs" / "evil")]
        assert db.stats().recovery["links"] == db.recovery.links
        assert db.recovery.removed_files == []
        assert int(db.get("k149")[0]) == 149
        db.gc()
        db.compact(min_fill=1.0)
    assert snapshot(outside) == before
    report = tierstore.verify(store)
    assert not report.ok and kinds(report) == {("link", "l3/packs/evil")}
    fixed = tierstore.verify(store, fix=True)
    assert fixed.ok and fixed.lost == [] and fixed.removed_links == ["l3/packs/evil"]
    assert not (store / "l3" / "packs" / "evil").is_symlink()
    assert snapshot(outside) == before
    with tierstore.open(store, readonly=True) as ro:
        assert len(ro) == 151


@pytest.mark.parametrize("name", ["LOCK", "l2.slab", "catalog.sqlite-headroom", "l2.index", "l2.index.tmp",
                                  "l3/packs/zarr.json"])
def test_link_at_a_fixed_entry_refuses_the_open_and_verify_fix_removes_it(tmp_path: Path, outside: Path,
                                                                          name: str) -> None:
    store = tmp_path / "store"
    make_store(store, l2_file_backed=True)
    (store / name).unlink(missing_ok=True)
    (store / name).symlink_to(outside / "junk")
    before = snapshot(outside)
    for config in ({"l2_file_backed": True}, {}):
        with pytest.raises(tierstore.UnsafePathError) as info:
            tierstore.open(store, fsync=False, **config)
        assert isinstance(info.value, PermissionError) and name in str(info.value)
    assert snapshot(outside) == before
    report = tierstore.verify(store)
    assert ("link", name) in kinds(report) and not report.ok
    fixed = tierstore.verify(store, fix=True)
    assert fixed.removed_links == [name] and fixed.ok, fixed.remaining
    assert snapshot(outside) == before
    with tierstore.open(store, fsync=False, l2_file_backed=True) as db:
        assert len(db) == 151
    assert snapshot(outside) == before


@pytest.mark.parametrize("readonly", [True, False])
def test_linked_catalog_is_refused_by_open_and_verify(tmp_path: Path, outside: Path, readonly: bool) -> None:
    store = tmp_path / "store"
    make_store(store)
    shutil.move(store / "catalog.sqlite", outside / "catalog.sqlite")
    (store / "catalog.sqlite").symlink_to(outside / "catalog.sqlite")
    before = snapshot(outside)
    with pytest.raises(tierstore.UnsafePathError):
        tierstore.open(store, readonly=readonly)
    with pytest.raises(tierstore.UnsafePathError):
        tierstore.verify(store, fix=True)
    assert snapshot(outside) == before


def test_linked_block_folder_is_a_typed_error_and_verify_fix_drops_the_block(tmp_path: Path, outside: Path) -> None:
    store = tmp_path / "store"
    make_store(store)
    folder = big_folder(store)
    shutil.move(folder, outside / folder.name)
    folder.symlink_to(outside / folder.name, target_is_directory=True)
    before = snapshot(outside)
    with tierstore.open(store, fsync=False, l2_cache_size=0) as db:
        assert db.recovery.links == [str(folder)]
        with pytest.raises(tierstore.UnsafePathError) as info:
            db.get("big")
        assert info.value.key == "big"
        assert int(db.get("k3")[0]) == 3
    report = tierstore.verify(store)
    rel = str(folder.relative_to(store))
    assert kinds(report) == {("link", rel), ("missing", "big")}
    fixed = tierstore.verify(store, fix=True)  # used to raise a bare OSError
    assert fixed.lost == ["big"] and fixed.removed_links == [rel] and fixed.ok, fixed.remaining
    assert not folder.is_symlink() and not folder.exists()
    assert snapshot(outside) == before
    with tierstore.open(store, fsync=False) as db:
        assert "big" not in db and len(db) == 150
        db.put("big", torch.ones(200_000))  # a fresh block id: nothing is written through the old place
    assert snapshot(outside) == before


def test_linked_shard_file_is_left_alone_by_open_compact_gc_and_dropped_by_fix(tmp_path: Path,
                                                                              outside: Path) -> None:
    store = tmp_path / "store"
    with tierstore.open(store, fsync=False, l2_cache_size=0) as db:
        for first in range(0, 64 * 6, 64):
            with db.transaction():
                for i in range(first, first + 64):
                    db.put(f"k{i}", torch.full((300,), i, dtype=torch.int32))
        with db.transaction():
            for i in range(64 * 6):
                if i % 8:
                    db.delete(f"k{i}")
    (pack,) = [p for p in (store / "l3" / "packs").iterdir() if p.is_dir()]
    shard = pack / "1.0"  # k64..k127: sparse, so compaction wants it
    shutil.move(shard, outside / "shard1")
    shard.symlink_to(outside / "shard1")
    before = snapshot(outside)
    with tierstore.open(store, fsync=False, l2_cache_size=0) as db:
        assert db.recovery.links == [str(shard)] and db.recovery.truncated == []
        report = db.compact(min_fill=0.9)
        assert any("l3/" + str(shard.relative_to(store / "l3")) in s for s in report.skipped)
        db.gc()
        with pytest.raises(tierstore.UnsafePathError):
            db.get("k64")
        assert int(db.get("k8")[0]) == 8
    assert shard.is_symlink()
    assert snapshot(outside) == before
    fixed = tierstore.verify(store, fix=True)
    assert sorted(fixed.lost) == sorted(f"k{i}" for i in range(64, 128, 8)), fixed.problems
    assert fixed.ok, fixed.remaining
    assert snapshot(outside) == before


def test_gc_never_deletes_through_a_pack_folder_linked_while_the_store_is_open(tmp_path: Path) -> None:
    store, away = tmp_path / "store", tmp_path / "away"
    with tierstore.open(store, fsync=False, l2_cache_size=0) as db:
        for first in range(0, 64 * 4, 64):
            with db.transaction():
                for i in range(first, first + 64):
                    db.put(f"k{i}", torch.full((300,), i, dtype=torch.int32))
        with db.transaction():
            for i in range(64):
                db.delete(f"k{i}")  # shard 0 holds no block now: gc deletes its file
        (pack,) = [p for p in (store / "l3" / "packs").iterdir() if p.is_dir()]
        shutil.move(pack, away)
        pack.symlink_to(away, target_is_directory=True)
        before = snapshot(away)
        db.gc()
        db.compact(min_fill=1.0)
    assert snapshot(away) == before, "gc deleted a file through a linked folder"
    assert pack.is_symlink()


# -- each guard on its own, below the check at open ---------------------------------------------------


def test_writer_lock_never_writes_through_a_link(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "LOCK").symlink_to(outside / "junk")
    before = snapshot(outside)
    with pytest.raises(tierstore.UnsafePathError):
        WriterLock(tmp_path)
    assert snapshot(outside) == before


def test_catalog_headroom_never_grows_a_linked_file(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "catalog.sqlite-headroom").symlink_to(outside / "junk")
    before = snapshot(outside)
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.close()
    assert snapshot(outside) == before


def test_l2_arena_never_maps_a_linked_file(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "l2.slab").symlink_to(outside / "junk")
    before = snapshot(outside)
    with pytest.raises(tierstore.UnsafePathError):
        HostArena(1 << 20, path=tmp_path / "l2.slab", pin=False)
    assert snapshot(outside) == before
