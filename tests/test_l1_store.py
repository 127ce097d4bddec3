"""The store's L1 tier, run on the CPU device (CI has no GPU; the same code serves CUDA)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

import tierstore
from tests.conftest import same_bits


def l1_store(path: Path, **config: object) -> tierstore.TierStore:
    return tierstore.open(path, l1_device="cpu", l1_cache_size="2MiB", l2_cache_size="4MiB", fsync=False,
                          **config)  # type: ignore[arg-type]


def test_device_get_promotes_then_hits_l1(store_path: Path) -> None:
    with l1_store(store_path) as db:
        value = torch.randn(256, 256, dtype=torch.bfloat16)
        db.put("w", value)
        first = db.get("w", device="cpu")
        second = db.get("w", device="cpu")
        assert same_bits(first, value) and same_bits(second, value)
        assert first.data_ptr() == second.data_ptr()  # both view the same L1 slot
        assert db.stats().hits["L1"] == 1 and "L1" in db.info("w").tiers
        assert db.stats().tiers["L1"]["device"] == "cpu"


def test_l1_is_not_used_without_a_device(store_path: Path) -> None:
    with l1_store(store_path) as db:
        db.put("w", torch.ones(100))
        db.get("w")
        assert db.stats().hits["L1"] == 0 and "L1" not in db.info("w").tiers


def test_overwrite_leaves_held_l1_views_unchanged(store_path: Path) -> None:
    with l1_store(store_path) as db:
        db.put("w", torch.full((1000,), 1.0))
        held = db.get("w", device="cpu")[10:20]
        db.put("w", torch.full((1000,), 2.0))
        for i in range(30):  # churn L1 far past its 2 MiB
            db.put(f"f{i}", torch.randn(100_000))
            db.get(f"f{i}", device="cpu")
        assert bool((held == 1.0).all())
        assert same_bits(db.get("w", device="cpu"), torch.full((1000,), 2.0))
        stats = db.stats().tiers["L1"]
        assert stats["evictions"] > 0 and stats["used"] <= stats["capacity"]
        del held
        gc.collect()


def test_block_bigger_than_l1_is_served_directly(store_path: Path) -> None:
    with l1_store(store_path) as db:
        big = torch.randn(1 << 20)  # 4 MiB > 2 MiB of L1
        db.put("big", big)
        assert same_bits(db.get("big", device="cpu"), big)
        assert "L1" not in db.info("big").tiers


def test_delete_drops_the_l1_copy(store_path: Path) -> None:
    with l1_store(store_path) as db:
        db.put("w", torch.ones(10))
        db.get("w", device="cpu")
        db.delete("w")
        assert "w" not in db and db.stats().tiers["L1"]["blocks"] == 0


def test_read_only_handle_checks_l1_versions(store_path: Path) -> None:
    with tierstore.open(store_path, fsync=False) as writer:
        writer.put("w", torch.ones(10))
        with tierstore.open(store_path, readonly=True, l1_device="cpu", l1_cache_size="1MiB") as reader:
            assert same_bits(reader.get("w", device="cpu"), torch.ones(10))
            writer.put("w", torch.zeros(10))
            assert same_bits(reader.get("w", device="cpu"), torch.zeros(10))
