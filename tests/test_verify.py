"""``tierstore.upkeep.verify`` and ``tierstore verify``: planted damage of every kind is found, and ``--fix``
repairs it and names what was lost."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

import tierstore
from tests.conftest import same_bits
from tierstore.cli import main
from tierstore.upkeep.verify import verify

SMALL = {f"small/{i}": torch.arange(i * 100, i * 100 + 300, dtype=torch.float32) for i in range(6)}
LARGE = {f"large/{i}": torch.randn(300_000, generator=torch.Generator().manual_seed(i)) for i in range(2)}


def _make(path: Path, compression: str = "auto") -> None:
    """The small blocks in one transaction; each large block put on its own, so each has a file of its own (the
    large blocks of one commit share one)."""
    with tierstore.open(path, l3_compression=compression, l2_cache_size=0) as db:
        with db.transaction():
            for key, tensor in SMALL.items():
                db.put(key, tensor)
        for key, tensor in LARGE.items():
            db.put(key, tensor)


def _where(path: Path, key: str) -> tuple[str, int, int]:
    with sqlite3.connect(path / "catalog.sqlite") as conn:
        array, shard, offset = conn.execute("SELECT l3_array, l3_shard, l3_offset FROM blocks WHERE key = ?",
                                            (key,)).fetchone()
    return array, shard, offset


def _flip(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x40
    file.write_bytes(bytes(data))


def _plant_everything(path: Path) -> dict[str, str]:
    """One of each kind of damage; returns kind -> the subject verify should name."""
    array, shard, offset = _where(path, "small/2")
    _flip(path / "l3" / array / f"{shard}.0", offset + 10)  # a flipped byte in a packed chunk
    large, _, _ = _where(path, "large/0")
    _flip(path / "l3" / large / "0.0", 5000)  # ... and in a large block's chunk
    gone, _, _ = _where(path, "large/1")
    (path / "l3" / gone / "0.0").unlink()  # a deleted array file
    with sqlite3.connect(path / "catalog.sqlite") as conn:  # a row without data, a leftover journal row
        conn.execute("INSERT INTO blocks (key, block_id, dtype, shape, nbytes, checksum, codec, l3_array, l3_shard,"
                     " l3_offset, l3_sizes, l3_inner, stored_bytes, created, updated) SELECT 'ghost', 999999, dtype,"
                     " shape, nbytes, checksum, codec, 'blocks/00000000000f423f', 0, 0, l3_sizes, l3_inner,"
                     " stored_bytes, created, updated FROM blocks WHERE key = 'large/0'")
        conn.execute("INSERT INTO journal (block_id, key, op, src, dst, state, created) "
                     "VALUES (3, 'small/3', 'promote', 'L3', 'L2', 'intent', 0)")
    orphan = path / "l3" / "blocks" / "0000000000abcdef"
    orphan.mkdir()
    (orphan / "0.0").write_bytes(b"x" * 100)  # data no row points at
    (path / "l3" / array / "9999.0").write_bytes(b"y" * 50)  # an orphan pack shard
    (path / "l3" / large / "zarr.json.tmp").write_text("{")  # a leftover temporary file
    (path / "l3" / array / f"{shard}.0").open("ab").write(b"torn tail")  # an append nobody committed
    return {"corrupt": "small/2", "missing": "large/1", "orphan": "l3/blocks/0000000000abcdef",
            "temp": f"l3/{large}/zarr.json.tmp", "journal": "small/3", "torn": f"l3/{array}/{shard}.0"}


@pytest.mark.parametrize("compression", ["auto", "off"])
def test_each_kind_of_damage_is_found_and_fix_repairs_it(tmp_path: Path, compression: str) -> None:
    store = tmp_path / "s"
    _make(store, compression)
    assert verify(store).ok
    planted = _plant_everything(store)
    report = verify(store)
    assert not report.ok and not report.fixed
    found = {(p.kind, p.subject) for p in report.problems}
    for kind, subject in planted.items():
        assert (kind, subject) in found, (kind, subject, found)
    assert ("corrupt", "large/0") in found and ("missing", "ghost") in found
    assert ("orphan", f"l3/{_where(store, 'small/2')[0]}/9999.0") in found
    # the check changed nothing: a second check finds the same
    assert {(p.kind, p.subject) for p in verify(store).problems} == found

    fixed = verify(store, fix=True)
    assert fixed.fixed and fixed.ok and fixed.remaining == []
    assert sorted(fixed.lost) == ["ghost", "large/0", "large/1", "small/2"]
    assert any("journal" in line for line in fixed.repaired)
    assert verify(store).ok
    with tierstore.open(store) as db:
        assert db.recovery.removed_files == [] and db.recovery.missing == [] and db.recovery.truncated == []
        assert sorted(db.keys()) == sorted(set(SMALL) - {"small/2"})
        for key in db:
            assert same_bits(db.get(key), SMALL[key])


def test_verify_cli_exit_codes_json_and_loss_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    _make(store)
    assert main(["verify", str(store)]) == 0
    assert "ok: checked 8 blocks" in capsys.readouterr().out
    _plant_everything(store)
    assert main(["verify", str(store), "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["counts"]["corrupt"] == 2 and data["counts"]["missing"] == 2
    assert data["counts"]["orphan"] == 2 and data["counts"]["temp"] == 1 and data["counts"]["journal"] == 1
    assert main(["verify", str(store), "--fix"]) == 2  # repaired, but blocks were lost: never silent
    out = capsys.readouterr().out
    assert "LOST 4 block(s)" in out and "small/2" in out and "repaired:" in out
    assert main(["verify", str(store)]) == 0


def test_fix_without_losses_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    _make(store)
    (store / "l3" / "zarr.json.tmp").write_text("{")
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        conn.execute("INSERT INTO journal (block_id, key, op, src, dst, state, created) "
                     "VALUES (1, 'small/0', 'demote', 'L2', 'L3', 'copied', 0)")
    assert main(["verify", str(store), "--fix"]) == 0
    out = capsys.readouterr().out
    assert "removed temp l3/zarr.json.tmp" in out and "LOST" not in out
    assert verify(store).ok


def test_verify_refuses_a_locked_store_and_a_newer_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    _make(store)
    with tierstore.open(store, l2_cache_size=0):
        with pytest.raises(tierstore.StoreLockedError):
            verify(store)
        assert main(["verify", str(store)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tierstore: ") and "already open for writing" in err and "Traceback" not in err
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        conn.execute("PRAGMA user_version = 99")
    assert main(["verify", str(store)]) == 2
    assert "schema version 99" in capsys.readouterr().err


def test_a_deleted_pack_shard_loses_its_blocks_and_its_row(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store)
    array, shard, _ = _where(store, "small/0")
    (store / "l3" / array / f"{shard}.0").unlink()
    report = verify(store)
    assert {p.subject for p in report.problems if p.kind == "missing"} == set(SMALL)
    fixed = verify(store, fix=True)
    assert fixed.ok and sorted(fixed.lost) == sorted(SMALL)
    assert any("shard file" in line for line in fixed.repaired)
    with tierstore.open(store) as db:
        assert db.recovery.missing == [] and sorted(db.keys()) == sorted(LARGE)
        db.put("again", torch.ones(8))  # the pack takes appends again
        assert same_bits(db.get("again"), torch.ones(8))
    assert verify(store).ok


def test_a_shard_row_whose_file_is_gone_is_stale(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store)
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        conn.execute("INSERT INTO shards (array, shard, length) VALUES ('packs/raw', 7, 5000)")
    assert [(p.kind, p.subject) for p in verify(store).problems] == [("stale", "l3/packs/raw/7.0")]
    assert verify(store, fix=True).ok and verify(store).ok


def test_lost_zarr_metadata_is_written_again(tmp_path: Path) -> None:
    import numpy as np
    import zarr

    store = tmp_path / "s"
    _make(store)
    large, _, _ = _where(store, "large/0")
    pack, shard, offset = _where(store, "small/0")
    assert offset == 0  # the first block of its pack: the array's first bytes
    (store / "l3" / large / "zarr.json").unlink()
    (store / "l3" / pack / "zarr.json").write_text("not json")
    (store / "l3" / "blocks" / "zarr.json").unlink()
    found = {(p.kind, p.subject) for p in verify(store).problems}
    assert found == {("meta", f"l3/{large}/zarr.json"), ("meta", f"l3/{pack}/zarr.json"),
                     ("meta", "l3/blocks/zarr.json")}
    fixed = verify(store, fix=True)
    assert fixed.ok and fixed.lost == [] and len(fixed.repaired) == 3
    raw = LARGE["large/0"].numpy().tobytes()
    assert np.asarray(zarr.open_array(str(store / "l3" / large), mode="r")[:]).tobytes() == raw
    packed = zarr.open_array(str(store / "l3" / pack), mode="r")
    size = packed.shape[1]  # (elements, element size) bytes
    start = shard * 4096 * 64 // size
    small = SMALL["small/0"].numpy().tobytes()
    assert np.asarray(packed[start:start + len(small) // size]).tobytes() == small
    assert zarr.open_group(str(store / "l3"), mode="r") is not None


def test_a_damaged_catalog_row_is_reported_and_dropped(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store)
    outside = tmp_path / "outside"
    outside.mkdir()
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        conn.execute("UPDATE blocks SET shape = 'not json' WHERE key = 'small/4'")
        conn.execute("UPDATE blocks SET l3_array = 'blocks/../../../outside' WHERE key = 'large/1'")
    report = verify(store)
    kinds = {p.subject: p.kind for p in report.problems}
    assert kinds["small/4"] == "corrupt" and kinds["large/1"] in ("missing", "corrupt")  # corrupt once rows are checked
    fixed = verify(store, fix=True)
    assert fixed.ok and sorted(fixed.lost) == ["large/1", "small/4"] and outside.is_dir()
    with tierstore.open(store) as db:
        assert "small/4" not in db and same_bits(db.get("small/3"), SMALL["small/3"])


def test_a_lost_catalog_beside_data_is_refused_not_repaired(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store)
    (store / "catalog.sqlite").unlink()
    for extra in store.glob("catalog.sqlite-*"):
        extra.unlink()
    sqlite3.connect(store / "catalog.sqlite").execute("CREATE TABLE x (y)").connection.close()  # tables, no schema
    with pytest.raises(tierstore.CatalogError, match="restore the catalog"):
        verify(store, fix=True)
    assert len(list((store / "l3" / "blocks").iterdir())) == 1 + len(LARGE)  # nothing deleted


def _reads_all(store: Path) -> None:
    with tierstore.open(store, l2_cache_size=0) as db:
        assert sorted(db.keys()) == sorted({**SMALL, **LARGE})
        for key, value in {**SMALL, **LARGE}.items():
            assert same_bits(db.get(key), value), key


def test_a_shortened_shard_row_is_rebuilt_from_the_bytes_never_cut(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store)
    array, shard, _ = _where(store, "small/5")
    file = store / "l3" / array / f"{shard}.0"
    size = file.stat().st_size
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        conn.execute("UPDATE shards SET length = length / 2 WHERE array = ? AND shard = ?", (array, shard))
    report = verify(store)
    assert [(p.kind, p.subject) for p in report.problems] == [("shard", f"l3/{array}/{shard}.0")]
    fixed = verify(store, fix=True)
    assert fixed.ok and fixed.lost == [] and any("rebuilt the shard row" in line for line in fixed.repaired)
    assert file.stat().st_size == size
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        assert conn.execute("SELECT length FROM shards WHERE array = ? AND shard = ?", (array, shard)).fetchone() \
            == (size,)
    _reads_all(store)
    assert verify(store).ok


def test_open_rebuilds_a_shortened_or_lost_shard_row_and_keeps_the_file(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store)
    array, shard, _ = _where(store, "small/5")
    file = store / "l3" / array / f"{shard}.0"
    size = file.stat().st_size
    for damage in ("UPDATE shards SET length = length / 2", "DELETE FROM shards"):
        with sqlite3.connect(store / "catalog.sqlite") as conn:
            conn.execute(f"{damage} WHERE array = ? AND shard = ?", (array, shard))
        if damage.startswith("DELETE"):
            assert [p.kind for p in verify(store).problems] == ["shard"]
        with tierstore.open(store, l2_cache_size=0) as db:
            assert db.recovery.removed_files == [] and db.recovery.truncated == []
            assert len(db.recovery.rebuilt) == 1 and f"l3/{array}/{shard}" in db.recovery.rebuilt[0]
            db.put("after", torch.ones(3))  # the next append goes to a fresh shard, not over the kept one
        assert file.stat().st_size == size
        with tierstore.open(store, l2_cache_size=0) as db:
            db.delete("after")
        _reads_all(store)
        assert verify(store).ok


def test_a_lost_shard_row_beside_a_torn_tail_keeps_the_blocks_and_cuts_only_the_tail(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store)
    array, shard, _ = _where(store, "small/5")
    file = store / "l3" / array / f"{shard}.0"
    size = file.stat().st_size
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        conn.execute("DELETE FROM shards WHERE array = ? AND shard = ?", (array, shard))
    with file.open("ab") as fh:
        fh.write(b"torn tail nobody committed")
    fixed = verify(store, fix=True)
    assert fixed.ok and fixed.lost == [] and file.stat().st_size == size
    _reads_all(store)


@pytest.mark.parametrize(("change", "why"), [
    ("dtype = 'float128'", "float128"),
    ("nbytes = nbytes + 8", "the row says"),
    ("shape = '[7, 3]'", "the row says"),
    ("dtype = 'int64'", "the row says"),  # 300 float32 elements are 1200 bytes, not 2400
])
def test_rows_whose_metadata_cannot_make_a_tensor_are_lost_not_passed(tmp_path: Path, change: str, why: str) -> None:
    store = tmp_path / "s"
    _make(store)
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        conn.execute(f"UPDATE blocks SET {change} WHERE key = 'small/1'")
    report = verify(store)
    assert [(p.kind, p.subject) for p in report.problems] == [("corrupt", "small/1")]
    assert why in report.problems[0].detail
    fixed = verify(store, fix=True)
    assert fixed.ok and fixed.lost == ["small/1"]
    with tierstore.open(store, l2_cache_size=0) as db:
        assert "small/1" not in db and same_bits(db.get("small/2"), SMALL["small/2"])


@pytest.mark.parametrize("which", ["pack", "large"])
def test_a_bit_flip_in_a_shard_index_is_found_and_written_again(tmp_path: Path, which: str) -> None:
    import numpy as np
    import zarr

    store = tmp_path / "s"
    _make(store, "off")
    key = "small/3" if which == "pack" else "large/0"
    array, shard, _ = _where(store, key)
    file = store / "l3" / array / f"{shard}.0"
    slots = 64 if which == "pack" else -(-LARGE[key].numel() * 4 // (1 << 20))  # one per inner chunk
    index_at = file.stat().st_size - (slots * 16 + 4)
    _flip(file, index_at + 16 * (3 if which == "pack" else 0))  # the offset of slot 3 (slot 0)
    report = verify(store)
    assert [(p.kind, p.subject) for p in report.problems] == [("index", f"l3/{array}/{shard}.0")]
    fixed = verify(store, fix=True)
    assert fixed.ok and fixed.lost == []
    _reads_all(store)
    if which == "large":
        raw = LARGE[key].numpy().tobytes()
        assert np.asarray(zarr.open_array(str(store / "l3" / array), mode="r")[:]).tobytes() == raw
    else:
        packed = zarr.open_array(str(store / "l3" / array), mode="r")
        for small_key, value in SMALL.items():
            _, _, offset = _where(store, small_key)
            small = value.numpy().tobytes()
            slot = offset // 4096  # raw pack: slot order is file order, one granule each
            start = shard * 4096 * 64 + slot * 4096
            assert np.asarray(packed[start:start + len(small)]).tobytes() == small, small_key


def test_a_leftover_l2_index_tmp_is_no_damage_and_goes_at_open(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store)
    (store / "l2.index.tmp").write_text("[")  # what a close on a full disk used to leave
    assert verify(store).ok
    with tierstore.open(store, l2_cache_size=0):
        pass
    assert not (store / "l2.index.tmp").exists()


def test_the_l2_file_goes_when_the_store_is_no_longer_file_backed(tmp_path: Path) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size="1MiB", l2_file_backed=True) as db:
        db.put("k", torch.ones(1000))
        db.get("k")
    assert (store / "l2.slab").exists() and (store / "l2.index").exists()
    with tierstore.open(store, l2_cache_size="1MiB", l2_file_backed=True) as db:
        assert same_bits(db.get("k"), torch.ones(1000))
    assert (store / "l2.slab").exists()  # still file-backed: kept for the warm restart
    with tierstore.open(store, l2_cache_size="1MiB", l2_file_backed=False) as db:
        assert not (store / "l2.slab").exists() and not (store / "l2.index").exists()
        assert same_bits(db.get("k"), torch.ones(1000))
    with tierstore.open(store, readonly=True) as db:
        assert same_bits(db.get("k"), torch.ones(1000))
    assert verify(store).ok
