"""L2 benchmark: tierstore's host tier against memcpy, safetensors and diskcache, in one run.

    python tools/bench_l2.py [--repeat 7] [--small 2000]

Prints medians of ``--repeat`` runs and the ratios the L2 issue sets as targets:
4 KiB gets (views) against ``safe_open().get_tensor`` and ``diskcache.Cache.get``;
a 16 MiB get as a view and with ``copy=True`` against memcpy into reused memory;
a cache-only put of 16 MiB into L2 against memcpy; the cost of recording an access.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import tierstore
from tierstore.engine.access_recorder import AccessRecorder


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def small_gets(folder: Path, n: int, repeat: int) -> dict[str, float]:
    """Ops/s of 4 KiB gets: tierstore L2 views, safetensors safe_open, diskcache."""
    import diskcache
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {f"t{i}": torch.randn(2048, dtype=torch.bfloat16) for i in range(n)}
    keys = list(tensors)
    rates: dict[str, float] = {}
    with tierstore.open(folder / "ts", l2_cache_size="64MiB", fsync=False) as db:
        with db.transaction():
            for key, value in tensors.items():
                db.put(key, value)

        def ts_get() -> None:
            for key in keys:
                db.get(key)
        rates["tierstore L2 get"] = n / median_time(ts_get, repeat)
        assert db.stats().hits["L2"] > 0
    save_file(tensors, str(folder / "small.safetensors"))
    with safe_open(str(folder / "small.safetensors"), framework="pt") as handle:
        def st_get() -> None:
            for key in keys:
                handle.get_tensor(key)
        rates["safetensors safe_open.get_tensor"] = n / median_time(st_get, repeat)
    with diskcache.Cache(str(folder / "dc")) as cache:
        for key, value in tensors.items():
            cache.set(key, value.view(torch.uint8).numpy().tobytes())

        def dc_get() -> None:
            for key in keys:
                torch.frombuffer(bytearray(cache.get(key)), dtype=torch.bfloat16)
        rates["diskcache get"] = n / median_time(dc_get, repeat)
    return rates


def large(folder: Path, repeat: int) -> dict[str, float]:
    """Seconds for 16 MiB: view get, copy get, cache-only put, and memcpy into reused memory."""
    value = torch.randn(8 << 20, dtype=torch.bfloat16)
    target = np.empty(value.numel() * 2, dtype=np.uint8)
    source = value.view(torch.uint8).numpy()
    out: dict[str, float] = {"memcpy (reused destination)": median_time(lambda: np.copyto(target, source), repeat)}
    with tierstore.open(folder / "big", l2_cache_size="128MiB", fsync=False) as db:
        db.put("big", value)
        db.get("big")
        out["tierstore get (view)"] = median_time(lambda: db.get("big"), repeat)
        out["tierstore get(copy=True)"] = median_time(lambda: db.get("big", copy=True), repeat)
        counter = iter(range(10**9))
        out["tierstore put(durable=False)"] = median_time(
            lambda: db.put(f"kv{next(counter) % 4}", value, durable=False), repeat)
    return out


def record_cost(n: int = 200_000) -> float:
    """Microseconds per recorded access (the hot-path part of access history)."""
    recorder = AccessRecorder(None, max_pending=n + 1)
    start = time.perf_counter()
    for _ in range(n):
        recorder.record("layer.0.weight", "get", "L2")
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--small", type=int, default=2000, help="number of 4 KiB tensors")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rates = small_gets(folder, args.small, args.repeat)
        sizes = large(folder, args.repeat)
    mib = 16.0
    ts = rates["tierstore L2 get"]
    print("\n| 4 KiB get | ops/s | tierstore ratio |\n| --- | ---: | ---: |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {ts / rate:.2f}x |")
    memcpy = sizes["memcpy (reused destination)"]
    print("\n| 16 MiB | time | bandwidth | vs memcpy |\n| --- | ---: | ---: | ---: |")
    for name, seconds in sizes.items():
        print(f"| {name} | {seconds * 1e6:,.1f} us | {mib / 1024 / seconds:,.2f} GiB/s | {memcpy / seconds:.2f}x |")
    cost = record_cost()
    print(f"\nrecording one access: {cost:.3f} us")
    checks = [
        ("L2 4 KiB get >= 150k ops/s", ts >= 150_000),
        ("L2 get >= 2.5x safetensors get_tensor", ts >= 2.5 * rates["safetensors safe_open.get_tensor"]),
        ("L2 get >= 3x diskcache get", ts >= 3 * rates["diskcache get"]),
        ("16 MiB view get in microseconds (< 100 us)", sizes["tierstore get (view)"] < 100e-6),
        ("get(copy=True) >= 0.6x memcpy", memcpy / sizes["tierstore get(copy=True)"] >= 0.6),
        ("put into L2 >= 0.5x memcpy", memcpy / sizes["tierstore put(durable=False)"] >= 0.5),
        ("recording an access <= 1 us", cost <= 1.0),
    ]
    print("\n| target | met |\n| --- | --- |")
    for name, ok in checks:
        print(f"| {name} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main()
