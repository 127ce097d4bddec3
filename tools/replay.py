"""Replay an access trace through cache policies and report hit rates against LRU and Belady's OPT.

    python tools/replay.py /work/shared/traces/web07.trace.xz
    python tools/replay.py synthetic_trace.jsonl --capacity 1%,5% --policy lru,opt,predictive --prefix-aware
    python tools/replay.py orm-busy.trace.xz --limit 1000000 --json
    python tools/replay.py multi2.trace.gz --plot multi2.png
    python tools/replay.py loop.trace.gz --limit 50000 --store --capacity 1%,10%

Capacities are a share of the trace's unique keys ("5%") or an entry count ("4096"); every key is
one unit-size entry. Hit rates count cold misses as misses. For request-structured traces (Mooncake
JSONL) the prefix-aware hit rate is reported too: a request's hits stop counting at its first miss.
``--prefix-aware`` also tells the predictive policy which block each block extends, so it can evict
chain tails first. The classic policies come from ``replay_policies`` (independent references); the
predictive one is the store's own :class:`tierstore.predict.predictor.PredictivePolicy`.

``--store`` also replays the trace through a real store (4 KiB blocks, see ``replay_store``) for each
of lru, fifo, lfu and predictive asked for, and prints, access by access, how often the store's L2
served the same hits as the store's policy class run in simulation.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from replay_formats import FORMATS, Trace, read_trace
from replay_policies import CHUNK, SIMULATORS, Progress
from replay_store import STORE_POLICIES, replay_store, round_capacity, simulate_policy

from tierstore.predict import compiled_learn
from tierstore.predict.kv_policy import KVPolicy
from tierstore.predict.policies import access
from tierstore.predict.predictor import PredictivePolicy, SuccessorTable

DEFAULT_CAPACITIES = "1%,5%,10%,25%"
DEFAULT_POLICIES = "lru,fifo,lfu,arc,s3fifo,wtinylfu,opt,predictive,kv"
POLICIES = (*SIMULATORS, "predictive", "kv")


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (restored on exit).

    The predictive replay allocates a few small objects per access (samples, heap entries) and no
    reference cycles, so refcounting frees everything; the collector would only rescan the policy's
    hundreds of thousands of live objects again and again (10-40% of the replay's time on orm-busy).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def simulate_predictive(keys: list[int], capacity: int, progress: Progress,
                        parents: list[int] | None = None, prefetch: list[int] | None = None,
                        compiled: bool = compiled_learn.AVAILABLE, kind: str = "predictive") -> bytearray:
    """Drive the store's predictive policy: its batch replay, or per access with prefetching.

    Without ``prefetch`` this is :meth:`PredictivePolicy.simulate` (the same decisions as the
    protocol's reference driver ``tierstore.predict.policies.access``, which the tests check), chunk by chunk.
    With ``prefetch`` (a one-item list that receives the count of blocks fetched ahead), after each
    access the likely successors of the key, as the store's prefetcher learns them
    (:class:`tierstore.predict.predictor.SuccessorTable`, fed with the stream), are brought in ahead of use:
    evicting by policy like a miss does, but not counted as an access; that runs per access.
    ``compiled`` (without prefetching; the default where numba is installed) replays the learned
    expert and every shadow of the panel (ARC, S3-FIFO, W-TinyLFU, LRU, LIRS) as numba kernels: the
    same decisions (``tests/test_predict_compiled.py``), ~5x faster (``tools/bench_replay.py``).
    ``kind`` ``kv`` replays the KV-aware policy (:class:`tierstore.predict.kv_policy.KVPolicy`) instead.
    """
    make = KVPolicy if kind == "kv" else PredictivePolicy
    policy: PredictivePolicy[int] = make(capacity, compiled=compiled and prefetch is None)
    if prefetch is None:
        chains = None if parents is None else [None if p < 0 else p for p in parents]
        out = bytearray()
        with collector_paused():
            for start in range(0, len(keys), CHUNK):
                stop = min(start + CHUNK, len(keys))
                out += policy.simulate(keys[start:stop], None if chains is None else chains[start:stop])
                progress(stop)
        return out
    table: SuccessorTable[int] | None = SuccessorTable() if prefetch is not None else None
    hits = bytearray(len(keys))
    previous = -1
    for start in range(0, len(keys), CHUNK):
        stop = min(start + CHUNK, len(keys))
        for i in range(start, stop):
            key = keys[i]
            parent = parents[i] if parents is not None else None
            chain = None if parent is None or parent < 0 else parent
            if access(policy, key, float(i), capacity, 1, chain):
                hits[i] = 1
            if table is not None and prefetch is not None:
                if previous >= 0:
                    table.add(previous, key)
                previous = key
                for ahead in table.likely(key)[:1]:
                    if ahead not in policy:
                        while policy.used + 1 > capacity:
                            policy.remove(policy.victim())
                        policy.insert(ahead, 1, key if parents is not None else None)
                        prefetch[0] += 1
        progress(stop)
    return hits


def chain_parents(dense: npt.NDArray[np.int64], request: npt.NDArray[np.int64]) -> list[int]:
    """Each access's predecessor within its request (-1 for a request's first block)."""
    parents = np.full(len(dense), -1, dtype=np.int64)
    same = request[1:] == request[:-1]
    parents[1:][same] = dense[:-1][same]
    return [int(p) for p in parents.tolist()]


def prefix_hits(hits: npt.NDArray[np.uint8], request: npt.NDArray[np.int64]) -> int:
    """Hits that count under prefix semantics: those before the first miss of their request."""
    misses = np.cumsum(hits == 0)
    starts = np.flatnonzero(np.r_[True, request[1:] != request[:-1]])
    before = np.repeat(misses[starts] - (hits[starts] == 0), np.diff(np.r_[starts, len(hits)]))
    return int(np.count_nonzero((misses - before == 0) & (hits == 1)))


def parse_capacities(text: str, unique: int) -> dict[str, int]:
    result: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item.endswith("%"):
            result[item] = max(1, round(unique * float(item[:-1]) / 100))
        else:
            result[item] = max(1, int(item))
    return result


class Reporter:
    """Progress on stderr: one line per run, rewritten in place while a long run goes."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.label = ""
        self.started = self.shown = time.perf_counter()

    def start(self, label: str) -> Progress:
        self.label, self.started = label, time.perf_counter()
        return self.tick

    def tick(self, done: int) -> None:
        now = time.perf_counter()
        if not self.quiet and self.total >= 4 * CHUNK and now - self.shown >= 1.0:  # at most 1 line/s
            self.shown = now
            rate = done / max(1e-9, now - self.started)
            print(f"\r  {self.label}: {done / self.total:6.1%} {rate / 1e3:8.0f}k acc/s",
                  end="", file=sys.stderr, flush=True)

    def finish(self, rate: float) -> None:
        if not self.quiet:
            print(f"\r  {self.label}: done {rate / 1e3:8.0f}k acc/s" + " " * 8, file=sys.stderr, flush=True)


