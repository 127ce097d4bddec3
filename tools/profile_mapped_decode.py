"""Where a decoded token's time goes when a model streams mapped from a raw L3 store (one process).

Opens ``WORK/store-raw`` (``tools/bench_real_size.py --keep DIR`` builds it) as the ``raw`` variant
does (``memory_split``, ``load_streamed(memory=M)``), generates from a one-token prompt (a one-token
prefill: no slow bf16 GEMM) and prints one JSON line: median ms/token, the token gaps, minor faults
per token, and per thread (the model's, torch's OpenMP workers, the prefetch thread) its run and
run-queue wait ms and context switches per token from ``/proc/self/task/*/schedstat`` and
``status``. ``--perf FILE`` records the decode with ``perf record -F 999 -g -e cpu-clock``.

Experiments that take one part away (they patch the running process, for measuring only):
``--exp no_populate`` (maps are not populated: the checksum or the product faults the pages in),
``--exp defer_unmap`` (a unit's maps are dropped on the prefetch thread, so its ``munmap`` leaves the
model's thread); ``--dt none|auto|N`` is ``load_streamed(decode_threads=)``, ``--threads N`` sets
torch's threads for the whole process, ``--prefetch``, ``--verify always|once``.

    flock /tmp/realsize.lock python tools/profile_mapped_decode.py --work /tmp/real15/2b --verify once
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

GiB = 1 << 30
_MADV_POPULATE_READ = 22


def _threads() -> dict[str, dict[str, Any]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            run, wait, _ = map(int, Path(f"/proc/self/task/{tid}/schedstat").read_text().split())
            status = dict(line.split(":", 1) for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines())
        except FileNotFoundError:  # the thread ended
            continue
        out[tid] = {"run": run / 1e9, "wait": wait / 1e9, "vol": int(status["voluntary_ctxt_switches"]),
                    "invol": int(status["nonvoluntary_ctxt_switches"])}
    return out


def _patch(experiments: set[str]) -> None:
    from tierstore.integrations import streaming
    from tierstore.tiers.l3_zarr import mapped

    if "no_populate" in experiments:
        libc = mapped._LIBC

        class NoPopulate:
            def __getattr__(self, name: str) -> Any:
                return getattr(libc, name)

            def madvise(self, address: int, length: int, advice: int) -> int:
                return 0 if advice == _MADV_POPULATE_READ else int(libc.madvise(address, length, advice))

        mapped._LIBC = NoPopulate()
    if "defer_unmap" in experiments:
        def post_hook(self: Any, index: int) -> Any:
            def release(module: Any, args: Any, output: Any) -> None:
                dropped = []
                for owner, name, _, placeholder in self.units[index].params:
                    dropped.append(owner._parameters[name])
                    streaming.place_param(owner, name, placeholder)
                if self._pool is not None:
                    self._pool.submit(dropped.clear)  # the last references die on the prefetch thread
                self.threads.leave()
            return release

        streaming.WeightStreamer._post_hook = post_hook  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/real15/2b")
    parser.add_argument("--memory", type=float, default=2.0, help="GiB")
    parser.add_argument("--verify", default="always", choices=("always", "once"))
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--dt", default="auto", help="decode_threads: auto, none or a number")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for the process (0: leave)")
    parser.add_argument("--exp", default="", help="comma list: no_populate, defer_unmap")
    parser.add_argument("--perf", default="", help="perf record the decode into this file")
    args = parser.parse_args()
    experiments = set(filter(None, args.exp.split(",")))
    _patch(experiments)
    if args.threads:
        torch.set_num_threads(args.threads)

    import tierstore
    from tierstore.integrations.stream_budget import memory_split
    from tierstore.integrations.streaming import load_streamed

    memory = int(args.memory * GiB)
    folder = Path(args.work) / "store-raw"
    with tierstore.open(folder, readonly=True, l2_cache_size=0) as probe:
        split = memory_split(probe, memory, prefetch=args.prefetch, mapped=True)
    store = tierstore.open(folder, readonly=True, l2_cache_size=split.l2_bytes, l3_verify_maps=args.verify)
    threads: int | str | None = None if args.dt == "none" else args.dt if args.dt == "auto" else int(args.dt)
    model = load_streamed(store, memory=memory, prefetch=args.prefetch, decode_threads=threads)
    stamps: list[float] = []
    first: dict[str, Any] = {}

    class Stamps:
        def put(self, value: Any) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) == 2:  # the first new token: decode starts here
                first.update(threads=_threads(), faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
                if args.perf:
                    first["perf"] = subprocess.Popen(["perf", "record", "-g", "-F", "999", "-e", "cpu-clock", "-o",
                                                      args.perf, "-p", str(os.getpid())], stderr=subprocess.DEVNULL)
                    time.sleep(0.5)
                    stamps[-1] = time.perf_counter()

        def end(self) -> None:
            pass

    ids = torch.tensor([[1000]])
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                       do_sample=False, streamer=Stamps())
    end, faults = _threads(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if args.perf:
        first["perf"].send_signal(signal.SIGINT)
        first["perf"].wait()
    decoded = max(1, len(stamps) - 2)
    gaps = [b - a for a, b in itertools.pairwise(stamps[1:])]  # [0] is the prompt
    per_thread = {}
    for tid, now in end.items():
        before = first["threads"].get(tid)
        if before is None or now["run"] - before["run"] < 0.002 * decoded:
            continue
        per_thread[tid] = {k: round((now[k] - before[k]) / decoded * (1e3 if k in ("run", "wait") else 1), 1)
                           for k in ("run", "wait", "vol", "invol")}
    stats = model.weight_streamer.stats()
    print(json.dumps({"experiments": sorted(experiments), "verify": args.verify, "prefetch": args.prefetch,
                      "decode_threads": model.weight_streamer.threads.threads, "torch_threads": torch.get_num_threads(),
                      "ms": round(statistics.median(gaps) * 1e3), "gaps": [round(g * 1e3) for g in gaps],
                      "minor_faults": (faults - first["faults"]) / decoded, "held": stats.held_units,
                      "demand_fetches": stats.demand_fetches, "peak_mib": resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss // 1024, "threads_ms_per_token": per_thread,
                      "load": os.getloadavg()[0]}))
    model.weight_streamer.close()
    store.close()


if __name__ == "__main__":
    main()
