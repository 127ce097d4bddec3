"""Qwen3-VL at the published 2B and 4B shapes, bigger than the memory budget, against its peers.

The model is built with seeded random weights (no hub): :func:`shape_config` gives the published
shape, :func:`write_random_checkpoint` writes it as a sharded bf16 safetensors folder one tensor
at a time (the whole model is never in memory). It is imported with ``tierstore import-hf``
(GB/s and peak RSS of that process), then each variant runs in a process of its own (so its peak
RSS is its own), on a synthetic image + prompt, greedy:

- ``memory``: ``from_pretrained`` of the folder, bf16 (only where it fits in the RAM available;
  its tokens are the reference),
- ``tierstore``: ``load_streamed(store, memory=M)`` with L2 sized by ``memory_split``,
- ``raw``: the same on the store imported with ``--l3-compression off``: the units it does not hold are
  zero-copy maps of the L3 files (``TierStore.map``), L2 holds only held units; ``raw-copy``: the same store
  with ``mapped=False``, every streamed unit copied into L2 by ``pread``; ``raw-once``: ``raw`` with
  ``l3_verify_maps="once"`` (each block's checksum checked on its first map only), ``raw-always`` with
  ``"always"`` (every map checked; the others run the default ``"disk"``: a map that reads from the disk,
  and each block's first); ``raw-all-threads``:
  ``raw`` with ``decode_threads=None`` (torch's threads on every core beside the prefetch thread, as
  before ``decode_threads``),
- ``accelerate``: ``from_pretrained(device_map="auto", max_memory={"cpu": M}, offload_folder=...)``,
- ``plan``: ``load_streamed(store, plan=placement.plan(model_units(store), machine, memory=M))`` with
  the machine measured once (``Machine.from_probe``) at the start of the run, on a copy of the
  store where the units the plan streams raw were rewritten raw first (``tierstore plan --apply``);
  ``plan-once``: the same with the plan made for, and the store opened with, ``l3_verify_maps="once"``.
  The plan's measured decode is reported against the best variant with the same checks (``plan``:
  the variants that check every streamed byte; ``plan-once``: ``raw-once``) and the best overall.

Per variant: load time, TTFT (prefill incl. the vision tower), decode ms/token (median gap between
tokens), peak RSS (``VmHWM``), bytes per decoded token read from the disk device
(``/proc/self/io`` ``read_bytes``; the variant's files are dropped from the page cache first with
``posix_fadvise(DONTNEED)``) and read through ``read()`` (``rchar``), the store's own L3 bytes per
token, and whether the tokens equal the reference. Then the planner's prediction for each variant
on the measured machine, and the ratio measured/predicted; also with the CPU's matvec and fetch
rates measured in the variant's own process right before ``generate`` (the "in-run" prediction).

Compute dtype is bf16, as stored: this CPU (AMX/AVX512-BF16) multiplies bf16 at 4-6x fp32's FLOP/s
and a decoded token reads bf16 weights at about fp32's bytes/s, and bf16 keeps streamed weights
zero-copy views of L2 (a cast copies every unit). The table and findings are in BENCHMARKS.md.

    python tools/bench_real_size.py --model 2b            # ~15 min on the shared 2-core VM (the 4B ~25)
    python tools/bench_real_size.py --model both --tokens 4 --json run.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tierstore.reports.process_memory import peak_rss

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, for rss_phases
from rss_phases import RssPhases

GiB = 1 << 30
VARIANTS = ("memory", "tierstore", "raw", "raw-always", "raw-all-threads", "raw-copy", "raw-once", "accelerate",
            "plan", "plan-once")
STORES = {"tierstore": "store", "plan": "store-plan", "plan-once": "store-plan", "raw": "store-raw",
          "raw-always": "store-raw", "raw-all-threads": "store-raw", "raw-copy": "store-raw",
          "raw-once": "store-raw"}
"""The store each tierstore variant opens: ``raw`` and ``raw-copy`` are the same checkpoint imported with
``--l3-compression off``; ``raw`` maps the streamed units (``load_streamed``'s default), ``raw-copy`` copies
them through L2 (``mapped=False``); ``plan`` and ``plan-once`` open a copy of ``store`` with the units their
plans stream raw rewritten raw (``tierstore plan --apply``; one copy for both: the units either plan wants raw)."""
VERIFY = {"raw-once": "once", "plan-once": "once", "raw-always": "always"}
"""The store's ``l3_verify_maps`` per variant (the others: the default, ``disk``); a plan is made for the
setting its store runs with (``plan(..., verify_maps=)``), never the other way round."""
CHECKED = ("tierstore", "raw", "raw-always", "raw-all-threads", "raw-copy", "plan")
"""The store variants that check every byte they read from the disk (the ``plan`` variant's peers with the
same checks; ``raw-always`` checks every mapped byte of every token too)."""
TEXT = {  # the published text shapes (Qwen3-VL-2B/4B-Instruct config.json)
    "2b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
               intermediate_size=6144),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=9728),
}
BUDGET = {"2b": 2 * GiB, "4b": 3 * GiB, "tiny": 3 << 20}
PLAN_TERMS: dict[str, int] = {"context": 64, "vision_cache_bytes": 0}
"""What the benchmark's generate holds beside the weights: a KV cache of under 64 tokens, no vision cache."""
PROMPT = list(range(1000, 1012))
SUFFIX = list(range(2000, 2006))


def shape_config(name: str) -> Any:
    """The ``Qwen3VLConfig`` of ``name``: ``2b``, ``4b`` (published shapes) or ``tiny`` (for tests)."""
    from transformers import Qwen3VLConfig

    if name == "tiny":
        text: dict[str, Any] = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32, intermediate_size=256, vocab_size=4096)
        vision: dict[str, Any] = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        section = [8, 4, 4]
    else:
        text = dict(TEXT[name], vocab_size=151936)
        vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                      num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])
        section = [24, 20, 20]
    text.update(max_position_embeddings=262144, rms_norm_eps=1e-6, rope_theta=5_000_000, tie_word_embeddings=True,
                rope_scaling={"rope_type": "default", "mrope_section": section, "mrope_interleaved": True},
                dtype="bfloat16")
    vision.update(out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3, hidden_act="gelu_pytorch_tanh")
    ids = (500, 501, 502, 503) if name == "tiny" else (151655, 151656, 151652, 151653)
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids[0], video_token_id=ids[1],
                         vision_start_token_id=ids[2], vision_end_token_id=ids[3], tie_word_embeddings=True,
                         dtype="bfloat16")


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic bf16 weights: norms 1, biases 0, the rest N(0, 0.02), seeded by the tensor's name."""
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def write_random_checkpoint(config: Any, folder: str | Path, *, seed: int = 0, shard_bytes: int = 1 << 30,
                            progress: bool = False) -> int:
    """Write the model of ``config`` with seeded random bf16 weights as a sharded safetensors folder.

    One tensor at a time (at most one shard in memory); a tied ``lm_head`` is not written, as
    ``save_pretrained`` does. Returns the bytes of weights written.
    """
    from safetensors.torch import save_file
    from transformers import Qwen3VLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    names = [(n, tuple(p.shape)) for n, p in model.state_dict().items()
             if not (config.tie_word_embeddings and n == "lm_head.weight")]
    total = sum(2 * _numel(s) for _, s in names)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in names:
        nbytes = 2 * _numel(entry[1])
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map: dict[str, str] = {}
    bar = _bar(progress, "write random weights", total)
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = _random_tensor(name, shape, seed)
            weight_map[name] = file
            bar(2 * _numel(shape))
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    bar(None)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bar(enabled: bool, label: str, total: int) -> Any:
    """A rich progress bar in bytes (``advance(n)``; ``advance(None)`` closes it); a no-op when disabled."""
    if not enabled:
        return lambda n: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from tierstore.progress import BytesColumn, SpeedColumn

    bar = Progress(TextColumn(label), BarColumn(), BytesColumn(), SpeedColumn(), TimeRemainingColumn())
    task = bar.add_task(label, total=total)
    bar.start()

    def advance(n: int | None) -> None:
        if n is None:
            bar.stop()
        else:
            bar.advance(task, n)
    return advance


