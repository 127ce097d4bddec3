"""Check tierstore's L1 pool on this machine's GPU, in one table.

    python tools/gpu_check.py [--size 256MiB] [--repeats 5]

Measures host-to-device bandwidth (pageable and pinned torch copies, then L2 -> L1 through a pinned
``HostArena`` and ``DevicePool.copy_in``; target >= 0.8x the pinned baseline), how well a prefetch
overlaps a matmul, and the pool's alloc/free rate against ``torch.empty`` + ``del``; then checks every
dtype through L1 bit for bit, the bf16 -> fp16 cast against ``Tensor.to``, release callbacks, shrink and
out-of-memory translation. Without CUDA it says so, runs the correctness checks on a CPU-device pool
and exits 0. Exit status 1 means a correctness check failed; slow numbers are reported, not fatal.
Needs only torch and tierstore; takes well under 3 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from tierstore.alloc import Allocation
from tierstore.config import format_size, parse_size
from tierstore.errors import TierFullError
from tierstore.tiers.l1_cuda import DevicePool, allocate_attention_weights, allocate_kv_cache
from tierstore.tiers.l2_slab import HostArena

DTYPES = [getattr(torch, n) for n in (
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64", "int32", "int16", "int8",
    "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz") if isinstance(getattr(torch, n, None), torch.dtype)]
SHAPES = [(), (0,), (3, 0, 2), (1,), (257,), (4, 33, 7)]
TARGET_L2_RATIO = 0.8

Row = tuple[str, str, str, str]  # check, result, target or reference, verdict


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` (device work included), after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def _random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (math.prod(shape) * dtype.itemsize,),
                        dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)  # NaN payloads, infinities, -0.0 and subnormals included


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _wait(event: torch.cuda.Event | None, device: torch.device) -> None:
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


# -- correctness (CPU and GPU) ----------------------------------------------------------------------------

def _check_dtypes(pool: DevicePool, arena: HostArena) -> Row:
    """Every dtype and shape: L2 slot -> copy_in -> view on the device -> back to the host, bit for bit."""
    failures = []
    for d, dtype in enumerate(DTYPES):
        for s, shape in enumerate(SHAPES):
            src = _random_bits(dtype, shape, 100 * d + s)
            nbytes = src.numel() * dtype.itemsize
            slot, host = pool.alloc(nbytes), arena.alloc(nbytes)
            assert slot is not None and host is not None
            staged = arena.view(host, dtype, shape)
            staged.copy_(src)
            _wait(pool.copy_in(slot, staged), pool.device)
            back = pool.view(slot, dtype, shape).cpu()
            out = np.empty(nbytes, dtype=np.uint8)
            pool.copy_out(slot, out)
            if not _same_bits(back, src) or out.tobytes() != src.reshape(-1).view(torch.uint8).numpy().tobytes():
                failures.append(f"{dtype}{list(shape)}")
            del staged, back
            pool.free(slot)
            arena.free(host)
    pool.synchronize()
    verdict = "ok" if not failures else "FAIL " + ", ".join(failures[:4])
    return ("every dtype through L1", f"{len(DTYPES)} dtypes x {len(SHAPES)} shapes", "bit-exact", verdict)


def _check_cast(pool: DevicePool) -> Row:
    """bf16 bits (specials included) cast to fp16 in L1 equal torch's own ``.to(torch.float16)``."""
    src = _random_bits(torch.bfloat16, (1 << 16,), 7)
    slot = pool.alloc(src.numel() * 2)
    assert slot is not None
    _wait(pool.cast_into(slot, src, torch.float16), pool.device)
    got = pool.view(slot, torch.float16, tuple(src.shape)).cpu()
    want = src.to(torch.float16)
    nan = want.isnan()
    ok = torch.equal(got.isnan(), nan) and _same_bits(got[~nan], want[~nan])
    pool.synchronize()
    pool.free(slot)
    policy = pool.needs_cast(torch.bfloat16)
    return ("bf16 -> fp16 cast on device", f"policy here: {policy or 'keep bf16'}", "== Tensor.to(float16)",
            "ok" if ok else "FAIL")


