"""Long-context decoding: TieredCache (spilled to L2 or L3) against DynamicCache and its offloaded variant.

    python tools/bench_kv_long.py [--layers 28] [--tokens 4096 16384 32768] [--dtype bfloat16] [--decode 4]
    python tools/bench_kv_long.py --layers 8 --tokens 2048 --dtype float32 --decode 8 --repeat 5 --variants dyn l2 l3

The model is a Qwen3-VL built in-process (random weights) with Qwen3-VL-2B's attention and K/V
geometry: ``--layers`` text layers (28 in the 2B), 16 query heads, 8 K/V heads x 128, M-RoPE
sections [24, 20, 20]; hidden 256 and MLP 256 wide instead of 2,048/6,144 (so the K/V traffic,
not the weights, is most of a decode step), and a 2-layer vision tower. Every prompt starts with
a 16x16-patch image (64 image tokens) followed by text.

The prompt is prefilled once per length, for real, with ``DynamicCache`` (``--prefill-dir``
keeps the result: one ``.npy`` of K/V per layer, the M-RoPE deltas, the first token and the
prefill's time). Each variant then runs in its own process (its peak RSS is its own): it takes
the prompt's K/V layer by layer through its cache's ``update``, as the prefill's layers hand
them over (with every spill and write that causes), and decodes ``--decode`` tokens greedily
after the prefill's first token. ``TTFT`` is the measured prefill plus that cache's share of it
(its ``update`` calls); ``decode`` the median ms per token. Variants: ``dyn`` (DynamicCache),
``offload`` (``DynamicCache(offloading=True)``, transformers' offloaded cache: it needs CUDA),
``l2`` (budget 1/16 of the K/V, the store's L2, 1.25x the K/V, holds all of it), ``l3`` (the
same budget, L2 a quarter of the K/V: most of it comes back from L3, spilled with TieredCache's
default ``spill_compression="off"``), ``l3zstd`` (the same, spilled with the store's default codec,
byte-shuffled zstd: ``spill_compression=None``), ``l3raw`` (a store with ``l3_compression="off"``)
and ``l3lz4`` (``spill_compression="blosc-lz4"``). Every
variant's tokens are checked equal to
DynamicCache's. ``--repeat`` runs the variants round-robin that many times; medians, and the
median over rounds of each round's DynamicCache/variant ratio (the paired ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

GRID = (1, 16, 16)
"""The image's patch grid: 256 patches, 64 tokens after the 2x2 merge."""


def build(layers: int, dtype: torch.dtype) -> Any:
    """A Qwen3-VL with the 2B's attention and K/V geometry, narrow hidden and MLP (see the module docstring)."""
    from tierstore.integrations.tiny_model import build_tiny_model, tiny_config

    config = tiny_config(layers=layers, hidden=256, intermediate=256, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=128, max_position_embeddings=65536,
                         rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20],
                                       "mrope_interleaved": True})
    return build_tiny_model(config).to(dtype)


