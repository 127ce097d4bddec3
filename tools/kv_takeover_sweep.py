#!/usr/bin/env python
"""Sweep the ``kv`` policy's takeover rule (margin, epochs) over the shared traces.

    python tools/kv_takeover_sweep.py [--variants off,0.02:8,...] [--traces synthetic,cloudPhysicsIO] > sweep.jsonl

One JSON line per trace, capacity (1/5/10/25% of the replayed part's unique keys) and scoring: the
hit rates of the classic policies (LRU, ARC, S3-FIFO, W-TinyLFU from ``replay_policies``; LIRS by
its shadow, ``ShadowLIRS``; FIFO and LFU are never the best on these cuts and are left out) and of
:class:`tierstore.predict.kv_policy.KVPolicy` (compiled replay, default switch rule) at each
takeover variant: ``off`` (no takeover, the policy before it) or ``MARGIN:EPOCHS[:NOISE]``
(:class:`tierstore.predict.takeover.TakeoverRule`), with its takeovers and the keys they loaded.
Request traces (Mooncake) are scored twice: ``plain`` (hit rate, no parents) and ``prefix``
(parents told, a request's hits stop at its first miss). The cuts are those of
``tools/kv_switch_sweep.py``; ``--grid`` replays instead the traces of BENCHMARKS.md's issue-18
grid in full (orm-busy: its first 1M accesses), at ``tools/replay.py``'s capacities (rounded), with
FIFO, LFU and OPT beside; ``--held-out`` the other shared traces (``HELD_OUT``), as ``--grid``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import numpy.typing as npt
import replay_policies  # tools/ is on sys.path when run as a script
from kv_switch_sweep import CUTS, TRACES
from replay import chain_parents, prefix_hits
from replay_formats import read_trace

from tierstore.predict.kv_policy import KVPolicy
from tierstore.predict.shadow_caches import ShadowLIRS

GRID: list[tuple[str, int | None]] = [
    ("2_pools.trace.gz", None), ("cloudPhysicsIO.csv", None), ("loop.trace.gz", None), ("multi2.trace.gz", None),
    ("orm-busy.trace.xz", 1_000_000), ("request.trace.xz", None), ("scan.trace.gz", None),
    ("scarab-recs.trace.xz", None), ("synthetic_trace.jsonl", None), ("web07.trace.xz", None),
    ("zigzag.trace.gz", None)]
HELD_OUT: list[tuple[str, int | None]] = [
    ("orm-night.trace.xz", 1_000_000), ("trace_vaultservice.gz", None), ("cpp.trace.gz", None),
    ("cs.trace.gz", None), ("gli.trace.gz", None), ("ps.trace.gz", None), ("multi1.trace.gz", None),
    ("multi3.trace.gz", None), ("backf.trace.gz", None)]
"""The shared traces in neither the cuts nor the grid (none chose the default): ``--held-out``."""
VARIANTS = "off,0.01:2,0.01:8,0.01:32,0.03:2,0.03:8,0.03:32,0.1:2,0.1:8,0.1:32"
CHUNK = 65536


def parse_variant(text: str) -> tuple[float, ...] | None:
    """``off``, or ``MARGIN:EPOCHS[:NOISE]``."""
    if text == "off":
        return None
    margin, epochs, *noise = text.split(":")
    return (float(margin), int(epochs), *map(float, noise))


def replay_kv(keys: list[int], capacity: int, takeover: tuple[float, ...] | None,
              parents: list[int | None] | None) -> tuple[bytearray, KVPolicy[int]]:
    policy: KVPolicy[int] = KVPolicy(capacity, compiled=True, takeover=takeover)
    hits = bytearray()
    for s in range(0, len(keys), CHUNK):
        hits += policy.simulate(keys[s:s + CHUNK], None if parents is None else parents[s:s + CHUNK])
    return hits, policy


def hit_rate(hits: bytearray, request: npt.NDArray[np.int64] | None) -> float:
    """Plain hit rate, or with ``request`` the prefix-aware one (a request's hits stop at its first miss)."""
    if request is None:
        return round(sum(hits) / len(hits), 4)
    return round(prefix_hits(np.frombuffer(hits, dtype=np.uint8), request) / len(hits), 4)


def lirs_hits(keys: list[int], capacity: int) -> bytearray:
    lirs: ShadowLIRS[int] = ShadowLIRS(capacity)
    hits = bytearray(len(keys))
    for i, key in enumerate(keys):
        hits[i] = key in lirs
        lirs.access(key)
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=VARIANTS, help="comma-separated: off or MARGIN:EPOCHS")
    parser.add_argument("--traces", default="", help="comma-separated name prefixes of CUTS (default: all)")
    parser.add_argument("--grid", action="store_true", help="the full grid's traces instead of the cuts")
    parser.add_argument("--held-out", action="store_true", help="the other shared traces (HELD_OUT), as --grid")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    wanted = [t for t in args.traces.split(",") if t]
    args.grid = args.grid or args.held_out
    refs = ("lru", "arc", "s3fifo", "wtinylfu") + (("fifo", "lfu", "opt") if args.grid else ())
    for name, limit in HELD_OUT if args.held_out else GRID if args.grid else CUTS:
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        trace = read_trace(TRACES / name, None, limit)
        _, dense = np.unique(trace.keys, return_inverse=True)
        keys = dense.astype(np.int64).tolist()
        unique = int(dense.max()) + 1
        scorings = ["plain"] if trace.request is None else ["plain", "prefix"]
        for share in (1, 5, 10, 25):
            capacity = max(1, round(unique * share / 100) if args.grid else unique * share // 100)
            for scoring in scorings:
                request = trace.request if scoring == "prefix" else None
                parents = None
                if request is not None:
                    parents = [None if p < 0 else p for p in chain_parents(dense.astype(np.int64), request)]

                def rate(hits: bytearray, request: npt.NDArray[np.int64] | None = request) -> float:
                    return hit_rate(hits, request)

                row: dict[str, object] = {"trace": name, "limit": limit, "capacity_pct": share,
                                          "capacity": capacity, "scoring": scoring}
                for ref in refs:
                    row[ref] = rate(getattr(replay_policies, ref)(keys, unique, capacity, lambda _done: None))
                row["lirs"] = rate(lirs_hits(keys, capacity))
                for variant in variants:
                    hits, policy = replay_kv(keys, capacity, parse_variant(variant), parents)
                    row[variant] = rate(hits)
                    row[f"{variant}/takeovers"] = policy.takeovers
                    row[f"{variant}/loaded"] = policy.loaded
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