def run(trace: Trace, policies: Sequence[str], capacities: dict[str, int], prefix_aware: bool,
        quiet: bool, prefetched: dict[str, int] | None = None, pure: bool = False
        ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, float]]:
    """Hit rates per policy and capacity; prefix-aware ones for request traces; accesses/s per policy.

    With ``prefetched`` (a dict), the predictive policy prefetches likely successors and the count
    of blocks it fetched ahead, per capacity, is stored there.
    """
    uniques, inverse = np.unique(trace.keys, return_inverse=True)
    dense = inverse.reshape(-1).astype(np.int64)
    keys = [int(k) for k in dense.tolist()]
    n, unique = len(keys), len(uniques)
    parents = chain_parents(dense, trace.request) if prefix_aware and trace.request is not None else None
    results: dict[str, dict[str, float]] = {}
    prefix: dict[str, dict[str, float]] = {}
    speed: dict[str, float] = {}
    reporter = Reporter(n, quiet)
    for name in policies:
        results[name], elapsed = {}, 0.0
        for label, capacity in capacities.items():
            progress = reporter.start(f"{name} @ {label} ({capacity} entries)")
            began = time.perf_counter()
            if name in ("predictive", "kv"):
                ahead = [0] if prefetched is not None and name == "predictive" else None
                hits = simulate_predictive(keys, capacity, progress, parents, ahead,
                                           compiled_learn.AVAILABLE and not pure, name)
                if prefetched is not None and ahead is not None:
                    prefetched[label] = ahead[0]
            else:
                hits = SIMULATORS[name](keys, unique, capacity, progress)
            took = time.perf_counter() - began
            elapsed += took
            reporter.finish(n / max(took, 1e-9))
            mask = np.frombuffer(bytes(hits), dtype=np.uint8)
            results[name][label] = int(mask.sum()) / max(1, n)
            if trace.request is not None:
                prefix.setdefault(name, {})[label] = prefix_hits(mask, trace.request) / max(1, n)
        speed[name] = n * len(capacities) / max(elapsed, 1e-9)
    return results, prefix, speed


def run_store(trace: Trace, policies: Sequence[str], capacities: dict[str, int],
              quiet: bool) -> dict[str, dict[str, dict[str, float]]]:
    """Per policy and capacity: the simulated and the real store's L2 hit rates and their agreement."""
    _, inverse = np.unique(trace.keys, return_inverse=True)
    keys = [int(k) for k in inverse.reshape(-1).tolist()]
    unique = int(inverse.max()) + 1 if len(keys) else 0
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in (p for p in policies if p in STORE_POLICIES):
        for label, capacity in capacities.items():
            entries = round_capacity(capacity)
            began = time.perf_counter()
            simulated = simulate_policy(keys, name, entries)
            stored = replay_store(keys, unique, name, entries)
            same = sum(a == b for a, b in zip(simulated, stored, strict=True))
            out.setdefault(name, {})[label] = {
                "capacity": entries, "simulated": sum(simulated) / max(1, len(keys)),
                "store": sum(stored) / max(1, len(keys)), "agreement": same / max(1, len(keys))}
            if not quiet:
                print(f"  store {name} @ {label} ({entries} blocks): {time.perf_counter() - began:.1f}s",
                      file=sys.stderr)
    return out


