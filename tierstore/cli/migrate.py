"""The migrator's view of a store: ``journal`` (moves in flight) and ``successors`` (what it prefetches)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .. import open as open_store
from ._output import add_json, emit, positive, table

__all__ = ["register"]


def cmd_journal(args: argparse.Namespace) -> int:
    """List tier moves recorded as in flight (empty unless a writer is moving blocks or crashed)."""
    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        rows = db.migrator.catalog.journal_rows()
    data: list[dict[str, Any]] = [
        {"id": i, "block_id": b, "key": k, "op": op, "src": s, "dst": d, "state": st, "created": c}
        for i, b, k, op, s, d, st, c in rows]
    emit(args, data, lambda: table(f"{args.store}: {len(data)} moves in flight (the next read-write open undoes them)",
                                     ["key", "op", "from", "to", "state", "since"],
                                     [[r["key"], r["op"], r["src"], r["dst"], r["state"],
                                       time.strftime("%H:%M:%S", time.localtime(float(r["created"])))]
                                      for r in data]))
    return 0


def cmd_successors(args: argparse.Namespace) -> int:
    """Show the blocks most often read right after KEY, and which of them a get of KEY prefetches."""
    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        db.info(args.key)  # BlockNotFoundError for a key the store does not hold: an empty table would mislead
        table_ = db.migrator.successors
        likely = set(table_.likely(args.key))
        threshold = table_.threshold
        rows = [{"next_key": b, "count": n, "probability": table_.probability(args.key, b), "prefetched": b in likely}
                for a, b, n in db.migrator.catalog.successor_counts(1 << 30) if a == args.key][:args.limit]
    emit(args, rows, lambda: table(f"after {args.key!r} (prefetch at probability >= {threshold:g})",
                                     ["next_key", "count", "probability", "prefetched"],
                                     [[r["next_key"], r["count"], f"{r['probability']:.2f}",
                                       "yes" if r["prefetched"] else ""] for r in rows]))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the migrator commands to the ``tierstore`` parser."""
    journal = sub.add_parser("journal", help="tier moves in flight (example: tierstore journal weights.ts)")
    journal.add_argument("store")
    journal.set_defaults(func=cmd_journal)
    successors = sub.add_parser("successors",
                                help="blocks read after KEY (example: tierstore successors weights.ts layers.0.w)")
    successors.add_argument("store")
    successors.add_argument("key")
    successors.add_argument("--limit", type=positive, default=20, help="rows to show (default 20)")
    successors.set_defaults(func=cmd_successors)
    for command in (journal, successors):
        add_json(command)
