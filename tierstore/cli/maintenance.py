"""Keeping a store sound and small: ``verify``, ``gc``, ``compact``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .. import open as open_store
from ..config import format_size
from ..errors import StoreNotFoundError
from ..maintenance import MaintenanceReport, disk_usage
from ..store import CATALOG_NAME
from ..verify import verify
from ._output import add_json, console, emit, progress_bar, table
from .shared import print_shared_verify, verify_shared_tier

__all__ = ["register", "DAMAGE_EXIT"]

DAMAGE_EXIT = 2
"""Exit status of ``verify`` when it found damage (or, with ``--fix``, lost blocks or left damage)."""


def cmd_verify(args: argparse.Namespace) -> int:
    """Read every block and check it, then check the files; repair with ``--fix``."""
    with progress_bar("verifying") as update:
        report = verify(args.store, fix=args.fix, progress=update)
    shared = verify_shared_tier(args.store) if args.shared else None  # the bucket's blocks too
    data: dict[str, Any] = {
        "path": report.path, "schema_version": report.schema_version, "blocks": report.blocks,
        "bytes_checked": report.bytes_checked, "ok": report.ok, "counts": report.by_kind(),
        "problems": [dataclasses.asdict(p) for p in report.problems], "fixed": report.fixed,
        "repaired": report.repaired, "lost": report.lost,
        "remaining": [dataclasses.asdict(p) for p in report.remaining]}
    if shared is not None:
        data["shared"] = {"manifests": shared.manifests, "blocks": shared.blocks, "problems": shared.problems}
    if args.json:
        emit(args, data, lambda: table("", [], []))
    else:
        if report.problems:
            console.print(table(f"{len(report.problems)} problem(s) in {report.path}", ["kind", "what", "detail"],
                                [[p.kind, p.subject, p.detail] for p in report.problems]))
        for line in report.repaired:
            console.print(f"repaired: {line}")
        if report.lost:
            console.print(f"[bold red]LOST {len(report.lost)} block(s)[/] (their bytes were damaged or gone; "
                          f"restore them from elsewhere): {', '.join(report.lost)}")
        for p in report.remaining:
            console.print(f"[red]still wrong[/]: {p.kind} {p.subject}: {p.detail}")
        state = "ok" if report.ok and not report.problems else ("repaired" if report.ok else "DAMAGED")
        console.print(f"{state}: checked {report.blocks} blocks ({format_size(report.bytes_checked)}), "
                      f"schema version {report.schema_version}, {len(report.problems)} problem(s) found")
        if shared is not None:
            print_shared_verify(shared)
    return 0 if report.ok and not report.lost and (shared is None or shared.ok) else DAMAGE_EXIT


def _maintain(args: argparse.Namespace, what: str) -> int:
    store_dir = Path(args.store)
    if not (store_dir / CATALOG_NAME).is_file():  # an error here, not a new empty store
        raise StoreNotFoundError(f"no tierstore store at {store_dir} (no {CATALOG_NAME})", path=str(store_dir))
    before = disk_usage(store_dir / "l3")
    # L2 off for this one pass, the store's own sizes kept; opening runs recovery: orphans of a crash go first
    with open_store(store_dir, l2_cache_size=0, remember_config=False) as db:
        recovered = len(db.recovery.removed_files) + len(db.recovery.truncated)
        if what == "compact":
            with progress_bar("compacting") as update:
                report: MaintenanceReport = db.compact(min_fill=args.min_fill, progress=update)
        else:
            report = db.gc()
    after = disk_usage(store_dir / "l3")
    data = {"reclaimed_bytes": before - after, "bytes_before": before, "bytes_after": after,
            "shards_rewritten": report.shards_rewritten, "blocks_moved": report.blocks_moved,
            "files_removed": report.files_removed + recovered, "skipped": list(report.skipped)}
    emit(args, data, lambda: table(f"{what} {store_dir}", ["what", "value"], [
        ["reclaimed", format_size(before - after)], ["L3 before", format_size(before)],
        ["L3 after", format_size(after)], ["shards rewritten", report.shards_rewritten],
        ["blocks moved", report.blocks_moved], ["files removed", data["files_removed"]],
        *([["skipped (damaged)", "; ".join(report.skipped)]] if report.skipped else [])]))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Delete pack files no block points at any more (and what a crash left behind)."""
    return _maintain(args, "gc")


def cmd_compact(args: argparse.Namespace) -> int:
    """Rewrite sparse packs and delete the old files."""
    return _maintain(args, "compact")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the maintenance commands to the ``tierstore`` parser."""
    check = sub.add_parser("verify", help="check every block and file (example: tierstore verify weights.ts --fix)")
    check.add_argument("store")
    check.add_argument("--fix", action="store_true",
                       help="repair: drop damaged blocks (listed as lost), remove orphans and leftovers")
    check.add_argument("--shared", action="store_true",
                       help="also check that every block the shared tier's manifests list is there and intact")
    check.set_defaults(func=cmd_verify)
    gc = sub.add_parser("gc", help="delete unused pack files (example: tierstore gc weights.ts)")
    gc.add_argument("store")
    gc.set_defaults(func=cmd_gc)
    compact = sub.add_parser("compact", help="rewrite sparse packs (example: tierstore compact weights.ts)")
    compact.add_argument("store")
    compact.add_argument("--min-fill", type=float, default=0.5,
                         help="rewrite pack shards whose live share is below this (default 0.5)")
    compact.set_defaults(func=cmd_compact)
    for command in (check, gc, compact):
        add_json(command)
