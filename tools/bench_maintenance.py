"""How fast ``verify`` checks and ``compact`` reclaims, on a churned store of small and large blocks.

    python tools/bench_maintenance.py [--small 20000] [--large 20] [--repeat 3]

Each round builds a fresh store (fsync off while building), replaces a third of the small blocks and
deletes another third (sparse packs), then times ``verify`` (read and check everything) and
``compact``. Prints medians over the rounds, with the cold read rate of the same blocks through
``db.get`` measured in the same round as the peer figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tierstore
from tierstore.upkeep.compaction import disk_usage, fragmentation
from tierstore.upkeep.verify import verify


def one_round(folder: Path, small: int, large: int) -> dict[str, float]:
    """Build, churn, then time verify, a cold full read and compact."""
    gen = torch.Generator().manual_seed(0)
    with tierstore.open(folder, l2_cache_size=0, fsync=False) as db:
        with db.transaction():
            for i in range(small):
                db.put(f"s{i}", torch.randn(2048, generator=gen).to(torch.bfloat16))
            for i in range(large):
                db.put(f"L{i}", torch.randn(4 << 20, generator=gen).to(torch.bfloat16))
        with db.transaction():
            for i in range(0, small, 3):
                db.put(f"s{i}", torch.randn(2048, generator=gen).to(torch.bfloat16))
            for i in range(1, small, 3):
                db.delete(f"s{i}")
        logical = db.stats().logical_bytes
    start = time.perf_counter()
    report = verify(folder)
    verify_s = time.perf_counter() - start
    assert report.ok
    with tierstore.open(folder, l2_cache_size=0) as db:
        start = time.perf_counter()
        for key in db:
            db.get(key)
        read_s = time.perf_counter() - start
        share, _dead = fragmentation(db.catalog)
        before = disk_usage(folder / "l3")
        start = time.perf_counter()
        result = db.compact()
        compact_s = time.perf_counter() - start
    return {"logical_mb": logical / 1e6, "verify_mb_s": logical / 1e6 / verify_s, "get_mb_s": logical / 1e6 / read_s,
            "fragmentation": share, "l3_mb_before": before / 1e6, "reclaimed_mb": result.reclaimed / 1e6,
            "compact_s": compact_s, "moved": result.blocks_moved}


def main() -> None:
    """Run the rounds and print medians."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=20000)
    parser.add_argument("--large", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-maint-") as tmp:
            rounds.append(one_round(Path(tmp) / f"s{r}", args.small, args.large))
    for name in rounds[0]:
        values = [row[name] for row in rounds]
        print(f"{name:>14}: median {statistics.median(values):10.2f}   (runs: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
