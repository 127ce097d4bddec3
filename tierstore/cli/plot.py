"""``tierstore plot``: tier use and hit rate over time, and a heat map of accesses, as a PNG."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

import numpy as np

from .. import open as open_store
from ..config import format_size
from ..reports.activity import Timeline, timeline
from ._output import console

__all__ = ["register", "draw"]


def draw(line: Timeline, path: str, *, title: str, width: float, height: float, dpi: int) -> None:
    """Render ``line`` to a PNG of ``width * dpi`` by ``height * dpi`` pixels (matplotlib, Agg, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    served, occupancy, heat = fig.subplots(3, 1, gridspec_kw={"height_ratios": [2, 2, 3]})
    centers = (line.edges[:-1] + line.edges[1:]) / 2
    span = float(line.edges[-1] - line.edges[0])
    x = centers - line.edges[0]
    step = span / max(1, len(centers))
    bottom = np.zeros(len(centers))
    for tier, colour in (("L1", "tab:green"), ("L2", "tab:blue"), ("L3", "tab:orange")):
        served.bar(x, line.served[tier], width=step, bottom=bottom, color=colour, label=f"gets from {tier}")
        bottom = bottom + line.served[tier]
    served.set_ylabel("gets per interval")
    rate = served.twinx()
    rate.plot(x, line.hit_rate * 100, color="black", marker=".", label="memory hit rate")
    rate.set_ylim(0, 105)
    rate.set_ylabel("hit rate (L1+L2), %")
    served.legend(loc="upper left", fontsize="small")
    served.set_title(title)
    occupancy.step(x, line.blocks, where="mid", color="tab:purple")
    occupancy.set_ylabel("blocks stored")
    sizes = occupancy.twinx()
    sizes.step(x, line.logical_bytes / (1 << 20), where="mid", color="tab:gray", linestyle="--")
    sizes.set_ylabel("MiB stored (raw)")
    started = datetime.datetime.fromtimestamp(float(line.edges[0])).strftime("%Y-%m-%d %H:%M:%S")
    for axis in (served, occupancy):
        axis.set_xlim(0, max(span, 1e-3))
        axis.set_xlabel(f"seconds since {started}")
    if len(line.heat_keys):
        image = heat.imshow(line.heat, aspect="auto", interpolation="nearest", cmap="inferno",
                            extent=(0.0, max(span, 1e-3), len(line.heat_keys) - 0.5, -0.5))
        heat.set_yticks(range(len(line.heat_keys)))
        heat.set_yticklabels([k if len(k) <= 40 else "..." + k[-37:] for k in line.heat_keys], fontsize=6)
        fig.colorbar(image, ax=heat, label="accesses per interval", orientation="horizontal", fraction=0.04,
                     pad=0.2)
    heat.set_title(f"accesses of the {len(line.heat_keys)} most used keys")
    heat.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw tier use, hit rate and an access heat map from the store's access log."""
    with open_store(args.store, readonly=True, l1_cache_size=0, l2_cache_size=0) as db:
        line = timeline(db.catalog, bins=args.bins, top=args.top)
        stats: Any = db.stats()
    draw(line, args.output, title=f"{args.store}: {stats.blocks} blocks, {format_size(stats.logical_bytes)}",
         width=args.width, height=args.height, dpi=args.dpi)
    console.print(f"wrote {args.output} ({int(sum(v.sum() for v in line.served.values()))} gets, "
                  f"{len(line.heat_keys)} keys in the heat map)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plot`` to the ``tierstore`` parser."""
    plot = sub.add_parser("plot", help="charts of the access log (example: tierstore plot weights.ts -o use.png)")
    plot.add_argument("store")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    plot.add_argument("--bins", type=int, default=60, help="time intervals (default 60)")
    plot.add_argument("--top", type=int, default=30, help="keys in the heat map (default 30)")
    plot.add_argument("--width", type=float, default=12.0, help="inches (default 12)")
    plot.add_argument("--height", type=float, default=10.0, help="inches (default 10)")
    plot.add_argument("--dpi", type=int, default=100)
    plot.set_defaults(func=cmd_plot, json=False)
