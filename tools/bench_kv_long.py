"""Long-context decoding: TieredCache (spilled to L2 or L3) against DynamicCache and its offloaded variant.

    python tools/bench_kv_long.py [--layers 28] [--tokens 4096 16384] [--dtype bfloat16] [--decode 4]
    python tools/bench_kv_long.py --layers 8 --tokens 2048 --dtype float32 --before OLD/kv_cache.py

A Llama-shaped model with Qwen3-VL-2B's K/V geometry (8 K/V heads x 128; ``--layers`` layers,
hidden 256 so the compute is small next to the K/V traffic). The prompt's K/V are random
tensors of the full geometry handed to each cache layer by layer, as a prefill would
(computing a 16k-token prefill is beyond this machine; it costs every cache the same), then
``--decode`` tokens are decoded greedily. Per variant, in its own process (for its peak RSS):
``ttft`` is the cache's share of the first token (taking the prompt's K/V, with its writes and
spills, plus the first decode step), ``decode`` the median ms per later token. Variants: ``dyn``
(DynamicCache), ``offload`` (``DynamicCache(offloading=True)``: it needs CUDA), ``l2`` (budget
1/16 of the K/V, store L2 holding all of it), ``l3`` (the same budget, L2 a quarter of the K/V so
most comes back from L3), and with ``--before`` the same two for an older ``kv_cache.py``.
Every variant's tokens are checked equal to DynamicCache's. ``--repeat`` runs every variant that
many times, round-robin, and reports medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def build(layers: int, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=128, max_position_embeddings=65536)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def cache_class(before: str | None) -> Any:
    if before is None:
        from tierstore.integrations.kv_cache import TieredCache
        return TieredCache
    spec = importlib.util.spec_from_file_location("tierstore.integrations._kv_before", before)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.TieredCache


def one(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this process."""
    from transformers import DynamicCache

    import tierstore

    dtype = getattr(torch, args.dtype)
    model = build(args.layers, dtype)
    gen = torch.Generator().manual_seed(1)
    shape = (1, 8, args.tokens, 128)
    kv = [(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
          for _ in range(args.layers)]
    kv_bytes = sum(k.nbytes + v.nbytes for k, v in kv)
    out: dict[str, Any] = {"variant": args.variant, "tokens": args.tokens, "kv_mib": kv_bytes / 2**20}
    with torch.inference_mode(), tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = None
        if args.variant == "dyn":
            cache = DynamicCache()
        elif args.variant == "offload":
            cache = DynamicCache(offloading=True)
        else:
            l2 = kv_bytes * 2 if args.variant.endswith("l2") else kv_bytes // 4
            store = tierstore.open(Path(tmp) / "kv", l2_cache_size=l2, fsync=False)
            cache = cache_class(args.before if args.variant.startswith("before") else None)(
                store, config=model.config, budget=kv_bytes // 16)
        try:
            start = time.perf_counter()
            for i, (k, v) in enumerate(kv):
                cache.update(k, v, i)
            token = torch.tensor([[7]])
            tokens, times = [], []
            for _ in range(args.decode + 1):
                step = time.perf_counter()
                logits = model(input_ids=token, cache=cache, use_cache=True).logits
                token = logits[:, -1:].argmax(-1)
                tokens.append(int(token))
                times.append(time.perf_counter() - step)
                if len(times) == 1:
                    out["ttft_ms"] = (time.perf_counter() - start) * 1e3
            out["decode_ms"] = statistics.median(times[1:]) * 1e3
            out["tokens_out"] = tokens
            if store is not None:
                out["l3_hits"] = store.stats().hits["L3"]
                out["fetched"] = cache.stats.blocks_fetched
        except (AssertionError, RuntimeError) as exc:  # the offloaded DynamicCache without CUDA
            out["error"] = f"{type(exc).__name__}: {exc}"[:80]
        finally:
            if store is not None:
                cache.release()
                store.close()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decode", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--before", default=None, help="an older kv_cache.py to measure beside this one")
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--tmp", default=None, help="folder for the stores (default: the system's temp folder)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:
        args.tokens = args.tokens[0]
        print(json.dumps(one(args)))
        return
    variants = args.variants or (["dyn", "offload", "l2", "l3"] + (["before-l2", "before-l3"] if args.before else []))
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; {args.layers} layers x 8 K/V heads x 128, {args.dtype}, {args.decode} decoded, "
          f"{args.repeat} rounds (medians)")
    print("\n| tokens | K/V MiB | cache | TTFT ms | decode ms/token | vs DynamicCache | peak RSS MiB | note |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for tokens in args.tokens:
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for _ in range(args.repeat):
            for variant in variants:
                cmd = [sys.executable, __file__, "--layers", str(args.layers), "--tokens", str(tokens), "--dtype",
                       args.dtype, "--decode", str(args.decode), "--variant", variant]
                cmd += ["--before", args.before] if args.before else []
                cmd += ["--tmp", args.tmp] if args.tmp else []
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
        ref = runs["dyn"][0]
        for variant, results in runs.items():
            r = results[-1]
            if "error" in r:
                print(f"| {tokens} | {r['kv_mib']:.0f} | {variant} | - | - | - | {r['peak_rss_mib']:.0f} | "
                      f"{r['error']} |")
                continue
            if r["tokens_out"] != ref["tokens_out"]:
                raise SystemExit(f"{variant} at {tokens} tokens changed the decoded tokens")
            ttft = statistics.median(x["ttft_ms"] for x in results)
            dec = statistics.median(x["decode_ms"] for x in results)
            ref_dec = statistics.median(x["decode_ms"] for x in runs["dyn"])
            rss = statistics.median(x["peak_rss_mib"] for x in results)
            note = f"{r['fetched']} gets, {r['l3_hits']} from L3" if "fetched" in r else ""
            print(f"| {tokens} | {r['kv_mib']:.0f} | {variant} | {ttft:.0f} | {dec:.1f} | {ref_dec / dec:.2f}x | "
                  f"{rss:.0f} | {note} |")


if __name__ == "__main__":
    main()