def _check_release_and_churn(pool: DevicePool) -> Row:
    """on_release fires once after the last derived tensor; held views survive churn around them."""
    calls: list[int] = []
    slot = pool.alloc(4096)
    assert slot is not None
    view = pool.view(slot, torch.float32, (32, 32), on_release=lambda: calls.append(1))
    view.copy_(torch.arange(1024, dtype=torch.float32).reshape(32, 32))
    derived = [view[3:], view.view(torch.int32), view.t(), view.reshape(-1)[::2]]
    del view
    gc.collect()
    early = bool(calls)
    rng = np.random.default_rng(1)
    others: list[Allocation] = []
    for _ in range(500):
        if others and rng.random() < 0.5:
            pool.free(others.pop(int(rng.integers(len(others)))))
        elif (a := pool.alloc(int(rng.choice([0, 64, 5000, 70_000])))) is not None:
            _wait(pool.copy_in(a, rng.integers(0, 256, a.nbytes, dtype=np.uint8)), pool.device)
            others.append(a)
    pool.synchronize()
    intact = bool(torch.equal(derived[0].cpu(), torch.arange(96, 1024, dtype=torch.float32).reshape(29, 32)))
    while derived:
        derived.pop()
        gc.collect()
    for a in others:
        pool.free(a)
    pool.free(slot)
    ok = not early and calls == [1] and intact
    return ("views: release + churn", f"release calls {len(calls)}, held view intact: {intact}", "1, True",
            "ok" if ok else "FAIL")


def _check_shrink_and_helpers(pool: DevicePool) -> Row:
    attn = allocate_attention_weights(pool, 2, 8, 512, 64)
    kv = allocate_kv_cache(pool, 1, 16, 1024, 128)
    shapes_ok = attn.shape == (2, 8, 512, 512) and kv.shape == (2, 1, 16, 1024, 128)
    del attn, kv
    gc.collect()
    released = pool.shrink()
    ok = shapes_ok and pool.stats().used == 0 and pool.stats().chunks == 0 and released > 0
    return ("adapter helpers, shrink", f"shapes ok: {shapes_ok}, released {format_size(released)}",
            "all chunks back", "ok" if ok else "FAIL")


def _check_oom(device: torch.device) -> Row:
    total = torch.cuda.mem_get_info(device)[1]
    pool = DevicePool(4 * total, device=device, chunk_size=2 * total, headroom=0)
    try:
        pool.grow()
    except TierFullError as exc:
        return ("device OOM -> TierFullError", "raised, tier L1" if exc.tier == "L1" else "wrong tier", "typed",
                "ok" if exc.tier == "L1" and pool.stats().oom_events == 1 else "FAIL")
    finally:
        pool.close()
    return ("device OOM -> TierFullError", "no error", "typed", "FAIL")


def correctness(device: torch.device) -> list[Row]:
    with DevicePool("256MiB", device=device, chunk_size="64MiB") as pool, HostArena("16MiB") as arena:
        return [_check_dtypes(pool, arena), _check_cast(pool), _check_release_and_churn(pool),
                _check_shrink_and_helpers(pool)] + ([_check_oom(device)] if device.type == "cuda" else [])


# -- performance (GPU only) -------------------------------------------------------------------------------

def _torch_baselines(device: torch.device, size: int, repeats: int) -> tuple[float, float]:
    """Seconds per ``size``-byte host-to-device copy from pageable and from pinned memory."""
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    pageable = torch.ones(size, dtype=torch.uint8)
    pinned = torch.ones(size, dtype=torch.uint8, pin_memory=True)
    return (_median_s(lambda: dst.copy_(pageable), device, repeats),
            _median_s(lambda: dst.copy_(pinned, non_blocking=True), device, repeats))


