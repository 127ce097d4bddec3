#!/usr/bin/env python
"""The engine's hot paths, one process: L2 4 KiB gets, small gets with L2 off, small puts.

    PYTHONPATH=<checkout> python tools/bench_engine.py           # one JSON line of rates per second
    PYTHONPATH=<checkout> python tools/bench_engine.py --cpu     # per CPU-second: median and best pass

Meant to be run alternately against two checkouts (before/after a change of the engine) on the
same machine, each extracted with ``git archive`` so neither moves during the runs: 1,000 x 4 KiB
bf16 blocks; L2 view gets (21 passes), gets with L2 off (row cache, L3 read and checksum; 9
passes), durable puts of all of them in one transaction (``fsync=False``; 7 passes). ``--cpu``
times in CPU seconds (``time.process_time``) and also reports the best pass (``*_best``), which
on a shared machine moves less than wall time; the default is the median wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import tierstore


def passes(fn: Callable[[], object], repeat: int, clock: Callable[[], float]) -> tuple[float, float]:
    """Median and shortest time of ``fn`` over ``repeat`` runs on ``clock`` (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU time, with the best pass of each rate")
    args = parser.parse_args()
    clock = time.process_time if args.cpu else time.perf_counter
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(2048, dtype=torch.bfloat16) for i in range(1000)}
    keys = list(tensors)
    out: dict[str, float] = {}

    def rate(name: str, fn: Callable[[], object], repeat: int) -> None:
        median, best = passes(fn, repeat, clock)
        out[f"{name}_per_s"] = len(keys) / median
        if args.cpu:
            out[f"{name}_best_per_s"] = len(keys) / best

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with tierstore.open(folder / "l2", l2_cache_size="64MiB", fsync=False) as db:
            with db.transaction():
                for key, value in tensors.items():
                    db.put(key, value)
            rate("l2_get", lambda: [db.get(k) for k in keys], 21)
        with tierstore.open(folder / "l3", l2_cache_size=0, fsync=False) as db:
            with db.transaction():
                for key, value in tensors.items():
                    db.put(key, value)
            rate("l3_small_get", lambda: [db.get(k) for k in keys], 9)
            round_ = [0]

            def puts() -> None:
                round_[0] += 1
                with db.transaction():
                    for key, value in tensors.items():
                        db.put(f"{key}.{round_[0] % 3}", value)
            rate("small_put_txn", puts, 7)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
