"""The handle, blocks and transactions, on a real on-disk store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tierstore
from tests.conftest import same_bits


def test_put_get_small_and_large(db: tierstore.TierStore) -> None:
    small = torch.randn(64, 32, dtype=torch.bfloat16)
    large = torch.randn(1024, 1024, dtype=torch.float16)
    db.put("small", small)
    db.put("large", large)
    assert same_bits(db.get("small"), small)
    assert same_bits(db.get("large"), large)
    assert "small" in db and "nope" not in db and 3 not in db
    assert len(db) == 2
    assert list(db.keys()) == ["large", "small"]


def test_overwrite_replaces_and_frees(db: tierstore.TierStore, store_path: Path) -> None:
    db.put("w", torch.randn(512, 1024))
    first = db.info("w").block_id
    replacement = torch.zeros(600, 1024)
    db.put("w", replacement)
    assert same_bits(db.get("w"), replacement)
    assert db.info("w").block_id != first
    assert not (store_path / "l3" / "blocks" / f"{first:016x}").exists()
    assert len(db) == 1


def test_missing_key_is_keyerror(db: tierstore.TierStore) -> None:
    with pytest.raises(KeyError):
        db.get("absent")
    with pytest.raises(tierstore.BlockNotFoundError):
        db.delete("absent")


def test_transaction_commits_all(db: tierstore.TierStore, store_path: Path) -> None:
    with db.transaction() as tx:
        tx.put("a", torch.ones(3))
        tx.put("b", torch.ones(100_000))
        assert same_bits(tx.get("a"), torch.ones(3))  # reads its own writes
    db.close()
    with tierstore.open(store_path) as again:
        assert sorted(again.keys()) == ["a", "b"]


def test_transaction_rolls_back_on_error(db: tierstore.TierStore, store_path: Path) -> None:
    db.put("keep", torch.arange(5))
    with pytest.raises(RuntimeError), db.transaction():
        db.put("new", torch.ones(300_000))
        db.put("keep", torch.zeros(5))
        db.delete("keep")
        raise RuntimeError("boom")
    assert list(db.keys()) == ["keep"]
    assert same_bits(db.get("keep"), torch.arange(5))
    assert not list((store_path / "l3" / "blocks").glob("0*"))


def test_nested_transaction_is_a_savepoint(db: tierstore.TierStore) -> None:
    with db.transaction():
        db.put("outer", torch.ones(2))
        with pytest.raises(ValueError), db.transaction():
            db.put("inner", torch.ones(2))
            db.put("outer", torch.zeros(2))
            raise ValueError("undo inner only")
        assert "inner" not in db
        assert same_bits(db.get("outer"), torch.ones(2))
        with db.transaction():
            db.put("inner2", torch.ones(1))
        assert len(db) == 2
    assert sorted(db.keys()) == ["inner2", "outer"]


def test_prefix_keys(db: tierstore.TierStore) -> None:
    for key in ["model.a", "model.b", "modem", "other", "model.\U0010ffff", "model."]:
        db.put(key, torch.ones(1))
    assert list(db.keys(prefix="model.")) == ["model.", "model.a", "model.b", "model.\U0010ffff"]
    assert list(db.keys(prefix="zzz")) == []


def test_info_and_stats(db: tierstore.TierStore) -> None:
    t = torch.randn(2048, 256, dtype=torch.bfloat16)
    db.put("w", t)
    db.get("w")
    db.get("w")
    info = db.info("w")
    assert info.dtype == torch.bfloat16 and info.shape == (2048, 256) and info.nbytes == t.numel() * 2
    assert info.tiers == ("L2", "L3") and info.durable  # a put lands in L2 and, durable, in L3
    assert info.access_count == 3  # one put, two gets
    assert 0 < info.stored_bytes < info.nbytes  # bf16 compresses
    stats = db.stats()
    assert stats.blocks == 1 and stats.gets == 2 and stats.compression_ratio > 1.3
    history = db.history("w")
    assert [op for _, _, op, _ in history] == ["get", "get", "put"]


def test_non_durable_blocks_are_dropped_on_reopen(store_path: Path) -> None:
    with tierstore.open(store_path) as db:
        db.put("kv", torch.ones(10), durable=False)
        db.put("weights", torch.ones(10))
        assert "kv" in db and not db.info("kv").durable
    with tierstore.open(store_path) as db:
        assert list(db.keys()) == ["weights"]


def test_config_is_remembered_and_overridable(store_path: Path) -> None:
    with tierstore.open(store_path, l3_compression="zstd:3", l2_cache_size="64MiB") as db:
        assert db.config.l3_compression == "zstd:3"
        db.put("x", torch.zeros(4096))
        assert db.info("x").codec == "zstd3"
    with tierstore.open(store_path) as db:
        assert db.config.l2_cache_size == 64 << 20
    with tierstore.open(store_path, l3_compression=False) as db:
        db.put("y", torch.zeros(4096))
        assert db.info("y").codec == "raw"


def test_incompressible_blocks_are_stored_raw(db: tierstore.TierStore) -> None:
    noise = torch.randint(0, 256, (500_000,), dtype=torch.uint8)
    db.put("noise", noise)
    assert db.info("noise").codec == "raw"
    assert same_bits(db.get("noise"), noise)


@pytest.mark.parametrize("codec", ["off", "zstd:1", "shuffle-zstd:3", "blosc-lz4"])
def test_every_codec_round_trips(store_path: Path, codec: str) -> None:
    tensors = {"s": torch.randn(100, dtype=torch.bfloat16), "l": torch.randn(700_000, dtype=torch.bfloat16),
               "f": torch.randn(300, 300)}
    with tierstore.open(store_path, l3_compression=codec) as db:
        for key, value in tensors.items():
            db.put(key, value)
    with tierstore.open(store_path, readonly=True) as db:
        for key, value in tensors.items():
            assert same_bits(db.get(key), value)


def test_l3_capacity_is_enforced(store_path: Path) -> None:
    with tierstore.open(store_path, l3_cache_size="1MiB", l3_compression=False) as db:
        db.put("a", torch.zeros(600_000, dtype=torch.uint8))
        with pytest.raises(tierstore.StoreFullError):
            db.put("b", torch.zeros(600_000, dtype=torch.uint8))
        assert list(db.keys()) == ["a"]


def test_seed_manager_first_example() -> None:
    config = tierstore.CacheConfig(l1_cache_size=512 * 1024 * 1024, l2_cache_size=1024 * 1024 * 1024,
                                   l3_cache_size=4 * 1024 * 1024 * 1024)
    with tierstore.HierarchicalCacheManager(config) as manager:
        tensor = torch.randn(100, 100, dtype=torch.float16)
        assert manager.put_tensor(tensor, "example_tensor") is True
        retrieved, level = manager.get_tensor(tensor.shape, tensor.dtype)
        assert same_bits(retrieved, tensor) and level in ("L1", "L2", "L3")
        fresh, level = manager.get_tensor((7, 7), torch.float32)
        assert fresh.shape == (7, 7) and level == "new"


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_lost_catalog_does_not_delete_data(store_path: Path, damage: str) -> None:
    with tierstore.open(store_path) as db:
        db.put("w", torch.randn(1000, 1000))
    catalog = store_path / "catalog.sqlite"
    if damage == "truncate":
        catalog.write_bytes(b"")
    else:
        catalog.unlink()
    files = sorted(p for p in (store_path / "l3").rglob("*") if p.is_file())
    with pytest.raises(tierstore.CatalogError, match="missing or empty"):
        tierstore.open(store_path)
    assert sorted(p for p in (store_path / "l3").rglob("*") if p.is_file()) == files


def test_large_transaction_replaces_deletes_and_counts(store_path: Path) -> None:
    """A commit looks the replaced rows up in batches: more keys than one batch, mixed with deletes."""
    first = {f"k{i:04d}": torch.full((64,), float(i)) for i in range(700)}
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        with db.transaction():
            for key, value in first.items():
                db.put(key, value)
        created = db.info("k0003").created
        kept = db.stats()
        with db.transaction():
            for i in range(0, 600):  # replaced: more than one batch of keys
                db.put(f"k{i:04d}", torch.full((32,), -float(i)))
            for i in range(600, 650):
                db.delete(f"k{i:04d}")
            for i in range(20):
                db.put(f"new{i}", torch.ones(16))
        after = db.stats()
        assert len(db) == after.blocks == 670
        assert after.logical_bytes == kept.logical_bytes - 600 * 32 * 4 - 50 * 64 * 4 + 20 * 16 * 4
        assert db.info("k0003").created == created  # a replace keeps the key's creation time
        assert same_bits(db.get("k0599"), torch.full((32,), -599.0))
        assert same_bits(db.get("k0699"), first["k0699"])
        with pytest.raises(KeyError):
            db.get("k0600")
    with tierstore.open(store_path, l2_cache_size=0) as db:  # the totals the catalog recounts on open
        reopened = db.stats()
        assert (reopened.blocks, reopened.logical_bytes, reopened.stored_bytes) == (
            after.blocks, after.logical_bytes, after.stored_bytes)