def bandwidth_and_overlap(device: torch.device, size: int, repeats: int) -> list[Row]:
    t_pageable, t_pinned = _torch_baselines(device, size, repeats)
    rows: list[Row] = [
        ("H2D pageable (torch)", _gbps(size, t_pageable), f"{format_size(size)}, median of {repeats}", ""),
        ("H2D pinned (torch)", _gbps(size, t_pinned), "baseline", ""),
    ]
    with HostArena(size + (1 << 20), pin=True) as arena, DevicePool(2 * size, device=device, chunk_size=size) as pool:
        host, slot = arena.alloc(size), pool.alloc(size)
        assert host is not None and slot is not None
        source = arena.view(host, torch.uint8, (size,))
        source.fill_(3)
        t_l2 = _median_s(lambda: pool.copy_in(slot, source), device, repeats)
        ratio = t_pinned / t_l2
        rows.append(("L2 -> L1 (HostArena + copy_in)", _gbps(size, t_l2),
                     f">= {TARGET_L2_RATIO}x pinned (arena pinned: {arena.pinned})",
                     f"{ratio:.2f}x " + ("ok" if ratio >= TARGET_L2_RATIO else "BELOW TARGET")))

        n = 4096
        a = torch.randn(n, n, dtype=torch.float16, device=device)
        b = torch.randn(n, n, dtype=torch.float16, device=device)
        t_one = _median_s(lambda: a @ b, device, repeats)
        reps = max(1, round(t_l2 / t_one))

        def matmuls() -> None:
            for _ in range(reps):
                a @ b

        def both() -> None:
            event = pool.copy_in(slot, source)
            matmuls()
            _wait(event, device)

        t_mm = _median_s(matmuls, device, repeats)
        t_both = _median_s(both, device, repeats)
        overlap = (t_l2 + t_mm - t_both) / min(t_l2, t_mm)
        rows.append(("prefetch || matmul", f"{t_both * 1e3:.2f} ms vs {(t_l2 + t_mm) * 1e3:.2f} ms serial",
                     f"copy {t_l2 * 1e3:.2f} ms, {reps} matmuls {t_mm * 1e3:.2f} ms",
                     f"{overlap:.0%} hidden"))
        pool.synchronize()
        pool.free(slot)
        rows.append(_alloc_rate(pool, device))
    return rows


def _alloc_rate(pool: DevicePool, device: torch.device, count: int = 20_000) -> Row:
    pool.grow()
    nbytes = 1 << 20

    def pool_pairs() -> None:
        for _ in range(count):
            pool.free(pool.alloc(nbytes))  # type: ignore[arg-type]

    def torch_pairs() -> None:
        for _ in range(count):
            t = torch.empty(nbytes, dtype=torch.uint8, device=device)
            del t

    t_pool = _median_s(pool_pairs, device, 3) / count
    t_torch = _median_s(torch_pairs, device, 3) / count
    return ("alloc+free 1 MiB", f"pool {t_pool * 1e6:.2f} us", f"torch.empty+del {t_torch * 1e6:.2f} us",
            f"{t_torch / t_pool:.1f}x")


def _print_table(rows: list[Row]) -> None:
    header: Row = ("check", "result", "target / reference", "verdict")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", default="256MiB", help="bytes per bandwidth copy (default 256MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: the current one)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}")
    if not torch.cuda.is_available():
        print("no GPU available: torch.cuda.is_available() is False; running the correctness checks on a "
              "CPU-device pool only")
        rows = correctness(torch.device("cpu"))
    else:
        device = torch.device(args.device)
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        props = torch.cuda.get_device_properties(device)
        print(f"GPU {device.index}: {props.name}, compute capability {props.major}.{props.minor}, "
              f"{format_size(props.total_memory)}")
        rows = bandwidth_and_overlap(device, parse_size(args.size), args.repeats) + correctness(device)
    _print_table(rows)
    failed = [r[0] for r in rows if r[3].startswith("FAIL")]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