def prompt(model: Any, tokens: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An image followed by text, ``tokens`` in all."""
    from tierstore.integrations.tiny_model import synthetic_inputs

    image_tokens = GRID[0] * GRID[1] * GRID[2] // 4 + 2  # with vision start/end
    text = torch.randint(1, 400, (tokens - image_tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    inputs = synthetic_inputs(text[:16], grid=GRID, suffix=text[16:], config=model.config)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    assert inputs["input_ids"].shape[1] == tokens
    return inputs


def prefill_folder(args: argparse.Namespace, tokens: int) -> Path:
    return Path(args.prefill_dir) / f"qwen3vl-{args.layers}x8x128-{args.dtype}-{tokens}"


def make_prefill(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill the prompt with DynamicCache and keep its K/V, M-RoPE deltas, first token and time."""
    from transformers import DynamicCache

    dtype = getattr(torch, args.dtype)
    model = build(args.layers, dtype)
    inputs = prompt(model, args.tokens, dtype)
    folder = prefill_folder(args, args.tokens)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        cache = DynamicCache()
        start = time.perf_counter()
        logits = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits
        seconds = time.perf_counter() - start
        for i, layer in enumerate(cache.layers):
            kv = torch.stack([layer.keys, layer.values])
            layer.keys = layer.values = None
            np.save(folder / f"layer{i}.npy", kv.view(torch.int16 if kv.element_size() == 2 else torch.int32).numpy())
            del kv
    meta = {"prefill_s": seconds, "first": int(logits[0, -1].argmax()), "rope_deltas": model.model.rope_deltas.tolist(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tokens": args.tokens}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def one(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this process."""
    from transformers import DynamicCache

    import tierstore
    from tierstore.integrations.kv_cache import TieredCache

    dtype = getattr(torch, args.dtype)
    model = build(args.layers, dtype)
    folder = prefill_folder(args, args.tokens)
    meta = json.loads((folder / "meta.json").read_text())
    layer_bytes = 2 * 8 * args.tokens * 128 * torch.tensor([], dtype=dtype).element_size()
    kv_bytes = layer_bytes * args.layers
    out: dict[str, Any] = {"variant": args.variant, "tokens": args.tokens, "kv_mib": kv_bytes / 2**20}
    with torch.inference_mode(), tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = None
        if args.variant == "dyn":
            cache: Any = DynamicCache()
        elif args.variant == "offload":
            cache = None
        else:
            l2 = kv_bytes * 5 // 4 if args.variant == "l2" else kv_bytes // 4
            codec = "off" if args.variant == "l3raw" else True
            spill = {"l3zstd": None, "l3lz4": "blosc-lz4"}.get(args.variant, "off")
            store = tierstore.open(Path(tmp) / "kv", l2_cache_size=l2, fsync=False, l3_compression=codec)
            cache = TieredCache(store, config=model.config, budget=kv_bytes // 16, spill_compression=spill)
        try:
            if cache is None:
                cache = DynamicCache(offloading=True)  # raises without CUDA (torch.Stream on no accelerator)
            share = 0.0
            for i in range(args.layers):
                kv = torch.from_numpy(np.load(folder / f"layer{i}.npy")).view(dtype)
                start = time.perf_counter()
                cache.update(kv[0], kv[1], i)  # the views keep kv alive, as a prefill's K/V would be
                share += time.perf_counter() - start
                del kv
            out["share_ms"] = share * 1e3
            out["ttft_ms"] = meta["prefill_s"] * 1e3 + share * 1e3
            model.model.rope_deltas = torch.tensor(meta["rope_deltas"])
            token = torch.tensor([[meta["first"]]])
            tokens, times, sums = [meta["first"]], [], []
            for _ in range(args.decode):
                step = time.perf_counter()
                logits = model(input_ids=token, cache=cache, use_cache=True).logits
                token = logits[:, -1:].argmax(-1)
                tokens.append(int(token))
                sums.append(float(logits.double().sum()))
                times.append(time.perf_counter() - step)
            out["decode_ms"] = statistics.median(times) * 1e3
            out["tokens_out"] = tokens
            out["logit_sums"] = sums
            if store is not None:
                out["l3_hits"] = store.stats().hits["L3"]
                out["fetched"] = cache.stats.blocks_fetched
                out["prefetch_hits"] = cache.stats.prefetch_hits
        except (AssertionError, RuntimeError) as exc:  # the offloaded DynamicCache without CUDA
            out["error"] = f"{type(exc).__name__}: {exc}"[:90]
        finally:
            if store is not None:
                cache.release()
                store.close()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def child(args: argparse.Namespace, tokens: int, variant: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--layers", str(args.layers), "--tokens", str(tokens), "--dtype", args.dtype,
           "--decode", str(args.decode), "--variant", variant, "--prefill-dir", args.prefill_dir]
    cmd += ["--tmp", args.tmp] if args.tmp else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{variant} at {tokens} tokens failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decode", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["dyn", "offload", "l2", "l3"])
    parser.add_argument("--prefill-dir", default=os.path.join(tempfile.gettempdir(), "tierstore-kv-prefill"),
                        help="where each prompt's prefilled K/V is kept between runs")
    parser.add_argument("--tmp", default=None, help="folder for the stores (default: the system's temp folder)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:
        args.tokens = args.tokens[0]
        print(json.dumps(make_prefill(args) if args.variant == "prefill" else one(args)))
        return
    if "dyn" not in args.variants:
        args.variants.insert(0, "dyn")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}; Qwen3-VL, {args.layers} layers, 16 heads / 8 K/V heads x 128, "
          f"hidden 256, {args.dtype}, image {GRID} + text; {args.decode} decoded, {args.repeat} rounds (medians)")
    rows = []
    for tokens in args.tokens:
        if not (prefill_folder(args, tokens) / "meta.json").exists():
            child(args, tokens, "prefill")
        meta = json.loads((prefill_folder(args, tokens) / "meta.json").read_text())
        print(f"# {tokens} tokens: prefill {meta['prefill_s']:.1f} s with DynamicCache "
              f"(peak RSS {meta['peak_rss_mib']:.0f} MiB)", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
        for _ in range(args.repeat):
            for variant in args.variants:
                runs[variant].append(child(args, tokens, variant))
        rows.append((tokens, meta, runs))
    print("\n| tokens | K/V MiB | cache | TTFT s | cache's prefill share ms | decode ms/token | vs DynamicCache "
          "(medians) | paired ratio (median, range) | peak RSS MiB | note |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for tokens, _meta, runs in rows:
        ref = runs["dyn"]
        for variant, results in runs.items():
            r = results[-1]
            rss = statistics.median(x["peak_rss_mib"] for x in results)
            if "error" in r:
                print(f"| {tokens} | {r['kv_mib']:.0f} | {variant} | - | - | - | - | - | {rss:.0f} | {r['error']} |")
                continue
            for x in results:
                if x["tokens_out"] != ref[0]["tokens_out"] or x["logit_sums"] != ref[0]["logit_sums"]:
                    raise SystemExit(f"{variant} at {tokens} tokens changed the decoded tokens (or logits)")
            dec = statistics.median(x["decode_ms"] for x in results)
            ref_dec = statistics.median(x["decode_ms"] for x in ref)
            paired = [d["decode_ms"] / x["decode_ms"] for d, x in zip(ref, results, strict=True)]
            note = (f"{r['fetched']} gets, {r['l3_hits']} from L3, {r['prefetch_hits']} prefetched"
                    if "fetched" in r else "")
            ttft = statistics.median(x["ttft_ms"] for x in results) / 1e3
            print(f"| {tokens} | {r['kv_mib']:.0f} | {variant} | {ttft:.2f}"
                  f" | {statistics.median(x['share_ms'] for x in results):.0f} | {dec:.1f} | {ref_dec / dec:.2f}x | "
                  f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f}) | {rss:.0f} | {note} |")
        print(f"\n# {tokens} tokens: tokens and logits identical to DynamicCache's in every run: "
              f"{ref[0]['tokens_out']}")


if __name__ == "__main__":
    main()
