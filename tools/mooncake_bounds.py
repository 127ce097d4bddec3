"""How much of the LRU->OPT gap can any online policy close on the Mooncake KV trace? Bounds, measured.

    python tools/mooncake_bounds.py [/work/shared/traces/synthetic_trace.jsonl] [--capacity 1%,5%] [--json]

The migrator issue asks the predictive policy to close half of the gap between LRU and Belady's OPT
on the Mooncake synthetic trace at 1% and 5% of its unique blocks. This tool measures what that
would take, by giving an LRU cache *oracles* that no online policy has, and reports:

* ``dead-block oracle``: LRU, LFU and a cache that keeps a fixed set (admits only while it has
  room), each never admitting (and dropping on a hit) a block that is never accessed again: perfect
  knowledge of *whether* a block comes back; the best of the three is reported.
* ``reuse-within-H oracle``: the same, told whether the block comes back within ``H`` accesses;
  the smallest ``H`` that reaches the target says how precisely an online policy must know *when*.
* ``hindsight feature table``: P(reused within H) per combination of the features an online policy
  can see (times seen, last gap, position in the request, last block of the request), fitted on the
  whole trace *including its future*, used for admission and eviction (lowest probability first) at
  the best threshold. An online model of those features can only do worse than its own hindsight fit.
* the correlation between a conversation's consecutive turn gaps, which is what a predictor of
  *when* a prefix comes back would have to exploit.

Every figure counts cold misses; "gap closed" is ``(policy - LRU) / (OPT - LRU)``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay_policies import lru, opt

DEFAULT_TRACE = Path("/work/shared/traces/synthetic_trace.jsonl")
HORIZONS = (500, 1000, 2000, 3000, 5000, 8000, 12000, 20000)
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def load(path: Path) -> tuple[list[int], list[int], list[bool], list[int]]:
    """Blocks in access order, each access's position in its request, last-of-request flags, request ids."""
    keys: list[int] = []
    position: list[int] = []
    last: list[bool] = []
    request: list[int] = []
    with path.open() as lines:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            ids = json.loads(line)["hash_ids"]
            keys.extend(int(k) for k in ids)
            position.extend(range(len(ids)))
            last.extend(j == len(ids) - 1 for j in range(len(ids)))
            request.extend([number] * len(ids))
    return keys, position, last, request


