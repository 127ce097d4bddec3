"""The ``tierstore`` command: a thin mirror of the library, one command one call.

Examples::

    tierstore demo                      # put and get tensors in a temporary store, show the catalog
    tierstore ls STORE [PREFIX]         # keys with dtype, shape, sizes, tiers
    tierstore info STORE KEY            # everything the catalog knows of one block
    tierstore stats STORE               # counts, sizes, compression
    tierstore history STORE [KEY]       # the access log, newest first

Every listing command takes ``--json``. Errors are printed as one line and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from . import open as open_store
from .config import format_size
from .errors import TierStoreError
from .store import TierStore

__all__ = ["main"]

console = Console(width=None if sys.stdout.isatty() else 160)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, justify="right" if name in ("size", "stored", "ratio", "accesses") else "left")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    return table


def _emit(args: argparse.Namespace, data: Any, render: Callable[[], Table]) -> None:
    if args.json:
        print(json.dumps(data, indent=1, default=str))
    else:
        console.print(render())


def _block_rows(db: TierStore, prefix: str | None) -> list[dict[str, Any]]:
    rows = []
    for key in db.keys(prefix=prefix):
        info = db.info(key)
        rows.append({"key": key, "dtype": str(info.dtype).removeprefix("torch."), "shape": list(info.shape),
                     "nbytes": info.nbytes, "stored_bytes": info.stored_bytes, "codec": info.codec,
                     "tiers": list(info.tiers), "accesses": info.access_count})
    return rows


def cmd_ls(args: argparse.Namespace) -> int:
    """List keys with dtype, shape, size, stored size, tiers and access count."""
    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        rows = _block_rows(db, args.prefix)
    _emit(args, rows, lambda: _table(f"{args.store}: {len(rows)} blocks",
                                     ["key", "dtype", "shape", "size", "stored", "codec", "tiers", "accesses"],
                                     [[r["key"], r["dtype"], tuple(r["shape"]), format_size(r["nbytes"]),
                                       format_size(r["stored_bytes"]), r["codec"], ",".join(r["tiers"]),
                                       r["accesses"]] for r in rows]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Show everything the catalog knows of one block."""
    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        info = db.info(args.key)
        history = db.history(args.key, limit=10)
    data = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    data["dtype"] = str(info.dtype).removeprefix("torch.")
    data["recent"] = [{"time": ts, "op": op, "tier": tier} for ts, _, op, tier in history]
    _emit(args, data, lambda: _table(f"block {args.key!r}", ["field", "value"],
                                     [[k, v] for k, v in data.items() if k != "recent"]))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Show counts, sizes and compression of a store."""
    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        stats = db.stats()
    data = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    _emit(args, data, lambda: _stats_table(stats))
    return 0


def _stats_table(stats: Any) -> Table:
    return _table(f"store {stats.path}", ["what", "value"], [
        ["blocks", stats.blocks], ["logical size", format_size(stats.logical_bytes)],
        ["stored in L3", format_size(stats.stored_bytes)], ["compression", f"{stats.compression_ratio:.2f}x"],
        ["gets / puts / deletes", f"{stats.gets} / {stats.puts} / {stats.deletes}"],
        ["hits L1 / L2 / L3", " / ".join(str(stats.hits[t]) for t in ("L1", "L2", "L3"))],
    ])


def cmd_history(args: argparse.Namespace) -> int:
    """Show the access log, newest first."""
    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        rows = db.history(args.key, limit=args.limit)
    data = [{"time": ts, "key": key, "op": op, "tier": tier} for ts, key, op, tier in rows]
    _emit(args, data, lambda: _table("access log", ["time", "key", "op", "tier"], [
        [time.strftime("%H:%M:%S", time.localtime(float(r["time"] or 0))), r["key"], r["op"], r["tier"] or ""]
        for r in data]))
    return 0


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
        console.print(_table(f"demo store at {folder}", ["key", "dtype", "shape", "size", "stored", "codec",
                                                          "tiers", "accesses"],
                             [[r["key"], r["dtype"], tuple(r["shape"]), format_size(r["nbytes"]),
                               format_size(r["stored_bytes"]), r["codec"], ",".join(r["tiers"]), r["accesses"]]
                              for r in _block_rows(db, None)]))
        console.print(_table("reading every block twice", ["pass", "time", "L1 hits", "L2 hits", "L3 reads"],
                             passes))
        stats = db.stats()
        console.print(_stats_table(stats))
        console.print(f"wrote {format_size(stats.logical_bytes)} durably in {wrote * 1e3:.0f} ms; stored "
                      f"{format_size(stats.stored_bytes)} ({stats.compression_ratio:.2f}x smaller)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierstore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="put and get tensors in a temporary store and show the catalog")
    demo.add_argument("--store", help="use this store folder instead of a temporary one")
    demo.set_defaults(func=cmd_demo, json=False)
    ls = sub.add_parser("ls", help="list keys (example: tierstore ls weights.ts model.layers.0.)")
    ls.add_argument("store")
    ls.add_argument("prefix", nargs="?")
    ls.set_defaults(func=cmd_ls)
    info = sub.add_parser("info", help="one block (example: tierstore info weights.ts lm_head.weight)")
    info.add_argument("store")
    info.add_argument("key")
    info.set_defaults(func=cmd_info)
    stats = sub.add_parser("stats", help="counts and sizes (example: tierstore stats weights.ts)")
    stats.add_argument("store")
    stats.set_defaults(func=cmd_stats)
    history = sub.add_parser("history", help="access log (example: tierstore history weights.ts --limit 20)")
    history.add_argument("store")
    history.add_argument("key", nargs="?")
    history.add_argument("--limit", type=int, default=50)
    history.set_defaults(func=cmd_history)
    for command in (ls, info, stats, history):
        command.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tierstore`` command."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyError as exc:  # BlockNotFoundError and friends
        print(f"tierstore: {exc}", file=sys.stderr)
        return 1
    except TierStoreError as exc:
        print(f"tierstore: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