def bench_inputs(config: Any, grid: tuple[int, int, int] = (1, 8, 8)) -> dict[str, torch.Tensor]:
    """The image + prompt every variant runs: a ``grid`` of 16-pixel patches, prompt before, suffix after."""
    from tierstore.integrations.tiny_model import synthetic_inputs

    inputs = synthetic_inputs(PROMPT, image_seed=0, grid=grid, suffix=SUFFIX, config=config)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return inputs


# -- one variant, in its own process -------------------------------------------------------------------


def _proc_io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value)
    return out


def drop_page_cache(*folders: Path) -> None:
    """Evict the files under ``folders`` from the page cache (``POSIX_FADV_DONTNEED``: clean pages only)."""
    for folder in folders:
        for path in (folder.rglob("*") if folder.is_dir() else [folder]):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)  # freshly written pages are dirty: DONTNEED drops only clean ones
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


class _Stamps:
    """A ``generate`` streamer that records when each token arrives and the process's I/O counters then."""

    def __init__(self, rss: RssPhases | None = None) -> None:
        self.times: list[float] = []
        self.io: list[dict[str, int]] = []
        self.l3: list[int] = []
        self.store: Any = None
        self.rss = rss

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())
        if self.rss is not None and len(self.times) == 2:  # [0] is the prompt, [1] the first new token
            self.rss.mark("decode")
        self.io.append(_proc_io())
        self.l3.append(self.store.stats().hit_bytes["L3"] if self.store is not None else 0)

    def end(self) -> None:
        pass


