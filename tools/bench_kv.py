"""KV-cache benchmark: a second request sharing a long prefix, and decoding with spilled K/V blocks.

    python tools/bench_kv.py [--repeat 5] [--prefix 1024] [--new 32] [--tokens 16]

Builds a small random Qwen3-VL text stack (4 layers, hidden 256) and measures, as medians of
``--repeat`` runs in one process:

- request 2 (the shared ``--prefix`` tokens + ``--new`` fresh ones, ``--tokens`` generated) with
  ``DynamicCache`` (everything computed) against ``TieredCache(persist=True)`` restoring the
  prefix that request 1 stored: wall time and positions the language model computed;
- the same generation with ``TieredCache`` under a live budget of one layer (blocks spilled to
  the store and fetched back, next layer in the background or not) against ``DynamicCache``,
  once with every block in L2 and once with an L2 of ``--small-l2`` (blocks go through L3).

The variants run round-robin (one run of each per round, after a warm-up round), so load
changes on a shared machine hit them alike. Outputs are checked equal to ``DynamicCache``'s; a
mismatch stops the benchmark. Long contexts (the 2B's K/V geometry at 4k-32k tokens, against
transformers' offloaded cache, peak RSS per variant) are ``tools/bench_kv_long.py``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tierstore
from tierstore.integrations.kv_cache import TieredCache
from tierstore.integrations.tiny_model import build_tiny_model, synthetic_inputs, tiny_config


def round_robin(variants: dict[str, Callable[[int], Any]], repeat: int) -> dict[str, tuple[float, Any]]:
    """Median wall time and last result of each variant, run one after another ``repeat`` times.

    Round ``i`` (0 is the warm-up) passes ``i`` to every variant, so they can work on the same input.
    """
    results = {name: fn(0) for name, fn in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(1, repeat + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            results[name] = fn(i)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prefix", type=int, default=1024, help="shared prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="fresh prompt tokens of the second request")
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated")
    parser.add_argument("--block", type=int, default=16, help="tokens per K/V block")
    parser.add_argument("--small-l2", default="2MiB", help="L2 of the store whose blocks spill to L3")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_tiny_model(tiny_config(layers=4, hidden=256, intermediate=512))
    shared = torch.randint(1, 400, (args.prefix,)).tolist()
    first = synthetic_inputs(shared + torch.randint(1, 400, (args.new,)).tolist(), image_seed=None)
    # each round's request 2 has its own fresh tokens, so no round reuses blocks an earlier round stored
    seconds = [synthetic_inputs(shared + torch.randint(1, 400, (args.new,)).tolist(), image_seed=None)
               for _ in range(args.repeat + 1)]
    gen: dict[str, Any] = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    one: dict[str, Any] = dict(gen, max_new_tokens=1, min_new_tokens=1)
    text = model.config.text_config
    layer_bytes = 2 * text.num_key_value_heads * text.head_dim * 4 * (args.prefix + args.new + args.tokens)
    computed: list[int] = []
    model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: computed.append(int(kw["inputs_embeds"].shape[1])), with_kwargs=True)

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; prompt {args.prefix}+{args.new} tokens, {args.tokens} generated, "
          f"{args.repeat} rounds (medians)")
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp, \
            tierstore.open(Path(tmp) / "kv", l2_cache_size="256MiB") as db, \
            tierstore.open(Path(tmp) / "small", l2_cache_size=args.small_l2) as small:
        with TieredCache(db, config=model.config, persist=True, block_tokens=args.block) as cache:
            cache.generate(model, **first, **gen)  # request 1 stores the prefix blocks

        def dynamic(kwargs: dict[str, Any]) -> Callable[[int], Any]:
            def run(i: int) -> Any:
                computed.clear()
                return model.generate(**seconds[i], **kwargs), computed[0], 0
            return run

        def reuse(kwargs: dict[str, Any]) -> Callable[[int], Any]:
            def run(i: int) -> Any:
                computed.clear()
                with TieredCache(db, config=model.config, persist=True, block_tokens=args.block) as cache:
                    return cache.generate(model, **seconds[i], **kwargs), computed[0], cache.stats.restored_tokens
            return run

        def spilled(prefetch: bool, store: tierstore.TierStore = db) -> Callable[[int], Any]:
            def run(i: int) -> Any:
                before = store.stats().hits["L3"]
                with TieredCache(store, config=model.config, budget=layer_bytes, block_tokens=args.block,
                                 prefetch=prefetch) as cache:
                    out = model.generate(**seconds[i], cache=cache, **gen)
                return out, cache.stats, store.stats().hits["L3"] - before
            return run

        res = round_robin({"dyn": dynamic(gen), "reuse": reuse(gen), "dyn1": dynamic(one), "reuse1": reuse(one),
                           "spill": spilled(True), "spill_noprefetch": spilled(False),
                           "l3": spilled(True, small), "l3_noprefetch": spilled(False, small)}, args.repeat)
        ref = res["dyn"][1][0]
        for name in ("reuse", "spill", "spill_noprefetch", "l3", "l3_noprefetch"):
            if not torch.equal(res[name][1][0], ref):
                raise SystemExit(f"{name} changed the generated tokens")
        t_dyn, t_reuse = res["dyn"][0], res["reuse"][0]
        f_dyn, f_reuse = res["dyn1"][0], res["reuse1"][0]
        print("\n| request 2 | wall s | first token s | prefill positions | restored | speed-up (all / first token) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| DynamicCache (no reuse) | {t_dyn:.3f} | {f_dyn:.3f} | {res['dyn'][1][1]} | 0 | 1.00x / 1.00x |")
        print(f"| TieredCache persist=True | {t_reuse:.3f} | {f_reuse:.3f} | {res['reuse'][1][1]} | "
              f"{res['reuse'][1][2]} | {t_dyn / t_reuse:.2f}x / {f_dyn / f_reuse:.2f}x |")
        print("\n| decoding, live budget of one layer | wall s | blocks fetched | from L3 | prefetch hits | "
              "vs DynamicCache |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| DynamicCache | {t_dyn:.3f} | - | - | - | 1.00x |")
        for name, label in (("spill", "blocks in L2, prefetch on"), ("spill_noprefetch", "blocks in L2, prefetch off"),
                            ("l3", f"L2 of {args.small_l2}, prefetch on"),
                            ("l3_noprefetch", f"L2 of {args.small_l2}, prefetch off")):
            wall, (_out, stats, l3_reads) = res[name]
            print(f"| TieredCache, {label} | {wall:.3f} | {stats.blocks_fetched} | {l3_reads} | "
                  f"{stats.prefetch_hits} | "
                  f"{t_dyn / wall:.2f}x |")


if __name__ == "__main__":
    main()
