"""The shared tier from the command line: ``publish``, ``pull`` and ``shared ls|stats|verify``.

Credentials come from the usual places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``~/.aws/credentials``), never from the command line; the store remembers its ``shared_url``
and endpoint, and ``--url``/``--endpoint``/``--region`` override them for one command.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .. import open as open_store
from ..config import format_size
from ..errors import ConfigError
from ..progress import BytesColumn, SpeedColumn
from ..shared import SharedCoordinator, SharedVerifyReport
from ..store import TierStore
from ._output import add_json, console, emit, table

__all__ = ["register", "verify_shared_tier", "print_shared_verify"]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"l2_cache_size": 0, "remember_config": False}  # one command's settings, not the store's
    for arg, field in (("url", "shared_url"), ("endpoint", "shared_endpoint"), ("region", "shared_region")):
        if getattr(args, arg, None):
            out[field] = getattr(args, arg)
    return out


@contextmanager
def _bar(label: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A byte progress bar fed by the library's ``progress(done, total)`` callbacks."""
    if quiet:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), BytesColumn(), SpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


def cmd_publish(args: argparse.Namespace) -> int:
    """Upload blocks under PREFIX (and a manifest NAME) to the store's shared tier."""
    with open_store(args.store, readonly=True, **_overrides(args)) as db, \
            _bar(f"publish {args.name or args.prefix or 'all'}", args.json) as progress:
        report = db.publish(args.prefix, name=args.name, progress=progress)
    data = {"name": report.name, "keys": report.keys, "uploaded": report.uploaded, "existing": report.existing,
            "bytes_sent": report.bytes_sent}
    emit(args, data, lambda: table("published", ["what", "value"], [[k, v] for k, v in data.items()]))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Fetch every block of manifest NAME that the store lacks."""
    with open_store(args.store, **_overrides(args)) as db, _bar(f"pull {args.name}", args.json) as progress:
        report = db.pull(args.name, progress=progress)
    data = {"name": report.name, "keys": report.keys, "fetched": report.fetched, "skipped": report.skipped,
            "bytes_received": report.bytes_received}
    emit(args, data, lambda: table("pulled", ["what", "value"], [[k, v] for k, v in data.items()]))
    return 0


def _shared_of(db: TierStore) -> SharedCoordinator:
    if db.shared is None:
        raise ConfigError(f"store {db.path} has no shared tier; give --url s3://bucket/prefix (and --endpoint)")
    return db.shared


def cmd_ls(args: argparse.Namespace) -> int:
    """List the manifests of the shared tier, or the blocks of one."""
    with open_store(args.store, readonly=True, **_overrides(args)) as db:
        shared = _shared_of(db)
        if args.name is None:
            rows: list[dict[str, Any]] = [{"name": name, "size": size} for name, size in shared.manifests()]
            emit(args, rows, lambda: table(f"{shared.tier.url}: {len(rows)} manifests", ["name", "size"],
                                           [[r["name"], format_size(r["size"])] for r in rows]))
            return 0
        info, entries = shared.manifest(args.name)
    blocks: list[dict[str, Any]] = [{"key": key, **header.to_json()} for key, header in entries.items()]
    emit(args, {"manifest": info, "blocks": blocks}, lambda: table(
        f"{args.name}: {len(blocks)} blocks", ["key", "dtype", "shape", "size", "codec", "hash"],
        [[r["key"], r["dtype"], tuple(r["shape"]), format_size(r["nbytes"]), r["codec"], r["hash"][:16]]
         for r in blocks]))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Health of the shared tier and what it holds (objects and bytes per kind)."""
    with open_store(args.store, readonly=True, **_overrides(args)) as db:
        shared = _shared_of(db)
        counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for path, size in shared.objects(""):
            kind = path.split("/", 1)[0]
            counts[kind][0] += 1
            counts[kind][1] += size
        state = shared.stats()
    data = {**state, "objects": {kind: {"count": c, "bytes": b} for kind, (c, b) in counts.items()}}
    emit(args, data, lambda: table(f"shared tier {state['url']}", ["what", "value"], [
        ["endpoint", state["endpoint"] or "(AWS)"], ["state", "degraded" if state["degraded"] else "ok"],
        *[[kind, f"{c} objects, {format_size(b)}"] for kind, (c, b) in sorted(counts.items())]]))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check that every block the manifests list is present and matches its content hash."""
    with open_store(args.store, readonly=True, **_overrides(args)) as db:
        report = db.verify_shared(args.names or None, deep=not args.quick)
    data = {"manifests": report.manifests, "blocks": report.blocks, "problems": report.problems}
    emit(args, data, lambda: table(
        f"shared tier: {report.manifests} manifests, {report.blocks} blocks, {len(report.problems)} problems",
        ["problem"], [[p] for p in report.problems]))
    return 0 if report.ok else 1


def verify_shared_tier(store: str) -> SharedVerifyReport:
    """``tierstore verify --shared``: check the shared tier of ``store`` (blocks fetched and hashed)."""
    with open_store(store, readonly=True, l2_cache_size=0) as db:
        return _shared_of(db).verify()


def print_shared_verify(report: SharedVerifyReport) -> None:
    """The human lines of a shared-tier check."""
    for problem in report.problems:
        console.print(f"[red]shared[/]: {problem}")
    console.print(f"{'ok' if report.ok else 'DAMAGED'}: shared tier, {report.manifests} manifest(s), "
                  f"{report.blocks} block(s), {len(report.problems)} problem(s)")


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="shared tier URL for this command (s3://bucket/prefix)")
    parser.add_argument("--endpoint", help="S3 endpoint for this command (http://host:port)")
    parser.add_argument("--region", help="S3 region for this command")
    add_json(parser)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``publish``, ``pull`` and ``shared ls|stats|verify`` to the ``tierstore`` parser."""
    publish = sub.add_parser("publish", help="upload blocks to the shared tier "
                                             "(example: tierstore publish weights.ts model. --name model/tiny)")
    publish.add_argument("store")
    publish.add_argument("prefix", nargs="?")
    publish.add_argument("--name", help="manifest name other machines pull")
    publish.set_defaults(func=cmd_publish)
    pull = sub.add_parser("pull", help="fetch a published name (example: tierstore pull weights.ts model/tiny)")
    pull.add_argument("store")
    pull.add_argument("name")
    pull.set_defaults(func=cmd_pull)
    group = sub.add_parser("shared", help="look at the shared tier (example: tierstore shared ls weights.ts)")
    inner = group.add_subparsers(dest="shared_command", required=True)
    ls = inner.add_parser("ls", help="manifests, or the blocks of one (tierstore shared ls STORE [NAME])")
    ls.add_argument("store")
    ls.add_argument("name", nargs="?")
    ls.set_defaults(func=cmd_ls)
    stats = inner.add_parser("stats", help="health and object counts (tierstore shared stats STORE)")
    stats.add_argument("store")
    stats.set_defaults(func=cmd_stats)
    verify = inner.add_parser("verify", help="check manifests' blocks (tierstore shared verify STORE [NAME...])")
    verify.add_argument("store")
    verify.add_argument("names", nargs="*")
    verify.add_argument("--quick", action="store_true", help="only check that each block exists")
    verify.set_defaults(func=cmd_verify)
    for command in (publish, pull, ls, stats, verify):
        _connection(command)