def rates_in_child(work: Path) -> tuple[float, dict[str, float]]:
    """The CPU rates the cost model prices decode with, measured in a child process (its buffers, hundreds
    of MiB of weights, never count in this variant's RSS), under the load this variant runs in.

    ``measure_matvec`` at the model's own shapes (:func:`~tierstore.integrations.plan_units.decode_shapes`:
    a decoder layer's projections, and the head separately: a 151936-row matrix runs at another rate),
    ``measure_fetch(work)``, and the store's own map of cached raw blocks (``TierStore.map`` of a
    decoder layer's weights in ``store-raw``, opened ``l3_verify_maps="once"`` and mapped twice: the
    second map is the populate without the checksum). Returns ``(matvec, {fetch rates, head_matvec,
    map_populate})``.
    """
    import tierstore

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(tierstore.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, "--rates", str(work)], capture_output=True, text=True,
                          check=True, env=env)
    rate, fetch = json.loads(done.stdout.strip().splitlines()[-1])
    return float(rate), {k: float(v) for k, v in fetch.items()}


def measure_rates(work: Path) -> tuple[float, dict[str, float]]:
    """What :func:`rates_in_child` runs in the child (see there)."""
    import tierstore
    from tierstore.integrations.plan_units import decode_shapes
    from tierstore.plan.bandwidth import measure_fetch
    from tierstore.plan.machine import measure_mapped_matvec, measure_matvec, measure_sharing

    with tierstore.open(work / "store", readonly=True, l2_cache_size=0) as db:
        layer, head = decode_shapes(db)
    matvec = measure_matvec(layer)
    fetch: dict[str, float] = dict(measure_fetch(work))
    if head is not None:
        fetch["head_matvec"] = measure_matvec((head,), layers=1)
    raw = work / "store-raw"
    if (raw / "catalog.sqlite").exists():
        fetch["map_populate"] = _map_rate(raw)
    fetch["unit_overhead"] = measure_unit_overhead()
    fetch["compute_share"], fetch["fetch_share"] = measure_sharing(layer)
    cores = max(1, len(os.sched_getaffinity(0)))
    if cores >= 2:
        fetch["spare_core_matvec"] = measure_matvec(layer, threads=cores - 1)
    fetch["mapped_matvec"] = measure_mapped_matvec(work, layer)
    return matvec, fetch


def _map_rate(folder: Path) -> float:
    """Bytes/s of ``TierStore.map`` of a decoder layer's raw blocks with their files cached, unchecked (median of 3)."""
    import tierstore

    with tierstore.open(folder, readonly=True, l2_cache_size=0, l3_verify_maps="once") as db:
        layer = [k for k in db.keys("model.language_model.layers.1.")] or \
            [k for k in db.keys("model.layers.1.")]
        for key in layer:  # reads the files into the page cache and checks each block once
            db.map(key)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            maps = [db.map(key) for key in layer]
            nbytes = sum(m.nbytes for m in maps if m is not None)
            del maps  # unmapped: tearing the page tables down costs about what populating them did
            times.append(time.perf_counter() - start)
    return nbytes / max(sorted(times)[1], 1e-9)


def measure_unit_overhead(layers: tuple[int, int] = (2, 12), tokens: int = 10) -> float:
    """Seconds a Qwen3-VL decoder layer's decode step takes beyond its products: the ``tiny`` shape (products
    free) with ``layers`` decoder layers, the difference of their decode times per layer (median gaps)."""
    from transformers import Qwen3VLForConditionalGeneration

    step = []
    for count in layers:
        config = shape_config("tiny")
        config.text_config.num_hidden_layers = count
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16).eval()
        stamps = _Stamps()
        with torch.inference_mode():
            model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=tokens, do_sample=False, streamer=stamps)
        step.append(statistics.median(b - a for a, b in zip(stamps.times[2:], stamps.times[3:], strict=False)))
    return max(0.0, (step[1] - step[0]) / (layers[1] - layers[0]))





