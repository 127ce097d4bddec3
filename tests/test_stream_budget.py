"""A streamed model bigger than L2, and a memory budget: a fixed held set, the rest streamed.

LRU over the cyclic layer scan keeps nothing (every pass reads every layer from L3); the streamer
holds as many units as L2 has room for beside its working reserve, so a pass reads only the others.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import tierstore
from tests.model_fixtures import tiny_llama_store
from tierstore import ConfigError
from tierstore.integrations.stream_budget import memory_split, unit_sizes
from tierstore.integrations.streaming import load_streamed

LAYERS = 20
PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny Llama of 20 equal decoder layers (~100 KiB each), in memory and as a checkpoint."""
    return tiny_llama_store(tmp_path_factory, LAYERS, max_shard_size="400KB")


def _logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT)).logits
    return out


def _layer_bytes(store: Path) -> int:
    with tierstore.open(store, readonly=True, l2_cache_size=0) as db:
        units, _ = unit_sizes(db)
    assert len(set(units.values())) == 1
    return next(iter(units.values()))


@pytest.mark.parametrize("hold", [None, 0], ids=["held-set", "lru-only"])
def test_a_pass_reads_only_the_units_outside_the_held_set(checkpoint: tuple[Any, Path], hold: int | None) -> None:
    reference, path = checkpoint
    layer = _layer_bytes(path)
    l2 = LAYERS * layer * 2 // 5  # 40% of the streamed layers
    expected = _logits(reference)
    with tierstore.open(path, l2_cache_size=l2) as db:
        model = load_streamed(db, prefetch=1, hold_bytes=hold)
        streamer = model.weight_streamer
        assert torch.equal(_logits(model), expected)  # pass 1: cold, fills the held set
        passes, before = 4, db.stats().hit_bytes["L3"]
        for _ in range(passes):
            assert torch.equal(_logits(model), expected)
        per_pass = (db.stats().hit_bytes["L3"] - before) / passes
        capacity = db.stats().tiers["L2"]["capacity"]
        stats = streamer.stats()
        streamer.close()
    usable = capacity - (1 + 1) * layer  # the working reserve: prefetch + 1 units
    bound = 1.1 * (LAYERS * layer - usable)
    if hold is None:
        assert stats.held_units >= usable // layer - 1
        assert per_pass <= bound, (per_pass / layer, bound / layer)
    else:  # the scan-blind LRU the held set replaces: more than the optimum from L3 (nearly every layer of every
        assert stats.held_units == 0  # pass; on a loaded machine the migrator's prefetch keeps a few: not the 1.1x)
        assert per_pass > LAYERS * layer - usable


