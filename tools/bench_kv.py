"""KV-cache benchmark: a second request sharing a long prefix, and decoding with spilled K/V blocks.

    python tools/bench_kv.py [--repeat 5] [--prefix 1024] [--new 32] [--tokens 16]

Builds a small random Qwen3-VL text stack (4 layers, hidden 256) and measures, as medians of
``--repeat`` runs in one process:

- request 2 (the shared ``--prefix`` tokens + ``--new`` fresh ones, ``--tokens`` generated) with
  ``DynamicCache`` (everything computed) against ``TieredCache(persist=True)`` restoring the
  prefix that request 1 stored: wall time and positions the language model computed;
- the same generation with ``TieredCache`` under a live budget of one layer (blocks spilled to
  the store and fetched back, next layer in the background) against ``DynamicCache``.

Outputs are checked equal to ``DynamicCache``'s; a mismatch stops the benchmark.
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


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time of ``fn`` over ``repeat`` runs (after one warm-up) and its last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prefix", type=int, default=1024, help="shared prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="fresh prompt tokens of the second request")
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated")
    parser.add_argument("--block", type=int, default=16, help="tokens per K/V block")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_tiny_model(tiny_config(layers=4, hidden=256, intermediate=512))
    shared = torch.randint(1, 400, (args.prefix,)).tolist()
    first = synthetic_inputs(shared + torch.randint(1, 400, (args.new,)).tolist(), image_seed=None)
    second = synthetic_inputs(shared + torch.randint(1, 400, (args.new,)).tolist(), image_seed=None)
    gen: dict[str, Any] = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    computed: list[int] = []
    model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: computed.append(int(kw["inputs_embeds"].shape[1])), with_kwargs=True)

    def counted(fn: Callable[[], Any]) -> tuple[float, Any, int]:
        computed.clear()
        seconds, out = timed(fn, args.repeat)
        return seconds, out, sum(computed) // (args.repeat + 1)

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; prompt {args.prefix}+{args.new} tokens, {args.tokens} generated, "
          f"{args.repeat} repeats (medians)")
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp, \
            tierstore.open(Path(tmp) / "kv", l2_cache_size="256MiB") as db:
        with TieredCache(db, config=model.config, persist=True, block_tokens=args.block) as cache:
            cache.generate(model, **first, **gen)  # request 1 stores the prefix blocks
        t_dyn, ref, pos_dyn = counted(lambda: model.generate(**second, **gen))

        def reuse() -> Any:
            with TieredCache(db, config=model.config, persist=True, block_tokens=args.block) as cache:
                return cache.generate(model, **second, **gen), cache.stats.restored_tokens

        t_reuse, (out, restored), pos_reuse = counted(reuse)
        if not torch.equal(out, ref):
            raise SystemExit("prefix reuse changed the generated tokens")
        one = dict(gen, max_new_tokens=1, min_new_tokens=1)
        ttft_dyn, _ = timed(lambda: model.generate(**second, **one), args.repeat)

        def reuse_first() -> Any:
            with TieredCache(db, config=model.config, persist=True, block_tokens=args.block) as cache:
                return cache.generate(model, **second, **one)

        ttft_reuse, _ = timed(reuse_first, args.repeat)
        print("\n| request 2 | wall s | first token s | positions computed | restored | speed-up (all / first) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| DynamicCache (no reuse) | {t_dyn:.3f} | {ttft_dyn:.3f} | {pos_dyn} | 0 | 1.00x / 1.00x |")
        print(f"| TieredCache persist=True | {t_reuse:.3f} | {ttft_reuse:.3f} | {pos_reuse} | {restored} | "
              f"{t_dyn / t_reuse:.2f}x / {ttft_dyn / ttft_reuse:.2f}x |")

        text = model.config.text_config
        layer_bytes = (2 * text.num_key_value_heads * text.head_dim * 4  # K and V, fp32
                       * (args.prefix + args.new + args.tokens))

        def spilled(prefetch: bool) -> Callable[[], Any]:
            def run() -> Any:
                with TieredCache(db, config=model.config, budget=layer_bytes, block_tokens=args.block,
                                 prefetch=prefetch) as cache:
                    return model.generate(**second, cache=cache, **gen), cache.stats
            return run

        print("\n| decoding with a 1-layer live budget | wall s | blocks fetched | prefetch hits | vs Dynamic |")
        print("| --- | ---: | ---: | ---: | ---: |")
        print(f"| DynamicCache | {t_dyn:.3f} | - | - | 1.00x |")
        for prefetch in (True, False):
            seconds, (out, stats) = timed(spilled(prefetch), args.repeat)
            if not torch.equal(out, ref):
                raise SystemExit("spilling changed the generated tokens")
            print(f"| TieredCache, prefetch={prefetch} | {seconds:.3f} | {stats.blocks_fetched} | "
                  f"{stats.prefetch_hits} | {t_dyn / seconds:.2f}x |")


if __name__ == "__main__":
    main()
