"""``tierstore probe``: the hardware optimizer's findings and the configuration it recommends."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .. import open as open_store
from ..config import CacheConfig, format_size
from ..hardware import PRESETS, HardwareFacts, HardwareOptimizer, Recommendation
from ..store import CATALOG_NAME, TierStore
from ._output import add_json, console, emit, table

__all__ = ["register"]

_SIZES = ("l1_cache_size", "l2_cache_size", "l3_cache_size")


def _facts_rows(facts: HardwareFacts) -> list[list[Any]]:
    rows: list[list[Any]] = [
        ["CPU", facts.cpu_model], ["cores", f"{facts.physical_cores} physical, {facts.logical_cores} logical"],
        ["RAM", f"{format_size(facts.ram_available)} available of {format_size(facts.ram_total)}"],
        ["RLIMIT_MEMLOCK", "unlimited" if facts.memlock_limit is None else format_size(facts.memlock_limit)],
        ["disk", f"{format_size(facts.disk_free)} free of {format_size(facts.disk_total)} ({facts.disk_kind})"]]
    for gpu in facts.gpus:
        rows.append([f"GPU {gpu.index}", f"{gpu.name}, {format_size(gpu.free_memory)} free of "
                     f"{format_size(gpu.total_memory)}, sm_{gpu.capability[0]}{gpu.capability[1]}, "
                     f"bf16 {'yes' if gpu.bf16 else 'no (cast to fp16)'}"])
    if not facts.gpus:
        rows.append(["GPU", "none"])
    return rows


def _config_rows(rec: Recommendation) -> list[list[Any]]:
    defaults = CacheConfig()
    rows = []
    for name, value in rec.config.to_dict().items():
        if name in _SIZES or value != getattr(defaults, name):
            rows.append([name, format_size(value) if name in _SIZES and value is not None else value])
    rows += [["compute threads", rec.compute_threads], ["I/O threads", rec.io_threads]]
    return rows


def _probe(args: argparse.Namespace, store: TierStore | None) -> int:
    facts = PRESETS[args.preset] if args.preset else None
    optimizer = HardwareOptimizer(store, facts=facts, disk_path=args.store or ".")
    if args.measure:
        with console.status("measuring disk, memory and codecs"):
            optimizer.measure()
    rec = optimizer.recommend()
    bw = optimizer.bandwidth
    data = {"facts": dataclasses.asdict(optimizer.facts), "bandwidth": None if bw is None else dataclasses.asdict(bw),
            "config": rec.config.to_dict(), "compute_threads": rec.compute_threads, "io_threads": rec.io_threads,
            "notes": list(rec.notes)}
    if args.json:
        emit(args, data, lambda: table("", [], []))
        return 0
    console.print(table("hardware" + (f" (preset {args.preset})" if args.preset else ""), ["what", "value"],
                        _facts_rows(optimizer.facts)))
    if bw is not None:
        rows = [["disk read", f"{format_size(bw.disk_read)}/s"], ["disk write", f"{format_size(bw.disk_write)}/s"],
                ["memcpy", f"{format_size(bw.memcpy)}/s"],
                ["pinned H2D", "no GPU" if bw.h2d_pinned is None else f"{format_size(bw.h2d_pinned)}/s"]]
        rows += [[f"decode {n}", f"{format_size(s)}/s (ratio {bw.ratio[n]:.2f}x)"] for n, s in bw.decode.items()]
        console.print(table("measured", ["what", "value"], rows))
    console.print(table("recommended configuration", ["knob", "value"], _config_rows(rec)))
    for note in rec.notes:
        console.print(f"- {note}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Detect the hardware (and measure it with ``--measure``), then print the recommended config."""
    if args.store is None:
        return _probe(args, None)
    if not (Path(args.store) / CATALOG_NAME).is_file():
        with open_store(args.store, readonly=True):  # raises the usual "no store" error
            pass
    with open_store(args.store, readonly=not args.measure, l2_cache_size=0, remember_config=False) as db:
        return _probe(args, db)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``probe`` to the ``tierstore`` parser."""
    probe = sub.add_parser("probe", help="hardware and the config it calls for (example: tierstore probe --measure)")
    probe.add_argument("store", nargs="?", help="size L3 for this store's disk and cache measurements in it")
    probe.add_argument("--measure", action="store_true",
                       help="measure disk, memcpy, codec and pinned-copy speed now (about a second)")
    probe.add_argument("--preset", choices=sorted(PRESETS), help="recommend for a named machine instead")
    probe.set_defaults(func=cmd_probe)
    add_json(probe)
