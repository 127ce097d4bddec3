"""Cold reads of large bf16 tensors from L3 against safetensors ``load_file``, interleaved.

    python tools/bench_l3_read.py                  # 8 x 16 MiB bf16, 7 rounds (~1 min)
    python tools/bench_l3_read.py --count 32 --repeat 5 --json out.json

One dataset of seeded random-normal bf16 tensors (what checkpoints hold) is written once as a
safetensors file and as tierstore stores (``l3_compression`` auto and off, all tensors put in one
transaction, so one file holds them), each read with one ``get`` per key and with one ``get_many``
of all keys, and as a store whose tensors were put one at a time (a file each), read with
``get_many``. Each round reads the
whole dataset with every variant in a rotated order, each after dropping its files from the page
cache (``posix_fadvise(DONTNEED)`` after a ``sync``), and materialises what it got (one byte per
page, as tools/bench.py does). Reported: medians over rounds, the spread, wall MiB/s, this
process's CPU seconds, the ratio against ``load_file``, the bytes stored on disk (metadata
included) and peak RSS. Every read is checked bit for bit against the source once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

import tierstore

PAGE = 4096
MiB = 1 << 20
PER_PUT = "a put per tensor (a file each)"


def make_tensors(count: int, shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"w.{i:04d}": torch.randn(shape, generator=gen).to(torch.bfloat16) for i in range(count)}


def drop_page_cache(folder: Path) -> None:
    """Write back dirty pages, then drop every file under ``folder`` from the page cache."""
    os.sync()
    for root, _dirs, names in os.walk(folder):
        for name in names:
            fd = os.open(Path(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_usage(folder: Path) -> int:
    """Bytes allocated on disk under ``folder`` (files and folders, so metadata counts)."""
    total = 0
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            total += os.lstat(Path(root, name)).st_blocks * 512
    return total


def touch(tensors: list[torch.Tensor]) -> int:
    """Materialise: one byte per page (forces mmap-backed data in)."""
    total = 0
    for tensor in tensors:
        pages = tensor.reshape(-1).view(torch.uint8).numpy().data
        total += sum(pages[::PAGE]) + pages[-1]
    return total


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def variants(out: Path, keys: list[str]) -> dict[str, tuple[Path, Callable[[], list[torch.Tensor]]]]:
    """Label -> (folder to drop from the page cache, read of every tensor)."""
    st_file = out / "safetensors" / "model.safetensors"

    def load_file() -> list[torch.Tensor]:
        loaded = safetensors.torch.load_file(st_file)
        return [loaded[key] for key in keys]

    def get_each(store: Path) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            with tierstore.open(store, l2_cache_size=0, readonly=True) as db:
                return [db.get(key) for key in keys]
        return run

    def get_many(store: Path) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            with tierstore.open(store, l2_cache_size=0, readonly=True) as db:
                got = db.get_many(keys)
                return [got[key] for key in keys]
        return run

    found: dict[str, tuple[Path, Callable[[], list[torch.Tensor]]]] = {
        "safetensors: load_file": (st_file.parent, load_file)}
    for setting in ("auto", "off"):
        store = out / f"tierstore-{setting}"
        found[f"tierstore l3_compression={setting}: get each"] = (store, get_each(store))
        found[f"tierstore l3_compression={setting}: get_many"] = (store, get_many(store))
    store = out / "tierstore-auto-file-each"
    found[f"tierstore l3_compression=auto, {PER_PUT}: get_many"] = (store, get_many(store))
    return found


def write_all(out: Path, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Write the dataset every way; returns label -> bytes on disk."""
    sizes: dict[str, int] = {}
    (out / "safetensors").mkdir(parents=True)
    safetensors.torch.save_file(tensors, out / "safetensors" / "model.safetensors")
    sizes["safetensors: load_file"] = disk_usage(out / "safetensors")
    for setting in ("auto", "off"):
        store = out / f"tierstore-{setting}"
        with tierstore.open(store, l2_cache_size=0, l3_compression=setting) as db, db.transaction():
            for key, tensor in tensors.items():
                db.put(key, tensor)
        sizes[f"tierstore l3_compression={setting}: get each"] = disk_usage(store / "l3")
        sizes[f"tierstore l3_compression={setting}: get_many"] = sizes[f"tierstore l3_compression={setting}: get each"]
    store = out / "tierstore-auto-file-each"  # each put its own commit: each large block its own file
    with tierstore.open(store, l2_cache_size=0, l3_compression="auto") as db:
        for key, tensor in tensors.items():
            db.put(key, tensor)
    sizes[f"tierstore l3_compression=auto, {PER_PUT}: get_many"] = disk_usage(store / "l3")
    os.sync()
    return sizes


