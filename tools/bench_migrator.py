"""Weight streaming with and without the migrator's predicted prefetch.

A model's layers (``--layers`` blocks of ``--size`` MiB, more than L2 holds, so every pass streams
them from L3) are read in order, pass after pass, with ``--compute`` ms of simulated compute after
each (a sleep: it releases the GIL as a GPU kernel launch would). The first passes teach the
migrator which layer follows which; then passes alternate between the worker paused (each get reads
L3 itself) and active (the next layer is brought into L2 while this one "computes"). Prints the
median pass time of each and their ratio, and the hot-path cost of the prefetch hook.

    python tools/bench_migrator.py --layers 24 --size 4 --compute 10 --passes 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tierstore


def one_pass(db: tierstore.TierStore, keys: list[str], compute: float) -> tuple[float, int]:
    began = time.perf_counter()
    l2_hits = db.stats().hits["L2"]
    for key in keys:
        db.get(key)
        time.sleep(compute)
    return time.perf_counter() - began, db.stats().hits["L2"] - l2_hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--size", type=float, default=4.0, help="MiB per layer")
    parser.add_argument("--compute", type=float, default=10.0, help="ms of simulated compute per layer")
    parser.add_argument("--passes", type=int, default=5, help="measured passes of each kind")
    args = parser.parse_args(argv)
    elements = int(args.size * (1 << 20)) // 2
    keys = [f"layers.{i}.weight" for i in range(args.layers)]
    l2 = max(4 << 20, int(args.layers * args.size * (1 << 20)) // 2)  # half the model fits
    with tempfile.TemporaryDirectory() as folder, \
            tierstore.open(Path(folder) / "s", l2_cache_size=l2, fsync=False, l3_compression="auto",
                           prediction_threshold=0.9) as db:
        gen = torch.Generator().manual_seed(0)
        for key in keys:
            db.put(key, torch.randn(elements, generator=gen).to(torch.bfloat16))
        for _ in range(2):  # learn the order
            one_pass(db, keys, 0.0)
        db.flush()
        compute = args.compute / 1000
        times: dict[str, list[float]] = {"no prefetch": [], "predicted prefetch": []}
        hits: dict[str, list[int]] = {"no prefetch": [], "predicted prefetch": []}
        for _ in range(args.passes):
            for label in times:
                (db.migrator.pause if label == "no prefetch" else db.migrator.resume)()
                db.migrator.wait()
                took, hit = one_pass(db, keys, compute)
                times[label].append(took)
                hits[label].append(hit)
        hook = db.migrator.on_get
        cost = min(timeit.repeat(lambda: hook("not-a-key", None), number=200_000, repeat=5)) / 200_000
        empty = min(timeit.repeat(lambda: None, number=200_000, repeat=5)) / 200_000
        print(f"{args.layers} layers x {args.size:g} MiB bf16, L2 {l2 >> 20} MiB, {args.compute:g} ms compute "
              f"per layer, {args.passes} passes each (medians)")
        for label, values in times.items():
            print(f"  {label:<20} {statistics.median(values) * 1000:8.1f} ms/pass   L2 hits/pass "
                  f"{statistics.median(hits[label]):.0f} of {args.layers}")
        ratio = statistics.median(times["no prefetch"]) / statistics.median(times["predicted prefetch"])
        floor = args.layers * compute * 1000
        print(f"  speed-up {ratio:.2f}x (compute alone: {floor:.0f} ms/pass)")
        print(f"  get hook with no successors: {(cost - empty) * 1e6:.3f} us above an empty call")
        print(f"  migrator: {db.migrator.stats()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
