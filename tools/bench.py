#!/usr/bin/env python
"""Benchmark tierstore's L3 tier against zarr-python, safetensors, torch.save and diskcache.

Run from the repository root::

    python tools/bench.py                 # 64 x 16 MiB + 1,000 x 4 KiB bf16 tensors (~6-8 min on 2 cores)
    python tools/bench.py --quick         # 8 x 16 MiB + 1,000 x 4 KiB, 3 repeats (~1.5 min)
    python tools/bench.py --scale         # 1,000,000 x 256 B blocks: rates vs 10,000, open(), RSS
    python tools/bench.py --json out.json # also save every sample

Every peer works on the same tensors in the same run; peers take turns inside each repeat (so
noise spreads over all of them) and medians are reported. Reads materialise their results
(``--touch page`` reads one byte of every 4 KiB page, which forces lazy mmap loads in; ``full``
reads every byte) and the first repeat checks every result bit for bit against the source.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache
import numcodecs
import numpy as np
import safetensors
import safetensors.torch
import torch
import zarr
import zarr.storage
from zarr.codecs import BytesCodec, TransposeCodec, ZstdCodec

import tierstore
from tierstore.reports.process_memory import reset_peak_rss

warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr version 3 specification.*")
warnings.filterwarnings("ignore", message=".*not yet part of the Zarr.*specification.*")

MiB = 1 << 20
PAGE = 4096
DTYPE = torch.bfloat16
PACK_MAX = 256 << 10
"""tierstore packs blocks up to this size; zarr direct mirrors its layout on either side of it."""
ZARR_INNER = 1 << 20
"""Inner chunk of a large block in tierstore's layout (and so in zarr direct's)."""

Samples = dict[str, dict[str, list[float]]]
"""section -> row label -> list of samples (seconds, or bytes for sizes)."""


# -- data and measurement helpers ------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Equal-shaped bf16 tensors under ``<name>.NNNNNN`` keys."""

    name: str
    tensors: dict[str, torch.Tensor]

    @property
    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(next(iter(self.tensors.values())).shape)

    @property
    def item_bytes(self) -> int:
        return next(iter(self.tensors.values())).nbytes

    @property
    def nbytes(self) -> int:
        return self.item_bytes * len(self.tensors)


