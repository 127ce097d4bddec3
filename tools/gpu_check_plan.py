"""The 2B placement-plan step of ``tools/gpu_check.py``: plan Qwen3-VL 2B for this GPU, execute it, time it.

Builds Qwen3-VL at the published 2B text shapes (hidden 2048, 16 heads, 8 KV heads, head_dim 128,
intermediate 6144, vocab 151936, tied embeddings) with seeded random bf16 weights and ``layers``
decoder layers (28 in the real model; fewer keep the step within a few minutes), and a vision tower
of 2 blocks at the published width (a text prompt never runs it). Saves it as safetensors, imports
it, measures the machine (:meth:`Machine.from_probe`), and plans it with the VRAM and host budget cut
so the plan mixes placements: a third of the layers in L1, a third in L2 (the planner decides which
of those compute on the CPU), the rest streamed from L3. Then ``load_streamed(plan=, gpu=device)``
runs greedy decoding and the step reports measured TTFT and ms/token beside the plan's prediction.

``run_plan_check(device, shape="tiny")`` runs the same step on a tiny model, on the CPU device with an
L1 on ``cpu`` (how the test suite covers it).
"""

from __future__ import annotations

import itertools
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import tierstore
from tierstore.integrations.checkpoint import import_checkpoint
from tierstore.integrations.plan_units import model_units
from tierstore.integrations.streaming import load_streamed
from tierstore.plan.machine import Machine
from tierstore.plan.placement import plan

MiB = 1 << 20
PROMPT = list(range(1000, 1012))
_HEADROOM = 256 * MiB  # what the planner keeps free in VRAM beside an eighth of it (placement._HEADROOM)


def qwen3_vl_config(shape: str, layers: int) -> Any:
    """Qwen3-VL with the 2B's published shapes (``shape="2b"``) or a tiny one (``"tiny"``), ``layers`` decoder layers.

    The shapes are :func:`bench_real_size.shape_config`'s; the vision tower is cut to 2 blocks (a text
    prompt never runs it).
    """
    from bench_real_size import shape_config  # tools/ is on sys.path when run as a script

    config = shape_config(shape)
    config.text_config.num_hidden_layers = layers
    config.vision_config.depth = 2
    config.vision_config.deepstack_visual_indexes = [0]
    return config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stamps:
    """A ``generate`` streamer that notes when each token arrives (the prompt is the first ``put``)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, [time.perf_counter()]

    def put(self, value: torch.Tensor) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _token_gaps(model: Any, ids: torch.Tensor, new: int, device: torch.device) -> tuple[float, list[float]]:
    """TTFT and the gaps between the decoded tokens of one greedy ``generate``."""
    stamps = _Stamps(device)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, streamer=stamps)
    times = stamps.times[1:]  # [prompt, token 1, token 2, ...]
    return times[1] - stamps.times[0], [b - a for a, b in itertools.pairwise(times[1:])]


def _generate_s(model: Any, ids: torch.Tensor, new: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)
    _sync(device)
    return time.perf_counter() - start


def run_plan_check(device: torch.device, *, shape: str = "2b", layers: int = 8, tokens: int = 8,
                   repeats: int = 2, prefetch: int = 2) -> dict[str, Any]:
    """Plan, execute and time the model on ``device`` (see the module doc); the facts as a JSON-ready dict."""
    from transformers import AutoModelForImageTextToText  # Qwen3VLConfig -> Qwen3VLForConditionalGeneration

    started = time.perf_counter()
    torch.manual_seed(0)
    config = qwen3_vl_config(shape, layers)
    with tempfile.TemporaryDirectory(prefix="tierstore-plan2b-") as tmp:
        folder = Path(tmp) / "ckpt"
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).eval()
        model.save_pretrained(folder, max_shard_size="1GB")
        del model
        with tierstore.open(Path(tmp) / "store", l2_cache_size=0) as db:
            import_checkpoint(folder, db, require_config=True)
            units = model_units(db)
        built_s = time.perf_counter() - started
        probed = Machine.from_probe(tmp, nbytes=16 * MiB) if device.type == "cuda" else Machine.seed_laptop()
        layer = max(u.nbytes for u in units.units)
        third = max(1, layers // 3)
        kv = units.kv_bytes_per_token * 64
        usable = units.fixed_bytes + kv + third * layer
        machine = replace(probed, vram_free=math.ceil((usable + _HEADROOM) * 8 / 7))
        terms: dict[str, Any] = dict(prefetch=prefetch, context=64, vision_cache_bytes=0,
                                     prefill_tokens=len(PROMPT))
        minimum = plan(units, machine, memory=1 << 50, **terms).minimum
        vision = sum(u.nbytes for u in units.units if not u.decoder)
        chosen = plan(units, machine, memory=minimum + third * layer + vision, **terms)
        tiers = {t: sum(1 for u in chosen.units if u.tier == t and u.name.startswith("model.language")) for t in
                 ("L1", "L2", "L3")}
        l1_bytes = sum(u.nbytes for u in chosen.units if u.tier == "L1")
        l2_bytes = sum(u.nbytes for u in chosen.units if u.tier == "L2") + (prefetch + 1) * layer
        out: dict[str, Any] = {"shape": shape, "layers": layers, "device": str(device), "machine": machine.name,
                               "layer_bytes": layer, "fixed_bytes": units.fixed_bytes, "decoder_tiers": tiers,
                               "placements": sorted({u.placement for u in chosen.units if u.decode_on != "-"}),
                               "predicted_ttft_s": chosen.prediction.ttft_s,
                               "predicted_decode_s": chosen.prediction.decode_s,
                               "decode_limit": chosen.prediction.decode_limit, "build_s": built_s}
        with tierstore.open(Path(tmp) / "store", l1_device=str(device), l1_cache_size=l1_bytes + 64 * MiB,
                            l2_cache_size=l2_bytes + 64 * MiB) as db:
            streamed = load_streamed(db, plan=chosen, gpu=device, dtype=torch.bfloat16, prefetch=prefetch)
            home = streamed.get_input_embeddings().weight.device
            ids = torch.tensor([PROMPT], device=home)
            _generate_s(streamed, ids, 2, device)  # warm: the held units find their tiers
            ttft, gaps = [], []
            for _ in range(repeats):  # decode: the median gap between tokens of one generate (a difference
                first, between = _token_gaps(streamed, ids, 1 + tokens, device)  # of two runs can go negative)
                ttft.append(first)
                gaps.extend(between)
            stats = streamed.weight_streamer.stats()
            streamed.weight_streamer.close()
        measured = statistics.median(gaps)
        predicted = chosen.prediction.decode_s
        out.update(measured_ttft_s=statistics.median(ttft), measured_decode_s=measured,
                   measured_over_predicted=measured / predicted if predicted else None,
                   held_units=stats.held_units, demand_fetches=stats.demand_fetches,
                   total_s=time.perf_counter() - started)
    return out
