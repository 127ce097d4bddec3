"""Time the predictive policy's compiled replay in CPU-seconds (the machine is shared: wall time lies).

    python tools/bench_replay.py                                   # orm-busy in full, 1/5/10/25%, 3 runs
    python tools/bench_replay.py --capacity 1%,25% --repeat 5
    python tools/bench_replay.py --limit 1000000 --profile 1%      # cProfile of one run, top 25 by tottime
    python tools/bench_replay.py --limit 200000 --check            # also the pure-Python replay: same hits?
    python tools/bench_replay.py --limit 500000 --capacity 763,19087 --check  # the full trace's 1%, 25%
    python tools/bench_replay.py --policy kv                      # the KV-aware policy (KVPolicy) instead
    python tools/bench_replay.py --policy lrfu                    # its adaptive LRFU expert alone
    python tools/bench_replay.py --policy kv --takeover off       # kv with another takeover rule (or none)

Each run replays the trace the way ``tools/replay.py`` does (dense key ids, ``simulate`` in
64k-access calls, the cyclic collector paused) on a fresh ``PredictivePolicy(c, compiled=True)``
(``--policy kv``: ``KVPolicy``; ``lrfu``: its ``AdaptiveLRFU`` expert alone, compiled) and
reports accesses per CPU-second of this process (``time.process_time``) and per wall-second,
median and spread over ``--repeat`` runs, runs of the capacities interleaved. numba compiles the
kernels once per machine into its on-disk cache (``cache=True``); the first run of a process
loads (or, with a cold cache, compiles) them: ``warmup_s`` is that first call alone, and the rates
exclude it only because the cache is on disk (a fresh checkout pays the compile once, ~10-30 s).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from replay_formats import read_trace
from replay_policies import CHUNK

from tierstore.predict.kv_policy import AdaptiveLRFU, KVPolicy
from tierstore.predict.predictor import PredictivePolicy


class LRFUAlone:
    """``--policy lrfu``: the KV policy's adaptive LRFU expert alone (its seven LRFU heaps, no panel).

    ``simulate`` returns a batch's hit count (8 bytes, little-endian), so ``--check`` compares the
    hits of every 64k-access batch with the pure-Python expert's.
    """

    def __init__(self, capacity: int, compiled: bool = True) -> None:
        lrfu: AdaptiveLRFU[int] = AdaptiveLRFU(capacity)
        self.lrfu = lrfu.compiled() if compiled else lrfu
        self.compiled = compiled

    def simulate(self, keys: list[int]) -> bytes:
        batch = np.asarray(keys, dtype=np.int64) if self.compiled else keys
        return int(self.lrfu.run(batch)).to_bytes(8, "little")  # type: ignore[arg-type]


POLICIES: dict[str, type] = {"predictive": PredictivePolicy, "kv": KVPolicy, "lrfu": LRFUAlone}


def replay(keys: list[int], capacity: int, compiled: bool = True,
           kind: type = PredictivePolicy) -> tuple[bytearray, int, float, float]:
    """One replay on a fresh policy: what it returned (per access; per batch for ``lrfu``), hits, CPU-s, wall-s."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        policy = kind(capacity, compiled=compiled)
        out = bytearray()
        for start in range(0, len(keys), CHUNK):
            out += policy.simulate(keys[start:start + CHUNK])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        hits = sum(out) if kind is not LRFUAlone else sum(int.from_bytes(out[i:i + 8], "little")
                                                          for i in range(0, len(out), 8))
        return out, hits, cpu, wall
    finally:
        if enabled:
            gc.enable()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="/work/shared/traces/orm-busy.trace.xz")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N accesses")
    parser.add_argument("--capacity", default="1%,5%,10%,25%",
                        help="comma list: a share of the unique keys ('5%%') or an entry count")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", default=None, help="one capacity (e.g. 1%%): cProfile one run instead")
    parser.add_argument("--check", action="store_true", help="also replay in pure Python and compare the hits")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="predictive")
    parser.add_argument("--takeover", default=None,
                        help="kv only: 'off' or MARGIN:EPOCHS[:NOISE] instead of the policy's default rule")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    kind = POLICIES[args.policy]
    if args.takeover is not None:
        if kind is not KVPolicy:
            parser.error("--takeover is for --policy kv")
        margin, epochs, *noise = ("0:1" if args.takeover == "off" else args.takeover).split(":")
        rule = None if args.takeover == "off" else (float(margin), int(epochs), *map(float, noise))
        kind = type("KVTakeover", (KVPolicy,), {"__init__": lambda self, capacity, compiled=True:
                                                 KVPolicy.__init__(self, capacity, compiled=compiled, takeover=rule)})
    trace = read_trace(Path(args.trace), None, args.limit)
    uniques, inverse = np.unique(trace.keys, return_inverse=True)
    keys = [int(k) for k in inverse.reshape(-1).astype(np.int64).tolist()]
    labels = [c.strip() for c in args.capacity.split(",") if c.strip()]
    caps = {label: max(1, round(len(uniques) * float(label[:-1]) / 100)) if label.endswith("%") else int(label)
            for label in labels}
    cpu0 = time.process_time()
    replay(keys[:CHUNK], 64, kind=kind)  # load (or compile) the numba kernels
    warmup = time.process_time() - cpu0
    print(f"{Path(args.trace).name}: {len(keys)} accesses, {len(uniques)} unique; warmup (JIT cache load) "
          f"{warmup:.2f} CPU-s", file=sys.stderr)
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        share = float(args.profile.rstrip("%")) / 100
        _, _, cpu, _ = replay(keys, max(1, round(len(uniques) * share)), kind=kind)
        profile.disable()
        print(f"{args.profile}: {len(keys) / cpu / 1e3:.0f}k accesses per CPU-second under the profiler")
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return 0
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
    hit_rate: dict[str, float] = {}
    for _ in range(args.repeat):
        for label in labels:
            hits, count, cpu, wall = replay(keys, caps[label], kind=kind)
            runs[label].append((len(keys) / cpu, len(keys) / wall))
            hit_rate[label] = count / len(keys)
            print(f"  {label} ({caps[label]}): {len(keys) / cpu / 1e3:.0f}k/CPU-s, "
                  f"{len(keys) / wall / 1e3:.0f}k/wall-s, hit rate {hit_rate[label]:.4f}", file=sys.stderr)
            if args.check and len(runs[label]) == 1:
                pure, _, _, _ = replay(keys, caps[label], compiled=False, kind=kind)
                print(f"    pure Python: {'same hits' if pure == hits else 'DIFFERENT HITS'}", file=sys.stderr)
                if pure != hits:
                    return 1
    summary = {label: {"capacity": caps[label], "hit_rate": round(hit_rate[label], 4),
                       "per_cpu_s": round(statistics.median(r[0] for r in rows)),
                       "per_cpu_s_range": [round(min(r[0] for r in rows)), round(max(r[0] for r in rows))],
                       "per_wall_s": round(statistics.median(r[1] for r in rows))}
               for label, rows in runs.items()}
    if args.json:
        print(json.dumps({"trace": Path(args.trace).name, "policy": args.policy, "takeover": args.takeover,
                          "accesses": len(keys),
                          "warmup_cpu_s": round(warmup, 2), "results": summary}))
    else:
        for label, row in summary.items():
            low, high = row["per_cpu_s_range"]  # type: ignore[misc]
            print(f"{label:>4} ({row['capacity']}): {row['per_cpu_s'] / 1e3:.0f}k per CPU-second "
                  f"({low / 1e3:.0f}-{high / 1e3:.0f}k), {row['per_wall_s'] / 1e3:.0f}k per wall-second, "
                  f"hit rate {row['hit_rate']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
