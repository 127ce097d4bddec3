"""Turn ``tools/replay.py --json`` outputs into the markdown tables of ``tools/replay_results.md``.

    python tools/replay.py web07.trace.xz --json > out/web07.json        # one per trace
    python tools/replay.py synthetic_trace.jsonl --json --prefix-aware --policy predictive > out/prefix.json
    python tools/replay_report.py out/*.json --prefix out/prefix.json --before old_results.md

Files for the same trace are merged (so the classic policies and the predictive one may come from
separate runs). ``--before`` reads the predictive hit rates of an earlier results file, to show
before/after. "best classic" is the best of LRU, FIFO, LFU, ARC, S3-FIFO and W-TinyLFU; ">=" allows
0.0005 of rounding.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLASSICS = ("lru", "fifo", "lfu", "arc", "s3fifo", "wtinylfu")
NAMES = {"synthetic_trace.jsonl": "synthetic (Mooncake)", "cloudPhysicsIO.csv": "cloudPhysicsIO"}
ORDER = ("lru", "fifo", "lfu", "arc", "s3fifo", "wtinylfu", "opt", "predictive", "kv")
TOLERANCE = 0.0005


def short(trace: str) -> str:
    """The table name of a trace file."""
    return NAMES.get(trace, trace.split(".")[0])


def merge(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Per trace: hit rates, prefix hit rates and speeds of every policy found in ``paths``."""
    traces: dict[str, dict[str, Any]] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        entry = traces.setdefault(doc["trace"], {"accesses": doc["accesses"], "unique": doc["unique"],
                                                 "results": {}, "prefix": {}, "speed": {}})
        entry["results"].update(doc["results"])
        entry["prefix"].update(doc.get("prefix_results", {}))
        entry["speed"].update(doc.get("accesses_per_second", {}))
    return traces


def read_before(path: Path) -> dict[tuple[str, str], float]:
    """(trace name, capacity) -> predictive hit rate from an earlier results file's main table."""
    before: dict[tuple[str, str], float] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"\d+%", cells[1]) and cells[4].startswith("**"):
            before[(cells[0], cells[1])] = float(cells[4].strip("*"))
    return before


def hit_table(traces: dict[str, dict[str, Any]], before: dict[tuple[str, str], float]) -> tuple[str, list[str]]:
    """The main table, and the cells where predictive falls short of the best classic."""
    head = ["trace", "cap", "LRU", "best classic", "predictive", "OPT", "pred >= best", "pred - best"]
    if before:
        head.append("predictive before")
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    short_of: list[str] = []
    for trace, entry in traces.items():
        results = entry["results"]
        if "predictive" not in results:
            continue
        name = short(trace)
        for cap, pred in results["predictive"].items():
            best_name = max((c for c in CLASSICS if c in results), key=lambda c: results[c][cap])
            best = results[best_name][cap]
            lru, opt = results["lru"][cap], results["opt"][cap]
            ok = pred >= best - TOLERANCE
            if not ok:
                short_of.append(f"{name} {cap} ({pred - best:+.3f} vs {best_name})")
            note = ""
            if trace.startswith("synthetic") and opt > lru:
                note = (f"closes {(pred - lru) / (opt - lru):.1%} of the LRU->OPT gap "
                        f"(best classic: {(best - lru) / (opt - lru):.1%})")
            elif name in ("loop", "scan") and opt > 0:
                note = f"predictive/OPT = {pred / opt:.2f}"
            row = [name, cap, f"{lru:.3f}", f"{best:.3f} {best_name}", f"**{pred:.3f}**", f"{opt:.3f}",
                   "yes" if ok else "**no**", f"{pred - best:+.3f}"]
            if before:
                was = before.get((name, cap))
                row.append("" if was is None else f"{was:.3f}")
            row.append(note)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), short_of


def prefix_table(traces: dict[str, dict[str, Any]], prefix: dict[str, Any] | None) -> str:
    """Mooncake's prefix-aware hit rates, with the chain-aware predictive run as a last row."""
    entry = next((e for t, e in traces.items() if t.startswith("synthetic") and e["prefix"]), None)
    if entry is None:
        return ""
    caps = list(next(iter(entry["prefix"].values())).keys())
    lines = ["| policy | " + " | ".join(caps) + " |", "|" + " --- |" * (len(caps) + 1)]
    for name in ORDER:
        if name in entry["prefix"]:
            lines.append(f"| {name} | " + " | ".join(f"{entry['prefix'][name][c]:.3f}" for c in caps) + " |")
    for name in ("predictive", "kv") if prefix is not None else ():
        if prefix is None or name not in prefix["prefix_results"]:
            continue
        rates = prefix["prefix_results"][name]
        plain = prefix["results"][name]
        lines.append(f"| {name} --prefix-aware | " + " | ".join(f"{rates[c]:.3f}" for c in caps) + " |")
        lines.append(f"| {name} --prefix-aware (plain hit rate) | "
                     + " | ".join(f"{plain[c]:.3f}" for c in caps) + " |")
    return "\n".join(lines)


def speed_table(traces: dict[str, dict[str, Any]]) -> str:
    """Accesses per second of every policy, all capacities together."""
    lines = ["| trace | " + " | ".join(ORDER) + " | predictive / lru |", "|" + " --- |" * (len(ORDER) + 2)]
    for trace, entry in traces.items():
        speed = entry["speed"]
        cells = [f"{speed[n] / 1e3:.0f}k" if n in speed else "" for n in ORDER]
        ratio = f"{speed['predictive'] / speed['lru']:.2f}" if "predictive" in speed and "lru" in speed else ""
        lines.append(f"| {short(trace)} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, nargs="+", help="replay.py --json outputs")
    parser.add_argument("--prefix", type=Path, default=None, help="a --prefix-aware predictive run (Mooncake)")
    parser.add_argument("--before", type=Path, default=None, help="an earlier replay_results.md")
    args = parser.parse_args(argv)
    traces = merge(args.files)
    before = read_before(args.before) if args.before else {}
    table, short_of = hit_table(traces, before)
    cells = sum(len(e["results"].get("predictive", {})) for e in traces.values())
    print("## Hit rate\n\n" + table + "\n")
    print(f"predictive >= best classic in {cells - len(short_of)} of {cells} cells"
          + (f"; it falls short in: {'; '.join(short_of)}." if short_of else ".") + "\n")
    prefix = json.loads(args.prefix.read_text()) if args.prefix else None
    mooncake = prefix_table(traces, prefix)
    if mooncake:
        print("## Mooncake, prefix-aware hit rate\n\n" + mooncake + "\n")
    print("## Throughput (accesses/s, all capacities together)\n\n" + speed_table(traces))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
