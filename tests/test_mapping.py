"""The handle as a ``MutableMapping``: indexing, assignment, deletion, the mixins, accelerate's weights_map."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path

import pytest
import torch

import tierstore
from tests.conftest import same_bits


def test_handle_is_a_mutable_mapping(db: tierstore.TierStore) -> None:
    assert isinstance(db, MutableMapping) and isinstance(db, Mapping)
    t = torch.randn(8, 4, dtype=torch.bfloat16)
    db["w"] = t
    assert same_bits(db["w"], t) and "w" in db and len(db) == 1 and list(db) == ["w"]
    with pytest.raises(KeyError):
        db["absent"]
    with pytest.raises(tierstore.BlockNotFoundError):
        del db["absent"]
    del db["w"]
    assert "w" not in db and len(db) == 0


def test_assignment_is_durable(store_path: Path) -> None:
    with tierstore.open(store_path) as db:
        db["a"] = torch.arange(6)
        db.update({"b": torch.ones(3), "c": torch.zeros(2, 2)})
    with tierstore.open(store_path, readonly=True) as ro:
        assert sorted(ro) == ["a", "b", "c"] and torch.equal(ro["a"], torch.arange(6))
        assert dict(ro.items()).keys() == {"a", "b", "c"}
        assert [tuple(v.shape) for v in ro.values()] == [(6,), (3,), (2, 2)]


def test_mixins_pop_setdefault_clear(db: tierstore.TierStore) -> None:
    db["x"] = torch.tensor([1, 2])
    assert torch.equal(db.pop("x"), torch.tensor([1, 2])) and "x" not in db
    assert db.pop("x", None) is None
    assert torch.equal(db.setdefault("y", torch.tensor([3])), torch.tensor([3]))
    assert torch.equal(db.setdefault("y", torch.tensor([9])), torch.tensor([3]))  # kept, not replaced
    db["z"] = torch.tensor([4])
    key, value = db.popitem()
    assert key == "y" and torch.equal(value, torch.tensor([3]))
    db.clear()
    assert len(db) == 0


def test_mapping_inside_a_transaction(db: tierstore.TierStore) -> None:
    with db.transaction():
        db["a"] = torch.ones(2)
        assert "a" in db and len(db) == 1 and torch.equal(db["a"], torch.ones(2))
        del db["a"]
        assert "a" not in db and list(db) == []


def test_handles_compare_by_identity_and_hash(db: tierstore.TierStore, tmp_path: Path) -> None:
    db["w"] = torch.ones(2)
    with tierstore.open(tmp_path / "other") as other:
        other["w"] = torch.ones(2)
        assert db == db and db != other and len({db, other}) == 2  # never a tensor-by-tensor comparison


def test_closed_handle_refuses_indexing(store_path: Path) -> None:
    db = tierstore.open(store_path)
    db["w"] = torch.ones(2)
    db.close()
    with pytest.raises(tierstore.StoreClosedError):
        db["w"]
    with pytest.raises(tierstore.StoreClosedError):
        db["v"] = torch.ones(1)


def test_accelerate_streams_a_model_from_the_store(store_path: Path) -> None:
    """accelerate's cpu_offload with the store as its weights_map gives the in-memory model's outputs."""
    hooks = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8),
                                torch.nn.LayerNorm(8))
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = model(x)
    with tierstore.open(store_path, l2_cache_size="1MiB") as db:
        db.update(model.state_dict())
        hooks.cpu_offload(model, execution_device=torch.device("cpu"), state_dict=db)  # type: ignore[arg-type]
        assert all(p.device.type == "meta" for p in model.parameters())  # the weights are only in the store
        with torch.no_grad():
            got = model(x)
        assert same_bits(got, expected)
        assert db.stats().gets >= len(model.state_dict())  # every forward read its weights through db[k]
