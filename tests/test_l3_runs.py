"""The large blocks of one commit share one L3 array (a *run*): one file, in put order, read in one pass.

A run is named by its first block and holds every large block of the commit with the same codec and
inner chunk size, each on a chunk boundary. It is a plain zarr v3 array (zarr-python and tensorstore
read every block out of it by the catalog's ``l3_chunk``), it goes only with the last block that
names it, a transaction rolled back (whole or to a savepoint) leaves nothing of what it wrote, and
``verify`` finds and ``--fix`` drops a damaged block without touching its neighbours.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

import tierstore
from tests.conftest import same_bits
from tests.test_zarr_compat import check_readable
from tierstore.upkeep.verify import verify

ts = pytest.importorskip("tensorstore")


def _bf16(seed: int, rows: int, cols: int = 1024) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _arrays_of(store: Path) -> dict[str, str]:
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        return dict(conn.execute("SELECT key, l3_array FROM blocks WHERE l3_array LIKE 'blocks/%'").fetchall())


def _block_folders(store: Path) -> list[Path]:
    return sorted(p for p in (store / "l3" / "blocks").iterdir() if p.is_dir())


def _layer() -> dict[str, torch.Tensor]:
    """A layer's worth: bf16 matrices of several sizes (1 MiB multiples share a run), one raw, one odd size."""
    return {"w.q": _bf16(1, 1024), "w.k": _bf16(2, 512), "w.v": _bf16(3, 512), "w.o": _bf16(4, 1024),
            "w.up": _bf16(5, 2048), "w.odd": _bf16(6, 333, 1000), "w.raw": torch.arange(300_000, dtype=torch.int64),
            "w.raw2": torch.arange(300_000, 600_000, dtype=torch.int64)}


def _commit(db: tierstore.TierStore, values: dict[str, torch.Tensor]) -> None:
    """Every value put in one transaction: one commit, so the large blocks share a run."""
    with db.transaction():
        for key, value in values.items():
            db.put(key, value)


def test_one_commit_one_file_in_put_order(tmp_path: Path) -> None:
    store = tmp_path / "s"
    values = _layer()
    with tierstore.open(store, l2_cache_size=0) as db, db.transaction():
        for key, value in values.items():
            db.put(key, value, compression="off" if key.startswith("w.raw") else None)
    arrays = _arrays_of(store)
    shared = [k for k in values if k not in ("w.raw", "w.raw2", "w.odd")]
    assert len({arrays[k] for k in shared}) == 1, arrays  # the bf16 1 MiB-chunked blocks: one array, one file
    # raw blocks keep a file each (a map of a block alone in its file may trust its cached pages)
    assert len({arrays["w.raw"], arrays["w.raw2"], arrays["w.q"]}) == 3
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        offsets = [conn.execute("SELECT l3_offset FROM blocks WHERE key = ?", (k,)).fetchone()[0] for k in shared]
    assert offsets == sorted(offsets) and offsets[0] == 0  # in put order
    doc = json.loads((store / "l3" / arrays["w.q"] / "zarr.json").read_text())
    assert [b["key"] for b in doc["attributes"]["tierstore"]["blocks"]] == shared
    check_readable(store, values)  # zarr-python and tensorstore read every block out of its run
    with tierstore.open(store, l2_cache_size=0, readonly=True) as db:
        got = db.get_many(list(values))
        assert all(same_bits(got[k], v) for k, v in values.items())
        raw = db.map("w.raw")
        assert raw is not None and same_bits(raw, values["w.raw"])
    assert verify(store).ok


def test_a_run_goes_with_its_last_block(tmp_path: Path) -> None:
    store = tmp_path / "s"
    values = {f"w{i}": _bf16(i, 512) for i in range(4)}
    with tierstore.open(store, l2_cache_size=0) as db:
        _commit(db, values)
        run = _arrays_of(store)["w0"]
        db.put("w1", _bf16(10, 512))  # replaced: its bytes stay dead in the run, the others live on
        values["w1"] = _bf16(10, 512)
        db.delete("w3")
        del values["w3"]
        assert (store / "l3" / run / "0.0").exists()
        assert all(same_bits(db.get(k, copy=True), v) for k, v in values.items())
    assert verify(store).ok
    check_readable(store, values)
    with tierstore.open(store, l2_cache_size=0) as db:
        db.delete("w0")
        assert (store / "l3" / run).exists()
        with db.transaction():
            db.delete("w2")  # the run's last live block
        assert not (store / "l3" / run).exists()
        assert same_bits(db.get("w1"), values["w1"])
    assert verify(store).ok


def test_rollbacks_leave_nothing_of_a_run(tmp_path: Path) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size=0) as db:
        db.put("base", _bf16(0, 512))
        before = _block_folders(store)
        with pytest.raises(RuntimeError), db.transaction():
            for i in range(3):
                db.put(f"gone{i}", _bf16(i, 512))
            raise RuntimeError("abort")
        assert _block_folders(store) == before and "gone0" not in db
        with db.transaction():
            db.put("kept", _bf16(7, 512))
            with pytest.raises(RuntimeError), db.transaction():  # a savepoint: only its puts go
                db.put("undone", _bf16(8, 512))
                db.put("kept", _bf16(9, 512))
                raise RuntimeError("savepoint")
            db.put("after", _bf16(11, 512))
        assert "undone" not in db
        assert same_bits(db.get("kept"), _bf16(7, 512)) and same_bits(db.get("after"), _bf16(11, 512))
        with db.transaction():
            db.put("only", _bf16(12, 512))
            with pytest.raises(RuntimeError), db.transaction():
                db.put("x", _bf16(13, 512))
                raise RuntimeError("savepoint")
            db.delete("only")  # nothing this commit wrote survives it: its run goes at once
        assert "only" not in db and "x" not in db
    assert verify(store).ok
    live = set(_arrays_of(store).values())
    assert {f"blocks/{p.name}" for p in _block_folders(store)} == live


