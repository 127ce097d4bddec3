"""KV-block chains in the store: ``put(key, t, parent=...)`` makes L2 evict a chain from its tail.

That the links persist in the catalog (reopen, promotions, upgrade) is in test_chain_persistence.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tierstore
from tierstore.errors import TierStoreError


def first_to_leave(db: tierstore.TierStore, watched: list[str], limit: int = 64) -> list[str]:
    """Stream filler blocks into L2 until a watched key leaves it; the watched keys that left."""
    for i in range(limit):
        db.put(f"filler{i}", torch.randn(64_000))
        gone = [k for k in watched if "L2" not in db.info(k).tiers]
        if gone:
            return gone
    raise AssertionError("L2 never evicted a watched block")


@pytest.mark.parametrize("policy", ["lru", "fifo", "predictive", "kv"])
def test_l2_evicts_chain_tails_before_their_prefixes(store_path: Path, policy: str) -> None:
    with tierstore.open(store_path, l2_cache_size="4MiB", fsync=False, l2_eviction_policy=policy) as db:
        db.put("c0", torch.randn(64_000))
        db.put("c1", torch.randn(64_000), parent="c0")
        db.put("c2", torch.randn(64_000), parent="c1")
        assert first_to_leave(db, ["c0", "c1", "c2"]) == ["c2"]  # c0 is the oldest, but c2 goes first
        assert first_to_leave(db, ["c0", "c1"]) == ["c1"]
        assert first_to_leave(db, ["c0"]) == ["c0"]
        for key in ("c0", "c1", "c2"):
            assert db.get(key).shape == (64_000,)  # evicted from L2, never lost


def test_without_parents_the_oldest_goes_first(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size="4MiB", fsync=False, l2_eviction_policy="lru") as db:
        for key in ("c0", "c1", "c2"):
            db.put(key, torch.randn(64_000))
        assert first_to_leave(db, ["c0", "c1", "c2"]) == ["c0"]


def test_a_replaced_or_deleted_block_leaves_its_chain(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size="4MiB", fsync=False, l2_eviction_policy="lru") as db:
        db.put("c0", torch.randn(64_000))
        db.put("c1", torch.randn(64_000), parent="c0")
        db.put("c1", torch.randn(64_000))  # replaced without a parent: no longer a tail of c0
        db.put("c2", torch.randn(64_000))
        assert first_to_leave(db, ["c0", "c1", "c2"]) == ["c0"]
        db.put("d0", torch.randn(64_000))
        db.put("d1", torch.randn(64_000), parent="d0")
        db.delete("d1")
        assert first_to_leave(db, ["d0"]) == ["d0"]


def test_bad_parent_is_a_typed_error(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size="4MiB", fsync=False) as db:
        with pytest.raises(TierStoreError):
            db.put("c1", torch.randn(10), parent="")
        assert "c1" not in db
