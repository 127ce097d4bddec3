"""A streamed model's linear layers get foldable inputs, so torch never copies a weight to multiply it.

Weights that do not require grad (the streamed model's, views of the store's tiers) are multiplied
against a 3-D input with one ``mm`` only when the input's leading strides are canonical; the
``hidden_states[:, -1:, :]`` slice transformers takes for the logits is not, and torch then expands
and copies the whole weight (for Qwen3-VL-2B's tied lm_head, 593 MiB per prefill). Memory is counted
with torch's profiler (its allocations), not timed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import tierstore
from tests.model_fixtures import tiny_llama_store
from tierstore.integrations.linear_fold import fold_linear_inputs, foldable
from tierstore.integrations.streaming import load_streamed


def _largest_allocation(fn: Any) -> int:
    """The largest single CPU allocation torch makes while ``fn()`` runs."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_foldable_strides() -> None:
    """A contiguous tensor is foldable; the last-position slice of a sequence is not, though ``is_contiguous()``."""
    seq = torch.zeros(1, 36, 64)
    last = seq[:, -1:, :]
    assert foldable(seq) and foldable(torch.zeros(64)) and foldable(torch.zeros(3, 64))
    assert last.is_contiguous() and not foldable(last)
    assert not foldable(seq.transpose(0, 1))
    assert foldable(last.contiguous().view(last.shape))


@pytest.mark.parametrize("make", [lambda s: s[:, -1:, :], lambda s: s[:, -2:, :].transpose(0, 1)],
                         ids=["last-position slice", "transposed"])
def test_hooked_linear_never_copies_its_weight(make: Any) -> None:
    """With the hook, a weight that does not require grad is multiplied in place, with the same result."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 4096, bias=False).to(torch.bfloat16).requires_grad_(False)
    x = make(torch.randn(1, 36, 256, dtype=torch.bfloat16))
    weight_bytes = linear.weight.nbytes
    expected = torch.nn.functional.linear(x.contiguous().view(x.shape), linear.weight)
    fold_linear_inputs(linear)
    got = linear(x)
    assert torch.equal(got, expected)
    assert _largest_allocation(lambda: linear(x)) < weight_bytes // 4  # the output only (36 x 4096 at most)


def test_streamed_model_hooks_every_linear(tmp_path_factory: pytest.TempPathFactory) -> None:
    """load_streamed hooks all linear layers: lm_head sees foldable inputs in prefill, tokens unchanged."""
    model, path = tiny_llama_store(tmp_path_factory, 3)
    reference: Any = model
    prompt = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.inference_mode():
        expected = reference.generate(prompt, max_new_tokens=3, do_sample=False)
    with tierstore.open(Path(path), readonly=True, l2_cache_size=8 << 20) as db:
        streamed = load_streamed(db, prefetch=1)
        linears = [m for m in streamed.modules() if isinstance(m, nn.Linear)]
        assert linears and all(m._forward_pre_hooks for m in linears)
        seen: list[bool] = []
        streamed.lm_head.register_forward_pre_hook(lambda m, args: seen.append(foldable(args[0])))
        with torch.inference_mode():
            out = streamed.generate(prompt, max_new_tokens=3, do_sample=False)
        streamed.weight_streamer.close()
    assert len(seen) == 3 and all(seen)  # the prefill's [:, -1:, :] slice included
    assert torch.equal(out, expected)
