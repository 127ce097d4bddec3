"""Corruption beyond what test_durability and test_misuse cover: catalog rows that lie, damaged catalog pages,
bad zarr.json files, a damaged L2 file and L2 index.

The rule everywhere: a typed error naming what is damaged, or the right bytes; never wrong bytes, never a
raw driver error, and never a file touched outside the store.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tests import faultlib

SMALL_L2 = "1MiB"
PAGE_TRIALS = int(os.environ.get("TIERSTORE_FAULT_TRIALS", "10"))
"""Damaged-catalog copies tried (more with TIERSTORE_FAULT_TRIALS=N)."""


def _values() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "small": torch.arange(100, dtype=torch.int32),
        "small2": torch.randint(0, 1 << 30, (700,), dtype=torch.int32, generator=gen),
        "large": torch.randn(100_000, generator=gen),
        "large2": torch.randint(0, 3, (300_000,), dtype=torch.int16, generator=gen),
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("corrupt") / "store"
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db, db.transaction():
        for key, value in _values().items():
            db.put(key, value)
    return store


@pytest.fixture
def store(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(template, copy)
    return copy


def _sql(store: Path, statement: str) -> None:
    con = sqlite3.connect(store / "catalog.sqlite")
    try:
        con.execute(statement)
        con.commit()
    finally:
        con.close()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and faultlib.raw_bytes(a) == faultlib.raw_bytes(b)


LYING_ROWS = {
    "array-escapes-blocks": ("large", "l3_array = 'blocks/../../../victim'"),
    "array-escapes-packs": ("small", "l3_array = 'packs/../../../victim', l3_shard = 0"),
    "array-absolute": ("large", "l3_array = '/etc'"),
    "sizes-blob-odd": ("large", "l3_sizes = x'010203'"),
    "offset-negative": ("small", "l3_offset = -5"),
    "offset-past-end": ("small", "l3_offset = 1000000000"),
    "shard-unknown": ("small", "l3_shard = 99"),
    "codec-unknown": ("small2", "codec = 'evil'"),
    "codec-other": ("large2", "codec = 'zstd1'"),
    "inner-zero": ("large", "l3_inner = 0"),
    "shape-not-json": ("small", "shape = 'not json'"),
    "shape-negative": ("small", "shape = '[-1]'"),
    "shape-object": ("small", "shape = '{\"a\": 1}'"),
    "shape-float": ("small", "shape = '[100.0]'"),
    "shape-wrong": ("small", "shape = '[50]'"),
    "nbytes-small": ("small", "nbytes = 1"),
    "huge-shape": ("small", "shape = '[1099511627776]', nbytes = 4398046511104"),
    "dtype-unknown": ("small", "dtype = 'evil'"),
    "dtype-other": ("small", "dtype = 'float32'"),
    "checksum": ("large", "checksum = checksum + 1"),
    "swapped-location": ("small", "l3_offset = (SELECT l3_offset FROM blocks WHERE key = 'small2')"),
}


@pytest.mark.parametrize("case", sorted(LYING_ROWS))
def test_catalog_row_that_lies(store: Path, tmp_path: Path, case: str) -> None:
    """A row whose columns are damaged: typed error (or the right bytes), and put/delete still repair it."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "0").write_bytes(b"precious")
    key, change = LYING_ROWS[case]
    _sql(store, f"UPDATE blocks SET {change} WHERE key = '{key}'")
    values = _values()
    for readonly in (True, False):
        with tierstore.open(store, readonly=readonly) as db:
            try:
                got = db.get(key, copy=True)
            except tierstore.TierStoreError as exc:
                assert isinstance(exc, (tierstore.CorruptBlockError, tierstore.UnsupportedTensorError)), repr(exc)
                assert exc.key == key or key in str(exc), str(exc)
            else:  # the checksum covers the bytes, not the row's dtype: a same-size dtype swap reads the
                # right bytes under the wrong dtype (known limit, in the README)
                assert faultlib.raw_bytes(got) == faultlib.raw_bytes(values[key]), f"{case}: wrong bytes returned"
                assert case == "dtype-other" or _same(got, values[key]), case
            for other, value in values.items():
                if other != key and not (case == "swapped-location" and other == "small2"):
                    assert _same(db.get(other, copy=True), value), other
    with tierstore.open(store) as db:
        db.put(key, torch.ones(7))  # a damaged row can be replaced ...
        assert torch.equal(db.get(key), torch.ones(7))
        db.delete(key)  # ... and deleted
        assert key not in db
    with tierstore.open(store) as db:
        faultlib.check_clean(db, store)
    faultlib.verify_clean(store)
    assert (victim / "0").read_bytes() == b"precious", "a file outside the store was touched"


