"""Weight streaming from a raw L3: the units not held are maps of the store's files, not copies in L2.

With every streamed unit stored raw (``import-hf --l3-compression off``), the streamer maps the
units it streams (``TierStore.map``, made by the prefetch thread), so L2 needs no working region for
them and holds more units under the same budget; the logits are the in-memory model's, bit for bit.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import tierstore
from tests.model_fixtures import tiny_llama_store
from tierstore.integrations.plan_units import model_units
from tierstore.integrations.stream_budget import mapped_slack, memory_split, raw_units, unit_sizes
from tierstore.integrations.streaming import load_streamed
from tierstore.plan.placement import Machine, UnitPlan, plan

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """12 layers of ~2.6 MiB, every block stored raw."""
    return tiny_llama_store(tmp_path_factory, 12, max_shard_size="4MB", seed=1, hidden=256, intermediate=768,
                            vocab=4096, head_dim=64, compression="off")


def _logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT)).logits
    return out


def _budget(path: Path, mapped: bool) -> tuple[int, int, Any]:
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        units, _ = unit_sizes(db)
        layer = max(units.values())
        memory = memory_split(db, 1 << 40).fixed_bytes + 9 * layer + layer // 2
        return memory, layer, memory_split(db, memory, prefetch=2, mapped=mapped)


def test_the_split_of_a_raw_store_gives_l2_to_held_units(raw: tuple[Any, Path]) -> None:
    _, path = raw
    memory, layer, split = _budget(path, mapped=True)
    _, _, copied = _budget(path, mapped=False)
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        assert all(raw_units(db).values())
    assert split.mapped and not copied.mapped
    assert split.working_bytes == copied.working_bytes == 3 * layer
    assert split.l2_bytes == memory - split.fixed_bytes - split.working_bytes  # the working units are mapped pages
    assert split.slack_bytes == mapped_slack(split.l2_bytes) < layer
    assert split.hold_bytes == split.l2_bytes - split.slack_bytes
    assert split.hold_bytes - copied.hold_bytes == layer - split.slack_bytes  # most of a unit more to hold
    assert split.minimum == copied.minimum


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "copied"])
def test_streaming_a_raw_store_maps_what_it_does_not_hold(raw: tuple[Any, Path], mapped: bool) -> None:
    reference, path = raw
    expected = _logits(reference)
    memory, layer, split = _budget(path, mapped)
    with tierstore.open(path, readonly=True, l2_cache_size=split.l2_bytes) as db:
        model = load_streamed(db, memory=memory, prefetch=2, mapped=mapped)
        streamer = model.weight_streamer
        for _ in range(3):
            assert torch.equal(_logits(model), expected)
        stats = streamer.stats()
        l2 = db.stats().tiers["L2"]
        store_mapped = db.stats().mapped
        streamer.close()
    assert stats.held_units == split.hold_bytes // layer >= 5
    assert l2["bypasses"] == 0
    streamed_params = sum(len(u.params) for i, u in enumerate(streamer.units) if i >= stats.held_units)
    if mapped:
        fixed = len(dict(reference.named_parameters())) - sum(len(u.params) for u in streamer.units)
        assert stats.mapped_blocks >= 3 * streamed_params  # every pass, every streamed weight
        assert store_mapped == stats.mapped_blocks + fixed  # and the fixed weights once, kept as maps
        assert l2["bytes"] <= split.hold_bytes  # L2 holds the held units only
    else:
        assert stats.mapped_blocks == store_mapped == 0


def test_a_compressed_store_streams_through_l2(tmp_path_factory: pytest.TempPathFactory) -> None:
    reference, path = tiny_llama_store(tmp_path_factory, 4, dtype=torch.bfloat16, compression="zstd")
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        assert not all(raw_units(db).values())
        split = memory_split(db, 1 << 30)
        assert not split.mapped
    with tierstore.open(path, readonly=True, l2_cache_size=split.l2_bytes // 1024) as db:
        model = load_streamed(db, prefetch=1, hold_bytes=0, dtype=torch.bfloat16)
        assert torch.equal(_logits(model), _logits(reference))
        keys = [key for unit in model.weight_streamer.units for _, _, key, _ in unit.params]
        raw_keys = [key for key in keys if db.info(key).codec == "raw"]  # norms that do not compress, say
        assert len(raw_keys) < len(keys)
        stats = model.weight_streamer.stats()
        model.weight_streamer.close()
    assert stats.mapped_blocks == len(raw_keys)  # one pass: the compressed blocks were read as usual


def test_a_plan_maps_its_l3_units(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The hybrid executor (a WeightStreamer) maps the plan's L3 units, computed on the CPU or the "GPU"."""
    reference, path = tiny_llama_store(tmp_path_factory, 4, dtype=torch.bfloat16, compression="off")
    layout = [("L1", "cuda", "cuda"), ("L2", "cpu", "cpu"), ("L3", "cpu", "cpu"), ("L3", "cuda", "cpu")]
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        units = model_units(db)
    chosen = plan(units, Machine.seed_laptop(), memory=64 << 30, context=0)
    placed = tuple(UnitPlan(u.name, u.nbytes, tier, dec, pre) for u, (tier, dec, pre) in zip(chosen.units, layout,
                                                                                            strict=True))
    chosen = replace(chosen, units=placed, head_on="cpu")
    layer = units.units[0].nbytes
    with tierstore.open(path, l1_device="cpu", l1_cache_size="2MiB", l2_cache_size=4 * layer + 64 * 1024,
                        fsync=False) as db:
        model = load_streamed(db, plan=chosen, gpu="cpu", prefetch=2, dtype=torch.bfloat16)
        expected = _logits(reference)
        for _ in range(2):
            assert torch.equal(_logits(model), expected)
        stats = model.weight_streamer.stats()
        model.weight_streamer.close()
    assert stats.held_units == 2
    assert stats.mapped_blocks >= 2 * 2 * len(model.weight_streamer.units[2].params)
