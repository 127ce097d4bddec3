"""``HardwareOptimizer``: what this machine has, and the ``CacheConfig`` that fits it.

Detection reads the facts (CPU model and cores, RAM and available RAM from
``/proc/meminfo`` and the cgroup limit, ``RLIMIT_MEMLOCK``, GPUs with free
memory and compute capability through ``torch.cuda``, free space on the
store's disk) into a :class:`HardwareFacts`; measurements (disk, memcpy,
codecs, pinned host-to-device, see :mod:`tierstore.bandwidth`) are taken only on
request and cached in the store. :func:`recommend` turns facts and measurements
into sizes, a codec and thread counts by rules that each leave a note saying why:

- L1: free device memory minus headroom for activations (a quarter of the
  device, at least 512 MiB); off without a GPU;
- L2: available RAM minus headroom (an eighth of RAM, at least 1 GiB), at most
  half of RAM; when L2 is to be pinned and ``RLIMIT_MEMLOCK`` is lower, capped
  at the limit (or left unpinned when the limit is too small to matter);
- L3: free disk minus headroom (5% of the disk, at least 2 GiB);
- threads: compute threads = physical cores, I/O and codec threads = logical cores;
- codec: the one whose measured read throughput ``min(disk * ratio, decode * threads)``
  is highest; a fast disk can beat decompression, and then lz4 or raw wins.

Tests and presets inject :class:`HardwareFacts` directly; the maths is the same.
"""

from __future__ import annotations

import mmap
import os
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .bandwidth import META_NAME, Bandwidth, measure
from .config import CacheConfig, format_size

if TYPE_CHECKING:
    from .store import TierStore

__all__ = ["GpuFacts", "HardwareFacts", "Recommendation", "HardwareOptimizer", "detect", "recommend",
           "SEED_MACHINE", "PRESETS"]

MiB, GiB = 1 << 20, 1 << 30
_ROUND = 64 * MiB
_CODEC_SETTING = {"shuffle-zstd": "auto", "blosc-lz4": "blosc-lz4", "raw": "off"}
_PREFER_SMALLER = 0.95
"""A compressed codec within 5% of the fastest option wins: it also saves disk."""


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """One CUDA device."""

    index: int
    name: str
    total_memory: int
    free_memory: int
    capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        """Native bf16 math (compute capability 8.0 and up); below it bf16 blocks are cast to fp16."""
        return self.capability >= (8, 0)


@dataclass(frozen=True, slots=True)
class HardwareFacts:
    """What a machine has, as detected (or as a test or preset describes it)."""

    cpu_model: str
    physical_cores: int
    logical_cores: int
    ram_total: int
    ram_available: int
    memlock_limit: int | None
    """Soft ``RLIMIT_MEMLOCK`` in bytes; None when unlimited."""
    gpus: tuple[GpuFacts, ...]
    disk_free: int
    disk_total: int
    disk_kind: str = "unknown"
    """``nvme``, ``ssd``, ``hdd`` or ``unknown``."""


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A configuration with the reasons for it."""

    config: CacheConfig
    compute_threads: int
    """For ``torch.set_num_threads``: the physical cores (hyper-threads slow dense maths down)."""
    io_threads: int
    """For decoding and disk reads, which wait on memory and the disk: the logical cores."""
    notes: tuple[str, ...] = field(default_factory=tuple)


def _round(nbytes: float) -> int:
    return max(0, int(nbytes) // _ROUND * _ROUND)


def _meminfo(text: str) -> tuple[int, int]:
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[name] = int(parts[0]) * 1024
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", 0))


def _cgroup_limit() -> tuple[int | None, int]:
    """The cgroup v2 memory limit and current use (a container's RAM is its limit, not the host's)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None, 0
    return (None if limit == "max" else int(limit)), current


def _cpu(cpuinfo: str) -> tuple[str, int]:
    """Model name and physical cores (distinct physical/core id pairs; 0 when the file does not say)."""
    model, cores, physical, core = "unknown", set(), "0", None
    for line in [*cpuinfo.splitlines(), ""]:
        name, _, value = (s.strip() for s in line.partition(":"))
        if name == "model name" and model == "unknown":
            model = value
        elif name == "physical id":
            physical = value
        elif name == "core id":
            core = value
        elif not name and core is not None:
            cores.add((physical, core))
    return model, len(cores)