def load_variant(variant: str, work: Path, memory: int, machine_file: Path | None = None,
                 rss: RssPhases | None = None) -> tuple[Any, Any]:
    """``(model, store or None)`` of ``variant`` from the folders under ``work`` (``ckpt``, ``store``).

    ``rss`` gets the phases ``open store`` (the catalog, ``memory_split``, L2 prefaulted) and ``load_streamed``.
    """
    import tierstore
    from tierstore.integrations.stream_budget import memory_split
    from tierstore.integrations.streaming import load_streamed

    if variant == "memory":
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration.from_pretrained(work / "ckpt", dtype=torch.bfloat16).eval(), None
    if variant == "accelerate":
        from transformers import Qwen3VLForConditionalGeneration

        offload = work / "offload"
        shutil.rmtree(offload, ignore_errors=True)
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            work / "ckpt", dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": memory},
            offload_folder=offload)
        return model.eval(), None
    folder = work / STORES[variant]
    if rss is not None:
        rss.mark("open store")
    mapped = variant != "raw-copy"
    verify = VERIFY.get(variant, "disk")
    if variant in ("tierstore", "raw", "raw-always", "raw-all-threads", "raw-copy", "raw-once"):
        with tierstore.open(folder, readonly=True, l2_cache_size=0) as probe:
            split = memory_split(probe, memory, prefetch=2, mapped=mapped)
        store = tierstore.open(folder, readonly=True, l2_cache_size=split.l2_bytes, l3_verify_maps=verify)
        if rss is not None:
            rss.mark("load_streamed")
        threads = None if variant == "raw-all-threads" else "auto"  # the decode before decode_threads
        return load_streamed(store, memory=memory, prefetch=2, mapped=mapped, decode_threads=threads), store
    from tierstore.integrations.plan_units import model_units
    from tierstore.plan.machine import Machine
    from tierstore.plan.placement import plan

    machine = Machine.from_file(machine_file) if machine_file is not None else Machine.from_probe(work)
    with tierstore.open(folder, readonly=True, l2_cache_size=0) as probe:
        chosen = plan(model_units(probe), machine, memory=memory, prefetch=2, verify_maps=verify, **PLAN_TERMS)
    if chosen.raw_units:
        raise RuntimeError(f"the plan still wants {len(chosen.raw_units)} units raw in {folder}: prepare_plan_store "
                           "did not apply it")
    # the plan's L2, not memory_split's; the checks the plan was made for
    store = tierstore.open(folder, readonly=True, l2_cache_size=chosen.l2_bytes, l3_verify_maps=verify)
    if rss is not None:
        rss.mark("load_streamed")
    return load_streamed(store, plan=chosen, prefetch=2), store


def prepare_plan_store(work: Path, machine: Any, memory: int, verify: tuple[str, ...] = ("disk",)) -> int:
    """``store-plan``: a copy of ``store`` with the raw units of the plan for each ``verify`` setting rewritten
    raw (``plan --apply``, one plan after the other: the second plans the store the first left); how many."""
    import tierstore
    from tierstore.integrations.plan_apply import store_raw
    from tierstore.integrations.plan_units import model_units
    from tierstore.plan.placement import plan

    target = work / STORES["plan"]
    if not (target / "catalog.sqlite").exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(work / "store", target)
    rewritten = 0
    for setting in verify:
        with tierstore.open(target, readonly=True, l2_cache_size=0) as db:
            chosen = plan(model_units(db), machine, memory=memory, prefetch=2, verify_maps=setting, **PLAN_TERMS)
        rewritten += store_raw(target, chosen) if chosen.raw_units else 0
    return rewritten


def run_variant(variant: str, work: Path, memory: int, tokens: int, grid: tuple[int, int, int],
                machine_file: Path | None = None, *, matvec: bool = True) -> dict[str, Any]:
    """Load and run one variant in this process; what it measured, as JSON-ready values.

    ``matvec`` also measures the CPU's matrix-vector rate just before ``generate`` (``matvec_rate``), in a
    child process (:func:`rates_in_child`, with the fetch rates) so that its weights are not in this process's peak RSS.
    """
    rss = RssPhases()
    with rss:
        result = _run_variant(variant, work, memory, tokens, grid, machine_file, matvec, rss)
    result["rss_phases"] = rss.summary()
    return result


