"""Prefix reuse at size: restoring a long stored prefix from L3 against recomputing it (TTFT both ways).

    python tools/bench_kv_restore.py [--layers 28] [--tokens 16384] [--repeat 3] [--recompute 1]

The model and the prompt (an image, then text) are ``tools/bench_kv_long.py``'s: a Qwen3-VL with
Qwen3-VL-2B's attention and K/V geometry, prefilled for real once (``--prefill-dir``). Steps, each
in its own process:

1. ``persist``: a ``TieredCache(persist=True)`` takes the prompt's K/V as its prefill hands them
   over and stores the prefix durably, as spans of 64 blocks (``spans``) or, with ``--before``
   (an older ``kv_cache.py``, loaded beside this one), one store block per 16-token block
   (``blocks``: one get per block at restore time); the store's bandwidths are measured
   (``HardwareOptimizer.measure``: what ``tierstore probe --measure`` keeps for the planner).
2. ``restore``: the store opened again (L2 empty, so every block comes from L3 -- from the OS
   page cache too, which this user cannot drop) and the same prompt generated for one token
   with ``TieredCache.generate``: the prefix is read back, the last 16 tokens computed. The
   restore decision is the store's :class:`RestorePolicy` with the planner's measured bandwidths
   and the prefill speed measured in the prefill step; its prediction is printed beside the truth.
3. ``recompute``: the same first token with ``DynamicCache``, the whole prompt computed.

The first token must be the same every way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
from bench_kv_long import build, prefill_folder, prompt  # tools/ is on sys.path when run as a script


def cache_class(args: argparse.Namespace) -> Any:
    if args.variant != "blocks":
        from tierstore.integrations.kv_cache import TieredCache
        return TieredCache
    spec = importlib.util.spec_from_file_location("tierstore.integrations._kv_before", args.before)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.TieredCache


def persist(args: argparse.Namespace) -> dict[str, Any]:
    import tierstore
    from tierstore.plan.hardware import HardwareOptimizer

    TieredCache = cache_class(args)

    dtype = getattr(torch, args.dtype)
    model = build(args.layers, dtype)
    inputs = prompt(model, args.tokens, dtype)
    folder = prefill_folder(args, args.tokens)
    with tierstore.open(Path(args.store), l2_cache_size="256MiB") as db, torch.inference_mode():
        bandwidth = HardwareOptimizer(db).measure()
        cache = TieredCache(db, config=model.config, persist=True)
        cache.prepare(inputs["input_ids"], pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                      mm_token_type_ids=inputs["mm_token_type_ids"])
        seconds = 0.0
        for i in range(args.layers):
            kv = torch.from_numpy(np.load(folder / f"layer{i}.npy")).view(dtype)
            start = time.perf_counter()
            cache.update(kv[0], kv[1], i)
            seconds += time.perf_counter() - start
            del kv
        written = cache.stats.blocks_written
        stored = sum(db.info(k).stored_bytes for k in db.keys(prefix="kv/prefix/"))
    return {"persist_s": seconds, "written": written, "stored_mib": stored / 2**20, "disk_read": bandwidth.disk_read,
            "memcpy": bandwidth.memcpy, "decode": bandwidth.decode, "fresh_copy": bandwidth.fresh_copy,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def restore(args: argparse.Namespace) -> dict[str, Any]:
    import tierstore
    from tierstore.integrations.kv_restore import RestorePolicy
    from tierstore.plan.hardware import HardwareOptimizer

    TieredCache = cache_class(args)

    dtype = getattr(torch, args.dtype)
    model = build(args.layers, dtype)
    inputs = prompt(model, args.tokens, dtype)
    meta = json.loads((prefill_folder(args, args.tokens) / "meta.json").read_text())
    with tierstore.open(Path(args.store), l2_cache_size="512MiB") as db, torch.inference_mode():
        policy = RestorePolicy(HardwareOptimizer(db).bandwidth, prefill_tokens_per_s=args.tokens / meta["prefill_s"])
        start = time.perf_counter()
        cache = TieredCache(db, config=model.config, persist=True, restore_policy=policy)
        out = cache.generate(model, **inputs, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - start
        est = cache.stats.restore_estimate
        result = {"ttft_s": ttft, "restored": cache.stats.restored_tokens, "fetched": cache.stats.blocks_fetched,
                  "l3_hits": db.stats().hits["L3"], "promoted": db.migrator.stats()["promoted"],
                  "first": int(out[0, -1]),
                  "predicted_restore_s": est.restore_s if est else None,
                  "predicted_recompute_s": est.recompute_s if est else None, "decision": bool(est and est.restore),
                  "predicted_read_s": (est.read_s or 0.0) if est else 0.0,
                  "predicted_compute_s": est.compute_s if est else 0.0,
                  "codec": db.info(cache.layers[0].block_keys[0]).codec if cache.layers[0].segments else ""}
        cache.release()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def recompute(args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    model = build(args.layers, dtype)
    inputs = prompt(model, args.tokens, dtype)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - start
    return {"ttft_s": ttft, "first": int(out[0, -1]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args: argparse.Namespace, step: str, variant: str, store: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--layers", str(args.layers), "--tokens", str(args.tokens), "--dtype", args.dtype,
           "--prefill-dir", args.prefill_dir, "--step", step, "--variant", variant, "--store", store]
    cmd += ["--before", args.before] if args.before else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{step} {variant} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"# {step} {variant}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--recompute", type=int, default=1, help="recompute runs (each a whole prefill)")
    parser.add_argument("--prefill-dir", default=os.path.join(tempfile.gettempdir(), "tierstore-kv-prefill"))
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--before", default=None, help="an older kv_cache.py (one store block per 16 tokens)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step is not None:
        print(json.dumps({"persist": persist, "restore": restore, "recompute": recompute}[args.step](args)))
        return
    if not (prefill_folder(args, args.tokens) / "meta.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_kv_long.py")), "--layers",
                        str(args.layers), "--tokens", str(args.tokens), "--dtype", args.dtype, "--prefill-dir",
                        args.prefill_dir, "--variant", "prefill"], check=True, capture_output=True)
    meta = json.loads((prefill_folder(args, args.tokens) / "meta.json").read_text())
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        stores = {v: str(Path(tmp) / v) for v in ("spans", "blocks") if v == "spans" or args.before}
        saved = {v: child(args, "persist", v, s) for v, s in stores.items()}
        runs: dict[str, list[dict[str, Any]]] = {"spans": [], "blocks": [], "recompute": []}
        for i in range(max(args.repeat, args.recompute)):
            for v, s in stores.items():
                if i < args.repeat:
                    runs[v].append(child(args, "restore", v, s))
            if i < args.recompute:
                runs["recompute"].append(child(args, "recompute", "dyn", ""))
    first = runs["recompute"][0]["first"] if runs["recompute"] else meta["first"]
    bw = saved["spans"]
    print(f"\n# {args.layers} layers, {args.tokens} tokens (image + text), K/V "
          f"{2 * 8 * 128 * 2 * args.tokens * args.layers / 2**30:.2f} GiB bf16; prefill measured "
          f"{meta['prefill_s']:.1f} s ({args.tokens / meta['prefill_s']:.0f} tokens/s); planner bandwidths: disk read "
          f"{bw['disk_read'] / 1e9:.2f} GB/s, memcpy {bw['memcpy'] / 1e9:.2f} GB/s, copy into new memory "
          f"{(bw.get('fresh_copy') or 0) / 1e9:.2f} GB/s, decode "
          + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in bw["decode"].items()))
    print("\n| first token by | persist s | stored MiB | store gets | read from L3 (by the get / moved up ahead) | "
          "TTFT s (median, range) | "
          "predicted restore s | predicted recompute s | decision | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for v in ("spans", "blocks", "recompute"):
        results = runs[v]
        if not results:
            continue
        for r in results:
            if r["first"] != first:
                raise SystemExit(f"{v}: first token {r['first']}, not {first}")
        ttfts = [r["ttft_s"] for r in results]
        rss = statistics.median(r["peak_rss_mib"] for r in results)
        span = f"{statistics.median(ttfts):.2f} ({min(ttfts):.2f}-{max(ttfts):.2f})"
        if v == "recompute":
            print(f"| recompute (DynamicCache) | - | - | - | - | {span} | - | - | - | {rss:.0f} |")
            continue
        r, p = results[-1], saved[v]
        label = "restore, spans of 64 blocks" if v == "spans" else "restore, one block per 16 tokens (before)"
        print(f"| {label} | {p['persist_s']:.1f} | {p['stored_mib']:.0f} | {r['fetched']} | "
              f"{r['l3_hits']} / {r['promoted']} | {span} | "
              f"{r['predicted_restore_s']:.2f} | {r['predicted_recompute_s']:.1f} | "
              f"{'restore' if r['decision'] else 'recompute'} | {rss:.0f} |")
    last = runs["spans"][-1]
    print(f"\n# predicted restore = reads and copies {last['predicted_read_s']:.2f} s (x read scale 1.0 in a new "
          f"process) + the {args.tokens - last['restored']} tokens computed after the prefix and the attention over it "
          f"{last['predicted_compute_s']:.2f} s")
    print(f"\n# first token {first} every way; restored {runs['spans'][-1]['restored']} of {args.tokens} tokens; "
          f"codec {runs['spans'][-1]['codec']}")


if __name__ == "__main__":
    main()