def test_damaged_catalog_pages_never_give_wrong_bytes(tmp_path: Path) -> None:
    """Random byte flips in the catalog's pages: every outcome is a typed error or the right bytes."""
    template = tmp_path / "template"
    values = {f"k{i:03d}/" + "x" * (i % 40): torch.full((i % 50 + 1,), i, dtype=torch.int32) for i in range(200)}
    with tierstore.open(template, l2_cache_size="1MiB") as db, db.transaction():
        for key, value in values.items():
            db.put(key, value)
    size = (template / "catalog.sqlite").stat().st_size
    rng = random.Random(11)
    outcomes: dict[str, int] = {}
    for trial in range(PAGE_TRIALS):
        store = tmp_path / f"s{trial}"
        shutil.copytree(template, store)
        raw = bytearray((store / "catalog.sqlite").read_bytes())
        page = rng.randrange(1, size // 4096)  # leave the header page: a garbage header is tested elsewhere
        for _ in range(rng.choice([1, 8, 64])):
            raw[page * 4096 + rng.randrange(4096)] ^= 1 << rng.randrange(8)
        (store / "catalog.sqlite").write_bytes(bytes(raw))
        try:
            with tierstore.open(store, readonly=trial % 2 == 0) as db:
                for key in list(db.keys()):
                    try:
                        got = db.get(key, copy=True)
                    except (tierstore.CorruptBlockError, tierstore.CatalogError, tierstore.BlockNotFoundError,
                            tierstore.UnsupportedTensorError):
                        outcomes["typed error on get"] = outcomes.get("typed error on get", 0) + 1
                        continue
                    if key in values:
                        assert _same(got, values[key]), f"trial {trial}: wrong bytes for {key!r}"
                    else:  # a damaged key name still points at some block's verified bytes
                        assert any(_same(got, v) for v in values.values()), f"trial {trial}: bytes for {key!r}"
            outcomes["opened"] = outcomes.get("opened", 0) + 1
        except tierstore.CatalogError:
            outcomes["catalog error"] = outcomes.get("catalog error", 0) + 1
    assert outcomes.get("opened", 0) + outcomes.get("catalog error", 0) == PAGE_TRIALS, outcomes


@pytest.mark.parametrize("damage", ["garbage", "deleted", "empty", "wrong-json"])
@pytest.mark.parametrize("which", ["root", "pack", "block"])
def test_bad_zarr_json(store: Path, damage: str, which: str) -> None:
    """zarr.json is for zarr readers; tierstore reads by catalog row and checksum, so blocks still read right."""
    l3 = store / "l3"
    target = {"root": l3 / "zarr.json",
              "pack": next((l3 / "packs").iterdir()) / "zarr.json",
              "block": next(p for p in (l3 / "blocks").iterdir() if p.is_dir()) / "zarr.json"}[which]
    if damage == "garbage":
        target.write_bytes(bytes(range(256)) * 4)
    elif damage == "deleted":
        target.unlink()
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        target.write_text(json.dumps({"zarr_format": 3, "node_type": "array", "shape": [-1], "codecs": "x"}))
    values = _values()
    for readonly in (True, False):
        with tierstore.open(store, readonly=readonly) as db:
            for key, value in values.items():
                assert _same(db.get(key, copy=True), value), key
    with tierstore.open(store) as db:
        db.put("new-small", torch.ones(10))
        db.put("new-large", torch.ones(200_000))
        faultlib.check_clean(db, store)
    from tierstore.upkeep.verify import verify

    report = verify(store)  # verify names the damaged metadata (where it is still damaged) and rewrites it
    assert all(p.kind == "meta" for p in report.problems), report.problems
    # garbage is named; a deleted root or pack zarr.json is written again by the writer, and so is any pack
    # zarr.json whose pack the writer starts a shard in (its shape grows); verify's check of a well-formed
    # but wrong one is shallow (format and node type)
    if (damage in ("garbage", "empty") and which != "pack") or (damage, which) == ("deleted", "block"):
        assert report.problems, f"verify missed a {damage} {which} zarr.json"
    assert verify(store, fix=True).ok
    faultlib.verify_clean(store)
    with tierstore.open(store, readonly=True) as db:
        assert torch.equal(db.get("new-small"), torch.ones(10))
        assert torch.equal(db.get("new-large"), torch.ones(200_000))


def _warm_store(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    store = tmp_path / "warm"
    gen = torch.Generator().manual_seed(5)
    values = {f"w{i}": torch.randn(500 * (i + 1), generator=gen) for i in range(6)}
    with tierstore.open(store, l2_cache_size="2MiB", l2_file_backed=True) as db:
        for key, value in values.items():
            db.put(key, value)
    assert (store / "l2.index").exists()
    return store, values


def test_damaged_l2_file_is_not_trusted(tmp_path: Path) -> None:
    store, values = _warm_store(tmp_path)
    index = json.loads((store / "l2.index").read_text())
    with open(store / "l2.slab", "r+b") as fh:  # flip a byte inside every listed slot
        for entry in index["entries"]:
            offset, nbytes = entry[1], entry[2]
            fh.seek(offset + nbytes // 2)
            byte = fh.read(1)
            fh.seek(offset + nbytes // 2)
            fh.write(bytes([byte[0] ^ 0xFF]))
    with tierstore.open(store, l2_cache_size="2MiB", l2_file_backed=True) as db:
        assert db.warm_blocks == 0
        for key, value in values.items():
            assert _same(db.get(key, copy=True), value), key


def test_truncated_l2_file(tmp_path: Path) -> None:
    store, values = _warm_store(tmp_path)
    with open(store / "l2.slab", "r+b") as fh:
        fh.truncate(4096)
    with tierstore.open(store, l2_cache_size="2MiB", l2_file_backed=True) as db:
        for key, value in values.items():
            assert _same(db.get(key, copy=True), value), key


HOSTILE_ENTRIES = {
    "beyond-capacity": lambda e: [e[0], 1 << 40, e[2], e[3], e[4]],
    "negative-offset": lambda e: [e[0], -4096, e[2], e[3], e[4]],
    "huge-nbytes": lambda e: [e[0], e[1], 1 << 40, e[3], e[4]],
    "zero-nbytes": lambda e: [e[0], e[1], 0, e[3], e[4]],
    "odd-offset": lambda e: [e[0], e[1] + 1, e[2], e[3], e[4]],
    "bad-slab": lambda e: [e[0], e[1], e[2], 10**9, e[4]],
    "negative-slab": lambda e: [e[0], e[1], e[2], -2, e[4]],
    "other-block": lambda e: [e[0] + 1, e[1], e[2], e[3], e[4]],
    "strings": lambda e: ["1", "x", None, [], {}],
    "short": lambda e: [e[0]],
    "floats": lambda e: [float(v) + 0.5 for v in e],
}


@pytest.mark.parametrize("case", [*sorted(HOSTILE_ENTRIES), "duplicated", "not-a-list", "garbage", "pickle"])
def test_hostile_l2_index(tmp_path: Path, case: str) -> None:
    """An l2.index listing slots that overlap, lie outside the file or name other blocks: never trusted."""
    store, values = _warm_store(tmp_path)
    path = store / "l2.index"
    doc = json.loads(path.read_text())
    if case == "duplicated":
        doc["entries"] = doc["entries"] * 2
    elif case == "not-a-list":
        doc["entries"] = {"a": 1}
    elif case in HOSTILE_ENTRIES:
        doc["entries"] = [HOSTILE_ENTRIES[case](e) for e in doc["entries"]]
    if case == "garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif case == "pickle":
        path.write_bytes(faultlib.pickle_bomb(tmp_path / "marker"))
    else:
        path.write_text(json.dumps(doc))
    with tierstore.open(store, l2_cache_size="2MiB", l2_file_backed=True) as db:
        for key, value in values.items():
            assert _same(db.get(key, copy=True), value), key
        db.put("after", torch.ones(100))
        assert torch.equal(db.get("after"), torch.ones(100))
    assert not (tmp_path / "marker").exists()


def test_wal_damage_after_a_killed_writer_is_reported_not_silent(tmp_path: Path) -> None:
    """A killed writer leaves its commits in the WAL; a damaged frame there makes SQLite drop every
    later commit without a word. The commit counter beside the catalog tells: open and verify report it."""
    import signal

    from tierstore.upkeep.verify import verify

    store = tmp_path / "s"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            db = tierstore.open(store, l2_cache_size=0, history_flush_interval=3600.0)
            for i in range(10):
                db.put(f"k{i}", torch.full((1000,), i, dtype=torch.int32))  # one commit each
        finally:
            os.kill(os.getpid(), signal.SIGKILL)  # no close: the commits stay in the WAL
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    wal = store / "catalog.sqlite-wal"
    frames = (wal.stat().st_size - 32) // (24 + 4096)
    assert frames > 6, frames
    data = bytearray(wal.read_bytes())
    data[32 + (frames // 2) * (24 + 4096) + 24 + 200] ^= 0x10  # a page in the middle of the log
    wal.write_bytes(bytes(data))
    for readonly in (True, False):
        with tierstore.open(store, readonly=readonly, l2_cache_size=0) as db:
            assert "lost commits" in db.recovery.catalog_rollback, readonly
            assert len(db) < 10  # (what SQLite rolled back)
    with tierstore.open(store, l2_cache_size=0) as db:  # still reported until acknowledged
        assert "lost commits" in db.recovery.catalog_rollback
        kept = sorted(db.keys())
    report = verify(store)
    assert [p.kind for p in report.problems] == ["rollback"]
    fixed = verify(store, fix=True)
    assert fixed.ok and fixed.lost and any("lost commits" in line for line in fixed.repaired)
    assert verify(store).ok
    with tierstore.open(store, l2_cache_size=0) as db:
        assert db.recovery.catalog_rollback == "" and sorted(db.keys()) == kept


def test_no_rollback_is_reported_after_kills_without_damage(tmp_path: Path) -> None:
    """Kills at every point of a commit (before and after the counter is written) are never a false alarm."""
    import signal

    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size=0) as db:
        db.put("first", torch.ones(3))
    for round_no in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                db = tierstore.open(store, l2_cache_size=0)
                for i in range(round_no * 3):
                    db.put(f"r{round_no}/{i}", torch.ones(3))
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
        for readonly in (True, False):
            with tierstore.open(store, readonly=readonly, l2_cache_size=0) as db:
                assert db.recovery.catalog_rollback == "" and len(db) == 1 + sum(3 * r for r in range(round_no + 1))
    faultlib.verify_clean(store)


def test_the_commit_counter_keeps_up_with_writes_from_many_threads(tmp_path: Path) -> None:
    """Puts from 4 threads plus the history flusher: the counter beside the catalog ends equal to the
    catalog's own count (a reopen reports nothing), never ahead of it."""
    import threading

    from tierstore.catalog.sqlite_catalog import _read_counter

    store = tmp_path / "s"
    errors: list[BaseException] = []
    with tierstore.open(store, l2_cache_size=0, history_flush_interval=0.01) as db:
        def work(n: int) -> None:
            try:
                for i in range(25):
                    db.put(f"t{n}/{i}", torch.full((16,), i))
                    db.get(f"t{n}/{i}")
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        seq = int(conn.execute("SELECT value FROM store_meta WHERE name = 'commit_seq'").fetchone()[0])
    assert _read_counter(store / "catalog.sqlite-commits") == seq >= 100
    with tierstore.open(store, readonly=True) as db:
        assert db.recovery.catalog_rollback == "" and len(db) == 100
