"""What every command shares: the console, tables, ``--json`` output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..config import format_size
from ..progress import BytesColumn
from ..store import TierStore

__all__ = ["console", "table", "emit", "block_rows", "stats_table", "add_json", "positive", "progress_bar",
           "tier_table", "windows_table"]

console = Console(width=None if sys.stdout.isatty() else 100)  # piped or captured: what a terminal of 100 shows

_RIGHT = frozenset({"size", "stored", "ratio", "accesses", "used", "free", "capacity", "blocks", "hits"})


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A rich table; numeric-looking columns are right-aligned."""
    out = Table(title=title, title_justify="left")
    for name in columns:
        out.add_column(name, justify="right" if name in _RIGHT else "left")
    for row in rows:
        out.add_row(*(str(v) for v in row))
    return out


def emit(args: argparse.Namespace, data: Any, render: Callable[[], Table]) -> None:
    """Print ``data`` as JSON when ``--json`` was given, else the table ``render()`` builds."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=1, default=str))
    else:
        console.print(render())


def add_json(parser: argparse.ArgumentParser) -> None:
    """Give a listing command its ``--json`` flag."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def block_rows(db: TierStore, prefix: str | None) -> list[dict[str, Any]]:
    """One dict per key under ``prefix``: what ``ls`` shows."""
    rows = []
    for key in db.keys(prefix=prefix):
        info = db.info(key)
        rows.append({"key": key, "dtype": str(info.dtype).removeprefix("torch."), "shape": list(info.shape),
                     "nbytes": info.nbytes, "stored_bytes": info.stored_bytes, "codec": info.codec,
                     "tiers": list(info.tiers), "accesses": info.access_count})
    return rows


def stats_table(stats: Any, totals: dict[str, Any] | None = None) -> Table:
    """The ``stats`` table of a :class:`StoreStats`: this handle's counts, or ``totals`` over every run
    (``tierstore.activity.lifetime_counts``) where given."""
    counts = totals if totals is not None else {"gets": stats.gets, "puts": stats.puts, "deletes": stats.deletes,
                                                "hits": stats.hits}
    when = " (all runs)" if totals is not None else " (this run)"
    return table(f"store {stats.path}", ["what", "value"], [
        ["blocks", stats.blocks], ["logical size", format_size(stats.logical_bytes)],
        ["stored in L3", format_size(stats.stored_bytes)], ["compression", f"{stats.compression_ratio:.2f}x"],
        ["gets / puts / deletes" + when, f"{counts['gets']} / {counts['puts']} / {counts['deletes']}"],
        ["hits L1 / L2 / L3" + when, " / ".join(str(counts["hits"][t]) for t in ("L1", "L2", "L3"))],
        *_shared_rows(stats.tiers.get("shared"), stats.hits.get("shared", 0)),
    ])


@contextmanager
def progress_bar(what: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr (shown only on a terminal); yields ``update(done, total)`` in bytes."""
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), BytesColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _size_or_dash(value: Any) -> str:
    return "-" if value is None else format_size(value)


def tier_table(overview: dict[str, dict[str, Any]]) -> Table:
    """Per-tier capacity, use, hit rate and moves (``tierstore.activity.tier_overview``)."""
    rows = []
    for tier, row in overview.items():
        rate = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.1%}"
        extra = (f"compression {row['compression_ratio']:.2f}x, fragmentation {row['fragmentation']:.1%} "
                 f"({format_size(row['dead_bytes'])} reclaimable)") if tier == "L3" else \
            f"promotions {row['promotions']}, demotions {row['demotions']}"
        rows.append([tier, _capacity(tier, row["capacity"]), _size_or_dash(row["used"]),
                     "-" if row["blocks"] is None else row["blocks"], rate, extra])
    return table("tiers", ["tier", "capacity", "used", "blocks", "hit rate", "moves / L3"], rows)


def _capacity(tier: str, capacity: int | None) -> str:
    if tier == "L1" and (capacity == 0 or not torch.cuda.is_available()):
        return "off"  # no GPU here, or L1 turned off: "auto" would promise a tier that does not exist
    if capacity is None:
        return "auto" if tier == "L1" else "disk"
    return format_size(capacity)


def windows_table(windows: dict[str, dict[str, int]]) -> Table:
    """Accesses in the last minute, hour and day (``tierstore.activity.access_windows``)."""
    return table("accesses", ["window", "gets", "puts", "deletes", "from L1", "from L2", "from L3"],
                 [[name, w["get"], w["put"], w["delete"], w["L1"], w["L2"], w["L3"]] for name, w in windows.items()])


def _shared_rows(shared: dict[str, Any] | None, hits: int) -> list[list[Any]]:
    """The shared tier's lines of ``stats`` (none without one)."""
    if shared is None:
        return []
    state = f"degraded: {shared['last_error']}" if shared["degraded"] else "ok"
    return [["shared tier", shared["url"]], ["shared state", state],
            ["shared hits / published / queued", f"{hits} / {shared['published']} / {shared['queued']}"]]
