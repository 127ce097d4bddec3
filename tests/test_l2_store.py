"""The store's L2 tier: zero-copy views that never change under their holder, eviction, cache-only blocks."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import tierstore
from tests.conftest import same_bits

MiB = 1 << 20


def small_store(path: Path, **config: object) -> tierstore.TierStore:
    return tierstore.open(path, l2_cache_size="4MiB", fsync=False, **config)  # type: ignore[arg-type]


def test_second_get_is_an_l2_hit_and_a_view(store_path: Path) -> None:
    with small_store(store_path) as db:
        value = torch.randn(1000, 100)
        db.put("w", value)
        db._l2.clear()  # type: ignore[union-attr]
        first = db.get("w")
        second = db.get("w")
        assert same_bits(first, value) and same_bits(second, value)
        assert first.data_ptr() == second.data_ptr()  # both view the same L2 slot
        assert db.stats().hits == {"L1": 0, "L2": 1, "L3": 1}
        own = db.get("w", copy=True)
        assert own.data_ptr() != first.data_ptr() and same_bits(own, value)


def test_held_views_never_change_under_churn(store_path: Path) -> None:
    with small_store(store_path) as db:
        originals = {f"k{i}": torch.full((50_000,), float(i)) for i in range(8)}  # 200 KB each
        for key, value in originals.items():
            db.put(key, value)
        held = {key: db.get(key)[10:20].view(torch.int32) for key in originals}  # derived views only
        for round_ in range(3):
            for key in originals:
                db.put(key, torch.full((50_000,), -1.0 - round_))  # overwrite every held block
            for i in range(40):
                db.put(f"filler{i}", torch.randn(100_000))  # 400 KB each: far more than L2 holds
                db.get(f"filler{i}")
            if "k0" in db:
                db.delete("k0")
            for _ in range(20):
                db.allocate((10_000,), torch.float32).fill_(7.0)
        for key, view in held.items():
            assert same_bits(view, originals[key][10:20].view(torch.int32)), key
        stats = db.stats().tiers["L2"]
        assert stats["evictions"] > 0 and stats["held"] >= 1
        del view, held
        gc.collect()
        db.get("filler0")  # the next operation gives the released slots back
        assert db.stats().tiers["L2"]["held"] == 0


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
def test_eviction_policies_keep_l2_within_capacity(store_path: Path, policy: str) -> None:
    with small_store(store_path, l2_eviction_policy=policy) as db:
        for i in range(30):
            db.put(f"b{i}", torch.randn(64_000))  # 256 KB each, 7.5 MB in all
        for _ in range(3):
            db.get("b29")
        l2 = db.stats().tiers["L2"]
        assert l2["used"] <= l2["capacity"] and l2["evictions"] > 0 and l2["policy"] == policy
        assert all(same_bits(db.get(f"b{i}"), db.get(f"b{i}", copy=True)) for i in range(30))


def test_lru_keeps_the_recently_used(store_path: Path) -> None:
    with small_store(store_path, l2_eviction_policy="lru") as db:
        for i in range(12):
            db.put(f"b{i}", torch.randn(64_000))
        for i in range(12, 24):
            db.get("b0")  # keep b0 hot while others stream through
            db.put(f"b{i}", torch.randn(64_000))
        assert "L2" in db.info("b0").tiers
        assert "L2" not in db.info("b1").tiers


def test_block_bigger_than_l2_bypasses_it(store_path: Path) -> None:
    with small_store(store_path) as db:
        big = torch.randn(2 * MiB)  # 8 MiB > 4 MiB of L2
        db.put("big", big)
        assert db.info("big").tiers == ("L3",)
        assert same_bits(db.get("big"), big)
        assert db.stats().tiers["L2"]["bypasses"] >= 1


def test_cache_only_blocks_live_in_l2_then_spill(store_path: Path) -> None:
    with small_store(store_path) as db:
        db.put("durable", torch.ones(10))
        stored = db.stats().stored_bytes
        kv = {f"kv{i}": torch.randn(64_000) for i in range(6)}
        for key, value in kv.items():
            db.put(key, value, durable=False)
        assert db.stats().stored_bytes == stored  # nothing of kv written to disk yet
        assert len(db) == 7 and list(db.keys(prefix="kv")) == sorted(kv)
        assert db.info("kv0").tiers == ("L2",) and not db.info("kv0").durable
        for i in range(20):  # push the cache-only blocks out of L2: they must spill, not vanish
            db.put(f"fill{i}", torch.randn(64_000))
        assert db.stats().tiers["L2"]["spills"] >= 1
        for key, value in kv.items():
            assert same_bits(db.get(key), value)
        db.delete("kv5")
        assert "kv5" not in db and len(db) == 26
    with small_store(store_path) as db:
        assert not any(k.startswith("kv") for k in db) and len(db) == 21


def test_cache_only_put_replaces_a_durable_block(store_path: Path) -> None:
    with small_store(store_path) as db:
        db.put("k", torch.ones(4))
        db.put("k", torch.zeros(4), durable=False)
        assert same_bits(db.get("k"), torch.zeros(4)) and len(db) == 1
        db.put("k", torch.full((4,), 2.0))
        assert same_bits(db.get("k"), torch.full((4,), 2.0)) and len(db) == 1 and db.info("k").durable
    with small_store(store_path) as db:
        assert same_bits(db.get("k"), torch.full((4,), 2.0))


def test_transaction_rollback_returns_l2_slots(store_path: Path) -> None:
    with small_store(store_path) as db:
        before = db.stats().tiers["L2"]["used"]
        with pytest.raises(RuntimeError), db.transaction():
            for i in range(5):
                db.put(f"t{i}", torch.randn(50_000))
            raise RuntimeError("roll back")
        assert db.stats().tiers["L2"]["used"] == before and len(db) == 0


def test_stats_say_why_l2_is_not_pinned(store_path: Path) -> None:
    with small_store(store_path) as db:
        l2 = db.stats().tiers["L2"]
        if not torch.cuda.is_available():
            assert l2["pinned"] is False and "CUDA" in l2["pin_reason"]
        assert "memlock_limit" in l2 and l2["capacity"] == 4 * MiB


def test_seed_get_tensor_draws_from_the_l2_pool(tmp_path: Path) -> None:
    manager = tierstore.HierarchicalCacheManager(tierstore.CacheConfig(l2_cache_size="4MiB"), path=tmp_path / "m")
    try:
        fresh, level = manager.get_tensor((512, 512), torch.float16, "general")
        assert level == "new" and fresh.shape == (512, 512) and bool((fresh == 0).all())
        assert manager.store.stats().tiers["L2"]["used"] >= 512 * 512 * 2
    finally:
        manager.close()


def test_file_backed_l2_restarts_warm(store_path: Path) -> None:
    blocks = {f"w{i}": torch.randn(30_000) for i in range(6)}
    with tierstore.open(store_path, l2_cache_size="4MiB", l2_file_backed=True) as db:
        for key, value in blocks.items():
            db.put(key, value)
        db.put("kv", torch.ones(10), durable=False)
    assert (store_path / "l2.index").exists()
    with tierstore.open(store_path, l2_cache_size="4MiB", l2_file_backed=True) as db:
        assert db.warm_blocks == len(blocks)
        l3_reads = db.l3.read_into
        db.l3.read_into = None  # type: ignore[assignment]  # any L3 read would now fail
        for key, value in blocks.items():
            assert same_bits(db.get(key), value)
        db.l3.read_into = l3_reads  # type: ignore[method-assign]
        assert db.stats().hits["L2"] == len(blocks) and "kv" not in db


def test_damaged_or_stale_l2_file_is_discarded(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size="4MiB", l2_file_backed=True) as db:
        db.put("a", torch.arange(1000.0))
        db.put("b", torch.arange(2000.0))
    index = (store_path / "l2.index").read_text()
    with open(store_path / "l2.slab", "r+b") as fh:  # damage the slot of one block
        entry = __import__("json").loads(index)["entries"][0]
        fh.seek(entry[1] + 8)
        fh.write(b"\xff\xff\xff\xff")
    with tierstore.open(store_path, l2_cache_size="4MiB", l2_file_backed=True) as db:
        assert db.warm_blocks == 1
        assert same_bits(db.get("a"), torch.arange(1000.0)) and same_bits(db.get("b"), torch.arange(2000.0))
        db.put("a", torch.zeros(3))  # a newer version after the close below makes the saved one stale
    (store_path / "l2.index").write_text(index)  # an index from an older generation
    with tierstore.open(store_path, l2_cache_size="4MiB", l2_file_backed=True) as db:
        assert db.warm_blocks == 0 and same_bits(db.get("a"), torch.zeros(3))