def _run_variant(variant: str, work: Path, memory: int, tokens: int, grid: tuple[int, int, int],
                 machine_file: Path | None, matvec: bool, rss: RssPhases) -> dict[str, Any]:
    rss.mark("imports")
    from transformers.utils import logging

    logging.disable_progress_bar()
    drop_page_cache(work / "ckpt", work / "store", work / "store-raw")
    start = time.perf_counter()
    rss.mark("load")  # the store's variants split it: open store, load_streamed
    model, store = load_variant(variant, work, memory, machine_file, rss)
    load_s = time.perf_counter() - start
    load_peak = peak_rss()
    # fetches past L2 while generating (a fixed weight larger than a plan's L2, read once at load, passes it by)
    bypassed_at_load = store.stats().tiers["L2"]["bypasses"] if store is not None else 0
    config = model.config
    inputs = bench_inputs(config, grid)
    # under this variant's share of the shared CPU, right before it runs, in a child (not in this RSS)
    rate, fetch = rates_in_child(work) if matvec else (None, None)
    stamps = _Stamps(rss)
    stamps.store = store
    io0 = _proc_io()
    rss.mark("prefill")  # the vision tower, the prompt, the first token
    begin = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, streamer=stamps)
    rss.mark("after generate")
    gaps = [b - a for a, b in zip(stamps.times[1:], stamps.times[2:], strict=False)]  # [0] is the prompt
    decoded = max(1, len(stamps.times) - 2)
    result = {
        "variant": variant, "load_s": load_s, "ttft_s": stamps.times[1] - begin,
        "decode_s": statistics.median(gaps) if gaps else float("nan"), "gaps_s": gaps,
        "tokens": out[0, inputs["input_ids"].shape[1]:].tolist(), "peak_rss": peak_rss(),
        "peak_rss_load": load_peak, "matvec_rate": rate, "fetch_rates": fetch,
        "read_bytes_per_token": (stamps.io[-1]["read_bytes"] - stamps.io[1]["read_bytes"]) / decoded,
        "rchar_per_token": (stamps.io[-1]["rchar"] - stamps.io[1]["rchar"]) / decoded,
        "prefill_read_bytes": stamps.io[1]["read_bytes"] - io0["read_bytes"],
        "l3_bytes_per_token": (stamps.l3[-1] - stamps.l3[1]) / decoded,
    }
    if store is not None:
        s = model.weight_streamer.stats()
        l2 = store.stats().tiers["L2"]
        result.update(held_units=s.held_units, held_bytes=s.held_bytes, units=s.units, l2_bytes=l2["capacity"],
                      verify_maps=store.config.l3_verify_maps, decode_threads=model.weight_streamer.threads.threads,
                      mapped_blocks=s.mapped_blocks,
                      l2_misses=l2["misses"], l2_bypasses=l2["bypasses"] - bypassed_at_load,
                      l2_bypasses_at_load=bypassed_at_load,
                      store_bytes=sum(p.stat().st_size for p in (work / STORES[variant]).rglob("*") if p.is_file()))
        model.weight_streamer.close()
        store.close()
    if variant == "accelerate":
        device_map = getattr(model, "hf_device_map", {})
        result["device_map"] = {where: sum(1 for v in device_map.values() if str(v) == where)
                                for where in {str(v) for v in device_map.values()}}
        result["offloaded_modules"] = [k for k, v in device_map.items() if str(v) == "disk"]
    return result


# -- the driver ----------------------------------------------------------------------------------------


