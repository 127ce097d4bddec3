"""Executing a placement plan: units on the "GPU" (an L1 on the CPU device) and on the CPU, per phase.

A tiny bf16 Llama of 8 layers runs under a hand-made plan that mixes every placement (L1; L2 copied
to the GPU; CPU from L2; L3 streamed to either) and layers that prefill on the GPU and decode on the
CPU. With one dtype everywhere the tokens and logits equal the in-memory model's; with the GPU in
fp32 or fp16 (the Pascal fallbacks, ``l1_bf16_fallback``) beside bf16 on the CPU they are close: against
the model in fp32, the logits' largest error was 0.0034 (fp32 GPU) and 0.0030 (fp16 GPU), the bf16
in-memory model's 0.0054, and the 6 greedy tokens were the same; the test allows 0.02 and 80% of tokens.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import tierstore
from tests.model_fixtures import tiny_llama_store
from tierstore import ConfigError
from tierstore.errors import HardwareUnavailableError
from tierstore.integrations.plan_units import model_units
from tierstore.integrations.streaming import load_streamed
from tierstore.plan.placement import Machine, Plan, UnitPlan, plan

GiB = 1 << 30
LAYERS = 8
PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
# (tier, decode_on, prefill_on) per layer: every placement, and phase switches on L2 and L3 units
LAYOUT = [("L1", "cuda", "cuda"), ("L1", "cuda", "cuda"), ("L2", "cuda", "cuda"), ("L2", "cpu", "cpu"),
          ("L2", "cpu", "cuda"), ("L3", "cuda", "cuda"), ("L3", "cpu", "cpu"), ("L3", "cpu", "cuda")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    return tiny_llama_store(tmp_path_factory, LAYERS, dtype=torch.bfloat16)


def _plan(store: Path) -> tuple[Plan, int]:
    with tierstore.open(store, readonly=True, l2_cache_size=0) as db:
        units = model_units(db)
    chosen = plan(units, Machine.seed_laptop(), memory=64 * GiB, context=0)
    placed = tuple(UnitPlan(u.name, u.nbytes, tier, dec, pre)
                   for u, (tier, dec, pre) in zip(chosen.units, LAYOUT, strict=True))
    return replace(chosen, units=placed, head_on="cpu"), units.units[0].nbytes


def _open(store: Path, layer: int, **config: Any) -> tierstore.TierStore:
    settings: dict[str, Any] = dict(l1_device="cpu", l1_cache_size="2MiB", l2_cache_size=(3 + 3) * layer + 64 * 1024,
                                    fsync=False)
    return tierstore.open(store, **{**settings, **config})


def _run(model: Any) -> tuple[torch.Tensor, Any]:
    with torch.inference_mode():
        logits = model(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT)).logits
        out = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=6,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
    return logits, out


def test_a_mixed_plan_in_one_dtype_is_the_in_memory_model(checkpoint: tuple[Any, Path]) -> None:
    reference, path = checkpoint
    chosen, layer = _plan(path)
    expected_logits, expected = _run(reference)
    with _open(path, layer) as db:
        model = load_streamed(db, plan=chosen, gpu="cpu", prefetch=2, dtype=torch.bfloat16)
        streamer = model.weight_streamer
        for _ in range(2):
            logits, out = _run(model)
            assert torch.equal(logits, expected_logits)
            assert torch.equal(out.sequences, expected.sequences)
        l1_hits = db.stats().hits["L1"]
        stats = streamer.stats()
        executed = dict(streamer.executed)
        streamer.close()
    assert l1_hits > 0  # the L1 units' weights came from the device pool
    assert stats.held_units == 5  # L1 and L2 units stay put; the L3 ones stream
    assert stats.demand_fetches + stats.prefetch_used_blocks > 0
    for i, (tier, dec, pre) in enumerate(LAYOUT):
        name = f"model.layers.{i}"
        assert executed[(name, "prefill")] == (pre, torch.bfloat16, tier)
        assert executed[(name, "decode")] == (dec, torch.bfloat16, tier)


@pytest.mark.parametrize("fallback", ["float32", "float16"])
def test_a_pascal_gpu_dtype_beside_a_bf16_cpu_casts_at_the_boundaries(checkpoint: tuple[Any, Path],
                                                                        fallback: str) -> None:
    """The GPU units compute in fp32 or fp16 (the L1 policy for a GPU without bf16), the CPU ones in bf16."""
    reference, path = checkpoint
    chosen, layer = _plan(path)
    expected_logits, expected = _run(reference.float())
    reference.to(torch.bfloat16)
    seen: dict[tuple[int, int], tuple[torch.dtype, torch.dtype]] = {}
    with _open(path, layer, l1_bf16_cast="always", l1_bf16_fallback=fallback) as db:
        model = load_streamed(db, plan=chosen, gpu="cpu", dtype=torch.bfloat16)  # gpu_dtype: the L1 policy
        for i in (0, 2, 3, 4):
            proj = model.model.layers[i].self_attn.q_proj

            def record(module: Any, args: Any, i: int = i) -> None:
                seen[(i, int(args[0].shape[-2]))] = (args[0].dtype, module.weight.dtype)
            proj.register_forward_pre_hook(record)
        logits, out = _run(model)
        cache = getattr(out, "cache", None) or out.past_key_values
        streamer = model.weight_streamer
        executed = dict(streamer.executed)
        streamer.close()
    assert logits.dtype == torch.bfloat16  # the head is on the CPU, in the model's dtype
    on_gpu, bf16 = getattr(torch, fallback), torch.bfloat16
    assert seen[(0, 1)] == (on_gpu, on_gpu) and seen[(2, 1)] == (on_gpu, on_gpu) and seen[(3, 1)] == (bf16, bf16)
    assert seen[(4, PROMPT.shape[1])] == (on_gpu, on_gpu) and seen[(4, 1)] == (bf16, bf16)  # prefill GPU, decode CPU
    assert executed[("model.layers.7", "prefill")] == ("cuda", on_gpu, "L3")
    assert executed[("model.layers.7", "decode")] == ("cpu", bf16, "L3")
    # each layer's KV cache lives in the dtype of the device it decoded on
    assert cache.layers[0].keys.dtype == on_gpu and cache.layers[4].keys.dtype == bf16
    assert cache.layers[5].keys.dtype == on_gpu and cache.layers[6].keys.dtype == bf16
    # bf16 rounding on the CPU half of the layers, against the fp32 model
    assert (logits.float() - expected_logits).abs().max() < 0.02
    agree = (out.sequences == expected.sequences).float().mean()
    assert agree >= 0.8


def test_a_plan_the_process_or_the_store_cannot_execute_is_a_typed_error(checkpoint: tuple[Any, Path]) -> None:
    _, path = checkpoint
    chosen, layer = _plan(path)
    if not torch.cuda.is_available():
        with _open(path, layer) as db:
            with pytest.raises(HardwareUnavailableError, match="no CUDA"):
                load_streamed(db, plan=chosen)  # the plan's "cuda" defaults to a CUDA device
            with pytest.raises(HardwareUnavailableError, match="no CUDA"):
                load_streamed(db, plan=chosen, gpu="cuda:0")
    with _open(path, layer) as db, pytest.raises(HardwareUnavailableError, match="'meta'"):
        load_streamed(db, plan=chosen, gpu="meta")
    with tierstore.open(path, l1_cache_size=0, l2_cache_size="4MiB") as db, \
            pytest.raises(ConfigError, match="no L1 on cpu; open it with l1_cache_size=") as info:
        load_streamed(db, plan=chosen, gpu="cpu")
    assert info.value.tier == "L1"
    need = 3 * layer + 3 * layer  # the plan's three L2 units and a reserve of prefetch + 1 units
    with _open(path, layer, l2_cache_size=need - 1) as db, \
            pytest.raises(ConfigError, match=f"l2_cache_size={need} or more"):
        load_streamed(db, plan=chosen, gpu="cpu", prefetch=2, dtype=torch.bfloat16)
    with _open(path, layer, l1_cache_size=layer, l1_bf16_cast="always", l1_bf16_fallback="float32") as db, \
            pytest.raises(ConfigError, match=f"l1_cache_size={4 * layer} or more"):  # two fp32 layers
        load_streamed(db, plan=chosen, gpu="cpu")
