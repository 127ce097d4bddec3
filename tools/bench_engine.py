#!/usr/bin/env python
"""The engine's hot paths, one process, medians: L2 4 KiB gets, small gets with L2 off, small puts.

    PYTHONPATH=<checkout> python tools/bench_engine.py        # one JSON line of rates per second

Meant to be run alternately against two checkouts (before/after a change of the engine) on the
same machine: 1,000 x 4 KiB bf16 blocks; L2 view gets (median of 15 passes), gets with L2 off
(row cache, L3 read and checksum; median of 7), durable puts of all of them in one transaction
(``fsync=False``; median of 5).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from bench_l2 import median_time  # tools/ is on sys.path when run as a script

import tierstore


def main() -> None:
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(2048, dtype=torch.bfloat16) for i in range(1000)}
    keys = list(tensors)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with tierstore.open(folder / "l2", l2_cache_size="64MiB", fsync=False) as db:
            with db.transaction():
                for key, value in tensors.items():
                    db.put(key, value)
            out["l2_get_per_s"] = len(keys) / median_time(lambda: [db.get(k) for k in keys], 15)
        with tierstore.open(folder / "l3", l2_cache_size=0, fsync=False) as db:
            with db.transaction():
                for key, value in tensors.items():
                    db.put(key, value)
            out["l3_small_get_per_s"] = len(keys) / median_time(lambda: [db.get(k) for k in keys], 7)
            round_ = [0]

            def puts() -> None:
                round_[0] += 1
                with db.transaction():
                    for key, value in tensors.items():
                        db.put(f"{key}.{round_[0] % 3}", value)
            out["small_put_txn_per_s"] = len(keys) / median_time(puts, 5)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