def test_verify_fix_drops_one_damaged_block_of_a_run(tmp_path: Path) -> None:
    store = tmp_path / "s"
    values = {f"w{i}": _bf16(i, 512) for i in range(4)}
    with tierstore.open(store, l2_cache_size=0) as db, db.transaction():
        for key, value in values.items():
            db.put(key, value)
    run = _arrays_of(store)["w0"]
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        offset, stored = conn.execute("SELECT l3_offset, stored_bytes FROM blocks WHERE key = 'w2'").fetchone()
    path = store / "l3" / run / "0.0"
    data = bytearray(path.read_bytes())
    data[offset + stored // 2] ^= 0x10
    path.write_bytes(bytes(data))
    (store / "l3" / run / "zarr.json").unlink()  # and its metadata lost
    report = verify(store)
    assert {(p.kind, p.subject) for p in report.problems} == {("corrupt", "w2"), ("meta", f"l3/{run}/zarr.json")}
    fixed = verify(store, fix=True)
    assert fixed.ok and fixed.lost == ["w2"]
    assert path.exists()  # the other blocks' bytes stay
    del values["w2"]
    check_readable(store, values)  # the metadata written again spans the whole run
    with tierstore.open(store, l2_cache_size=0, readonly=True) as db:
        assert "w2" not in db and all(same_bits(db.get(k), v) for k, v in values.items())


def test_metadata_of_a_run_whose_last_block_died_is_written_again_whole(tmp_path: Path) -> None:
    """The shard index spans every chunk the run was written with; a zarr.json written again must too."""
    store = tmp_path / "s"
    values = {f"w{i}": _bf16(i, 512) for i in range(3)}
    with tierstore.open(store, l2_cache_size=0) as db:
        _commit(db, values)
        db.delete("w2")  # the run's tail is dead now
        del values["w2"]
    run = _arrays_of(store)["w0"]
    before = json.loads((store / "l3" / run / "zarr.json").read_text())
    (store / "l3" / run / "zarr.json").unlink()
    assert verify(store, fix=True).ok
    after = json.loads((store / "l3" / run / "zarr.json").read_text())
    assert after["chunk_grid"] == before["chunk_grid"] and after["shape"] == before["shape"]
    check_readable(store, values)


def test_a_schema_3_store_reads_read_only_and_upgrades_at_its_first_write_open(tmp_path: Path) -> None:
    """A store as the code before runs left it (one array per large block, catalog schema 3, no l3_array index):
    read-only handles read it as it is; the first read-write open adds the index, and writes runs beside."""
    store = tmp_path / "s"
    values = {f"w{i}": _bf16(i, 512) for i in range(3)}
    with tierstore.open(store, l2_cache_size=0) as db:
        for key, value in values.items():
            db.put(key, value)  # a commit each: an array each, as before
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        conn.execute("DROP INDEX blocks_by_l3_array")
        conn.execute("PRAGMA user_version = 3")
    with tierstore.open(store, l2_cache_size=0, readonly=True) as db:
        got = db.get_many(list(values))
        assert all(same_bits(got[k], v) for k, v in values.items())
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3  # a reader changes nothing
    with tierstore.open(store, l2_cache_size=0) as db:
        with db.transaction():
            for i in range(3, 6):
                values[f"w{i}"] = _bf16(i, 512)
                db.put(f"w{i}", values[f"w{i}"])
        db.delete("w0")
        del values["w0"]
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
        assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'blocks_by_l3_array'").fetchone()
    arrays = _arrays_of(store)
    assert len({arrays[f"w{i}"] for i in range(3, 6)}) == 1 and arrays["w1"] != arrays["w2"]
    assert verify(store).ok
    check_readable(store, values)



def test_a_commit_freeing_more_arrays_than_one_catalog_batch_keeps_every_shared_one(tmp_path: Path) -> None:
    """300 runs of two blocks (a commit each); one transaction replaces the first block of each: the catalog
    is asked in batches of 256 which freed arrays rows still name, and all 300 stay with their second block;
    replacing the second blocks then removes them all."""
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size=0, fsync=False) as db:
        for i in range(300):
            _commit(db, {f"a{i}": _bf16(i, 130), f"b{i}": _bf16(5000 + i, 130)})  # 260 KiB each: large blocks
        runs = set(_arrays_of(store).values())
        assert len(runs) == 300
        with db.transaction():
            for i in range(300):
                db.put(f"a{i}", _bf16(1000 + i, 130))
        assert runs <= {f"blocks/{p.name}" for p in _block_folders(store)}  # every run still named by its b
        assert all(same_bits(db.get(f"b{i}"), _bf16(5000 + i, 130)) for i in range(0, 300, 37))
        with db.transaction():
            for i in range(300):
                db.put(f"b{i}", _bf16(2000 + i, 130))
        left = {f"blocks/{p.name}" for p in _block_folders(store)}
    assert not runs & left and left == set(_arrays_of(store).values())
