#!/usr/bin/env python
"""Sweep the ``kv`` policy's switch rule (``switch_cost``, score ``window``) over the shared traces.

    python tools/kv_switch_sweep.py > sweep.jsonl

One JSON line per trace and capacity (1/5/10/25% of the replayed part's unique keys): the hit rates
of ARC, S3-FIFO and W-TinyLFU (``replay_policies``) and of
:class:`tierstore.predict.kv_policy.KVPolicy` (compiled replay) at each ``(switch_cost, window
multiple)`` in ``VARIANTS``; ``c4w1`` is the policy's default. The long object traces are cut
(``TRACES``) to keep a sweep to a few minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import replay_policies  # tools/ is on sys.path when run as a script
from replay_formats import read_trace

from tierstore.predict.kv_policy import KVPolicy

TRACES = Path("/work/shared/traces")
CUTS: list[tuple[str, int | None]] = [
    ("synthetic_trace.jsonl", None), ("cloudPhysicsIO.csv", None), ("scarab-recs.trace.xz", 400_000),
    ("web07.trace.xz", 500_000), ("orm-busy.trace.xz", 500_000), ("2_pools.trace.gz", None),
    ("scan.trace.gz", None), ("loop.trace.gz", None), ("multi2.trace.gz", None)]
VARIANTS = [(4.0, 1), (1.0, 1), (1.0, 4), (2.0, 4), (4.0, 4)]
"""(switch cost in misses per key the tier lacks, score window as a multiple of the default)."""
CHUNK = 65536


def main() -> None:
    for name, limit in CUTS:
        trace = read_trace(TRACES / name, None, limit)
        _, dense = np.unique(trace.keys, return_inverse=True)
        keys = dense.astype(np.int64).tolist()
        unique = int(dense.max()) + 1
        for share in (1, 5, 10, 25):
            capacity = max(1, unique * share // 100)
            row: dict[str, object] = {"trace": name, "limit": limit, "capacity_pct": share}
            for ref in ("arc", "s3fifo", "wtinylfu"):
                hits = getattr(replay_policies, ref)(keys, unique, capacity, lambda _done: None)
                row[ref] = round(sum(hits) / len(keys), 4)
            for cost, multiple in VARIANTS:
                policy: KVPolicy[int] = KVPolicy(capacity, compiled=True, switch_cost=cost,
                                                 window=multiple * max(8192, 16 * capacity))
                hit = sum(sum(policy.simulate(keys[s:s + CHUNK])) for s in range(0, len(keys), CHUNK))
                row[f"c{cost:g}w{multiple}"] = round(hit / len(keys), 4)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
