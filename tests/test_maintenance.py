"""``db.gc()`` and ``db.compact()``: space comes back, bytes stay the same, a failure at any step leaves a
store that opens clean."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

import tierstore
from tests.conftest import same_bits
from tierstore.cli import main
from tierstore.upkeep import compaction as maintenance
from tierstore.upkeep.compaction import disk_usage, fragmentation
from tierstore.upkeep.verify import verify


def _churn(db: tierstore.TierStore) -> dict[str, torch.Tensor]:
    """Many small blocks, one commit each, then two thirds replaced or deleted: sparse packs."""
    gen = torch.Generator().manual_seed(0)
    live: dict[str, torch.Tensor] = {}
    for i in range(200):
        live[f"k{i}"] = torch.randn(1000, generator=gen)
        db.put(f"k{i}", live[f"k{i}"])
    db.put("big", torch.randn(400_000, generator=gen))
    live["big"] = db.get("big", copy=True)
    for i in range(0, 200, 3):
        del live[f"k{i}"]
        db.delete(f"k{i}")
    for i in range(1, 200, 3):
        live[f"k{i}"] = torch.randn(1000, generator=gen)
        db.put(f"k{i}", live[f"k{i}"])
    return live


def _check(db: tierstore.TierStore, live: dict[str, torch.Tensor]) -> None:
    assert sorted(db.keys()) == sorted(live)
    for key, tensor in live.items():
        assert same_bits(db.get(key, copy=True), tensor), key


def test_compact_reclaims_dead_pack_space_and_keeps_every_block(tmp_path: Path) -> None:
    with tierstore.open(tmp_path / "s", l2_cache_size="1MiB", fsync=False) as db:
        live = _churn(db)
        share, dead = fragmentation(db.catalog)
        assert share > 0.3 and dead > 0
        before = disk_usage(db.path / "l3")
        report = db.compact()
        assert report.blocks_moved > 0 and report.shards_rewritten > 0 and report.files_removed > 0
        assert report.reclaimed >= dead // 2 and disk_usage(db.path / "l3") == before - report.reclaimed
        assert fragmentation(db.catalog)[0] < share / 2
        _check(db, live)
        db.put("after", torch.ones(10))  # appends still work after compaction
        live["after"] = torch.ones(10)
        _check(db, live)
    assert verify(tmp_path / "s").ok
    with tierstore.open(tmp_path / "s") as db:
        assert db.recovery.removed_files == [] and db.recovery.missing == []
        _check(db, live)


def test_gc_removes_shards_without_live_blocks(tmp_path: Path) -> None:
    with tierstore.open(tmp_path / "s", l2_cache_size=0, l3_compression="off", fsync=False) as db:
        with db.transaction():
            for i in range(64):  # fills shard 0 exactly
                db.put(f"a{i}", torch.zeros(1024))
        db.put("b", torch.ones(1024))  # shard 1
        shard0 = db.path / "l3" / "packs" / "raw" / "0.0"
        assert shard0.exists()
        with db.transaction():
            for i in range(64):
                db.delete(f"a{i}")
        report = db.gc()
        assert report.files_removed == 1 and report.reclaimed >= 64 * 4096 and not shard0.exists()
        assert same_bits(db.get("b"), torch.ones(1024))
    assert verify(tmp_path / "s").ok


def test_a_reader_holding_an_old_location_follows_the_move(tmp_path: Path) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size=0, fsync=False) as db:
        live = _churn(db)
        with tierstore.open(store, readonly=True, l2_cache_size=0) as reader:
            row, loc = reader.index.lookup("k2")  # looked up, not read yet: no descriptor cached
            assert db.compact().blocks_moved > 0
            assert not (store / "l3" / loc.array / str(loc.shard)).exists()
            assert same_bits(reader.mover.read_l3(row, loc), live["k2"])
            _check(reader, live)


def test_a_failure_before_the_commit_leaves_the_store_as_it_was(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size=0, fsync=False) as db:
        live = _churn(db)
        files = sorted(p for p in (store / "l3").rglob("*") if p.is_file())
        sizes = {p: p.stat().st_size for p in files}

        def boom(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(db.catalog, "commit_blocks", boom)
        with pytest.raises(tierstore.StoreFullError):
            db.compact()
        monkeypatch.undo()
        assert sorted(p for p in (store / "l3").rglob("*") if p.is_file()) == files
        assert {p: p.stat().st_size for p in files} == sizes
        _check(db, live)
    assert verify(store).ok


def test_a_crash_after_the_commit_is_finished_by_the_next_open(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size=0, fsync=False) as db:
        live = _churn(db)

        def crash(_db: object) -> int:
            raise KeyboardInterrupt  # stands for a kill between the commit and the file deletions

        monkeypatch.setattr(maintenance, "_drop_unused", crash)
        before = disk_usage(store / "l3")
        with pytest.raises(KeyboardInterrupt):
            db.compact()
        _check(db, live)  # the commit happened: rows point at the copies
    with tierstore.open(store, l2_cache_size=0, fsync=False) as db:
        assert db.recovery.removed_files and not db.recovery.missing
        assert disk_usage(store / "l3") < before
        _check(db, live)
    assert verify(store).ok


def test_compact_skips_a_shard_with_a_damaged_block(tmp_path: Path) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size=0, l3_compression="off", fsync=False) as db:
        _churn(db)
        row = db.catalog.get_block("k2")
        assert row is not None and row.l3_array is not None
        path = store / "l3" / row.l3_array / f"{row.l3_shard}.0"
        with open(path, "r+b") as fh:
            fh.seek(int(row.l3_offset or 0) + 7)
            fh.write(b"\xff")
        report = db.compact()
        assert any("k2" in s for s in report.skipped) and path.exists()


def test_gc_and_compact_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size=0, fsync=False) as db:
        live = _churn(db)
    assert main(["compact", str(store), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reclaimed_bytes"] > 0 and data["blocks_moved"] > 0
    assert data["bytes_before"] - data["bytes_after"] == data["reclaimed_bytes"]
    assert main(["gc", str(store)]) == 0
    assert "reclaimed" in capsys.readouterr().out
    with tierstore.open(store, readonly=True) as db:
        _check(db, live)
    assert main(["gc", str(tmp_path / "nowhere")]) == 2
    assert "no tierstore store" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


_ZYGOTE = r'''
import os, signal, sys
import tierstore
for line in sys.stdin:  # one store folder per line: fork a compactor, report its pid, then its exit
    pid = os.fork()
    if pid == 0:
        with tierstore.open(line.strip(), l2_cache_size=0) as db:
            print("ready", flush=True)
            db.compact()
        os._exit(0)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"exit {status}", flush=True)
'''


def test_sigkill_at_random_moments_of_a_compaction(tmp_path: Path) -> None:
    """A compactor killed (SIGKILL) at random points: the next open finds every block intact, no orphan left."""
    import random
    import shutil
    import signal
    import subprocess
    import sys

    base = tmp_path / "base"
    with tierstore.open(base, l2_cache_size=0, fsync=True) as db:
        gen = torch.Generator().manual_seed(1)
        live: dict[str, torch.Tensor] = {}
        with db.transaction():
            for i in range(600):
                live[f"k{i}"] = torch.randn(1000, generator=gen)
                db.put(f"k{i}", live[f"k{i}"])
        with db.transaction():
            for i in range(600):
                if i % 3:
                    del live[f"k{i}"]
                    db.delete(f"k{i}")
    shutil.copytree(base, tmp_path / "timed")
    with tierstore.open(tmp_path / "timed", l2_cache_size=0) as db:
        start = time.perf_counter()
        assert db.compact().blocks_moved == 200  # what the killed runs do
        window = time.perf_counter() - start
    zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert zygote.stdin is not None and zygote.stdout is not None
    rng = random.Random(7)
    killed = 0
    outcomes: set[bool] = set()
    try:
        for r in range(6):
            store = tmp_path / f"r{r}"
            shutil.copytree(base, store)
            zygote.stdin.write(f"{store}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            assert zygote.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 1.5 * window))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed += zygote.stdout.readline().strip() == f"exit {signal.SIGKILL}"
            with tierstore.open(store, l2_cache_size=0) as db:
                _check(db, live)
                outcomes.add(bool(db.recovery.removed_files or db.recovery.truncated))
            assert verify(store).ok
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
    assert killed >= 1  # some kills landed mid-compaction
