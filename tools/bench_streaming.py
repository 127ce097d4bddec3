"""Decode time per token of a Qwen3-VL whose weights stream from a tierstore, against its peers.

The same randomly initialised model (8 text layers of ~24 MiB float32 by default, ~215 MB in all)
runs text-only greedy decoding four ways, in one process, interleaved repeat by repeat:

- ``memory``: the model held in memory (the reference; every other variant must give its tokens),
- ``tierstore L2``: :func:`tierstore.integrations.streaming.load_streamed`, L2 big enough for all
  layers (warm: a decode reads each layer as a zero-copy view of its L2 slot),
- ``tierstore L3``: the same with L2 at 40% of the layers (``--l2-share``): the streamer holds the
  layers that fit beside its working reserve and reads the others from L3 for every token; the
  bytes read per token are reported against the bound ``1.1 x (streamed - usable L2)``,
- ``accelerate disk``: ``accelerate.disk_offload`` of the model to a folder of memory-mapped arrays.

Per token time: a ``generate`` streamer stamps each new token; the first (prefill) is dropped and
the median gap over the others is the decode time of that repeat; the report is the median over
repeats, and ratios are taken against ``memory`` measured in the same run (also paired: the median
over repeats of the ratio within each repeat, which a noisy shared machine disturbs less).

    python tools/bench_streaming.py                      # ~2-3 min on a 2-core VM
    python tools/bench_streaming.py --repeat 3 --tokens 8 --json run.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import tierstore
from tierstore.integrations.checkpoint import import_checkpoint
from tierstore.integrations.streaming import load_streamed
from tierstore.integrations.tiny_model import build_tiny_model, synthetic_inputs, tiny_config


class _Stamps:
    """A ``generate`` streamer that records when each token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_seconds(model: Any, inputs: dict[str, torch.Tensor], tokens: int) -> tuple[float, torch.Tensor]:
    """Median seconds per decoded token (prefill excluded) and the tokens."""
    stamps = _Stamps()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, streamer=stamps)
    gaps = [b - a for a, b in zip(stamps.times[1:], stamps.times[2:], strict=False)]  # [0] is the prompt
    return statistics.median(gaps), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=12, help="new tokens per generate")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--l2-share", type=float, default=0.4, help="L2 of 'tierstore L3' over the layers' bytes")
    parser.add_argument("--out", default="/tmp", help="where the scratch folder goes")
    parser.add_argument("--json", help="also write the samples and settings here")
    args = parser.parse_args()

    from accelerate import disk_offload
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="tierstore-bench-stream-", dir=args.out))
    try:
        config = tiny_config(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=4096)
        reference = build_tiny_model(config)
        reference.save_pretrained(work / "ckpt", max_shard_size="100MB")
        layer_bytes = sum(p.nbytes for p in reference.model.language_model.layers[0].parameters())
        model_bytes = sum(p.nbytes for p in reference.parameters())
        print(f"model: {args.layers} text layers of {layer_bytes / 2**20:.1f} MiB, "
              f"{model_bytes / 2**20:.0f} MiB in all")
        start = time.perf_counter()
        with tierstore.open(work / "store", l2_cache_size=0) as db:
            import_checkpoint(work / "ckpt", db)
        print(f"import: {time.perf_counter() - start:.1f} s")
        offloaded = build_tiny_model(config)
        disk_offload(offloaded, work / "offload", execution_device=torch.device("cpu"))
        inputs = synthetic_inputs(list(range(10, 26)), image_seed=None)

        warm = tierstore.open(work / "store", l2_cache_size=int(model_bytes * 1.3))
        streamed = load_streamed(warm, prefetch=args.prefetch)
        cold_l2 = int(layer_bytes * args.layers * args.l2_share)
        cold = tierstore.open(work / "store", readonly=True, l2_cache_size=cold_l2)
        streamed_cold = load_streamed(cold, prefetch=args.prefetch)
        variants = {"memory": reference, "tierstore L2": streamed, "tierstore L3": streamed_cold,
                    "accelerate disk": offloaded}
        expected = decode_seconds(reference, inputs, args.tokens)[1]
        for name, model in variants.items():  # warm-up: page cache, L2, kernels; and the same tokens
            if not torch.equal(decode_seconds(model, inputs, args.tokens)[1], expected):
                raise SystemExit(f"{name} generated different tokens from the in-memory model")
        samples: dict[str, list[float]] = {name: [] for name in variants}
        l3_hits: list[int] = []
        l3_bytes: list[int] = []
        for r in range(args.repeat):
            for name, model in variants.items():
                before, before_bytes = cold.stats().hits["L3"], cold.stats().hit_bytes["L3"]
                samples[name].append(decode_seconds(model, inputs, args.tokens)[0])
                if name == "tierstore L3":
                    l3_hits.append(cold.stats().hits["L3"] - before)
                    l3_bytes.append(cold.stats().hit_bytes["L3"] - before_bytes)
            print(f"repeat {r + 1}/{args.repeat}: " + ", ".join(f"{n} {s[-1] * 1e3:.1f} ms"
                                                                for n, s in samples.items()))
        medians = {name: statistics.median(s) for name, s in samples.items()}
        base = medians["memory"]
        print(f"\n{'variant':<18}{'ms/token':>10}{'vs memory':>11}{'vs accelerate':>15}")
        for name, m in medians.items():
            print(f"{name:<18}{m * 1e3:>10.1f}{m / base:>10.2f}x{medians['accelerate disk'] / m:>14.2f}x")
        paired = {name: statistics.median(a / b for a, b in zip(s, samples["memory"], strict=True))
                  for name, s in samples.items()}
        speedup = {name: statistics.median(a / b for a, b in zip(samples["accelerate disk"], s, strict=True))
                   for name, s in samples.items()}
        print("paired (median over repeats of the ratio within a repeat): "
              + ", ".join(f"{n} {paired[n]:.2f}x memory, {speedup[n]:.2f}x faster than accelerate"
                          for n in samples if n != "memory"))
        print(f"tierstore L3: {statistics.median(l3_hits)} L3 reads per generate of {args.tokens} tokens")
        held = streamed_cold.weight_streamer.stats()
        capacity = cold.stats().tiers["L2"]["capacity"]
        usable = capacity - (args.prefetch + 1) * layer_bytes
        per_token = statistics.median(l3_bytes) / args.tokens  # a generate makes `tokens` passes (prefill + decodes)
        bound = 1.1 * (layer_bytes * args.layers - usable)
        print(f"tierstore L3: L2 {capacity / 2**20:.0f} MiB, {held.held_units} of {held.units} units held; "
              f"{per_token / 2**20:.1f} MiB read from L3 per token against the bound "
              f"1.1 x (streamed - usable L2) = {bound / 2**20:.1f} MiB ({per_token / bound:.2f}x of it)")
        for model in (streamed, streamed_cold):
            model.weight_streamer.close()
        warm.close()
        cold.close()
        if args.json:
            Path(args.json).write_text(json.dumps({
                "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                            "torch": torch.__version__},
                "settings": vars(args), "layer_bytes": layer_bytes, "model_bytes": model_bytes,
                "samples_s": samples, "median_s": medians, "paired_vs_memory": paired,
                "l3_bytes_per_token": per_token, "l3_bytes_bound": bound, "held_units": held.held_units,
                "paired_speedup_vs_accelerate": speedup}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