def test_held_units_survive_eviction_pressure_from_another_thread(checkpoint: tuple[Any, Path]) -> None:
    """A writer thread fills L2 with other blocks while the model runs: the held set stays, tokens do not change."""
    reference, path = checkpoint
    layer = _layer_bytes(path)
    expected = _logits(reference)
    with tierstore.open(path, l2_cache_size=LAYERS * layer // 2) as db:
        model = load_streamed(db, prefetch=2)
        assert torch.equal(_logits(model), expected)
        held = model.weight_streamer.stats().held_units
        assert held > 0
        stop = threading.Event()
        errors: list[BaseException] = []

        def pressure() -> None:
            i = 0
            try:
                while not stop.is_set():
                    db.put(f"noise/{i % 8}", torch.full((layer // 4,), float(i)), durable=False)
                    i += 1
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=pressure)
        thread.start()
        try:
            before = db.stats().hit_bytes["L3"]
            for _ in range(6):
                assert torch.equal(_logits(model), expected)
            read = db.stats().hit_bytes["L3"] - before
        finally:
            stop.set()
            thread.join()
        assert not errors
        assert model.weight_streamer.stats().held_units == held
        assert read <= 6 * (LAYERS - held) * layer + 6 * layer  # the held units were never read again
        model.weight_streamer.close()


def test_memory_budget_splits_into_fixed_weights_and_l2(checkpoint: tuple[Any, Path]) -> None:
    reference, path = checkpoint
    layer = _layer_bytes(path)
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        split = memory_split(db, 12 * layer, prefetch=2)
    assert split.fixed_bytes == sum(p.nbytes for n, p in reference.named_parameters() if ".layers." not in n)
    assert split.working_bytes == 3 * layer
    assert split.l2_bytes == 12 * layer - split.fixed_bytes
    with tierstore.open(path, l2_cache_size=split.l2_bytes) as db:
        model = load_streamed(db, memory=12 * layer, prefetch=2)
        assert torch.equal(_logits(model), _logits(reference))
        assert torch.equal(_logits(model), _logits(reference))
        stats = model.weight_streamer.stats()
        assert 0 < stats.held_bytes <= split.hold_bytes
        assert db.stats().tiers["L2"]["capacity"] + split.fixed_bytes <= 12 * layer
        model.weight_streamer.close()


def test_a_budget_below_the_minimum_names_the_minimum(checkpoint: tuple[Any, Path]) -> None:
    _, path = checkpoint
    layer = _layer_bytes(path)
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        minimum = memory_split(db, 100 * layer).minimum
        with pytest.raises(ConfigError, match=f"at least {minimum} bytes"):
            memory_split(db, minimum - 1)
        with pytest.raises(ConfigError, match=f"at least {minimum} bytes"):
            load_streamed(db, memory=minimum - 1)
        with pytest.raises(ConfigError, match="not both"):
            load_streamed(db, memory=minimum, resident_bytes=layer)


def test_an_l2_bigger_than_the_budget_allows_is_refused(checkpoint: tuple[Any, Path]) -> None:
    _, path = checkpoint
    layer = _layer_bytes(path)
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        split = memory_split(db, 10 * layer)
    with tierstore.open(path, l2_cache_size=split.l2_bytes + 64 * 4096) as db, \
            pytest.raises(ConfigError, match=f"l2_cache_size={split.l2_bytes}"):
        load_streamed(db, memory=10 * layer)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A Llama of 12 layers of ~2.6 MiB whose large weights take page runs of L2 (not slab slots)."""
    return tiny_llama_store(tmp_path_factory, 12, max_shard_size="4MB", seed=1, hidden=256, intermediate=768,
                            vocab=4096, head_dim=64)


def _bypasses(db: Any) -> int:
    return int(db.stats().tiers["L2"]["bypasses"])


def test_a_budget_holds_what_it_allows_and_nothing_bypasses_l2(wide: tuple[Any, Path]) -> None:
    """Under ``memory=`` the fixed weights stay out of L2 and the held set is what the split says.

    Before: the fixed weights' copies took free L2 (``get(copy=True)`` uses L2 scratch), the working
    region had no slack, fetches bypassed L2 every pass and each holdable unit that once missed was
    streamed for good.
    """
    reference, path = wide
    expected = _logits(reference)
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        units, _ = unit_sizes(db)
        layer = max(units.values())
        memory = memory_split(db, 1 << 40).fixed_bytes + 9 * layer + layer // 2
        split = memory_split(db, memory, prefetch=2)
    with tierstore.open(path, readonly=True, l2_cache_size=split.l2_bytes) as db:
        model = load_streamed(db, memory=memory, prefetch=2)
        l2 = db.stats().tiers["L2"]
        assert l2["requested"] == l2["bytes"]  # only the blocks cached there, no copies of the fixed weights
        assert torch.equal(_logits(model), expected)
        before = _bypasses(db)
        for _ in range(3):
            assert torch.equal(_logits(model), expected)
        stats = model.weight_streamer.stats()
        assert _bypasses(db) == before
        assert stats.held_units == split.hold_bytes // layer == 9 - 4  # less 3 working units and 1 of slack
        model.weight_streamer.close()


def test_a_unit_that_missed_l2_once_is_held_on_a_later_pass(wide: tuple[Any, Path]) -> None:
    """L2 full of someone else's memory during the first pass: the units to hold stream; freed, they are held."""
    reference, path = wide
    expected = _logits(reference)
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        units, _ = unit_sizes(db)
        layer = max(units.values())
        memory = memory_split(db, 1 << 40).fixed_bytes + 9 * layer + layer // 2
        split = memory_split(db, memory, prefetch=2)
    with tierstore.open(path, readonly=True, l2_cache_size=split.l2_bytes) as db:
        model = load_streamed(db, memory=memory, prefetch=2)
        streamer = model.weight_streamer
        squatter = db.allocate((split.l2_bytes - 4 * layer,), torch.uint8)  # leaves room to stream, not to hold
        assert torch.equal(_logits(model), expected)
        assert streamer.stats().held_units < split.hold_bytes // layer
        del squatter
        assert torch.equal(_logits(model), expected)
        assert torch.equal(_logits(model), expected)
        assert streamer.stats().held_units == split.hold_bytes // layer
        streamer.close()
