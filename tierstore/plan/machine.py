"""A machine as the placement planner sees it: speeds in bytes or FLOPs per second, and free memory.

:class:`Machine` is a frozen value. :meth:`Machine.from_probe` measures this machine (disk, codec,
memcpy and pinned copies through :mod:`tierstore.bandwidth`, facts through :mod:`tierstore.hardware`,
plus a short matmul and, on a GPU, pageable copies and device memory bandwidth);
:meth:`Machine.seed_laptop` is the original request's laptop from published figures (nothing
measured); :meth:`Machine.from_file` reads one written by :meth:`Machine.to_dict` as JSON.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["Machine", "measure_matvec", "measure_mapped_matvec", "measure_sharing"]

GB, MiB, GiB = 10**9, 1 << 20, 1 << 30


@dataclass(frozen=True, slots=True)
class Machine:
    """Speeds (per second) and free memory (bytes) of one machine; GPU fields are None without a GPU."""

    name: str
    disk_read: float
    """Sequential read of the store's disk, bytes/s (what an L3 read of stored bytes costs)."""
    decode: float
    """Decompression of L3 blocks on all ``cores`` at once, bytes/s of decoded data (``decode / cores`` per thread)."""
    memcpy: float
    """Host memory bandwidth, bytes/s: what a CPU matrix-vector product reads its weights at."""
    cpu_flops: float
    """Dense matmul throughput of the CPU on the weights' dtype (bf16), FLOP/s: what prefill on the CPU runs at."""
    ram_free: int
    h2d_pinned: float | None = None
    """Host-to-device copy from pinned memory (L2 is pinned), bytes/s."""
    h2d_pageable: float | None = None
    """Host-to-device copy from pageable memory (accelerate's CPU offload), bytes/s."""
    gpu_flops: float | None = None
    """Dense matmul throughput of the GPU at the dtype the plan runs there, FLOP/s."""
    vram_bandwidth: float | None = None
    """Device memory bandwidth, bytes/s: what a GPU matrix-vector product reads its weights at."""
    vram_free: int = 0
    cpu_matvec: float | None = None
    """Bytes/s of bf16 weights a CPU matrix-vector product (one decoded token) reads, on all threads.

    None: ``memcpy``. A matrix-vector product is memory-bound only where the kernel keeps up with
    the memory; on a few cores (and for bf16 on most CPUs) it reads its weights well below
    ``memcpy``: 0.45-2.2 GB/s against 2.5-5.6 GB/s on the shared 2-core VM of BENCHMARKS.md.
    """

    cores: int = 1
    """CPU cores the process runs on: compute threads and the L3 fetch threads share them."""
    compute_threads: int | None = None
    """Threads a CPU matrix product runs on (None: all ``cores``, torch's default)."""
    page_cache_read: float | None = None
    """One thread's ``pread`` of a file held in the page cache into memory already faulted in, bytes/s
    (its share with every core reading, as :func:`~tierstore.plan.bandwidth.measure_fetch` measures).

    What a raw L3 block costs to copy into its L2 slot once its file is cached (None: ``memcpy``).
    """
    checksum: float | None = None
    """One thread's crc32c, bytes/s: the L3 reader checks every block it returns (None: not counted)."""
    head_matvec: float | None = None
    """Bytes/s a CPU matrix-vector product reads the head's weights at (``lm_head``: one vocab-wide matrix,
    whose rows the threads split evenly; on the bench VM 3-4x a decoder layer's rate). None: ``cpu_matvec``."""
    compute_share: float | None = None
    """Fraction of its alone speed a CPU product on every core keeps while a fetch thread runs beside it
    (None: the cores are shared evenly, see :mod:`tierstore.plan.placement`). Measured by
    :func:`measure_sharing`: torch's threads wait at each product's end for the one the fetch thread
    displaced, so on the 2-core bench VM a product runs at ~0.5 of its speed, not the 2/3 of an even share."""
    fetch_share: float | None = None
    """Fraction of its alone speed the fetch thread keeps while a product runs on every core (with
    ``compute_share``; None: 1)."""
    unit_overhead: float | None = None
    """Seconds one unit's forward takes beyond its matrix products, for one token: the framework's Python
    and dispatch, norms, rotary, attention over a short context (measured on the model's class at a tiny
    width, where the products are free; ~1.4 ms per Qwen3-VL decoder layer on the bench VM). None: 0."""
    map_populate: float | None = None
    """One thread's map of a raw L3 block whose file is in the page cache, bytes/s: ``mmap`` and
    ``MADV_POPULATE_READ`` (the page-table entries of every page) and, once its tensor dies, the
    ``munmap``, without the checksum (None: free)."""
    spare_core_matvec: float | None = None
    """Bytes/s a one-token CPU product reads its weights at on ``cores - 1`` threads: what a streamed unit's
    decode runs on while the prefetch thread fetches on the core left to it (``load_streamed``'s
    ``decode_threads="auto"``, :mod:`tierstore.integrations.decode_threads`). None: ``cpu_matvec`` times
    ``(cores - 1) / cores``."""
    stream_spare_core: bool = True
    """Whether a streamed decode leaves a core to the prefetch thread (``load_streamed``'s default
    ``decode_threads="auto"``); False prices compute on every core beside it (``decode_threads=None``)."""
    mapped_matvec: float | None = None
    """Bytes/s a one-token CPU product reads its weights at when each weight is a fresh ``MAP_PRIVATE`` map
    of a file in the page cache, faulted in by the product itself and unmapped after it
    (:func:`measure_mapped_matvec`): how accelerate's disk offload serves an offloaded module (safetensors'
    ``get_tensor`` returns a view of a private map of the checkpoint file). None: the product at
    ``cpu_matvec`` plus a copy at ``page_cache_read``."""

    def __post_init__(self) -> None:
        optional = ("cpu_matvec", "head_matvec", "page_cache_read", "checksum", "map_populate", "unit_overhead",
                    "compute_share", "fetch_share", "spare_core_matvec", "mapped_matvec")
        for name in ("disk_read", "decode", "memcpy", "cpu_flops", *optional):
            if name in optional and getattr(self, name) is None:
                continue
            if name == "unit_overhead":  # seconds, not a speed: none measured above the products is 0
                if not getattr(self, name) >= 0:
                    raise ConfigError(f"machine {self.name!r}: unit_overhead must be 0 or more seconds, not "
                                      f"{getattr(self, name)!r}")
                continue
            if not getattr(self, name) > 0:
                raise ConfigError(f"machine {self.name!r}: {name} must be a positive speed, not "
                                  f"{getattr(self, name)!r}; measure it (Machine.from_probe) or give it")
        threads = self.compute_threads
        if not (isinstance(self.cores, int) and self.cores >= 1) or (threads is not None and threads < 1):
            raise ConfigError(f"machine {self.name!r}: cores={self.cores!r} and compute_threads={threads!r} must be "
                              "whole numbers of at least 1")
        gpu = (self.h2d_pinned, self.gpu_flops, self.vram_bandwidth)
        if any(v is not None for v in gpu) and not all(v is not None and v > 0 for v in gpu):
            raise ConfigError(f"machine {self.name!r}: a GPU needs h2d_pinned, gpu_flops and vram_bandwidth "
                              f"(got {gpu}); give all three, or none for a machine without a GPU")

    @property
    def cpu_weight_read(self) -> float:
        """Bytes/s at which a CPU matrix-vector product reads its weights: ``cpu_matvec``, else ``memcpy``."""
        return self.cpu_matvec if self.cpu_matvec is not None else self.memcpy

    @property
    def head_weight_read(self) -> float:
        """Bytes/s the CPU reads the head's weights at for one token: ``head_matvec``, else ``cpu_weight_read``."""
        return self.head_matvec if self.head_matvec is not None else self.cpu_weight_read

    @property
    def spare_core_read(self) -> float:
        """Bytes/s of a one-token product on ``cores - 1`` threads: ``spare_core_matvec``, else a share of
        ``cpu_weight_read``."""
        if self.spare_core_matvec is not None:
            return self.spare_core_matvec
        return self.cpu_weight_read * max(1, self.cores - 1) / self.cores

    @property
    def streams_on_spare_core(self) -> bool:
        """Whether a streamed decode computes on ``cores - 1`` threads beside the prefetch thread: two cores or
        more, torch on all of them and ``stream_spare_core`` (what ``decode_threads="auto"`` then does)."""
        return self.stream_spare_core and self.cores >= 2 and self.threads_computing >= self.cores

    @property
    def threads_computing(self) -> int:
        """Cores the CPU compute keeps busy: ``compute_threads``, at most ``cores`` (None: all of them)."""
        return min(self.cores, self.compute_threads or self.cores)

    def fetch_seconds(self, nbytes: int, stored_bytes: int, how: str, *, checked: bool = False) -> float:
        """CPU-seconds (one thread's) to fetch a streamed block of ``nbytes`` from L3, its file in the page cache.

        ``how`` is ``decode`` (compressed, ``stored_bytes`` in the file): ``stored_bytes /
        page_cache_read + nbytes / (decode / cores) + nbytes / checksum``; ``read`` (stored raw, read
        into L2): ``nbytes / page_cache_read + nbytes / checksum``; ``map`` (stored raw, the page
        cache's pages viewed in place): ``nbytes / map_populate``, plus ``nbytes / checksum`` when
        ``checked`` (the store checks this map: ``l3_verify_maps`` ``"always"``, or ``"disk"`` when it
        reads from the disk). A file not in the page cache adds the disk's time, which is no CPU work (see
        :mod:`tierstore.plan.placement`).
        """
        check = nbytes / self.checksum if self.checksum else 0.0
        if how == "map":
            return (nbytes / self.map_populate if self.map_populate else 0.0) + (check if checked else 0.0)
        read = self.page_cache_read or self.memcpy
        if how == "read":
            return nbytes / read + check
        return stored_bytes / read + nbytes / (self.decode / self.cores) + check

    @property
    def has_gpu(self) -> bool:
        """Whether the machine has a GPU the plan may use."""
        return self.gpu_flops is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what :meth:`from_file` reads)."""
        return asdict(self)

    @staticmethod
    def from_file(path: str | os.PathLike[str]) -> Machine:
        """A machine from a JSON object of its fields (unknown fields are a ``ConfigError``)."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"machine file {path}: not JSON ({exc}); write it with Machine.to_dict()") from None
        known = {f.name for f in fields(Machine)}
        if not isinstance(data, dict) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"machine file {path}: unexpected {extra}; the fields are {sorted(known)}")
        try:
            return Machine(**data)
        except TypeError as exc:
            raise ConfigError(f"machine file {path}: {exc}; the fields are {sorted(known)}") from None

    @staticmethod
    def seed_laptop(*, lanes: int = 4, vram: int = 4 * GiB, ram_free: int = 6 * GiB) -> Machine:
        """The original request's laptop, from published figures: nothing here is measured.

        i5-10210U (4 cores, AVX2, ~30 GB/s DDR4 dual channel; ~100 GFLOP/s sustained fp32 matmul),
        a GTX 10xx with 4 GB (sm61: fp16 arithmetic runs at 1/64 of fp32, so fp16 weights are
        multiplied with fp32 accumulation at the fp32 rate, ~1.8 TFLOP/s; ~110 GB/s GDDR5), PCIe
        3.0 at ``lanes`` lanes (~0.75 GB/s per lane pinned, ~2/3 of that pageable), NVMe at 2.5 GB/s;
        one thread copies a cached file at ~10 GB/s and checks crc32c (SSE4.2) at ~8 GB/s.
        """
        if lanes not in (1, 2, 4, 8, 16):
            raise ConfigError(f"seed_laptop: lanes={lanes} is not a PCIe width; use 4 or 16")
        pinned = 0.75 * GB * lanes
        return Machine(name=f"seed laptop (i5-10210U, GTX 10xx {vram // GiB} GB sm61, PCIe 3.0 x{lanes}, NVMe)",
                       disk_read=2.5 * GB, decode=4 * 0.8 * GB, memcpy=30 * GB, cpu_flops=100e9, ram_free=ram_free,
                       cores=4, page_cache_read=10 * GB, checksum=8 * GB,
                       h2d_pinned=pinned, h2d_pageable=pinned * 2 / 3, gpu_flops=1.8e12, vram_bandwidth=110 * GB,
                       vram_free=vram - 200 * MiB)

    @staticmethod
    def from_probe(folder: str | os.PathLike[str] = ".", *, nbytes: int = 32 << 20,
                   layer_shapes: tuple[tuple[int, int], ...] | None = None,
                   head_shape: tuple[int, int] | None = None) -> Machine:
        """Measure this machine now (a few seconds); the disk is the one holding ``folder``.

        ``layer_shapes`` / ``head_shape``: the ``(out, in)`` of a decoder layer's projections and of the
        head of the model to plan (:func:`~tierstore.integrations.plan_units.decode_shapes`), for the
        matvec rates (default: a 2B-class layer, and no separate head rate).
        """
        from .bandwidth import measure, measure_fetch
        from .hardware import detect

        facts = detect(folder)
        bw = measure(folder, nbytes=nbytes)
        cores = max(1, facts.logical_cores)
        fetch = measure_fetch(folder, threads=cores)  # every core at once: the share each gets, as the read pool sees
        shapes = layer_shapes or LAYER_SHAPES
        gpu: dict[str, Any] = {}
        if torch.cuda.is_available():
            gpu = _measure_gpu(nbytes)
            gpu["h2d_pinned"] = bw.h2d_pinned
        return Machine(name=f"this machine ({facts.cpu_model}, {facts.physical_cores} cores)",
                       disk_read=bw.disk_read, decode=fetch["decode"] * cores, memcpy=bw.memcpy,
                       cpu_flops=_matmul_flops(torch.device("cpu"), dtype=torch.bfloat16),
                       cpu_matvec=measure_matvec(shapes),
                       spare_core_matvec=measure_matvec(shapes, threads=cores - 1) if cores >= 2 else None,
                       mapped_matvec=measure_mapped_matvec(folder, shapes),
                       head_matvec=measure_matvec((head_shape,), layers=1) if head_shape else None,
                       ram_free=facts.ram_available, cores=cores,
                       compute_threads=torch.get_num_threads(), page_cache_read=fetch["page_cache_read"],
                       checksum=fetch["checksum"], map_populate=fetch.get("map_populate"), **gpu)


