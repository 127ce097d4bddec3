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
    rewritten = bench.prepare_plan_store(work, machine, memory)  # the plan's raw units stored raw (plan --apply)
    assert rewritten > 0
    results = {v: bench.run_variant(v, work, memory, 3, (1, 4, 4), machine_file, matvec=False)
               for v in ("memory", "tierstore", "raw", "raw-copy", "raw-once", "plan")}
    reference = results["memory"]["tokens"]
    assert len(reference) == 3
    for variant in ("tierstore", "raw", "raw-copy", "raw-once", "plan"):
        r = results[variant]
        assert r["tokens"] == reference
        assert r["held_units"] < r["units"] and r["l2_bypasses"] == 0
        assert r["l2_bytes"] <= memory
    assert results["raw"]["store_bytes"] > results["plan"]["store_bytes"] > results["tierstore"]["store_bytes"]
    assert results["raw"]["mapped_blocks"] > 0 and results["raw-copy"]["mapped_blocks"] == 0
    assert results["raw-once"]["mapped_blocks"] > 0
    assert all(r["peak_rss"] > 0 and r["ttft_s"] > 0 for r in results.values())
