"""``tierstore demo``: the README's main job — a Qwen3-VL generating with its weights streamed from a store.

By default it builds a small randomly initialised Qwen3-VL in-process (no download), writes it as a
Hugging Face checkpoint, imports it into a store, loads it streamed (each decoder layer and vision
block fetched from the store right before it runs, the next ones prefetched) and generates from a
synthetic image and prompt twice: the first run reads layers from L3 (compressed, on disk), the
second finds them in L2. It prints the tiers, the hits per run, the prefetch accuracy, the time per
run, and checks that the tokens are identical to those of the same model held in memory.

``--checkpoint DIR`` does the same with a real model folder; ``--store STORE`` keeps the store
(and, if it already holds a model and no checkpoint is given, uses that model as it is).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import open as open_store
from ..config import format_size, parse_size
from ..engine.handle import TierStore
from ..integrations.stream_budget import memory_split
from ..reports.process_memory import peak_rss, reset_peak_rss
from ._output import console, stats_table, table

__all__ = ["register"]

DEMO_MODEL: dict[str, Any] = {"layers": 6, "hidden": 256, "intermediate": 1024, "vocab": 2048, "vision_depth": 4}
"""The demo model: ~30 MB of float32 weights, six 4 MiB decoder layers; a few seconds on a laptop CPU."""
PROMPT, SUFFIX = [17, 101, 29, 64], [33, 7, 250]


def _device() -> tuple[torch.device, torch.dtype | None]:
    """The GPU if there is one (fp16 where it lacks bf16 math), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), None
    return torch.device("cuda"), torch.float16 if torch.cuda.get_device_capability() < (8, 0) else None


def _checkpoint(args: argparse.Namespace, work: Path) -> tuple[Path | None, Any]:
    """The checkpoint to import and the random model built for it, if the demo built one (None otherwise)."""
    from ..integrations.tiny_model import build_tiny_model, tiny_config

    if args.checkpoint:
        from ..integrations.checkpoint import checkpoint_files

        checkpoint_files(args.checkpoint, require_config=True)  # a typed one-line error, before transformers looks
        console.print(f"[bold]1.[/] model: {args.checkpoint}")
        return Path(args.checkpoint), None
    store = Path(args.store) if args.store else None
    if store is not None and (store / "catalog.sqlite").exists():
        with open_store(store, readonly=True, l2_cache_size=0) as db:
            if "__hf__/config.json" in db:
                console.print(f"[bold]1.[/] model: the one already in {store}")
                return None, None
    model = build_tiny_model(tiny_config(**DEMO_MODEL))
    folder = work / "checkpoint"
    model.save_pretrained(folder, max_shard_size="8MB")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    console.print(f"[bold]1.[/] model: a random Qwen3-VL ({DEMO_MODEL['layers']} text layers, "
                  f"{DEMO_MODEL['vision_depth']} vision blocks), written as a checkpoint of "
                  f"{len(list(folder.glob('*.safetensors')))} safetensors shards, {format_size(size)}, to {folder}")
    return folder, model


def _reference(args: argparse.Namespace, folder: Path, built: Any, model_bytes: int, memory: int | None,
               inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None
               ) -> tuple[torch.Tensor, str, float]:
    """The tokens of the model held whole in memory: ``(tokens, what computed them, seconds)``.

    Computed before the streamed model exists, so the two are never held together. Where the
    whole model does not fit the budget it runs in a child process (``python -m
    tierstore.cli.demo_reference``), whose memory is its own and is gone before streaming starts.
    """
    start = time.perf_counter()
    if memory is not None and model_bytes > memory:
        source = ["--checkpoint", str(args.checkpoint)] if args.checkpoint else ["--store", str(folder)]
        command = [sys.executable, "-m", "tierstore.cli.demo_reference", *source, "--tokens", str(args.tokens)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the reference process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        tokens = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])["sequence"])
        return tokens, "the model held in memory in another process", time.perf_counter() - start
    if built is not None or args.checkpoint:
        if built is None:
            from transformers import Qwen3VLForConditionalGeneration

            built = Qwen3VLForConditionalGeneration.from_pretrained(args.checkpoint, local_files_only=True).eval()
        model = built.to(device=device, dtype=dtype) if dtype is not None else built.to(device)
        label = "the model held in memory"
        built = None
    else:
        with open_store(folder, readonly=True, l2_cache_size=0) as db:
            from ..integrations.streaming import load_streamed

            model = load_streamed(db, device=device, dtype=dtype, resident_bytes=1 << 62)
        label = "the same weights all resident"
    expected = _generate(model, inputs, args.tokens)
    del model
    gc.collect()
    return expected, label, time.perf_counter() - start