def _disk_kind(path: Path) -> str:
    try:
        st = path.stat()
        block = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    except OSError:
        return "unknown"
    for folder in (block, block.parent):
        rotational = folder / "queue" / "rotational"
        if rotational.exists():
            if folder.name.startswith("nvme"):
                return "nvme"
            return "hdd" if rotational.read_text().strip() == "1" else "ssd"
    return "unknown"


def _gpus() -> tuple[GpuFacts, ...]:
    if not torch.cuda.is_available():
        return ()
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        major, minor = torch.cuda.get_device_capability(i)
        found.append(GpuFacts(i, props.name, int(total), int(free), (int(major), int(minor))))
    return tuple(found)


def detect(disk_path: str | os.PathLike[str] = ".") -> HardwareFacts:
    """Read this machine's facts; the disk is the one holding ``disk_path`` (or its nearest parent)."""
    path = Path(disk_path).resolve()
    while not path.exists():
        path = path.parent
    try:
        model, physical = _cpu(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, physical = "unknown", 0
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        total, available = _meminfo(Path("/proc/meminfo").read_text())
    except OSError:
        total = available = 0
    limit, used = _cgroup_limit()
    if limit is not None and limit < total:
        total, available = limit, min(available, max(0, limit - used))
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    disk = shutil.disk_usage(path)
    return HardwareFacts(cpu_model=model, physical_cores=min(physical, logical) or logical, logical_cores=logical,
                         ram_total=total, ram_available=available,
                         memlock_limit=None if soft == resource.RLIM_INFINITY else int(soft), gpus=_gpus(),
                         disk_free=disk.free, disk_total=disk.total, disk_kind=_disk_kind(path))


def _codec(facts: HardwareFacts, bandwidth: Bandwidth | None, io_threads: int) -> tuple[str, str]:
    if bandwidth is None:
        return "auto", "codec: byte-grouped zstd ('auto'), the default; run a measurement to weigh disk against CPU"
    speed = {"raw": bandwidth.disk_read}
    for name, decode in bandwidth.decode.items():
        speed[name] = min(bandwidth.disk_read * bandwidth.ratio[name], decode * io_threads)
    best = max(speed.values())
    compressed = [n for n in speed if n != "raw" and speed[n] >= best * _PREFER_SMALLER]
    choice = max(compressed, key=lambda n: bandwidth.ratio[n]) if compressed else "raw"
    shown = ", ".join(f"{n} {format_size(s)}/s" for n, s in sorted(speed.items(), key=lambda kv: -kv[1]))
    return _CODEC_SETTING[choice], f"codec: {choice}, the fastest read path measured ({shown})"


def recommend(facts: HardwareFacts, bandwidth: Bandwidth | None = None, *, memory: int | None = None
              ) -> Recommendation:
    """The configuration for a machine with ``facts`` (and measured ``bandwidth``, if any).

    ``memory`` is a budget for host memory: L2 (mapped and prefaulted at open) stays within it.
    """
    notes: list[str] = []
    gpu = max(facts.gpus, key=lambda g: g.free_memory, default=None)
    l1 = 0
    device = None
    if gpu is not None:
        headroom = max(512 * MiB, gpu.total_memory // 4)
        l1 = _round(gpu.free_memory - headroom)
        device = f"cuda:{gpu.index}"
        notes.append(f"L1 {format_size(l1)} on {device} ({gpu.name}): {format_size(gpu.free_memory)} free minus "
                     f"{format_size(headroom)} for activations")
        if not gpu.bf16:
            notes.append(f"{gpu.name} (sm_{gpu.capability[0]}{gpu.capability[1]}) has no bf16 math: bf16 blocks "
                         "are cast to fp16 on the way into L1")
    else:
        notes.append("L1 off: no CUDA device")
    headroom = max(GiB, facts.ram_total // 8)
    l2 = _round(min(facts.ram_available - headroom, facts.ram_total // 2))
    notes.append(f"L2 {format_size(l2)}: {format_size(facts.ram_available)} available minus {format_size(headroom)}, "
                 "at most half of RAM")
    if memory is not None and memory < l2:
        l2 = _round(memory) or memory // mmap.PAGESIZE * mmap.PAGESIZE
        notes.append(f"L2 {format_size(l2)}: capped at the memory budget of {format_size(memory)}")
    pin = True
    limit = facts.memlock_limit
    if limit is not None and limit < l2:
        if limit >= GiB:
            l2 = _round(limit)
            notes.append(f"L2 capped at RLIMIT_MEMLOCK ({format_size(limit)}) so that it can be pinned")
        else:
            pin = False
            notes.append(f"L2 not pinned: RLIMIT_MEMLOCK is {format_size(limit)}; raise it (ulimit -l, or memlock "
                         "in limits.conf) to pin L2 for faster host-to-device copies")
    disk_headroom = max(2 * GiB, facts.disk_total // 20)
    l3 = _round(facts.disk_free - disk_headroom) or _round(facts.disk_free // 2)
    notes.append(f"L3 {format_size(l3)}: {format_size(facts.disk_free)} free on the {facts.disk_kind} disk minus "
                 f"{format_size(disk_headroom)}")
    io_threads = max(1, facts.logical_cores)
    compute = max(1, facts.physical_cores)
    setting, why = _codec(facts, bandwidth, io_threads)
    notes.append(why)
    notes.append(f"threads: {compute} for compute (physical cores), {io_threads} for I/O and decoding")
    config = CacheConfig(l1_cache_size=l1, l2_cache_size=l2, l3_cache_size=l3, l2_pin_memory=pin,
                         l3_compression=setting, l1_device=device)
    return Recommendation(config, compute, io_threads, tuple(notes))


class HardwareOptimizer:
    """Detects the machine (or takes its facts), measures on request, and recommends a ``CacheConfig``.

    ``store`` (an open :class:`TierStore`) is where measurements are cached and whose disk is
    sized; ``facts`` and ``bandwidth`` replace detection and measurement (tests, presets).
    """

    def __init__(self, store: TierStore | None = None, *, facts: HardwareFacts | None = None,
                 bandwidth: Bandwidth | None = None, disk_path: str | os.PathLike[str] | None = None) -> None:
        self.store = store
        self.disk_path = Path(disk_path) if disk_path is not None else (store.path if store is not None else Path("."))
        self._facts = facts
        self._bandwidth = bandwidth

    @property
    def facts(self) -> HardwareFacts:
        """The machine's facts (detected on first use)."""
        if self._facts is None:
            self._facts = detect(self.disk_path)
        return self._facts

    @property
    def bandwidth(self) -> Bandwidth | None:
        """The measurement given, or the one cached in the store, or None."""
        if self._bandwidth is None and self.store is not None:
            cached = self.store._catalog.meta(META_NAME)
            if cached is not None:
                self._bandwidth = Bandwidth.from_json(cached)
        return self._bandwidth

    def measure(self, *, nbytes: int = 64 << 20) -> Bandwidth:
        """Measure disk, memcpy, codecs and pinned copies now (about a second); cached in a writable store."""
        self._bandwidth = measure(self.disk_path, nbytes=nbytes)
        if self.store is not None and not self.store.readonly:
            self.store._catalog.set_meta({META_NAME: self._bandwidth.to_json()})
        return self._bandwidth

    def recommend(self, *, memory: int | None = None) -> Recommendation:
        """The configuration for this machine (L2 within ``memory`` if given), with notes on why."""
        return recommend(self.facts, self.bandwidth, memory=memory)

    def recommend_config(self, **overrides: object) -> CacheConfig:
        """The recommended :class:`CacheConfig` (with any field overridden)."""
        config = self.recommend().config
        return config.replace(**overrides) if overrides else config


SEED_MACHINE = HardwareFacts(
    cpu_model="Intel(R) Core(TM) i5-10210U CPU @ 1.60GHz", physical_cores=4, logical_cores=8,
    ram_total=8 * GiB, ram_available=6 * GiB, memlock_limit=None,
    gpus=(GpuFacts(0, "NVIDIA GeForce MX250", 2 * GiB, 2 * GiB - 64 * MiB, (6, 1)),),
    disk_free=200 * GiB, disk_total=512 * GiB, disk_kind="nvme")
"""The original request's laptop: i5-10210U (4 cores, 8 threads), 8 GiB RAM, a Pascal SM61 GPU with
2 GiB (MX250), a 512 GB NVMe SSD with 200 GiB free; ``ulimit -l unlimited`` assumed."""

PRESETS: dict[str, HardwareFacts] = {"i5-10210u-sm61": SEED_MACHINE}
"""Named machines; ``recommend(PRESETS[name])`` is what the optimizer recommends on that machine."""
