"""Check tierstore's L1 pool on this machine's GPU, in one table.

    python tools/gpu_check.py [--size 256MiB] [--repeats 5] [--json results.json]

Measures host-to-device bandwidth (pageable and pinned torch copies, then L2 -> L1 through a pinned
``HostArena`` and ``DevicePool.copy_in``, and through a whole ``TierStore.get(key, device="cuda")``
promotion from its pinned L2; target >= 0.8x the pinned baseline), how well a prefetch overlaps a
matmul (wall time against the sum of the parts), and the pool's alloc/free rate against
``torch.empty`` + ``del``; then checks every dtype through L1 bit for bit, the bf16 -> fp16 cast
against ``Tensor.to``, release callbacks, shrink, L1-only blocks written back through a store, and
out-of-memory translation. Then (``--plan-layers N``, default 8; ``--no-plan-2b`` skips it) it plans
Qwen3-VL 2B at its real layer shapes for this machine, executes the plan with ``load_streamed(plan=)``
on CUDA and reports predicted against measured ms/token (:mod:`gpu_check_plan`, about 1-3 minutes).
Without CUDA it says so, runs the correctness checks and the alloc rate on a CPU-device pool, says
in the JSON (``skipped``) which CUDA steps it skipped and why, and exits 0. Exit status 1 means a
correctness check failed; slow numbers are reported, not fatal. ``--json`` also writes the table,
with raw numbers, to a file. Needs only torch, transformers (the 2B step) and tierstore; takes well
under 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import tierstore
from tierstore.compat.allocations import allocate_attention_weights, allocate_kv_cache
from tierstore.config import format_size, parse_size
from tierstore.errors import DeviceMemoryError, TierFullError
from tierstore.tiers.l1_cuda import DevicePool
from tierstore.tiers.l2_slab import HostArena
from tierstore.tiers.slab_allocator import Allocation

DTYPES = [getattr(torch, n) for n in (
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64", "int32", "int16", "int8",
    "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz") if isinstance(getattr(torch, n, None), torch.dtype)]
SHAPES = [(), (0,), (3, 0, 2), (1,), (257,), (4, 33, 7)]
TARGET_L2_RATIO = 0.8



class Row(NamedTuple):
    """One line of the table; ``values`` holds the raw numbers behind it (for ``--json``)."""

    check: str
    result: str
    target: str
    verdict: str
    values: dict[str, Any] = {}  # noqa: RUF012 - never mutated


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
    return Row("every dtype through L1", f"{len(DTYPES)} dtypes x {len(SHAPES)} shapes", "bit-exact", verdict)


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
    return Row("bf16 -> fp16 cast on device", f"policy here: {policy or 'keep bf16'}", "== Tensor.to(float16)",
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
    return Row("views: release + churn", f"release calls {len(calls)}, held view intact: {intact}", "1, True",
            "ok" if ok else "FAIL")


def _check_shrink_and_helpers(pool: DevicePool) -> Row:
    attn = allocate_attention_weights(pool, 2, 8, 512, 64)
    kv = allocate_kv_cache(pool, 1, 16, 1024, 128)
    shapes_ok = attn.shape == (2, 8, 512, 512) and kv.shape == (2, 1, 16, 1024, 128)
    del attn, kv
    gc.collect()
    released = pool.shrink()
    ok = shapes_ok and pool.stats().used == 0 and pool.stats().chunks == 0 and released > 0
    return Row("adapter helpers, shrink", f"shapes ok: {shapes_ok}, released {format_size(released)}",
            "all chunks back", "ok" if ok else "FAIL")


def _check_oom(device: torch.device) -> Row:
    total = torch.cuda.mem_get_info(device)[1]
    pool = DevicePool(4 * total, device=device, chunk_size=2 * total, headroom=0)
    try:
        pool.grow()
    except TierFullError as exc:
        typed = isinstance(exc, DeviceMemoryError) and exc.tier == "L1"
        return Row("device OOM -> DeviceMemoryError", "raised, tier L1" if typed else f"{type(exc).__name__}",
                   "typed", "ok" if typed and pool.stats().oom_events == 1 else "FAIL")
    finally:
        pool.close()
    return Row("device OOM -> DeviceMemoryError", "no error", "typed", "FAIL")


def _check_store(device: torch.device) -> list[Row]:
    """Through a whole store on ``device``: cache-only device tensors live only in L1, are written back
    when L1 is shrunk or full, and come back bit-exact; a forced bf16 cast matches ``Tensor.to``."""
    blocks = {f"kv/{d:02d}": _random_bits(dtype, ((96 << 10) // dtype.itemsize,), d).to(device)
              for d, dtype in enumerate(DTYPES)}  # 96 KiB each through 1 MiB of L1
    with tempfile.TemporaryDirectory(prefix="tierstore-gpu-check-") as tmp:
        with tierstore.open(Path(tmp) / "store", l1_device=str(device), l1_cache_size="1MiB",
                            l2_cache_size="1MiB", fsync=False, l3_compression=False) as db:
            for key, value in blocks.items():
                db.put(key, value, durable=False)
            spills = db.stats().tiers["L1"]["spills"]
            released = db.shrink_l1()
            tiers = sorted({t for key in blocks for t in db.info(key).tiers})
            bad = [k for k, v in blocks.items() if not (_same_bits(db.get(k, device=device), v)
                                                        and _same_bits(db.get(k), v.cpu()))]
            writeback = Row("store: L1-only blocks written back", f"{len(blocks)} blocks, {spills} spilled, "
                            f"shrink released {format_size(released)}, now in {'+'.join(tiers)}",
                            "bit-exact, nothing lost", "ok" if not bad and spills else f"FAIL {bad[:3]}",
                            {"blocks": len(blocks), "spills": spills, "released_bytes": released})
        with tierstore.open(Path(tmp) / "cast", l1_device=str(device), l1_cache_size="4MiB", l1_bf16_cast="always",
                            fsync=False) as db:
            src = _random_bits(torch.bfloat16, (1 << 16,), 11)
            db.put("w", src)
            got, want = db.get("w", device=device).cpu(), src.to(torch.float16)
            nan = want.isnan()
            ok = got.dtype == torch.float16 and torch.equal(got.isnan(), nan) and _same_bits(got[~nan], want[~nan])
            ok = ok and _same_bits(db.get("w"), src)
            cast = Row("store: bf16 -> fp16 on the way into L1", "l1_bf16_cast='always'",
                       "== Tensor.to(float16), stored block untouched", "ok" if ok else "FAIL")
    return [writeback, cast]


def correctness(device: torch.device) -> list[Row]:
    with DevicePool("256MiB", device=device, chunk_size="64MiB") as pool, HostArena("16MiB") as arena:
        rows = [_check_dtypes(pool, arena), _check_cast(pool), _check_release_and_churn(pool),
                _check_shrink_and_helpers(pool)]
    return rows + _check_store(device) + ([_check_oom(device)] if device.type == "cuda" else [])


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
        Row("H2D pageable (torch)", _gbps(size, t_pageable), f"{format_size(size)}, median of {repeats}", "",
            {"bytes": size, "seconds": t_pageable}),
        Row("H2D pinned (torch)", _gbps(size, t_pinned), "baseline", "", {"bytes": size, "seconds": t_pinned}),
    ]
    rows.append(_store_promotion(device, size, repeats, t_pinned))
    with HostArena(size + (1 << 20), pin=True) as arena, DevicePool(2 * size, device=device, chunk_size=size) as pool:
        host, slot = arena.alloc(size), pool.alloc(size)
        assert host is not None and slot is not None
        source = arena.view(host, torch.uint8, (size,))
        source.fill_(3)
        t_l2 = _median_s(lambda: pool.copy_in(slot, source), device, repeats)
        ratio = t_pinned / t_l2
        rows.append(Row("L2 -> L1 (HostArena + copy_in)", _gbps(size, t_l2),
                        f">= {TARGET_L2_RATIO}x pinned (arena pinned: {arena.pinned})",
                        f"{ratio:.2f}x " + ("ok" if ratio >= TARGET_L2_RATIO else "BELOW TARGET"),
                        {"bytes": size, "seconds": t_l2, "ratio_to_pinned": ratio}))

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
        rows.append(Row("prefetch || matmul", f"{t_both * 1e3:.2f} ms vs {(t_l2 + t_mm) * 1e3:.2f} ms serial",
                        f"copy {t_l2 * 1e3:.2f} ms, {reps} matmuls {t_mm * 1e3:.2f} ms",
                        f"{overlap:.0%} hidden", {"copy_s": t_l2, "matmuls_s": t_mm, "both_s": t_both,
                                                  "matmuls": reps, "hidden_fraction": overlap}))
        pool.synchronize()
        pool.free(slot)
        rows.append(_alloc_rate(pool, device))
    return rows


def _store_promotion(device: torch.device, size: int, repeats: int, t_pinned: float) -> Row:
    """``TierStore.get(key, device)`` of a block in the store's pinned L2: two blocks alternate through
    an L1 that holds one, so every get is a promotion (with an eviction), the whole store path."""
    with tempfile.TemporaryDirectory(prefix="tierstore-gpu-check-") as tmp, tierstore.open(
            Path(tmp), l1_device=str(device), l1_cache_size=size + (4 << 20), l2_cache_size=2 * size + (8 << 20),
            fsync=False, l3_compression=False) as db:
        for key in ("a", "b"):
            db.put(key, torch.full((size,), 7, dtype=torch.uint8))
            db.get(key)  # into L2
        keys = ["a", "b"]

        def promote() -> None:
            keys.reverse()
            tensor = db.get(keys[0], device=device)
            del tensor  # held views cannot be evicted

        t_get = _median_s(promote, device, repeats)
        l1 = db.stats().tiers["L1"]
        pinned = db.stats().tiers["L2"]["pinned"]
    ratio = t_pinned / t_get
    return Row("L2 -> L1 (TierStore.get, device)", _gbps(size, t_get),
               f">= {TARGET_L2_RATIO}x pinned (L2 pinned: {pinned}, L1 misses {l1['misses']})",
               f"{ratio:.2f}x " + ("ok" if ratio >= TARGET_L2_RATIO else "BELOW TARGET"),
               {"bytes": size, "seconds": t_get, "ratio_to_pinned": ratio})


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
    return Row(f"alloc+free 1 MiB ({device.type})", f"pool {t_pool * 1e6:.2f} us",
               f"torch.empty+del {t_torch * 1e6:.2f} us", f"pool at {t_torch / t_pool:.1f}x torch's rate",
               {"pool_s": t_pool, "torch_s": t_torch, "count": count})


def _print_table(rows: list[Row]) -> None:
    header = Row("check", "result", "target / reference", "verdict")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _machine(device: torch.device | None) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                            "tierstore": tierstore.__version__, "python": platform.python_version(),
                            "host": platform.node(), "gpu": None}
    if device is not None:
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"index": device.index, "name": props.name, "capability": [props.major, props.minor],
                       "total_memory": props.total_memory}
    return info


def _plan_2b(device: torch.device, layers: int) -> dict[str, Any]:
    """The 2B plan step (:func:`gpu_check_plan.run_plan_check`); an exception is reported, not raised."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check_plan import run_plan_check

    try:
        return run_plan_check(device, shape="2b", layers=layers)
    except Exception as exc:  # a failed step is a row of the report
        return {"error": f"{type(exc).__name__}: {exc}"}