def verify(label: str, got: list[torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    for tensor, (key, want) in zip(got, tensors.items(), strict=True):
        if not torch.equal(tensor.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            raise AssertionError(f"{label} returned wrong bytes for {key}")


def run(args: argparse.Namespace) -> dict[str, object]:
    tensors = make_tensors(args.count, tuple(args.shape), args.seed)
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    out = Path(tempfile.mkdtemp(prefix="bench-l3-read-", dir=args.dir))
    try:
        sizes = write_all(out, tensors)
        found = variants(out, list(tensors))
        labels = list(found)
        wall: dict[str, list[float]] = {label: [] for label in labels}
        cpu: dict[str, list[float]] = {label: [] for label in labels}
        for round_ in range(args.repeat):
            order = labels[round_ % len(labels):] + labels[:round_ % len(labels)]  # rotated: no fixed neighbour
            for label in order:
                folder, read = found[label]
                drop_page_cache(folder)
                start_cpu, start = cpu_seconds(), time.perf_counter()
                got = read()
                touch(got)
                wall[label].append(time.perf_counter() - start)
                cpu[label].append(cpu_seconds() - start_cpu)
                if round_ < len(labels):
                    verify(label, got, tensors)
                del got
            print(f"[{time.strftime('%H:%M:%S')}] round {round_ + 1}/{args.repeat}", file=sys.stderr, flush=True)
        ref = statistics.median(wall["safetensors: load_file"])
        rows = []
        for label in labels:
            med = statistics.median(wall[label])
            spread = (max(wall[label]) - min(wall[label])) / 2 / med
            rows.append({"variant": label, "median_s": med, "spread": spread, "cpu_s": statistics.median(cpu[label]),
                         "mib_per_s": raw / MiB / med, "vs_load_file": ref / med, "stored_bytes": sizes[label],
                         "raw_over_stored": raw / sizes[label], "samples_s": wall[label]})
        return {"count": args.count, "shape": args.shape, "raw_bytes": raw, "repeat": args.repeat, "rows": rows,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


def table(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, list)
    lines = ["| cold read (materialised) | median s | spread | CPU s | MiB/s | vs load_file | on disk MiB | raw/disk |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['median_s']:.3f} | ±{row['spread']:.0%} | {row['cpu_s']:.2f} | "
                     f"{row['mib_per_s']:,.0f} | {row['vs_load_file']:.2f}x | {row['stored_bytes'] / MiB:.1f} | "
                     f"{row['raw_over_stored']:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--count", type=int, default=8, help="tensors (default 8)")
    parser.add_argument("--shape", type=int, nargs="+", default=[4096, 2048], help="shape of each (16 MiB bf16)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds, medians reported (default 7)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    raw = result["raw_bytes"]
    assert isinstance(raw, int)
    print(f"{args.count} x {' x '.join(map(str, args.shape))} bf16 ({raw / MiB:.0f} MiB), {args.repeat} rounds, "
          f"{result['machine']}, peak RSS {result['peak_rss_mib']:.0f} MiB, {result['date']}\n")
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