def _matmul_flops(device: torch.device, n: int = 1024, *, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an ``n``-square matmul in ``dtype`` (the CPU's is measured in bf16, the weights' dtype)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / max(best, 1e-9)


LAYER_SHAPES = ((2048, 2048), (1024, 2048), (1024, 2048), (2048, 2048), (6144, 2048), (6144, 2048), (2048, 6144))
"""``(out, in)`` of a decoder layer's projections (q, k, v, o, gate, up, down of a 2B-class model): 96 MiB of bf16."""


def measure_matvec(shapes: tuple[tuple[int, int], ...] = LAYER_SHAPES, *, layers: int | None = None,
                   passes: int = 5, min_bytes: int = 256 * MiB, threads: int | None = None) -> float:
    """Bytes/s of bf16 weights ``F.linear`` reads for one token, as a decoder layer runs it: decode on the CPU.

    ``shapes`` are one layer's ``(out, in)``, the model's own where known
    (:func:`~tierstore.integrations.plan_units.decode_shapes`). The input is ``(1, 1, in)``, as
    transformers passes a decoded token (the 2-D and 3-D paths run different kernels), on torch's
    threads as the process runs them. ``layers`` copies of the layer (default: enough for
    ``min_bytes``, beyond the CPU's caches as a decode's weights are: 32 MiB of L3 on the AMD bench
    VM, 105 MiB on the Xeon) are multiplied in turn, each weight once per pass; the median of
    ``passes`` passes, not the best: on a shared machine the median is what a decode of many layers
    sustains. ``threads``: torch's threads for the measurement (None: as the process runs them; the
    caller's count is restored after).
    """
    layer_bytes = sum(2 * rows * cols for rows, cols in shapes)
    count = layers if layers is not None else max(2, -(-min_bytes // max(1, layer_bytes)))
    weights = [(torch.randn(rows, cols) * 0.02).to(torch.bfloat16) for _ in range(count) for rows, cols in shapes]
    inputs = [torch.randn(1, 1, cols).to(torch.bfloat16) for _ in range(count) for _, cols in shapes]
    times = []
    outer = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    try:
        with torch.inference_mode():
            for _ in range(passes + 1):
                start = time.perf_counter()
                for w, x in zip(weights, inputs, strict=True):
                    torch.nn.functional.linear(x, w)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(outer)
    times = sorted(times[1:])  # the first pass warms the kernels
    return sum(w.nbytes for w in weights) / max(times[len(times) // 2], 1e-9)


def measure_mapped_matvec(folder: str | os.PathLike[str] = ".", shapes: tuple[tuple[int, int], ...] = LAYER_SHAPES,
                          *, layers: int | None = None, passes: int = 5, min_bytes: int = 256 * MiB) -> float:
    """Bytes/s of :func:`measure_matvec`'s products when every weight is a fresh private map of a cached file.

    What accelerate's disk offload does per offloaded module and token: ``safe_open`` maps the
    checkpoint file (``MAP_PRIVATE``, nothing populated), ``get_tensor`` returns a view of the
    weight's range in it, the product faults its pages in on torch's threads, and the map goes when
    accelerate drops the weight after the forward. The weights are written to a scratch file in
    ``folder`` (read back once, so it is in the page cache as an offload folder is after the first
    pass); each is mapped on its own, multiplied once per pass and unmapped; the median of ``passes``.
    """
    import mmap

    layer_bytes = sum(2 * rows * cols for rows, cols in shapes)
    count = layers if layers is not None else max(2, -(-min_bytes // max(1, layer_bytes)))
    plan = [(rows, cols) for _ in range(count) for rows, cols in shapes]
    path = Path(folder) / f".tierstore-mapped-matvec-{os.getpid()}.tmp"
    offsets, offset = [], 0
    try:
        with path.open("wb") as out:
            for rows, cols in plan:
                out.write((torch.randn(rows, cols) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
                offsets.append(offset)
                offset += 2 * rows * cols
        path.read_bytes()  # into the page cache
        inputs = [torch.randn(1, 1, cols).to(torch.bfloat16) for _, cols in plan]
        times = []
        with path.open("rb") as f, torch.inference_mode():
            for _ in range(passes + 1):
                start = time.perf_counter()
                for (rows, cols), at, x in zip(plan, offsets, inputs, strict=True):
                    region = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    weight = torch.frombuffer(region, dtype=torch.bfloat16, count=rows * cols, offset=at)
                    torch.nn.functional.linear(x, weight.view(rows, cols))
                    del weight
                    region.close()
                times.append(time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)
    times = sorted(times[1:])
    return offset / max(times[len(times) // 2], 1e-9)


def measure_sharing(shapes: tuple[tuple[int, int], ...] = LAYER_SHAPES, *, layers: int | None = None,
                    min_bytes: int = 256 * MiB, passes: int = 5) -> tuple[float, float]:
    """``(compute_share, fetch_share)``: how a one-token matvec on torch's threads and a fetch thread slow each other.

    The matvec of :func:`measure_matvec` alone, then again while a second thread checksums (crc32c, the
    work every fetch mode does per byte) a 64 MiB buffer in a loop; the shares are each one's speed
    beside the other over its speed alone (medians).
    """
    import threading

    import crc32c

    buffer = torch.ones(64 * MiB, dtype=torch.uint8).numpy()

    def checksum_rate(seconds: float = 0.5) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            crc32c.crc32c(buffer.data)
            done += buffer.nbytes
        return done / (time.perf_counter() - start)

    alone = measure_matvec(shapes, layers=layers, passes=passes, min_bytes=min_bytes)
    crc_alone = checksum_rate()
    stop, done = threading.Event(), [0, 0.0]

    def background() -> None:
        start = time.perf_counter()
        while not stop.is_set():
            crc32c.crc32c(buffer.data)
            done[0] += buffer.nbytes
        done[1] = time.perf_counter() - start

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    try:
        beside = measure_matvec(shapes, layers=layers, passes=passes, min_bytes=min_bytes)
    finally:
        stop.set()
        thread.join()
    crc_beside = done[0] / max(done[1], 1e-9)
    return min(1.0, beside / alone), min(1.0, crc_beside / crc_alone)


def _measure_gpu(nbytes: int) -> dict[str, Any]:
    """Pageable host-to-device and device-to-device speed, GPU matmul throughput and free memory."""
    host = torch.empty(nbytes, dtype=torch.uint8)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(dev)

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return max(min(times), 1e-9)

    pageable = nbytes / best(lambda: dev.copy_(host))
    vram = 2 * nbytes / best(lambda: other.copy_(dev))  # a copy reads and writes every byte
    free, _total = torch.cuda.mem_get_info()
    return {"h2d_pageable": pageable, "vram_bandwidth": vram, "gpu_flops": _matmul_flops(torch.device("cuda")),
            "vram_free": int(free)}
