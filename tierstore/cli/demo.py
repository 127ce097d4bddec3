"""``tierstore demo``: the README's main job."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .. import open as open_store
from ..config import format_size
from ._output import block_rows, console, stats_table, table

__all__ = ["register"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Put tensors in a store (a temporary one by default), read them cold and warm, show tiers and hits."""
    folder = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="tierstore-demo-")) / "store"
    with open_store(folder, l2_cache_size="64MiB") as db:
        start = time.perf_counter()
        with db.transaction():
            for layer in range(4):
                db.put(f"model.layers.{layer}.mlp.weight", torch.randn(1024, 1024, dtype=torch.bfloat16))
                db.put(f"model.layers.{layer}.norm.weight", torch.ones(1024, dtype=torch.bfloat16))
        wrote = time.perf_counter() - start
    passes = []
    with open_store(folder) as db:  # a new process would start here: L2 empty, everything on disk
        for name in ("cold (from L3)", "warm (from L2)"):
            before = dict(db.stats().hits)
            start = time.perf_counter()
            for key in db:
                db.get(key)
            seconds = time.perf_counter() - start
            hits = {tier: n - before[tier] for tier, n in db.stats().hits.items()}
            passes.append([name, f"{seconds * 1e3:.1f} ms", *(hits[t] for t in ("L1", "L2", "L3"))])
        db.flush()
        console.print(table(f"demo store at {folder}", ["key", "dtype", "shape", "size", "stored", "codec",
                                                          "tiers", "accesses"],
                             [[r["key"], r["dtype"], tuple(r["shape"]), format_size(r["nbytes"]),
                               format_size(r["stored_bytes"]), r["codec"], ",".join(r["tiers"]), r["accesses"]]
                              for r in block_rows(db, None)]))
        console.print(table("reading every block twice", ["pass", "time", "L1 hits", "L2 hits", "L3 reads"],
                             passes))
        stats = db.stats()
        console.print(stats_table(stats))
        console.print(f"wrote {format_size(stats.logical_bytes)} durably in {wrote * 1e3:.0f} ms; stored "
                      f"{format_size(stats.stored_bytes)} ({stats.compression_ratio:.2f}x smaller)")
    return 0



def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the ``tierstore`` parser."""
    demo = sub.add_parser("demo", help="put and get tensors in a temporary store and show the catalog")
    demo.add_argument("--store", help="use this store folder instead of a temporary one")
    demo.set_defaults(func=cmd_demo, json=False)
