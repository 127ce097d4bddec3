"""Looking at a store: ``ls``, ``info``, ``stats``, ``history``."""

from __future__ import annotations

import argparse
import dataclasses
import time

from .. import open as open_store
from ..activity import access_windows, lifetime_counts, tier_overview
from ..config import format_size
from ..predict import next_access_estimate
from ._output import add_json, block_rows, console, emit, positive, stats_table, table, tier_table, windows_table

__all__ = ["register"]


def cmd_ls(args: argparse.Namespace) -> int:
    """List keys with dtype, shape, size, stored size, tiers and access count (``--shared``: the shared tier)."""
    if args.shared:  # the same listing as ``tierstore shared ls STORE [NAME]``
        from . import shared

        args.name = args.prefix
        return shared.cmd_ls(args)
    with open_store(args.store, readonly=True, l1_cache_size=0, l2_cache_size=0) as db:
        rows = block_rows(db, args.prefix)
    emit(args, rows, lambda: table(f"{args.store}: {len(rows)} blocks",
                                     ["key", "dtype", "shape", "size", "stored", "codec", "tiers", "accesses"],
                                     [[r["key"], r["dtype"], tuple(r["shape"]), format_size(r["nbytes"]),
                                       format_size(r["stored_bytes"]), r["codec"], ",".join(r["tiers"]),
                                       r["accesses"]] for r in rows]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Show everything the catalog knows of one block: its row, statistics, recent history and prediction."""
    with open_store(args.store, readonly=True, l1_cache_size=0, l2_cache_size=0) as db:
        info = db.info(args.key)
        history = db.history(args.key, limit=10)
        stats = db._catalog.block_stats(args.key) or {}
        successors = db.migrator.successors
        likely = [{"key": k, "probability": successors.probability(args.key, k)} for k in successors.likely(args.key)]
    data = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    data["dtype"] = str(info.dtype).removeprefix("torch.")
    data["statistics"] = stats
    data["prediction"] = {**next_access_estimate(int(stats.get("access_count") or 0), stats.get("last_access"),
                                                 stats.get("interarrival_ewma"), time.time()),
                          "prefetches": likely}
    data["recent"] = [{"time": ts, "op": op, "tier": tier} for ts, _, op, tier in history]
    if args.json:
        emit(args, data, lambda: table("", [], []))
        return 0
    nested = ("recent", "statistics", "prediction")
    console.print(table(f"block {args.key!r}", ["field", "value"],
                        [[k, _when(k, v)] for k, v in data.items() if k not in nested]
                        + [[f"stats.{k}", _when(k, v)] for k, v in stats.items()]))
    prediction = data["prediction"]
    due = prediction["due_in"]
    console.print(table("prediction", ["what", "value"], [
        ["next access expected in", "unknown (fewer than two accesses)" if due is None else
         (f"{due:.1f} s" if due >= 0 else f"overdue by {-due:.1f} s ({prediction['overdue_gaps']:.1f} gaps)")],
        ["likely soon", "yes" if prediction["likely_soon"] else "no"],
        ["a get prefetches", ", ".join(f"{p['key']} ({p['probability']:.2f})" for p in likely) or "nothing"],
    ]))
    console.print(table("recent accesses", ["time", "op", "tier"], [
        [time.strftime("%H:%M:%S", time.localtime(float(r["time"] or 0))), r["op"], r["tier"] or ""]
        for r in data["recent"]]))
    return 0


def _when(name: str, value: object) -> object:
    """Timestamps as local date and time, everything else as is."""
    if name in ("last_access", "first_access", "created", "updated") and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if name == "interarrival_ewma" and isinstance(value, float):
        return f"{value:.3g} s"
    return value


def cmd_stats(args: argparse.Namespace) -> int:
    """Show counts, sizes and compression of a store."""
    with open_store(args.store, readonly=True, l1_cache_size=0, l2_cache_size=0) as db:
        stats = db.stats()
        overview, windows = tier_overview(db), access_windows(db._catalog)
        totals = lifetime_counts(db.migrator.catalog)
    # This handle was opened a moment ago with L1 and L2 off: its own counts and capacities say
    # nothing. Show the store's: counts over every run, capacities it was configured with.
    data = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    data.update(totals, hits={**stats.hits, **totals["hits"]}, tier_overview=overview, windows=windows,
                tiers={tier: {**stats.tiers.get(tier, {}), "capacity": row["capacity"], "used": row["used"],
                              "blocks": row["blocks"]} for tier, row in overview.items()}
                | {t: v for t, v in stats.tiers.items() if t not in overview})
    if args.json:
        emit(args, data, lambda: stats_table(stats))
    else:
        for part in (stats_table(stats, totals=totals), tier_table(overview), windows_table(windows)):
            console.print(part)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """Show the access log, newest first."""
    with open_store(args.store, readonly=True, l1_cache_size=0, l2_cache_size=0) as db:
        rows = db.history(args.key, limit=args.limit)
    data = [{"time": ts, "key": key, "op": op, "tier": tier} for ts, key, op, tier in rows]
    emit(args, data, lambda: table("access log", ["time", "key", "op", "tier"], [
        [time.strftime("%H:%M:%S", time.localtime(float(r["time"] or 0))), r["key"], r["op"], r["tier"] or ""]
        for r in data]))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the catalog commands to the ``tierstore`` parser."""
    ls = sub.add_parser("ls", help="list keys (example: tierstore ls weights.ts model.layers.0.)")
    ls.add_argument("store")
    ls.add_argument("prefix", nargs="?", help="a key prefix; with --shared, a manifest name")
    ls.add_argument("--shared", action="store_true",
                    help="list the shared tier's manifests (or, with a name, its blocks) instead")
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
    history.add_argument("--limit", type=positive, default=50, help="newest accesses to show (default 50)")
    history.set_defaults(func=cmd_history)
    for command in (ls, info, stats, history):
        add_json(command)