def format_store(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["real store vs simulation (L2 hit rate; agreement = accesses with the same hit/miss)",
             f"{'policy':<12}{'capacity':>12}{'simulated':>11}{'store':>9}{'agreement':>11}"]
    for name, row in results.items():
        for label, r in row.items():
            lines.append(f"{name:<12}{label + ' ' + str(int(r['capacity'])):>12}{r['simulated']:11.3f}"
                         f"{r['store']:9.3f}{r['agreement']:11.4f}")
    return "\n".join(lines)


def format_table(results: dict[str, dict[str, float]], title: str) -> str:
    labels = list(next(iter(results.values())).keys()) if results else []
    lines = [title, f"{'policy':<12}" + "".join(f"{label:>9}" for label in labels)]
    for name, row in results.items():
        lines.append(f"{name:<12}" + "".join(f"{row[label]:9.3f}" for label in labels))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, float]], capacities: dict[str, int], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [capacities[label] for label in capacities]
    for name, row in results.items():
        ax.plot(xs, [row[label] for label in capacities], marker="o", label=name,
                linestyle="--" if name == "opt" else "-")
    ax.set_xscale("log")
    ax.set_xticks(xs, list(capacities))
    ax.set_xlabel("capacity (share of unique keys)")
    ax.set_ylabel("hit rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path,
                        help="trace file (a bare name is looked up in /work/shared/traces)")
    parser.add_argument("--capacity", default=DEFAULT_CAPACITIES,
                        help="comma list: '5%%' of unique keys, or a number of entries")
    parser.add_argument("--policy", default=DEFAULT_POLICIES,
                        help=f"comma list from: {', '.join(POLICIES)}")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N accesses")
    parser.add_argument("--format", choices=sorted(FORMATS), default=None,
                        help="trace format (default: guessed from the file name)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot", type=Path, default=None, help="write hit rate vs capacity to this PNG")
    parser.add_argument("--prefix-aware", action="store_true",
                        help="give the predictive policy each block's chain parent (request traces)")
    parser.add_argument("--prefetch", action="store_true",
                        help="the predictive policy also fetches each key's likely successor ahead of use "
                             "(not demand caching: compare with OPT only with the prefetch count in view)")
    parser.add_argument("--store", action="store_true",
                        help="also replay through a real store (lru, fifo, lfu, predictive); use --limit")
    parser.add_argument("--pure", action="store_true",
                        help="replay the predictive policy in pure Python even where numba is installed")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = build_parser().parse_args(argv)
    path: Path = args.trace
    if not path.exists() and (Path("/work/shared/traces") / path).exists():
        path = Path("/work/shared/traces") / path
    policies = [p.strip().lower() for p in args.policy.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    trace = read_trace(path, args.format, args.limit)
    n, unique = len(trace.keys), len(np.unique(trace.keys))
    capacities = parse_capacities(args.capacity, unique)
    if not args.quiet:
        print(f"{path.name}: {n} accesses, {unique} unique keys; capacities "
              + ", ".join(f"{k}={v}" for k, v in capacities.items()), file=sys.stderr)
        if trace.note:
            print(f"note: {trace.note}", file=sys.stderr)
    prefetched: dict[str, int] | None = {} if args.prefetch else None
    results, prefix, speed = run(trace, policies, capacities, args.prefix_aware, args.quiet, prefetched,
                                  args.pure)
    store = run_store(trace, policies, capacities, args.quiet) if args.store else {}
    if args.json:
        document: dict[str, object] = {"trace": path.name, "accesses": n, "unique": unique,
                                       "results": results}
        if prefix:
            document["prefix_results"] = prefix
        document["accesses_per_second"] = {k: round(v) for k, v in speed.items()}
        if prefetched is not None:
            document["prefetched"] = prefetched
        if store:
            document["store"] = store
        out(json.dumps(document))
    else:
        out(format_table(results, f"{path.name}: hit rate ({n} accesses, {unique} unique, ceiling "
                                  f"{1 - unique / max(1, n):.3f})"))
        if prefix:
            out(format_table(prefix, "prefix-aware hit rate (a request's hits stop at its first miss)"))
        out("accesses/s: " + ", ".join(f"{k} {v / 1e3:.0f}k" for k, v in speed.items()))
        if prefetched is not None:
            out("prefetched by predictive (blocks fetched ahead of use): "
                + ", ".join(f"{k} {v}" for k, v in prefetched.items()))
        if store:
            out(format_store(store))
    if args.plot is not None:
        plot(results, capacities, path.name, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