def next_gaps(keys: Sequence[int]) -> list[int]:
    """Accesses until each access's key comes back (a huge number when it never does)."""
    never = 1 << 40
    gaps = [never] * len(keys)
    seen: dict[int, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        k = keys[i]
        j = seen.get(k)
        if j is not None:
            gaps[i] = j - i
        seen[k] = i
    return gaps


def lru_with_oracle(keys: Sequence[int], capacity: int, keep: Callable[[int], bool]) -> int:
    """Hits of LRU that admits the key of access ``i`` only if ``keep(i)``, and drops it on a hit otherwise."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for i, k in enumerate(keys):
        wanted = keep(i)
        if k in cache:
            hits += 1
            if wanted:
                cache.move_to_end(k)
            else:
                del cache[k]
        elif wanted:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[k] = None
    return hits


def reject_when_full_with_oracle(keys: Sequence[int], capacity: int, keep: Callable[[int], bool]) -> int:
    """Hits of a cache that admits wanted keys only while it has room (it keeps a fixed set; best on loops)."""
    cache: set[int] = set()
    hits = 0
    for i, k in enumerate(keys):
        if k in cache:
            hits += 1
            if not keep(i):
                cache.discard(k)
        elif keep(i) and len(cache) < capacity:
            cache.add(k)
    return hits


Rank = TypeVar("Rank", int, float)


def pop_live(heap: list[tuple[Rank, int, int]], current: dict[int, tuple[Rank, int]]) -> tuple[Rank, int, int]:
    """Pop the lowest entry of a lazily deleted heap that still describes a resident key."""
    while True:
        rank, stamp, key = heapq.heappop(heap)
        if current.get(key) == (rank, stamp):
            return rank, stamp, key


def lfu_with_oracle(keys: Sequence[int], capacity: int, keep: Callable[[int], bool]) -> int:
    """Hits of LFU (counts over the whole trace so far, older first among equals) that admits wanted keys only."""
    count: Counter[int] = Counter()
    current: dict[int, tuple[int, int]] = {}
    heap: list[tuple[int, int, int]] = []
    hits = 0
    for i, k in enumerate(keys):
        count[k] += 1
        if k in current:
            hits += 1
            if not keep(i):
                del current[k]
                continue
        elif not keep(i):
            continue
        elif len(current) >= capacity:
            del current[pop_live(heap, current)[2]]
        current[k] = (count[k], i)
        heapq.heappush(heap, (count[k], i, k))
    return hits


def ranked_with_scores(keys: Sequence[int], capacity: int, score: Sequence[float], threshold: float) -> int:
    """Admit when ``score >= threshold``; evict the lowest score (older first among equals)."""
    current: dict[int, tuple[float, int]] = {}
    heap: list[tuple[float, int, int]] = []
    hits = 0
    for i, k in enumerate(keys):
        s = score[i]
        if k in current:
            hits += 1
        elif s < threshold:
            continue
        elif len(current) >= capacity:
            low, stamp, victim = pop_live(heap, current)
            if low > s:  # the newcomer is the least likely: keep what is there
                heapq.heappush(heap, (low, stamp, victim))
                continue
            del current[victim]
        if s < threshold:
            del current[k]
            continue
        current[k] = (s, i)
        heapq.heappush(heap, (s, i, k))
    return hits


def features(keys: Sequence[int], position: Sequence[int], last: Sequence[bool]) -> list[tuple[int, int, int, bool]]:
    """Per access, what an online policy can know: times seen before (capped), last gap, position, last block."""
    seen: dict[int, int] = {}
    count: Counter[int] = Counter()
    out = []
    for i, k in enumerate(keys):
        gap = i - seen[k] if k in seen else 0
        out.append((min(count[k], 8), gap.bit_length(), min(position[i], 64).bit_length(), last[i]))
        count[k] += 1
        seen[k] = i
    return out


def turn_gap_correlation(keys: Sequence[int], request: Sequence[int]) -> tuple[float, int, float]:
    """Correlation of log consecutive turn gaps of a conversation, pairs, and the median turn gap (requests)."""
    blocks: dict[int, list[int]] = {}
    for k, r in zip(keys, request, strict=True):
        blocks.setdefault(r, []).append(k)
    owner: dict[int, int] = {}
    previous_gap: dict[int, int] = {}
    pairs: list[tuple[int, int]] = []
    gaps: list[int] = []
    for r in sorted(blocks):
        ids = blocks[r]
        shared = 0
        while shared < len(ids) and ids[shared] in owner:
            shared += 1
        if shared:
            before = owner[ids[shared - 1]]
            gap = r - before
            gaps.append(gap)
            if before in previous_gap:
                pairs.append((previous_gap[before], gap))
            previous_gap[r] = gap
        for k in ids:
            owner[k] = r
    a = np.log(np.array(pairs, dtype=np.float64))
    corr = float(np.corrcoef(a[:, 0], a[:, 1])[0, 1]) if len(pairs) > 2 else float("nan")
    return corr, len(pairs), float(np.median(gaps)) if gaps else float("nan")


def within_horizon(gaps: Sequence[int], horizon: int) -> Callable[[int], bool]:
    return lambda i: gaps[i] <= horizon


def at_least(score: Sequence[float], threshold: float) -> Callable[[int], bool]:
    return lambda i: score[i] >= threshold


def measure(path: Path, capacities: Sequence[str]) -> dict[str, object]:
    keys, position, last, request = load(path)
    n = len(keys)
    uniques, dense_array = np.unique(np.array(keys), return_inverse=True)
    dense = [int(k) for k in dense_array.reshape(-1).tolist()]
    unique = len(uniques)
    gaps = next_gaps(dense)
    feats = features(dense, position, last)
    results: dict[str, object] = {"trace": str(path), "accesses": n, "unique": unique, "capacities": {}}
    for label in capacities:
        capacity = max(1, round(unique * float(label.rstrip("%")) / 100))
        base = sum(lru(dense, unique, capacity, lambda _: None)) / n
        best = sum(opt(dense, unique, capacity, lambda _: None)) / n
        target = base + 0.5 * (best - base)
        row: dict[str, object] = {"entries": capacity, "lru": base, "opt": best, "target": target}
        reused = lambda i: gaps[i] < n  # noqa: E731
        row["dead_block_oracle"] = {name: run(dense, capacity, reused) / n for name, run in (
            ("lru", lru_with_oracle), ("lfu", lfu_with_oracle), ("reject_when_full", reject_when_full_with_oracle))}
        within = {h: lru_with_oracle(dense, capacity, within_horizon(gaps, h)) / n for h in HORIZONS}
        row["reuse_within_oracle"] = within
        reaching = [h for h, rate in within.items() if rate >= target]
        row["largest_h_reaching_target"] = max(reaching) if reaching else None
        table_best: dict[str, float] = {}
        for h in (1000, 3000, 8000):
            tally: dict[tuple[int, int, int, bool], list[int]] = {}
            for i, f in enumerate(feats):
                cell = tally.setdefault(f, [0, 0])
                cell[0] += 1
                cell[1] += gaps[i] <= h
            score = [tally[f][1] / tally[f][0] for f in feats]
            table_best[str(h)] = max(
                max(lru_with_oracle(dense, capacity, at_least(score, t)) / n,
                    ranked_with_scores(dense, capacity, score, t) / n)
                for t in THRESHOLDS)
        row["hindsight_feature_table"] = table_best
        best_online = max(table_best.values())
        row["hindsight_gap_closed"] = (best_online - base) / (best - base) if best > base else 0.0
        results["capacities"][label] = row  # type: ignore[index]
    corr, pairs, median = turn_gap_correlation(dense, request)
    results["turn_gap_correlation"] = {"pairs": pairs, "log_correlation": corr, "median_turn_gap_requests": median}
    return results


def report(results: dict[str, object]) -> str:
    rows = ["| capacity | LRU | OPT | target (50% of gap) | dead-block oracle | smallest reuse-within-H oracle "
            "reaching it | hindsight feature table (best) | its gap closed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, row in results["capacities"].items():  # type: ignore[attr-defined]
        h = row["largest_h_reaching_target"]
        rows.append(f"| {label} ({row['entries']}) | {row['lru']:.3f} | {row['opt']:.3f} | {row['target']:.3f} | "
                    f"{max(row['dead_block_oracle'].values()):.3f} | {'H <= ' + str(h) if h else 'none tried'} | "
                    f"{max(row['hindsight_feature_table'].values()):.3f} | {100 * row['hindsight_gap_closed']:.1f}% |")
    corr = results["turn_gap_correlation"]
    rows.append("")
    rows.append(f"Consecutive turn gaps of a conversation: log-correlation {corr['log_correlation']:.2f} over "  # type: ignore[index]
                f"{corr['pairs']} pairs; median turn gap {corr['median_turn_gap_requests']:.0f} requests.")  # type: ignore[index]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--capacity", default="1%,5%")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args(argv)
    if not args.trace.exists():
        parser.error(f"no trace at {args.trace}")
    results = measure(args.trace, [c.strip() for c in args.capacity.split(",") if c.strip()])
    print(json.dumps(results) if args.json else report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