def _generate(model: Any, inputs: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out


def _generate_cached(db: TierStore, model: Any, inputs: dict[str, torch.Tensor], tokens: int
                     ) -> tuple[torch.Tensor, int, int]:
    """Generate with the KV prefix cache and the vision-feature cache: ``(tokens, prefix restored, tower skips)``.

    Run 1 stores the prompt's K/V blocks (under a hash chain of its tokens and image) and the
    image's features; run 2 restores the prefix and skips the vision tower.
    """
    from ..integrations.kv_cache import TieredCache
    from ..integrations.vision_cache import VisionFeatureCache

    with VisionFeatureCache(db).attach(model) as vision, \
            TieredCache(db, config=model.config, persist=True) as cache, torch.inference_mode():
        out: torch.Tensor = cache.generate(model, **inputs, max_new_tokens=tokens, do_sample=False)
    return out, cache.stats.restored_tokens, vision.stats.hits


def cmd_demo(args: argparse.Namespace) -> int:
    """Import a model into a store, generate twice with weights streamed from its tiers, show what happened."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never reaches the network (read at import)
    from transformers.utils import logging

    from ..integrations.checkpoint import import_checkpoint, read_json
    from ..integrations.streaming import load_streamed
    from ..integrations.tiny_model import synthetic_inputs

    logging.disable_progress_bar()  # tierstore shows its own
    work = Path(tempfile.mkdtemp(prefix="tierstore-demo-"))
    try:
        folder = Path(args.store) if args.store else work / "store"
        reused = (folder / "catalog.sqlite").exists()  # its L2 slab may be warm: run 1 is then not cold
        checkpoint, reference = _checkpoint(args, work)
        if checkpoint is not None:
            console.print(f"[bold]2.[/] import into the store {folder} (L3: compressed Zarr on disk)")
            with open_store(folder, l2_cache_size=0, remember_config=False) as db:
                import_checkpoint(checkpoint, db, require_config=True, progress=True)
        device, dtype = _device()
        memory = parse_size(args.memory, name="--memory") if args.memory else None
        with open_store(folder, readonly=True, l2_cache_size=0) as db:
            model_bytes = db.stats().logical_bytes
            from transformers import AutoConfig

            raw = read_json(db, "config.json")
            config = AutoConfig.for_model(raw.pop("model_type"), **raw)
            split = memory_split(db, memory, prefetch=2, dtype=dtype) if memory is not None else None
        inputs = synthetic_inputs(PROMPT, image_seed=0, suffix=SUFFIX, config=config)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        expected, label, ref_seconds = _reference(args, folder, reference, model_bytes, memory, inputs, device, dtype)
        del reference
        gc.collect()
        # The import and the reference are done: the peak from here on is the streamed model's own.
        reset = reset_peak_rss()
        if args.l2:
            l2 = parse_size(args.l2)
        else:
            l2 = split.l2_bytes if split is not None else int(model_bytes * 1.25) + (8 << 20)
        with open_store(folder, l2_cache_size=l2) as db:
            model = load_streamed(db, device=device, dtype=dtype, prefetch=2, memory=memory)
            streamer = model.weight_streamer
            runs: list[list[Any]] = [["reference", f"{ref_seconds:.2f} s", *[""] * 4]]
            budget = "" if split is None else (f", memory budget {format_size(split.memory)}: "
                                               f"{format_size(split.fixed_bytes)} always loaded + L2")
            console.print(f"[bold]3.[/] generate {args.tokens} tokens from a synthetic image + prompt, twice, on "
                          f"{device} with layers streamed from the store (L2 {format_size(l2)}{budget}, "
                          f"{streamer.stats().units} streamed units, {format_size(streamer.stats().resident_bytes)} "
                          "resident)")
            same = []
            summary: list[dict[str, Any]] = []
            first = "1: reused store" if reused else "1: cold (L3)"
            for name in (first, "2: warm"):
                streamer.reset_stats()
                before = dict(db.stats().hits)
                start = time.perf_counter()
                out, restored, skipped = _generate_cached(db, model, inputs, args.tokens)
                seconds = time.perf_counter() - start
                hits = {tier: n - before[tier] for tier, n in db.stats().hits.items()}
                s = streamer.stats()
                same.append(torch.equal(out, expected))
                decided = s.prefetch_used_blocks + s.prefetch_wasted_blocks
                undecided = s.prefetched_blocks - decided  # still in flight or unused when the run ended
                runs.append([name, f"{seconds:.2f} s", f"{hits['L1']}/{hits['L2']}/{hits['L3']}", s.demand_fetches,
                             f"{s.prefetch_used_blocks}/{decided}/{undecided}"
                             + (f" ({s.prefetch_accuracy:.0%})" if decided else ""), f"{restored}, {skipped}"])
                summary.append({"run": name, "seconds": seconds, "hits": hits, "demand_fetches": s.demand_fetches,
                                "prefetched": s.prefetched_blocks, "prefetch_used": s.prefetch_used_blocks,
                                "prefetch_decided": decided, "prefetch_undecided": undecided,
                                "prefetch_accuracy": s.prefetch_accuracy, "kv_prefix_restored": restored,
                                "vision_tower_skipped": skipped, "identical": same[-1]})
            held = streamer.stats()
            streamer.close()
            tiers = db.stats().tiers
            occupancy = [[t, format_size(tiers[t]["used"]),
                          format_size(tiers[t]["capacity"]) if tiers[t]["capacity"] else "the disk",
                          tiers[t]["blocks"]] for t in ("L1", "L2", "L3") if t in tiers]
            console.print(table("tier occupancy after the runs", ["tier", "used", "capacity", "blocks"], occupancy))
            console.print(table("runs (prefetch: used/decided/undecided blocks, decided = used or dropped; "
                                "run 2 also reuses the KV prefix and vision features)",
                                ["run", "time", "hits L1/L2/L3", "demand fetches", "prefetch",
                                 "KV prefix, vision skip"], runs))
            console.print(stats_table(db.stats()))
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        verdict = "[green]identical[/]" if all(same) else "[red]DIFFERENT[/]"
        console.print(f"generated tokens {new}: {verdict} to {label} in both runs"
                      + (" (random weights: the tokens mean nothing)" if checkpoint is not None and not args.checkpoint
                         else ""))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        streaming = peak_rss(since_reset=reset)
        overhead = f" = budget + {format_size(streaming - memory)}" if memory and streaming >= memory else ""
        console.print(f"held in L2 for good: {held.held_units} units ({format_size(held.held_bytes)}); peak RSS "
                      f"{'while streaming' if reset else 'of this process'} {format_size(streaming)}"
                      + (f" (budget {format_size(memory)}{overhead}: the interpreter with torch and transformers, "
                         "activations, KV and vision caches on top of the weights)" if memory else "")
                      + (f"; of the whole process, the import included, {format_size(peak)}" if reset else ""))
        if args.json:  # one line, last: what a script or a test reads
            print(json.dumps({"runs": summary, "tokens": new, "identical": all(same), "peak_rss": peak,
                              "streaming_peak_rss": streaming,
                              "overhead": streaming - memory if memory else None,
                              "memory": memory, "reference": label, "held_units": held.held_units,
                              "tiers": {t: {k: v for k, v in tiers[t].items() if isinstance(v, (int, float, str))}
                                        for t in tiers}}))
        return 0 if all(same) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the ``tierstore`` parser."""
    demo = sub.add_parser("demo", help="run a Qwen3-VL with its weights streamed from a store (a small random "
                                       "one by default)")
    demo.add_argument("--store", help="keep the store in this folder (a model already in it is used as is)")
    demo.add_argument("--checkpoint", help="a Hugging Face Qwen3-VL folder to import instead of the random model")
    demo.add_argument("--tokens", type=int, default=8, help="tokens to generate per run (default 8)")
    demo.add_argument("--l2", help="L2 size (default: the model's size plus a quarter, or what --memory leaves)")
    demo.add_argument("--memory", help="a budget for the weights in host memory, e.g. 3GiB: L2 is sized from it, "
                                       "units it cannot hold stream from L3, and the reference runs in another "
                                       "process when the whole model does not fit")
    demo.add_argument("--json", action="store_true", help="also print the runs as one line of JSON, last")
    demo.set_defaults(func=cmd_demo)
