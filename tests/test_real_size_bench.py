"""tools/bench_real_size.py's building blocks at a tiny shape: the real-size run is a benchmark, not a test."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import tierstore
from tierstore.integrations.checkpoint import import_checkpoint
from tierstore.plan.machine import Machine

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_real_size.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_real_size", _TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_real_size"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "params", "hidden", "layers"), [("2b", 2.13e9, 2048, 28), ("4b", 4.44e9, 2560, 36)])
def test_published_shapes(bench: Any, name: str, params: float, hidden: int, layers: int) -> None:
    """The configs build the published models (parameter counts of Qwen3-VL-2B/4B-Instruct), on meta."""
    from transformers import Qwen3VLForConditionalGeneration

    config = bench.shape_config(name)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    count = sum(p.numel() for p in model.parameters())  # tied: the embeddings once
    assert abs(count - params) / params < 0.01
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.head_dim) == (hidden, layers, 151936, 128)
    vision = config.vision_config
    assert vision.out_hidden_size == hidden and vision.deepstack_visual_indexes == [5, 11, 17]
    assert sum(text.rope_scaling["mrope_section"]) == text.head_dim // 2


@pytest.fixture(scope="module")
def work(bench: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("real-size")
    config = bench.shape_config("tiny")
    total = bench.write_random_checkpoint(config, folder / "ckpt", seed=3, shard_bytes=256 << 10)
    with tierstore.open(folder / "store", l2_cache_size=0) as db:
        import_checkpoint(folder / "ckpt", db, require_config=True)
    with tierstore.open(folder / "store-raw", l2_cache_size=0, l3_compression="off") as db:
        import_checkpoint(folder / "ckpt", db, require_config=True)
    assert len(list((folder / "ckpt").glob("*.safetensors"))) > 1  # sharded
    index = json.loads((folder / "ckpt" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total and "lm_head.weight" not in index["weight_map"]
    return folder


def test_random_checkpoint_is_seeded(bench: Any, work: Path, tmp_path: Path) -> None:
    """The same seed writes the same bytes; another seed other weights."""
    from safetensors.torch import load_file

    config = bench.shape_config("tiny")
    bench.write_random_checkpoint(config, tmp_path / "a", seed=3, shard_bytes=256 << 10)
    bench.write_random_checkpoint(config, tmp_path / "b", seed=4, shard_bytes=256 << 10)
    first = sorted((work / "ckpt").glob("*.safetensors"))[0].name
    same, other, mine = (load_file(p / first) for p in (tmp_path / "a", tmp_path / "b", work / "ckpt"))
    name = next(k for k, v in mine.items() if v.dim() == 2)
    assert torch.equal(same[name], mine[name]) and not torch.equal(other[name], mine[name])
    assert all(v.dtype == torch.bfloat16 for v in mine.values())


def test_variants_run_under_budget_and_agree(bench: Any, work: Path, tmp_path: Path) -> None:
    """In memory, tierstore (memory=, compressed or raw L3) and the CPU plan give the same tokens.

    Not all units are held; at this budget the one decoder layer not held may stay cached in the
    working reserve, so decode need not read L3 (the real-size run shows the per-token L3 reads).
    """
    machine = Machine(name="test", disk_read=1e9, decode=1e9, memcpy=5e9, cpu_flops=5e10, ram_free=8 << 30)
    machine_file = tmp_path / "machine.json"
    machine_file.write_text(json.dumps(machine.to_dict()))
    memory = 3 << 20  # below the tiny model's ~4.6 MiB: some units stream
    # the raw units of the plans for both verify settings stored raw (plan --apply)
    rewritten = bench.prepare_plan_store(work, machine, memory, ("disk", "once"))
    assert rewritten > 0
    results = {v: bench.run_variant(v, work, memory, 3, (1, 4, 4), machine_file, matvec=False)
               for v in ("memory", "tierstore", "raw", "raw-always", "raw-all-threads", "raw-copy", "raw-once", "plan",
                         "plan-once")}
    reference = results["memory"]["tokens"]
    assert len(reference) == 3
    for variant in ("tierstore", "raw", "raw-always", "raw-all-threads", "raw-copy", "raw-once", "plan", "plan-once"):
        r = results[variant]
        assert r["tokens"] == reference
        assert r["held_units"] < r["units"] and r["l2_bypasses"] == 0
        assert r["l2_bytes"] <= memory
    assert results["raw"]["store_bytes"] > results["plan"]["store_bytes"] > results["tierstore"]["store_bytes"]
    assert results["raw"]["mapped_blocks"] > 0 and results["raw-copy"]["mapped_blocks"] == 0
    assert results["raw-once"]["mapped_blocks"] > 0
    assert all(r["peak_rss"] > 0 and r["ttft_s"] > 0 for r in results.values())
    assert {v: r["verify_maps"] for v, r in results.items() if "verify_maps" in r} == {
        "tierstore": "disk", "raw": "disk", "raw-always": "always", "raw-all-threads": "disk", "raw-copy": "disk",
        "raw-once": "once", "plan": "disk", "plan-once": "once"}  # each plan runs with the checks it was made for
    assert results["raw-all-threads"]["decode_threads"] is None  # torch's own count, as before decode_threads


def test_the_plan_is_compared_with_the_best_variant_with_the_same_checks(bench: Any) -> None:
    ms = {"tierstore": 9.0, "raw": 5.0, "raw-copy": 6.0, "raw-once": 3.0, "accelerate": 4.0, "plan": 5.5,
          "plan-once": 3.3, "memory": 1.0}
    ratios = bench.plan_ratios({k: {"decode_s": v} for k, v in ms.items()})
    (same, overall) = ratios["plan"]
    assert same == ("raw", pytest.approx(1.1)) and overall == ("raw-once", pytest.approx(5.5 / 3.0))
    (same, overall) = ratios["plan-once"]
    assert same == ("raw-once", pytest.approx(1.1)) and overall == ("raw-once", pytest.approx(1.1))
    assert "plan-once" not in bench.plan_ratios({k: {"decode_s": v} for k, v in ms.items() if k != "plan-once"})


def test_a_plan_with_mapped_decoder_layers_holds_its_budget(bench: Any, work: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny Qwen3-VL as the 2B's plan store keeps it (decoder layers raw, vision blocks compressed), under
    ``load_streamed(plan=)`` with L2 at ``plan.l2_bytes``: L2 + the mapped pages alive at once + the fixed
    weights + caches stay within ``memory``, and nothing bypasses L2 while generating.

    Before, the plan kept a working reserve of decoder layers in L2 while their maps came on top of it.
    """
    import shutil
    import weakref
    from dataclasses import replace

    from tierstore.errors import ConfigError
    from tierstore.integrations.plan_apply import store_raw
    from tierstore.integrations.plan_units import model_units
    from tierstore.integrations.streaming import load_streamed
    from tierstore.plan.placement import plan

    path = tmp_path / "store"
    shutil.copytree(work / "store", path)
    machine = Machine(name="test", disk_read=1e9, decode=1e9, memcpy=5e9, cpu_flops=5e10, ram_free=8 << 30,
                      cores=2, cpu_matvec=2e9, checksum=10e9)
    terms: dict[str, Any] = dict(prefetch=2, **bench.PLAN_TERMS)
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        units = model_units(db)
    decoders = tuple(u.name for u in units.units if u.decoder)
    store_raw(path, replace(plan(units, machine, memory=64 << 20, **terms), raw_units=decoders))
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        units = model_units(db)
    layer = max(u.nbytes for u in units.units if u.decoder)
    terms["rewrite"] = False  # the store as it is now: its decoder layers raw, its vision blocks compressed
    minimum = plan(units, machine, memory=64 << 20, **terms).minimum
    memory = minimum + layer + 4096  # holds one decoder layer; the other streams mapped, the vision blocks via L2
    chosen = plan(units, machine, memory=memory, **terms)
    host = chosen.host
    assert host is not None and host.total <= memory
    fetch = {u.name: u.fetch for u in chosen.units if u.tier == "L3"}
    assert "map" in fetch.values() and "decode" in fetch.values() and len(chosen.resident("L2")) == 1

    live = {"now": 0, "peak": 0}
    original = tierstore.TierStore.map

    def counted(self: Any, key: str) -> Any:
        tensor = original(self, key)
        if tensor is not None:
            live["now"] += tensor.nbytes
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(tensor, lambda n=tensor.nbytes: live.__setitem__("now", live["now"] - n))
        return tensor

    monkeypatch.setattr(tierstore.TierStore, "map", counted)
    config = bench.shape_config("tiny")
    inputs = bench.bench_inputs(config, (1, 4, 4))
    from transformers import Qwen3VLForConditionalGeneration

    reference = Qwen3VLForConditionalGeneration.from_pretrained(work / "ckpt", dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        expected = reference.generate(**inputs, max_new_tokens=3, do_sample=False)
    with tierstore.open(path, readonly=True, l2_cache_size=chosen.l2_bytes) as db:
        model = load_streamed(db, plan=chosen, prefetch=2)
        streamer = model.weight_streamer
        before = db.stats().tiers["L2"]["bypasses"]
        live["peak"] = live["now"]  # from here: the streamed units' maps (the fixed weights are clones)
        with torch.inference_mode():
            got = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        l2 = db.stats().tiers["L2"]
        stats = streamer.stats()
        streamer.close()
    assert torch.equal(got, expected)
    assert l2["bypasses"] == before and stats.held_units == 1 and stats.mapped_blocks > 0
    assert 0 < live["peak"] <= host.mapped
    assert l2["capacity"] + live["peak"] + stats.resident_bytes + host.caches <= memory
    old_size = memory - units.fixed_bytes  # the L2 the benchmark opened the plan's store with before
    with tierstore.open(path, readonly=True, l2_cache_size=old_size) as db, \
            pytest.raises(ConfigError, match=f"l2_cache_size={chosen.l2_bytes}"):
        load_streamed(db, plan=chosen, prefetch=2)


def test_a_planned_vision_block_gets_its_inputs_in_the_in_memory_dtypes(bench: Any, work: Path) -> None:
    """The hybrid streamer casts a unit's activations to its compute dtype, not the float32 rotary tables
    Qwen3-VL's vision blocks get: cast to bf16, the 2B's vision tower drifted from the in-memory model."""
    from transformers import Qwen3VLForConditionalGeneration

    from tierstore.integrations.plan_units import model_units
    from tierstore.integrations.streaming import load_streamed
    from tierstore.plan.placement import plan

    def dtypes_seen(model: Any) -> set[tuple[str, Any]]:
        seen: set[tuple[str, Any]] = set()

        def record(module: Any, args: Any, kwargs: Any) -> None:
            for name, value in kwargs.items():
                values = value if isinstance(value, tuple) else (value,)
                seen.update((name, v.dtype) for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())

        for block in model.model.visual.blocks:
            block.register_forward_pre_hook(record, with_kwargs=True)
        inputs = bench.bench_inputs(model.config, (1, 4, 4))
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return seen

    reference = dtypes_seen(Qwen3VLForConditionalGeneration.from_pretrained(work / "ckpt",
                                                                            dtype=torch.bfloat16).eval())
    assert ("position_embeddings", torch.float32) in reference
    machine = Machine(name="test", disk_read=1e9, decode=1e9, memcpy=5e9, cpu_flops=5e10, ram_free=8 << 30)
    with tierstore.open(work / "store-raw", readonly=True, l2_cache_size=0) as db:
        chosen = plan(model_units(db), machine, memory=64 << 20, prefetch=2, rewrite=False, **bench.PLAN_TERMS)
    with tierstore.open(work / "store-raw", readonly=True, l2_cache_size=chosen.l2_bytes) as db:
        model = load_streamed(db, plan=chosen, prefetch=2)
        try:
            assert dtypes_seen(model) == reference
        finally:
            model.weight_streamer.close()