def import_store(work: Path, folder: str = "store", codec: str | None = None) -> dict[str, Any]:
    """``tierstore import-hf ckpt store`` as a user runs it, in a child: seconds, GB/s, its peak RSS.

    ``codec`` is its ``--l3-compression`` (None: the default, compressed).
    """
    drop_page_cache(work / "ckpt")
    nbytes = sum(p.stat().st_size for p in (work / "ckpt").glob("*.safetensors"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    extra = [] if codec is None else ["--l3-compression", codec]
    subprocess.run([sys.executable, "-m", "tierstore", "import-hf", str(work / "ckpt"), str(work / folder), *extra],
                   check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    stored = sum(p.stat().st_size for p in (work / folder).rglob("*") if p.is_file())
    return {"seconds": seconds, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9,
            "peak_rss": peak if peak > before * 1024 else None, "store_bytes": stored}


def child(variant: str, work: Path, memory: int, tokens: int, grid: tuple[int, int, int],
          machine_file: Path | None) -> dict[str, Any]:
    """Run one variant in a new interpreter; its JSON result."""
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--memory", str(memory),
           "--tokens", str(tokens), "--grid", ",".join(map(str, grid))]
    if machine_file is not None:
        cmd += ["--machine", str(machine_file)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"variant": variant, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed",
                "stderr": done.stderr[-4000:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def predictions(work: Path, machine: Any, memory: int, prefill_tokens: int) -> dict[str, Any]:
    """The cost model's prediction of each variant on ``machine`` (see ``tierstore.plan.placement``).

    ``tierstore`` and ``raw`` are the plan of their store taken as stored (``rewrite=False``: what
    ``memory=`` does), ``plan`` / ``plan-once`` the planner's own choice for its verify setting on the
    store the variant runs (``store-plan`` where it was prepared, else the compressed store).
    """
    import tierstore
    from tierstore.errors import ConfigError
    from tierstore.integrations.plan_units import model_units
    from tierstore.plan.placement import UnitPlan, baselines, plan, predict

    with tierstore.open(work / "store", readonly=True, l2_cache_size=0) as db:
        units = model_units(db)
    raw_units = None
    if (work / "store-raw" / "catalog.sqlite").exists():
        with tierstore.open(work / "store-raw", readonly=True, l2_cache_size=0) as db:
            raw_units = model_units(db)
    terms: dict[str, Any] = dict(memory=memory, prefetch=2, prefill_tokens=prefill_tokens, **PLAN_TERMS)
    plan_units = units
    if (work / STORES["plan"] / "catalog.sqlite").exists():
        with tierstore.open(work / STORES["plan"], readonly=True, l2_cache_size=0) as db:
            plan_units = model_units(db)
    chosen = plan(plan_units, machine, **terms)
    chosen_once = plan(plan_units, machine, verify_maps="once", **terms)
    stored = plan(units, machine, rewrite=False, **terms)
    raw = plan(raw_units, machine, rewrite=False, mapped=True, **terms).prediction if raw_units is not None else None
    raw_once = plan(raw_units, machine, rewrite=False, mapped=True, verify_maps="once",
                    **terms).prediction if raw_units is not None else None
    raw_always = plan(raw_units, machine, rewrite=False, mapped=True, verify_maps="always",
                      **terms).prediction if raw_units is not None else None
    raw_copy = plan(raw_units, machine, rewrite=False, **terms).prediction if raw_units is not None else None
    raw_all = plan(raw_units, replace(machine, stream_spare_core=False), rewrite=False, mapped=True,
                   **terms).prediction if raw_units is not None else None
    everything = [UnitPlan(u.name, u.nbytes, "L2", "cpu" if u.decoder else "-", "cpu") for u in units.units]
    try:
        accelerate = baselines(units, machine, memory, prefill_tokens=prefill_tokens)["accelerate offload"]
    except ConfigError:  # baselines plans with the default KV/vision budgets, which a tiny budget lacks
        accelerate = None
    memory_all = predict(machine, units, everything, prefill_tokens=prefill_tokens)
    return {"memory": memory_all, "tierstore": stored.prediction, "plan": chosen.prediction,
            "plan-once": chosen_once.prediction, "raw": raw, "raw-always": raw_always, "raw-all-threads": raw_all,
            "raw-copy": raw_copy,
            "raw-once": raw_once,
            "accelerate": accelerate, "_plan": chosen, "_plan-once": chosen_once}


def in_run_machine(machine: Any, result: dict[str, Any]) -> Any:
    """``machine`` with the CPU rates a variant's process measured right before ``generate``."""
    fetch = result.get("fetch_rates") or {}
    extra: dict[str, Any] = {"decode": fetch["decode"] * machine.cores, "page_cache_read": fetch["page_cache_read"],
                             "checksum": fetch["checksum"]} if fetch else {}
    for name in ("head_matvec", "map_populate", "unit_overhead", "compute_share", "fetch_share",
                 "spare_core_matvec", "mapped_matvec"):
        if name in fetch:
            extra[name] = fetch[name]
    return replace(machine, cpu_matvec=result["matvec_rate"], **extra)


def bench_model(name: str, args: argparse.Namespace, machine: Any, machine_file: Path) -> dict[str, Any]:
    """Build, import and run every variant of one model; print and return the table's rows."""
    grid = tuple(int(x) for x in args.grid.split(","))
    memory = int(args.memory * GiB) if args.memory else BUDGET[name]
    work = Path(args.keep) / name if args.keep else Path(tempfile.mkdtemp(prefix=f"tierstore-real-{name}-",
                                                                          dir=args.out))
    try:
        config = shape_config(name)
        start = time.perf_counter()
        if (work / "store" / "catalog.sqlite").exists():  # --keep: reuse what an earlier run built
            total = sum(p.stat().st_size for p in (work / "ckpt").glob("*.safetensors"))
            imported = json.loads((work / "import.json").read_text())
        else:
            total = write_random_checkpoint(config, work / "ckpt", seed=args.seed, progress=True)
            print(f"{name}: {total / GiB:.2f} GiB of bf16 weights written in {time.perf_counter() - start:.0f} s")
            imported = import_store(work)
            (work / "import.json").write_text(json.dumps(imported))
        print(f"{name}: import-hf {imported['bytes'] / GiB:.2f} GiB in {imported['seconds']:.0f} s "
              f"({imported['gb_per_s']:.2f} GB/s), peak RSS {(imported['peak_rss'] or 0) / 2**20:.0f} MiB, "
              f"stored {imported['store_bytes'] / GiB:.2f} GiB")
        if {"raw", "raw-copy", "raw-once"} & set(args.variants.split(",")):
            if not (work / "store-raw" / "catalog.sqlite").exists():
                imported["raw"] = import_store(work, "store-raw", codec="off")
                (work / "import.json").write_text(json.dumps(imported))
            raw = imported["raw"]
            print(f"{name}: import-hf --l3-compression off in {raw['seconds']:.0f} s, stored "
                  f"{raw['store_bytes'] / GiB:.2f} GiB")
        # the probe's matvec ran at a 2B-class layer's shapes: measure this model's (layers, head) and its maps
        rate, fetch = rates_in_child(work)
        machine = in_run_machine(machine, {"matvec_rate": rate, "fetch_rates": fetch})
        machine_file.write_text(json.dumps(machine.to_dict()))
        print(f"{name}: machine at this model's shapes: matvec {rate / 1e9:.2f} GB/s, head "
              f"{fetch.get('head_matvec', 0) / 1e9:.2f} GB/s, map {fetch.get('map_populate', 0) / 1e9:.2f} GB/s, "
              f"{fetch.get('unit_overhead', 0) * 1e3:.2f} ms per layer beside its products, shares beside a fetch "
              f"thread {fetch.get('compute_share', 1):.2f} (matvec) / {fetch.get('fetch_share', 1):.2f} (fetch)")
        settings = tuple(VERIFY.get(v, "disk") for v in ("plan", "plan-once") if v in args.variants.split(","))
        if settings:
            start = time.perf_counter()
            rewritten = prepare_plan_store(work, machine, memory, settings)
            print(f"{name}: plan store: {rewritten} tensors rewritten raw in {time.perf_counter() - start:.0f} s")
        available = _mem_available()
        results = {}
        for variant in args.variants.split(","):
            if variant == "memory" and total + 2 * GiB > min(available, args.max_rss * GiB):
                results[variant] = {"variant": variant, "error": f"skipped: {total / GiB:.1f} GiB model, "
                                                                 f"{available / GiB:.1f} GiB available"}
                continue
            print(f"{name}: running {variant} ...", flush=True)
            results[variant] = child(variant, work, memory, args.tokens, grid, machine_file)
            r = results[variant]
            print(f"  {r.get('error') or _line(r)}", flush=True)
        prefill = int(bench_inputs(config, grid)["input_ids"].shape[1])
        predicted = predictions(work, machine, memory, prefill)
        in_run = {}  # the same model with the CPU rate each variant's process measured just before it ran
        for variant, r in results.items():
            if r.get("matvec_rate"):
                in_run[variant] = predictions(work, in_run_machine(machine, r), memory, prefill)[variant]
        return report(name, total, memory, imported, results, predicted, in_run)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _line(r: dict[str, Any]) -> str:
    return (f"load {r['load_s']:.1f} s, TTFT {r['ttft_s']:.1f} s, decode {r['decode_s'] * 1e3:.0f} ms/token, "
            f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB (load {r['peak_rss_load'] / 2**20:.0f}), disk "
            f"{r['read_bytes_per_token'] / 2**20:.0f} MiB/token, L3 {r['l3_bytes_per_token'] / 2**20:.0f} MiB/token, "
            f"tokens {r['tokens']}" + (f", held {r['held_units']}/{r['units']} units, "
                                        f"{r['mapped_blocks']} blocks mapped" if "held_units" in r else "")
            + "\n    RSS MiB by phase (end/peak): "
            + ", ".join(f"{k} {v['end'] / 2**20:.0f}/{v['peak'] / 2**20:.0f}"
                        for k, v in r.get("rss_phases", {}).items()))


def report(name: str, total: int, memory: int, imported: dict[str, Any], results: dict[str, Any],
           predicted: dict[str, Any], in_run: dict[str, Any]) -> dict[str, Any]:
    """Print the table of one model and return it JSON-ready."""
    ok = {k: v for k, v in results.items() if "error" not in v}
    reference = ok.get("memory", next(iter(ok.values()), None))
    rows = []
    print(f"\n{name}: {total / GiB:.2f} GiB bf16, budget {memory / GiB:.2f} GiB")
    print(f"{'variant':<12}{'load s':>8}{'TTFT s':>8}{'ms/tok':>8}{'pred':>8}{'ratio':>7}{'peak MiB':>10}"
          f"{'disk MiB/t':>11}{'L3 MiB/t':>10}  tokens")
    for variant, r in results.items():
        if "error" in r:
            print(f"{variant:<12}{r['error']}")
            rows.append(r)
            continue
        p = predicted[variant]
        same = reference is not None and r["tokens"] == reference["tokens"]
        r = dict(r, predicted_decode_s=p.decode_s if p else None, predicted_ttft_s=p.ttft_s if p else None,
                 ratio=r["decode_s"] / p.decode_s if p else None, identical=same,
                 predicted_in_run_decode_s=in_run[variant].decode_s if in_run.get(variant) else None,
                 reference=reference["variant"] if reference else None)
        rows.append(r)
        pred = f"{p.decode_s * 1e3:>8.0f}{r['ratio']:>7.2f}" if p else f"{'-':>8}{'-':>7}"
        print(f"{variant:<12}{r['load_s']:>8.1f}{r['ttft_s']:>8.1f}{r['decode_s'] * 1e3:>8.0f}"
              f"{pred}{r['peak_rss'] / 2**20:>10.0f}"
              f"{r['read_bytes_per_token'] / 2**20:>11.1f}{r['l3_bytes_per_token'] / 2**20:>10.1f}  "
              f"{'identical' if same else 'DIFFERENT'}"
              + (f"  (in-run rate {r['matvec_rate'] / 1e9:.2f} GB/s: predicted "
                 f"{r['predicted_in_run_decode_s'] * 1e3:.0f} ms, ratio "
                 f"{r['decode_s'] / r['predicted_in_run_decode_s']:.2f})" if r['predicted_in_run_decode_s'] else ""))
    chosen = predicted["_plan"]
    ratios = plan_ratios(ok)
    for variant, (same, overall) in ratios.items():
        placed = predicted["_" + variant]
        print(f"{variant}: {len(placed.resident('L2'))} units in L2, limit {placed.prediction.decode_limit}; "
              f"measured {same[1]:.2f}x the best variant with the same checks ({same[0]}), "
              f"{overall[1]:.2f}x the best overall ({overall[0]})")
    return {"model": name, "weights_bytes": total, "memory": memory, "import": imported, "variants": rows,
            "plan_l2_units": len(chosen.resident("L2")),
            "plan_vs_best": ratios["plan"][1][1] if "plan" in ratios else None,
            "plan_ratios": {k: {"same_checks": list(same), "overall": list(overall)} for k, (same, overall)
                            in ratios.items()}}


def plan_ratios(ok: dict[str, Any]) -> dict[str, tuple[tuple[str, float], tuple[str, float]]]:
    """Per plan variant measured: ``((best variant with the same checks, ratio), (best overall, ratio))``.

    The same checks: ``plan`` against the store variants that check every byte they stream
    (:data:`CHECKED`), ``plan-once`` against those opened ``l3_verify_maps="once"``; overall: every variant
    under the budget (not ``memory``). Ratios are the plan's decode over the best's (1.0: the plan is the best).
    """
    def best(names: list[str]) -> tuple[str, float]:
        name = min(names, key=lambda k: ok[k]["decode_s"])
        return name, float(ok[name]["decode_s"])

    out = {}
    under = [k for k in ok if k != "memory"]
    for variant in ("plan", "plan-once"):
        if variant not in ok:
            continue
        peers = [k for k in under if (k in CHECKED) == (variant == "plan") and
                 (VERIFY.get(k) == "once") == (variant == "plan-once")]
        same, overall = best(peers), best(under)
        measured = ok[variant]["decode_s"]
        out[variant] = ((same[0], measured / same[1]), (overall[0], measured / overall[1]))
    return out


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("2b", "4b", "both", "tiny"), default="2b")
    parser.add_argument("--memory", type=float, help="budget in GiB (default: 2 for the 2B, 3 for the 4B)")
    parser.add_argument("--tokens", type=int, default=4, help="new tokens per variant")
    parser.add_argument("--grid", default="1,8,8", help="image patches t,h,w (16-pixel patches)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss", type=float, default=12, help="GiB: skip the in-memory variant above it")
    parser.add_argument("--out", default="/tmp", help="where the scratch folders go")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--keep", help="build in DIR/<model> and keep it (a later run with --keep reuses it)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--machine", help=argparse.SUPPRESS)
    parser.add_argument("--rates", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rates:
        print(json.dumps(measure_rates(Path(args.rates))))
        return
    if args.child:
        grid = tuple(int(x) for x in args.grid.split(","))
        result = run_variant(args.child, Path(args.work), int(float(args.memory)), args.tokens, grid,  # type: ignore[arg-type]
                             Path(args.machine) if args.machine else None)
        print(json.dumps(result))
        return

    from tierstore.plan.machine import Machine

    machine = Machine.from_probe(args.out)
    print(f"machine: {machine}")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(machine.to_dict(), f)
    machine_file = Path(f.name)
    try:
        names = ["2b", "4b"] if args.model == "both" else [args.model]
        out = [bench_model(n, args, machine, machine_file) for n in names]
    finally:
        machine_file.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine.to_dict(), "results": out}, indent=1))


if __name__ == "__main__":
    main()