def _plan_row(result: dict[str, Any]) -> Row:
    if "error" in result:
        return Row("2B plan, load_streamed(plan=)", result["error"][:80], "runs", "FAIL", result)
    ratio = result["measured_over_predicted"] or float("nan")
    return Row(f"2B plan ({result['layers']} layers) decode",
               f"{result['measured_decode_s'] * 1e3:.1f} ms/token measured",
               f"{result['predicted_decode_s'] * 1e3:.1f} ms/token predicted",
               f"measured/predicted {ratio:.2f}" + (" (outside +-25%)" if not 0.75 <= ratio <= 1.25 else ""),
               result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", default="256MiB", help="bytes per bandwidth copy (default 256MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: the current one)")
    parser.add_argument("--json", metavar="PATH", help="also write the results, with raw numbers, to PATH")
    parser.add_argument("--plan-layers", type=int, default=8,
                        help="decoder layers of the 2B plan step (28 is the real model; default 8)")
    parser.add_argument("--no-plan-2b", action="store_true", help="skip the 2B placement-plan step")
    args = parser.parse_args(argv)
    skipped: dict[str, str] = {}
    plan_2b: dict[str, Any] | None = None
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}")
    device: torch.device | None = None
    if not torch.cuda.is_available():
        print("no GPU available: torch.cuda.is_available() is False; running the correctness checks and the "
              "alloc rate on a CPU-device pool only (no bandwidth or overlap numbers)")
        cpu = torch.device("cpu")
        with DevicePool("64MiB", device=cpu, chunk_size="64MiB") as pool:
            rows = [*correctness(cpu), _alloc_rate(pool, cpu, count=2_000)]
        why = "no CUDA device: torch.cuda.is_available() is False"
        skipped = {"bandwidth and overlap": why, "2B placement plan on CUDA": why}
    else:
        device = torch.device(args.device)
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        props = torch.cuda.get_device_properties(device)
        print(f"GPU {device.index}: {props.name}, compute capability {props.major}.{props.minor}, "
              f"{format_size(props.total_memory)}, bf16 math: {(props.major, props.minor) >= (8, 0)}")
        rows = bandwidth_and_overlap(device, parse_size(args.size), args.repeats) + correctness(device)
        if args.no_plan_2b:
            skipped["2B placement plan on CUDA"] = "--no-plan-2b"
        else:
            plan_2b = _plan_2b(device, args.plan_layers)
            rows.append(_plan_row(plan_2b))
    for step, why in skipped.items():
        print(f"skipped: {step} ({why})")
    _print_table(rows)
    failed = [r.check for r in rows if r.verdict.startswith("FAIL")]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    if args.json:
        report = {"machine": _machine(device), "size": parse_size(args.size), "repeats": args.repeats,
                  "failed": failed, "skipped": skipped, "plan_2b": plan_2b, "rows": [r._asdict() for r in rows]}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
