"""Full disk: a store on a tiny tmpfs, writes under RLIMIT_FSIZE, a file-backed L2 that cannot be reserved.

Each time: the failing put raises a typed error (``StoreFullError``, an ``OSError``), nothing committed
is lost or changed, the store opens again (on the still full disk) and checks clean, and the space
freed by deletes is usable again.
"""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tierstore
from tests import faultlib


def _block(seed: int, nbytes: int) -> torch.Tensor:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)  # incompressible
    return torch.from_numpy(data)


def _check(db: tierstore.TierStore, model: dict[str, torch.Tensor]) -> None:
    assert sorted(db.keys()) == sorted(model), "the keys changed"
    for key, value in model.items():
        assert torch.equal(db.get(key, copy=True), value), f"{key!r} changed"


def _fill(db: tierstore.TierStore, model: dict[str, torch.Tensor], prefix: str, nbytes: int, seed: int,
          limit: int = 400) -> tierstore.StoreFullError:
    """Put blocks until the disk refuses one; every acknowledged put goes into ``model``."""
    for i in range(limit):
        key, value = f"{prefix}/{i}", _block(seed * 1000 + i, nbytes)
        try:
            db.put(key, value)
        except tierstore.StoreFullError as exc:
            assert key not in db, "a refused put is visible"
            return exc
        model[key] = value
    raise AssertionError(f"{limit} puts of {nbytes} bytes never filled the disk")


def _full_disk_scenario(store: Path, **options: Any) -> dict[str, Any]:
    model: dict[str, torch.Tensor] = {}
    with tierstore.open(store, l2_cache_size="1MiB", **options) as db:
        error = _fill(db, model, "big", 300_000, 1)  # one array per block
        assert isinstance(error, OSError) and isinstance(error, tierstore.TierStoreError)
        assert "space" in str(error) or "full" in str(error), str(error)
        _check(db, model)
        small_error = _fill(db, model, "small", 3000, 2)  # packed: the pack shard or the catalog is refused
        assert isinstance(small_error, tierstore.StoreFullError)
        with pytest.raises(tierstore.StoreFullError), db.transaction():  # a transaction is all or nothing
            db.put("txn/a", _block(7, 100))
            db.put("txn/b", _block(8, 300_000))
        assert "txn/a" not in db and "txn/b" not in db
        _check(db, model)
        full_count = len(model)
    with tierstore.open(store, l2_cache_size="1MiB", **options) as db:  # opens on the full disk
        _check(db, model)
        faultlib.check_clean(db, store)
        big = sorted((k for k in model if k.startswith("big/")), key=lambda k: int(k.split("/")[1]))
        for key in big[:8]:  # free space: large blocks give their files back
            db.delete(key)
            del model[key]
        for i in range(3):
            value = _block(100 + i, 300_000)
            db.put(f"again/{i}", value)
            model[f"again/{i}"] = value
        _check(db, model)
    with tierstore.open(store, l2_cache_size="1MiB", **options) as db:
        _check(db, model)
        faultlib.check_clean(db, store)
    faultlib.verify_clean(store)
    return {"committed_when_full": full_count, "error": str(error), "small_error": str(small_error)}


def test_store_on_a_full_tmpfs(tmp_path: Path) -> None:
    with faultlib.tiny_tmpfs(tmp_path / "mnt", "4m") as mnt:
        result = _full_disk_scenario(mnt / "store")
    assert result["committed_when_full"] >= 5, result


def test_writes_past_rlimit_fsize_fail_cleanly(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (with SIGXFSZ ignored, so writes get EFBIG) in a forked child: the same contract."""
    store = tmp_path / "store"
    limit = 2 << 20

    def scenario() -> dict[str, Any]:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        model: dict[str, torch.Tensor] = {}
        with tierstore.open(store, l2_cache_size="1MiB") as db:
            db.put("ok", _block(1, 100_000))
            model["ok"] = _block(1, 100_000)
            with pytest.raises(tierstore.StoreFullError) as info:
                db.put("too-big", _block(2, limit + 4096))  # one file past the limit
            assert "too-big" not in db
            error = _fill(db, model, "small", 3000, 3, limit=2000)  # a pack shard grows to the limit
            _check(db, model)
        with tierstore.open(store, l2_cache_size="1MiB") as db:
            _check(db, model)
            faultlib.check_clean(db, store)
            db.put("after", _block(4, 100_000))  # a fresh shard / array under the limit works
            assert torch.equal(db.get("after"), _block(4, 100_000))
        faultlib.verify_clean(store)
        return {"error": str(info.value), "fill_error": str(error), "kept": len(model)}

    result = faultlib.in_child(scenario)
    assert "too-big" not in result["error"] or "space" in result["error"], result
    assert result["kept"] >= 10, result


def test_file_backed_l2_on_a_full_disk_fails_at_open(tmp_path: Path) -> None:
    """Reserving the L2 file on a full disk is a StoreFullError at open (never SIGBUS later); the lock is freed."""
    with faultlib.tiny_tmpfs(tmp_path / "mnt", "3m") as mnt:
        store = mnt / "store"

        def scenario() -> dict[str, Any]:
            with tierstore.open(store, l2_cache_size="1MiB") as db:
                db.put("kept", _block(1, 200_000))
            with pytest.raises(tierstore.StoreFullError):
                tierstore.open(store, l2_cache_size="8MiB", l2_file_backed=True)
            assert not (store / "l2.slab").exists(), "a half-reserved L2 file was left behind"
            with tierstore.open(store, l2_cache_size="1MiB", l2_file_backed=True) as db:  # fits: works
                assert torch.equal(db.get("kept"), _block(1, 200_000))
                for i in range(4):
                    db.put(f"warm/{i}", _block(10 + i, 100_000))  # writes through the file mapping
            with tierstore.open(store, l2_cache_size="1MiB", l2_file_backed=True) as db:
                assert db.warm_blocks >= 1
                for i in range(4):
                    assert torch.equal(db.get(f"warm/{i}"), _block(10 + i, 100_000))
            return {}

        faultlib.in_child(scenario)  # a SIGBUS would kill only the child, and fail here


def _fill_disk(where: Path) -> None:
    """Take every free byte of the file system under ``where``."""
    fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        size = 1 << 16
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError:
                size //= 2
    finally:
        os.close(fd)


def test_closing_a_file_backed_store_on_a_full_disk_leaves_no_temporary_index(tmp_path: Path) -> None:
    with faultlib.tiny_tmpfs(tmp_path / "mnt", "4m") as mnt:
        store = mnt / "store"

        def scenario() -> dict[str, Any]:
            db = tierstore.open(store, l2_cache_size="1MiB", l2_file_backed=True)
            for i in range(3):
                db.put(f"k/{i}", _block(i, 100_000))
                db.get(f"k/{i}")
            _fill_disk(mnt)
            db.close()  # the L2 index cannot be written: a cold start next time, nothing left behind
            left = sorted(p.name for p in store.iterdir() if p.name.endswith(".tmp"))
            (mnt / "filler").unlink()
            with tierstore.open(store, l2_cache_size="1MiB", l2_file_backed=True) as db:
                for i in range(3):
                    assert torch.equal(db.get(f"k/{i}"), _block(i, 100_000))
            faultlib.verify_clean(store)
            return {"left": left}

        assert faultlib.in_child(scenario)["left"] == []