def make_dataset(name: str, count: int, shape: tuple[int, ...], seed: int) -> Dataset:
    """``count`` tensors of normal weights in bf16 (what model checkpoints hold)."""
    gen = torch.Generator().manual_seed(seed)
    return Dataset(name, {f"{name}.{i:06d}": torch.randn(shape, generator=gen).to(DTYPE) for i in range(count)})


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy view (bf16 has no numpy dtype)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def from_bytes(buf: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(buf).view(DTYPE).reshape(shape)


def touch(tensor: torch.Tensor, mode: str) -> int:
    """Materialise ``tensor``: one byte per page (forces mmap-backed data in) or every byte."""
    flat = tensor.reshape(-1).view(torch.uint8)
    if mode == "full":
        return int(flat.max())
    pages = flat.numpy().data  # a memoryview: cheaper than torch ops on small tensors (~3 µs, not ~10)
    return sum(pages[::PAGE]) + pages[-1]


def drop_page_cache(folder: Path) -> None:
    """Write back dirty pages, then drop every file under ``folder`` from the page cache."""
    os.sync()
    for path in files_under(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(folder: Path) -> Iterator[Path]:
    for root, _dirs, names in os.walk(folder):
        for name in names:
            yield Path(root, name)


def disk_usage(folder: Path) -> int:
    """Bytes allocated on disk under ``folder`` (files and directories)."""
    total = 0
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def max_rss_mib() -> float:
    """Peak RSS of this process (``getrusage``), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib(field: str = "VmRSS") -> float:
    """Current (``VmRSS``) or peak-since-reset (``VmHWM``) resident memory, MiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return max_rss_mib()


# -- peers ---------------------------------------------------------------------------------------


class Unsupported(Exception):
    """The peer has no natural way to do this operation."""


class Peer:
    """One storage library, as its users would call it. Handles come from :meth:`open`.

    ``each`` writes every tensor on its own (a transaction, a file or an array each), ``batch``
    writes them all in one go; ``None`` means the peer has no such mode.
    """

    name = ""
    slug = ""
    durability = "no fsync"
    each: str | None = None
    batch: str | None = None
    large_kinds: tuple[str, ...] = ()
    small_kinds: tuple[str, ...] = ()
    read_kind = "each"
    reads = True

    def open(self, folder: Path, *, write: bool, data: Dataset) -> Any:
        return folder

    def close(self, handle: Any) -> None:
        """Release what :meth:`open` returned."""

    def put_each(self, handle: Any, data: Dataset) -> None:
        raise Unsupported

    def put_batch(self, handle: Any, data: Dataset) -> None:
        raise Unsupported

    def get(self, handle: Any, key: str, data: Dataset) -> torch.Tensor:
        raise Unsupported

    def loads(self) -> dict[str, Callable[[Path, Dataset], list[torch.Tensor]]]:
        """Ways to read a whole dataset back, by label."""
        return {"get each": self.load_via_get}

    def load_via_get(self, folder: Path, data: Dataset) -> list[torch.Tensor]:
        handle = self.open(folder, write=False, data=data)
        try:
            return [self.get(handle, key, data) for key in data.keys]
        finally:
            self.close(handle)

    def put(self, kind: str, handle: Any, data: Dataset) -> None:
        (self.put_each if kind == "each" else self.put_batch)(handle, data)

    def label(self, kind: str) -> str:
        return f"{self.name}: {self.each if kind == 'each' else self.batch}"


class TierstorePeer(Peer):
    """tierstore's L3 by default (``l2_cache_size=0``: every get decodes from disk); ``l2=True`` keeps
    the default host cache on, so repeated gets are served from memory."""

    each = "txn per put"
    batch = "one txn"

    def __init__(self, *, fsync: bool = True, l2: bool = False, kinds: tuple[str, ...] = ("each", "batch"),
                 reads: bool = True) -> None:
        self.fsync, self.l2 = fsync, l2
        self.name = "tierstore" + (" fsync=False" if not fsync else "") + (" +L2" if l2 else "")
        self.slug = self.name.replace(" ", "-").replace("=", "").replace("+", "")
        self.durability = "fsync data+dirs+catalog" if fsync else "no fsync"
        self.large_kinds = self.small_kinds = kinds
        self.read_kind = "batch" if "batch" in kinds else kinds[0]
        self.reads = reads

    def open(self, folder: Path, *, write: bool, data: Dataset) -> tierstore.TierStore:
        l2_size = tierstore.CacheConfig().l2_cache_size if self.l2 else 0
        return tierstore.open(folder, fsync=self.fsync, l2_cache_size=l2_size, l3_compression="auto")

    def close(self, handle: tierstore.TierStore) -> None:
        handle.close()

    def put_each(self, handle: tierstore.TierStore, data: Dataset) -> None:
        for key, tensor in data.tensors.items():
            handle.put(key, tensor)

    def put_batch(self, handle: tierstore.TierStore, data: Dataset) -> None:
        with handle.transaction():
            self.put_each(handle, data)

    def get(self, handle: tierstore.TierStore, key: str, data: Dataset) -> torch.Tensor:
        return handle.get(key)


def _zarr_codecs(order: tuple[int, ...]) -> dict[str, Any]:
    """tierstore's ``auto`` chain for 2-byte elements held as (..., elements, 2) bytes: the transpose that
    groups byte planes, bytes, zstd level 1."""
    return {"serializer": BytesCodec(), "filters": [TransposeCodec(order=order)], "fill_value": 0,
            "compressors": [ZstdCodec(level=1, checksum=False)]}


class ZarrDirectPeer(Peer):
    """An array per tensor in a LocalStore, laid out as tierstore lays out its own."""

    name, slug = "zarr direct", "zarr-direct"
    each = "create_array per tensor"
    large_kinds = small_kinds = ("each",)

    def open(self, folder: Path, *, write: bool, data: Dataset) -> zarr.storage.LocalStore:
        return zarr.storage.LocalStore(folder, read_only=not write)

    def put_each(self, handle: zarr.storage.LocalStore, data: Dataset) -> None:
        nbytes = data.item_bytes
        layout: dict[str, Any] = {}  # small: one chunk; large: one shard of ~1 MiB inner chunks
        if nbytes > PACK_MAX:
            layout = {"chunks": (min(nbytes, ZARR_INNER) // 2, 2), "shards": (nbytes // 2, 2)}
        for key, tensor in data.tensors.items():
            array = zarr.create_array(handle, name=key, shape=(nbytes // 2, 2), dtype="uint8", **layout,
                                      **_zarr_codecs((1, 0)))
            array[...] = as_bytes(tensor).reshape(-1, 2)

    def get(self, handle: zarr.storage.LocalStore, key: str, data: Dataset) -> torch.Tensor:
        return from_bytes(np.asarray(zarr.open_array(handle, path=key, mode="r")[...]), data.shape)


class ZarrPackedPeer(Peer):
    """All tensors as rows of one sharded array: 64 rows per shard file, as tierstore packs them."""

    name, slug = "zarr sharded", "zarr-sharded"
    batch = "one sharded array"
    small_kinds = ("batch",)
    read_kind = "batch"

    def open(self, folder: Path, *, write: bool, data: Dataset) -> Any:
        if write:
            return zarr.storage.LocalStore(folder)
        array = zarr.open_array(zarr.storage.LocalStore(folder, read_only=True), path="pack", mode="r")
        keys: list[str] = array.attrs["keys"]  # type: ignore[assignment]
        return array, {key: i for i, key in enumerate(keys)}

    def put_batch(self, handle: zarr.storage.LocalStore, data: Dataset) -> None:
        n, nbytes = len(data.tensors), data.item_bytes
        array = zarr.create_array(handle, name="pack", shape=(n, nbytes // 2, 2), dtype="uint8",
                                  chunks=(1, nbytes // 2, 2), shards=(64, nbytes // 2, 2),
                                  attributes={"keys": data.keys}, **_zarr_codecs((0, 2, 1)))
        array[...] = np.stack([as_bytes(t) for t in data.tensors.values()]).reshape(n, -1, 2)

    def get(self, handle: Any, key: str, data: Dataset) -> torch.Tensor:
        array, rows = handle
        return from_bytes(np.asarray(array[rows[key]]), data.shape)


class SafetensorsPeer(Peer):
    name = slug = "safetensors"
    batch = "save_file"
    large_kinds = small_kinds = ("batch",)
    read_kind = "batch"
    FILE = "model.safetensors"

    def open(self, folder: Path, *, write: bool, data: Dataset) -> Any:
        if write:
            return folder
        return safetensors.safe_open(str(folder / self.FILE), framework="pt")

    def close(self, handle: Any) -> None:
        if not isinstance(handle, Path):
            handle.__exit__(None, None, None)

    def put_batch(self, handle: Path, data: Dataset) -> None:
        safetensors.torch.save_file(data.tensors, handle / self.FILE)

    def get(self, handle: Any, key: str, data: Dataset) -> torch.Tensor:
        return handle.get_tensor(key)  # type: ignore[no-any-return]

    def loads(self) -> dict[str, Callable[[Path, Dataset], list[torch.Tensor]]]:
        def load(backend: str) -> Callable[[Path, Dataset], list[torch.Tensor]]:
            def run(folder: Path, data: Dataset) -> list[torch.Tensor]:
                loaded = safetensors.torch.load_file(folder / self.FILE, backend=backend)
                return [loaded[key] for key in data.keys]
            return run
        return {"load_file": load("mmap"), "load_file(backend=pread)": load("pread")}


class TorchPeer(Peer):
    name = slug = "torch"
    batch = "torch.save"
    large_kinds = ("batch",)
    read_kind = "batch"
    FILE = "model.pt"

    def put_batch(self, handle: Path, data: Dataset) -> None:
        torch.save(data.tensors, handle / self.FILE)

    def loads(self) -> dict[str, Callable[[Path, Dataset], list[torch.Tensor]]]:
        def load(mmap: bool) -> Callable[[Path, Dataset], list[torch.Tensor]]:
            def run(folder: Path, data: Dataset) -> list[torch.Tensor]:
                loaded = torch.load(folder / self.FILE, weights_only=True, mmap=mmap)
                return [loaded[key] for key in data.keys]
            return run
        return {"load(mmap=True)": load(True), "load(mmap=False)": load(False)}


class DiskcachePeer(Peer):
    """Raw tensor bytes (no pickle); values over 32 KiB go to files of their own, as diskcache does."""

    name = slug = "diskcache"
    each = "Cache.set"
    batch = "set inside Cache.transact()"
    large_kinds = ("each",)
    small_kinds = ("each", "batch")

    def open(self, folder: Path, *, write: bool, data: Dataset) -> diskcache.Cache:
        return diskcache.Cache(str(folder), size_limit=1 << 50, eviction_policy="none")

    def close(self, handle: diskcache.Cache) -> None:
        handle.close()

    def put_each(self, handle: diskcache.Cache, data: Dataset) -> None:
        for key, tensor in data.tensors.items():
            handle.set(key, as_bytes(tensor).tobytes())

    def put_batch(self, handle: diskcache.Cache, data: Dataset) -> None:
        with handle.transact():
            self.put_each(handle, data)

    def get(self, handle: diskcache.Cache, key: str, data: Dataset) -> torch.Tensor:
        buf = np.empty(data.item_bytes, dtype=np.uint8)
        value = handle.get(key, read=True)  # bytes when stored inline in SQLite, else an open file
        if isinstance(value, bytes):
            buf[:] = np.frombuffer(value, dtype=np.uint8)
        else:
            with value:
                value.readinto(buf)
        return from_bytes(buf, data.shape)


def large_peers() -> list[Peer]:
    return [TierstorePeer(), TierstorePeer(fsync=False, kinds=("each",), reads=False), ZarrDirectPeer(),
            SafetensorsPeer(), TorchPeer(), DiskcachePeer()]


def small_peers() -> list[Peer]:
    return [TierstorePeer(), TierstorePeer(fsync=False, reads=False), TierstorePeer(l2=True, kinds=("batch",)),
            ZarrDirectPeer(), ZarrPackedPeer(),
            SafetensorsPeer(), DiskcachePeer()]


# -- the main benchmark --------------------------------------------------------------------------


@dataclass
class Bench:
    """Where a run writes, how it materialises reads, and what it measured."""

    out: Path
    touch: str
    samples: Samples = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    """section -> row label -> bytes allocated on disk."""
    notes: list[str] = field(default_factory=list)

    def record(self, section: str, label: str, value: float) -> None:
        self.samples.setdefault(section, {}).setdefault(label, []).append(value)

    def measure(self, section: str, label: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; record its wall time under ``section`` and this process's CPU time (all
        threads, user + system) under ``section cpu``. Return what ``fn`` returned."""
        cpu = cpu_seconds()
        seconds, result = timed(fn)
        self.record(f"{section} cpu", label, cpu_seconds() - cpu)
        self.record(section, label, seconds)
        return result

    def materialise(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        for tensor in tensors:
            touch(tensor, self.touch)
        return tensors


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def verify(label: str, got: list[torch.Tensor], data: Dataset, keys: list[str]) -> None:
    """Fail loudly unless every tensor is bit-identical to the source."""
    for tensor, key in zip(got, keys, strict=True):
        want = data.tensors[key]
        same = tensor.dtype == want.dtype and tuple(tensor.shape) == tuple(want.shape)
        if not (same and torch.equal(tensor.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))):
            raise AssertionError(f"{label} returned wrong data for {key}")


def open_put_close(peer: Peer, kind: str, folder: Path, data: Dataset) -> None:
    handle = peer.open(folder, write=True, data=data)
    try:
        peer.put(kind, handle, data)
    finally:
        peer.close(handle)


def bench_write(bench: Bench, section: str, peer: Peer, kind: str, data: Dataset) -> None:
    """Large writes are timed from open to close; small ones per operation, on an open handle."""
    folder = fresh(bench.out / section / f"{peer.slug}-{kind}")
    os.sync()  # no peer pays for the write-back of the one before it
    label = peer.label(kind)
    if section == "large":
        bench.measure("large_write", label, lambda: open_put_close(peer, kind, folder, data))
    else:
        handle = peer.open(folder, write=True, data=data)
        try:
            bench.measure(f"small_write_{kind}", label, lambda: peer.put(kind, handle, data))
        finally:
            peer.close(handle)
    bench.sizes.setdefault(section, {})[label] = disk_usage(folder)


def bench_load(bench: Bench, peer: Peer, label: str, data: Dataset, first: bool) -> None:
    """Cold (page cache dropped) then warm read of the whole large dataset, handle opening included."""
    load = peer.loads()[label]
    folder = bench.out / "large" / f"{peer.slug}-{peer.read_kind}"
    row = f"{peer.name}: {label}"
    drop_page_cache(folder)
    for state in ("cold", "warm"):
        got = bench.measure(f"large_read_{state}", row, lambda: bench.materialise(load(folder, data)))
        if first:
            verify(row, got, data, data.keys)
        del got


def bench_gets(bench: Bench, peer: Peer, data: Dataset, order: list[str], first: bool) -> None:
    """Single gets in random order: first with the page cache dropped, then again (warm)."""
    folder = bench.out / "small" / f"{peer.slug}-{peer.read_kind}"
    drop_page_cache(folder)
    handle = peer.open(folder, write=False, data=data)
    try:
        for state in ("cold", "warm"):
            got = bench.measure(f"small_get_{state}", peer.name,
                                lambda: bench.materialise([peer.get(handle, key, data) for key in order]))
            if first:
                verify(peer.name, got, data, order)
    finally:
        peer.close(handle)


def sharding_layout(meta_path: Path) -> dict[str, Any]:
    """Shard shape, inner chunk shape and inner codec chain of a zarr v3 array's ``zarr.json``."""
    meta = json.loads(meta_path.read_text())
    codec = meta["codecs"][0]
    inner = codec["configuration"] if codec["name"] == "sharding_indexed" else {"codecs": meta["codecs"]}
    codecs = [{"name": "bytes"} if c["name"] == "bytes" else c for c in inner["codecs"]]  # uint8: no endianness
    return {"shard": meta["chunk_grid"]["configuration"]["chunk_shape"], "inner": inner.get("chunk_shape"),
            "codecs": codecs}


def compare_layouts(out: Path) -> str:
    """Check that zarr direct mirrors the layout and codecs tierstore wrote for a large block."""
    ours = next((out / "large" / "tierstore-batch" / "l3" / "blocks").glob("*/zarr.json"), None)
    theirs = next((out / "large" / "zarr-direct-each").glob("*/zarr.json"), None)
    if ours is None or theirs is None:
        return "zarr direct vs tierstore layout: not checked (no arrays found)"
    a, b = sharding_layout(ours), sharding_layout(theirs)
    if a == b:
        return f"zarr direct mirrors tierstore's large-block layout exactly: {json.dumps(a)}"
    return f"zarr direct layout DIFFERS from tierstore's: tierstore {json.dumps(a)}, zarr direct {json.dumps(b)}"


def run_large(bench: Bench, data: Dataset, repeats: int) -> None:
    peers = large_peers()
    for rep in range(repeats):
        progress(f"large tensors: repeat {rep + 1}/{repeats}")
        for peer in peers:
            for kind in peer.large_kinds:
                bench_write(bench, "large", peer, kind, data)
        if rep == 0:
            bench.notes.append(compare_layouts(bench.out))
        for peer in peers:
            for label in peer.loads() if peer.reads else ():
                bench_load(bench, peer, label, data, rep == 0)


def run_small(bench: Bench, data: Dataset, repeats: int) -> None:
    peers = small_peers()
    order = data.keys
    random.Random(7).shuffle(order)
    for rep in range(repeats):
        progress(f"small tensors: repeat {rep + 1}/{repeats}")
        for peer in peers:
            for kind in peer.small_kinds:
                bench_write(bench, "small", peer, kind, data)
        for peer in peers:
            if peer.reads:
                bench_gets(bench, peer, data, order, rep == 0)


# -- reporting -----------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: first column left-aligned, the others right-aligned."""
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def spread(values: list[float]) -> str:
    """Half the min-max range, relative to the median."""
    mid = statistics.median(values)
    return f"±{(max(values) - min(values)) / 2 / mid * 100:.0f}%" if mid else "—"


def get_median(bench: Bench, section: str, label: str) -> float | None:
    values = bench.samples.get(section, {}).get(label)
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


TS_EACH, TS_BATCH = "tierstore: txn per put", "tierstore: one txn"
ZARR_LARGE = "zarr direct: create_array per tensor"


def large_write_table(bench: Bench, data: Dataset) -> str:
    ref = get_median(bench, "large_write", TS_EACH)
    rows = []
    for peer in large_peers():
        for kind in peer.large_kinds:
            label = peer.label(kind)
            values = bench.samples["large_write"][label]
            secs, disk = statistics.median(values), bench.sizes["large"][label]
            rows.append([label, peer.durability, fmt(secs, 2), spread(values),
                         fmt(get_median(bench, "large_write cpu", label), 2), fmt(data.nbytes / MiB / secs),
                         fmt(ratio(secs, ref), 2, "x"), fmt(disk / MiB, 1), fmt(data.nbytes / disk, 3, "x")])
    headers = [f"write {len(data.tensors)} x {data.item_bytes // MiB} MiB", "durability", "median s", "spread",
               "CPU s", "MiB/s", "tierstore/peer", "on disk MiB", "raw/disk"]
    return table(headers, rows)


def large_read_table(bench: Bench, data: Dataset) -> str:
    refs = {s: get_median(bench, f"large_read_{s}", "tierstore: get each") for s in ("cold", "warm")}
    rows = []
    for label in bench.samples["large_read_cold"]:
        row = [label]
        for state in ("cold", "warm"):
            samples = bench.samples[f"large_read_{state}"][label]
            secs = statistics.median(samples)
            row += [fmt(secs, 2), spread(samples), fmt(get_median(bench, f"large_read_{state} cpu", label), 2),
                    fmt(data.nbytes / MiB / secs)]
        row += [fmt(ratio(get_median(bench, f"large_read_{s}", label), refs[s]), 2, "x") for s in ("cold", "warm")]
        rows.append(row)
    headers = ["read (materialised)", "cold s", "spread", "CPU s", "cold MiB/s", "warm s", "spread", "CPU s",
               "warm MiB/s", "tierstore/peer cold", "tierstore/peer warm"]
    return table(headers, rows)


def small_rate(bench: Bench, section: str, label: str, count: int) -> float | None:
    secs = get_median(bench, section, label)
    return count / secs if secs else None


def small_table(bench: Bench, data: Dataset) -> str:
    n = len(data.tensors)
    ref = small_rate(bench, "small_get_warm", "tierstore", n)
    rows = []
    for peer in small_peers():
        puts = [small_rate(bench, f"small_write_{k}", peer.label(k), n) if k in peer.small_kinds else None
                for k in ("each", "batch")]
        gets = [small_rate(bench, f"small_get_{s}", peer.name, n) for s in ("cold", "warm")]
        disk = bench.sizes["small"].get(peer.label(peer.read_kind))
        modes = ", ".join(f"{k}: {getattr(peer, k)}" for k in peer.small_kinds)
        rows.append([peer.name, modes, peer.durability, *map(fmt, puts), *map(fmt, gets),
                     fmt(ratio(ref, gets[1]), 1, "x"), fmt(disk and disk / 1024),
                     fmt(ratio(data.nbytes, disk), 2, "x")])
    headers = [f"{n} x {data.item_bytes // 1024} KiB", "modes", "durability", "put each /s", "put batch /s",
               "get cold /s", "get warm /s", "tierstore/peer get warm", "on disk KiB", "raw/disk"]
    return table(headers, rows)


def small_cpu_table(bench: Bench, data: Dataset) -> str:
    """CPU time per operation, which the other tenants of a shared machine disturb much less than wall time."""
    n = len(data.tensors)
    sections = [("small_write_each", "each"), ("small_write_batch", "batch"), ("small_get_cold", None),
                ("small_get_warm", None)]
    rows = []
    for peer in small_peers():
        cells = []
        for section, kind in sections:
            label = peer.name if kind is None else peer.label(kind)
            cpu = get_median(bench, f"{section} cpu", label) if kind is None or kind in peer.small_kinds else None
            cells.append(fmt(cpu and cpu / n * 1e6))
        rows.append([peer.name, *cells])
    return table(["CPU µs per op (all threads)", "put each", "put batch", "get cold", "get warm"], rows)


@dataclass(frozen=True)
class Target:
    goal: str
    measured: str
    met: bool | None


def targets(bench: Bench, large: Dataset | None, small: Dataset | None) -> list[Target]:
    found: list[Target] = []
    if large is not None:
        each, batch = (ratio(get_median(bench, "large_write", ZARR_LARGE), get_median(bench, "large_write", lbl))
                       for lbl in (TS_EACH, TS_BATCH))
        found.append(Target("L3 write (durable) >= 2x zarr-python direct",
                            f"{fmt(each, 2, 'x')} (txn per put), {fmt(batch, 2, 'x')} (one txn)",
                            None if each is None else each >= 2))
        cold = ratio(get_median(bench, "large_read_cold", "safetensors: load_file"),
                     get_median(bench, "large_read_cold", "tierstore: get each"))
        disk = bench.sizes["large"].get(TS_BATCH)
        smaller = ratio(large.nbytes, disk)
        found.append(Target("L3 cold read >= 1.0x safetensors load_file, stored bf16 >= 1.4x smaller",
                            f"{fmt(cold, 2, 'x')} read, {fmt(smaller, 3, 'x')} smaller",
                            None if cold is None or smaller is None else cold >= 1.0 and smaller >= 1.4))
    if small is not None:
        n = len(small.tensors)
        gets = small_rate(bench, "small_get_warm", "tierstore", n)
        vs = ratio(gets, small_rate(bench, "small_get_warm", "zarr direct", n))
        found.append(Target("small get >= 20k/s and >= 40x zarr direct", f"{fmt(gets)}/s, {fmt(vs, 1, 'x')}",
                            None if gets is None or vs is None else gets >= 20_000 and vs >= 40))
        puts = small_rate(bench, "small_write_batch", TS_BATCH, n)
        dc = small_rate(bench, "small_write_each", "diskcache: Cache.set", n)
        found.append(Target("small durable puts in one txn >= diskcache set", f"{fmt(puts)}/s vs {fmt(dc)}/s",
                            None if puts is None or dc is None else puts >= dc))
    return found


def targets_table(found: list[Target]) -> str:
    verdict = {True: "MET", False: "MISSED", None: "not measured"}
    return table(["target", "measured", "verdict"], [[t.goal, t.measured, verdict[t.met]] for t in found])


# -- the machine ---------------------------------------------------------------------------------


def _first_line(path: str, prefix: str) -> str:
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return "?"


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(device, mount point, file system) holding ``path``."""
    best = ("?", "/", "?")
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as fh:
        for line in fh:
            dev, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) >= len(best[1]):
                best = (dev, mount, fstype)
    return best


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return f"{rev}{' + uncommitted changes' if dirty else ''}"


def _source_digest() -> str:
    """A digest of the tierstore sources measured (others may be editing them between runs)."""
    digest = hashlib.sha256()
    for path in sorted(Path(tierstore.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info(out: Path) -> dict[str, str]:
    dev, mount, fstype = _mount_of(out)
    disk = shutil.disk_usage(mount)
    block = Path("/sys/block") / Path(dev).name.rstrip("0123456789")
    rotational = (block / "queue" / "rotational").read_text().strip() if (block / "queue").exists() else "?"
    return {
        "cpu": _first_line("/proc/cpuinfo", "model name"),
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable, torch threads "
                 f"{torch.get_num_threads()}",
        "ram": _first_line("/proc/meminfo", "MemTotal"),
        "disk": f"{dev} on {mount} ({fstype}), {disk.total / 2**30:.0f} GiB, {disk.free / 2**30:.0f} GiB free, "
                f"rotational={rotational}",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": f"torch {torch.__version__}, numpy {np.__version__}, zarr {zarr.__version__}, numcodecs "
                    f"{numcodecs.__version__}, safetensors {safetensors.__version__}, diskcache "
                    f"{diskcache.__version__}",
        "tierstore": f"{tierstore.__version__} (git {_git_revision()}; sources sha256 {_source_digest()})",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def print_machine(info: dict[str, str]) -> None:
    print("## Machine\n")
    for name, value in info.items():
        print(f"- {name}: {value}")
    print()


# -- scale: a million small blocks, and one huge tensor ------------------------------------------


SCALE_KEY = "b.{:08d}"


def run_isolated(fn: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
    """Run ``fn(*args)`` in a fresh interpreter, so its peak RSS is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def scale_insert(db: tierstore.TierStore, start: int, stop: int, args: argparse.Namespace, deadline: float) -> int:
    """Insert blocks ``start..stop`` in transactions of ``--scale-txn``; stop early at ``deadline``."""
    gen = torch.Generator().manual_seed(start)
    elems, done, began = args.scale_block // 2, start, time.perf_counter()
    while done < stop and time.monotonic() < deadline:
        count = min(args.scale_txn, stop - done)
        rows = torch.randn((count, elems), generator=gen).to(DTYPE)
        with db.transaction():
            for j in range(count):
                db.put(SCALE_KEY.format(done + j), rows[j])
        done += count
        rate = (done - start) / (time.perf_counter() - began)
        print(f"\r  inserted {done:,}/{stop:,} blocks ({rate:,.0f}/s, ~{(stop - done) / rate:,.0f} s left)   ",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return done


def scale_probe(path: str, count: int, gets: int, puts: int, elems: int) -> dict[str, float]:
    """In a fresh process: open() time, L3 get and put rates, and memory with ``count`` blocks stored."""
    reset_peak_rss()
    base = rss_mib()
    open_s, db = timed(lambda: tierstore.open(path, l2_cache_size=0))
    opened = rss_mib()
    keys = [SCALE_KEY.format(i) for i in random.Random(count).sample(range(count), min(gets, count))]
    cold_s = timed(lambda: [db.get(key) for key in keys])[0]
    warm_s = timed(lambda: [db.get(key) for key in keys])[0]
    got = rss_mib()
    block = torch.randn(elems).to(DTYPE)
    each = max(puts // 10, 1)
    each_s = timed(lambda: [db.put(f"probe.each.{i}", block) for i in range(each)])[0]

    def batch() -> None:
        with db.transaction():
            for i in range(puts):
                db.put(f"probe.batch.{i}", block)

    batch_s = timed(batch)[0]
    peak = rss_mib("VmHWM")
    with db.transaction():
        for key in list(db.keys(prefix="probe.")):
            db.delete(key)
    db.close()
    return {"open_s": open_s, "get_first_per_s": len(keys) / cold_s, "get_again_per_s": len(keys) / warm_s,
            "put_each_per_s": each / each_s, "put_batch_per_s": puts / batch_s, "rss_imports_mib": base,
            "rss_open_growth_mib": opened - base, "rss_gets_growth_mib": got - base, "rss_peak_growth_mib": peak - base}


def big_put(path: str, nbytes: int) -> dict[str, float]:
    """Peak RSS around putting one ``nbytes`` tensor (made without a bigger transient)."""
    tensor = torch.empty(nbytes // 2, dtype=DTYPE)
    step = 1 << 24
    for lo in range(0, tensor.numel(), step):
        tensor[lo:lo + step] = torch.randn(min(step, tensor.numel() - lo))
    db = tierstore.open(path, l2_cache_size=0)
    reset_peak_rss()
    before = rss_mib()
    seconds = timed(lambda: db.put("big", tensor))[0]
    after = rss_mib("VmHWM")
    db.close()
    return {"seconds": seconds, "rss_before_mib": before, "peak_after_mib": after, "overhead_mib": after - before}


def big_get(path: str, nbytes: int) -> dict[str, float]:
    """Peak RSS around getting it back, less the returned tensor itself."""
    db = tierstore.open(path, l2_cache_size=0)
    reset_peak_rss()
    before = rss_mib()
    seconds, tensor = timed(lambda: db.get("big"))
    touch(tensor, "full")
    after = rss_mib("VmHWM")
    db.close()
    return {"seconds": seconds, "rss_before_mib": before, "peak_after_mib": after,
            "overhead_mib": after - before - nbytes / MiB}


def run_scale(args: argparse.Namespace) -> dict[str, Any]:
    folder = fresh(args.out / "scale") / "store"
    deadline = time.monotonic() + args.scale_minutes * 60
    report: dict[str, Any] = {"target_n": args.scale_n}

    def grow(start: int, stop: int, name: str) -> int:
        with tierstore.open(folder) as db:
            seconds, done = timed(lambda: scale_insert(db, start, stop, args, deadline))
        report[f"insert_{name}_per_s"] = (done - start) / seconds if done > start else None
        drop_page_cache(folder)
        progress(f"scale: probing at {done:,} blocks (page cache dropped), in a fresh process")
        report[f"at_{name}"] = {"blocks": done, **run_isolated(
            scale_probe, str(folder), done, args.scale_gets, args.scale_puts, args.scale_block // 2)}
        return int(done)

    grow(grow(0, args.scale_base, "base"), args.scale_n, "n")
    report["main_rss_peak_mib"] = max_rss_mib()
    report["main_rss_now_mib"] = rss_mib()
    report["files"] = sum(1 for _ in files_under(folder))
    report["disk_mib"] = disk_usage(folder) / MiB
    report["big"] = run_big(args)
    return report


def run_big(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    folder = fresh(args.out / "big") / "store"
    nbytes = int(args.big_gib * 2**30)
    progress(f"scale: {nbytes / 2**30:g} GiB tensor put/get peak RSS, each in a fresh process")
    result = {"put": run_isolated(big_put, str(folder), nbytes), "get": run_isolated(big_get, str(folder), nbytes)}
    shutil.rmtree(folder.parent, ignore_errors=True)
    return result


def scale_table(report: dict[str, Any], args: argparse.Namespace) -> str:
    base, top = report["at_base"], report["at_n"]
    rows = [["blocks in the store", fmt(base["blocks"]), fmt(top["blocks"]), ""]]
    metrics = [("open() s (page cache dropped)", "open_s", 3), ("get /s, first pass (L3, cold)", "get_first_per_s", 0),
               ("get /s, again (L3, warm)", "get_again_per_s", 0), ("put /s, txn each (fsync)", "put_each_per_s", 0),
               ("put /s, one txn", "put_batch_per_s", 0), ("RSS after imports MiB", "rss_imports_mib", 0),
               ("RSS growth: open() MiB", "rss_open_growth_mib", 1),
               ("RSS growth: open() + gets MiB", "rss_gets_growth_mib", 1),
               ("peak RSS growth over the probe MiB", "rss_peak_growth_mib", 1)]
    for name, key, digits in metrics:
        rows.append([name, fmt(base[key], digits), fmt(top[key], digits), fmt(ratio(top[key], base[key]), 2, "x")])
    return table(["metric", f"at {base['blocks']:,}", f"at {top['blocks']:,}", "ratio"], rows)


def print_scale(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"## Scale: {args.scale_block}-byte bf16 blocks, inserted {args.scale_txn:,} per transaction\n")
    if report["at_n"]["blocks"] < args.scale_n:
        print(f"**Stopped at {report['at_n']['blocks']:,} of {args.scale_n:,} blocks: the insert ran into the "
              f"{args.scale_minutes:g}-minute budget (--scale-minutes).**\n")
    print(table(["insert", "blocks/s"], [[f"0 -> {report['at_base']['blocks']:,}", fmt(report["insert_base_per_s"])],
                                          [f"-> {report['at_n']['blocks']:,}", fmt(report["insert_n_per_s"])]]))
    print()
    print(scale_table(report, args))
    print(f"\nStore at the end: {report['files']:,} files, {report['disk_mib']:,.0f} MiB on disk; the inserting "
          f"process peaked at {report['main_rss_peak_mib']:,.0f} MiB RSS (getrusage), "
          f"{report['main_rss_now_mib']:,.0f} MiB at the end.")
    print(f"Probes: {args.scale_gets:,} random gets twice (the first after dropping the page cache at N), "
          f"{max(args.scale_puts // 10, 1)} puts each in its own transaction, {args.scale_puts:,} in one.\n")
    rows = [[op, fmt(r["seconds"], 2), fmt(r["rss_before_mib"]), fmt(r["peak_after_mib"]), fmt(r["overhead_mib"])]
            for op, r in report["big"].items()]
    print(f"### One {args.big_gib:g} GiB bf16 tensor (fresh process each; get overhead excludes the tensor)\n")
    print(table(["op", "s", "RSS before MiB", "peak RSS during MiB", "overhead MiB"], rows))
    print()


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 x 16 MiB instead of 64, 3 repeats (about 1.5 minutes)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repeats per measurement, medians reported (default 5; 3 with --quick)")
    parser.add_argument("--repeat-large", type=int, default=None,
                        help="repeats of the large-tensor passes (default: --repeat, at most 3)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()),
                        help="where to make the scratch folder (a fresh tierstore-bench-* inside it, removed at "
                             "the end unless --keep); needs ~7 GiB free (1 GiB with --quick, 6 GiB with --scale)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", type=Path, help="save the machine, settings and every sample here")
    parser.add_argument("--touch", choices=("page", "full"), default="page",
                        help="materialise reads by one byte per 4 KiB page (default) or every byte")
    parser.add_argument("--skip", choices=("large", "small"), action="append", default=[],
                        help="leave out the large- or small-tensor part")
    scale = parser.add_argument_group("scale mode")
    scale.add_argument("--scale", action="store_true", help="run the scale benchmark instead")
    scale.add_argument("--scale-n", type=int, default=1_000_000, help="small blocks to grow the store to")
    scale.add_argument("--scale-base", type=int, default=10_000, help="the small store compared against")
    scale.add_argument("--scale-block", type=int, default=256, help="bytes per small block")
    scale.add_argument("--scale-txn", type=int, default=10_000, help="blocks per insert transaction")
    scale.add_argument("--scale-gets", type=int, default=10_000, help="random gets per probe")
    scale.add_argument("--scale-puts", type=int, default=2_000, help="puts in one txn per probe (a tenth each)")
    scale.add_argument("--scale-minutes", type=float, default=15.0, help="stop inserting after this long")
    scale.add_argument("--big-gib", type=float, default=1.0, help="size of the huge tensor for the RSS check")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.repeat_large is None:
        args.repeat_large = min(args.repeat, 3)
    return args


def run_main(args: argparse.Namespace) -> tuple[Bench, Dataset | None, Dataset | None]:
    bench = Bench(args.out, args.touch)
    large = small = None
    if "large" not in args.skip:
        progress("making the large tensors")
        large = make_dataset("w", 8 if args.quick else 64, (4096, 2048), seed=1)
        run_large(bench, large, args.repeat_large)
        shutil.rmtree(args.out / "large", ignore_errors=True)
    if "small" not in args.skip:
        small = make_dataset("s", 1000, (2048,), seed=2)
        run_small(bench, small, args.repeat)
    return bench, large, small


def print_main(bench: Bench, large: Dataset | None, small: Dataset | None, args: argparse.Namespace) -> None:
    if large is not None:
        print(f"## Large tensors: {len(large.tensors)} x {large.item_bytes // MiB} MiB bf16, "
              f"{args.repeat_large} repeats\n")
        print(large_write_table(bench, large), end="\n\n")
        print(large_read_table(bench, large), end="\n\n")
        print("tierstore/peer = peer time / tierstore time (above 1: tierstore is faster); the write ratios are "
              "against tierstore's durable txn-per-put row.")
        print("\n".join(f"- {note}" for note in bench.notes), end="\n\n")
    if small is not None:
        print(f"## Small tensors: {len(small.tensors):,} x {small.item_bytes // 1024} KiB bf16, "
              f"{args.repeat} repeats\n")
        print(small_table(bench, small), end="\n\n")
        print(small_cpu_table(bench, small), end="\n\n")
    print("## Targets\n")
    print(targets_table(targets(bench, large, small)), end="\n\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = Path(tempfile.mkdtemp(prefix="tierstore-bench-", dir=args.out))
    info = machine_info(args.out)
    print_machine(info)
    report: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    started = time.perf_counter()
    try:
        if args.scale:
            report["scale"] = run_scale(args)
            print_scale(report["scale"], args)
        else:
            bench, large, small = run_main(args)
            print_main(bench, large, small, args)
            report.update(samples=bench.samples, disk_bytes=bench.sizes,
                          targets=[vars(t) for t in targets(bench, large, small)])
    finally:
        if args.keep:
            progress(f"kept the scratch folder {args.out}")
        else:
            shutil.rmtree(args.out, ignore_errors=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"(benchmark took {time.perf_counter() - started:,.0f} s; load average at the end {load})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
