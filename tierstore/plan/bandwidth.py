"""Measuring the machine: disk read/write, memcpy, codec speed and, on a GPU, pinned host-to-device copies.

Each measurement is brief (tens of megabytes, best of a few rounds) and runs only
when asked for; :class:`Bandwidth` values can be cached in a store's ``store_meta``
table (``hardware_bandwidth``) so that a later probe reuses them.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import crc32c
import numpy as np
import torch

from ..tiers.codecs import Codec

__all__ = ["Bandwidth", "measure", "measure_fetch", "META_NAME", "STORE_CODEC"]

META_NAME = "hardware_bandwidth"
"""``store_meta`` row holding the last measurement, as JSON."""

_CODECS = {"shuffle-zstd": Codec("shuffle-zstd", 1, 2), "blosc-lz4": Codec("blosc-lz4", 0, 2)}
"""The codecs the recommendation weighs, on bf16-like data (element size 2)."""
STORE_CODEC = "shuffle-zstd"
"""The codec a store's default ``l3_compression`` (``auto``) writes bf16 blocks with: what the planner prices."""


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """Measured speeds in bytes per second (codec speeds per byte of decoded data)."""

    disk_read: float
    disk_write: float
    memcpy: float
    h2d_pinned: float | None
    """Pinned host-to-device copy; None without a GPU."""
    decode: dict[str, float]
    """Decompression speed of each codec, on one thread."""
    ratio: dict[str, float]
    """Compression ratio of each codec on weight-like data (normal bf16)."""
    measured_at: float
    disk_path: str
    page_cache_read: float | None = None
    """``pread`` of a file in the page cache into memory already faulted in, one thread (None: not measured)."""
    checksum: float | None = None
    """crc32c of data in memory, one thread: what the L3 reader adds per byte it returns (None: not measured)."""
    fresh_copy: float | None = None
    """Copy into memory allocated for it (its pages faulted in by the copy), one thread: what ``torch.cat``
    into a new tensor costs per byte, several times slower than ``memcpy`` into reused memory
    (None: not measured)."""

    def to_json(self) -> str:
        """For ``store_meta``."""
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Bandwidth:
        """Inverse of :meth:`to_json`."""
        return Bandwidth(**json.loads(text))


def _best(fn: Callable[[], None], rounds: int) -> float:
    """Fastest of ``rounds`` runs, in seconds."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _disk(folder: Path, nbytes: int) -> tuple[float, float]:
    """Write (with fdatasync) then read back, uncached, a scratch file in ``folder``."""
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    path = folder / f".tierstore-probe-{os.getpid()}.tmp"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            start = time.perf_counter()
            os.write(fd, data.data)
            os.fdatasync(fd)
            write = nbytes / max(time.perf_counter() - start, 1e-9)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the disk, not the page cache
            out = bytearray(nbytes)
            start = time.perf_counter()
            got = os.preadv(fd, [out], 0)
            read = got / max(time.perf_counter() - start, 1e-9)
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return read, write


def _codecs(nbytes: int) -> tuple[dict[str, float], dict[str, float]]:
    weights = torch.randn(nbytes // 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    data = weights.view(torch.uint8).numpy()
    chunks = [data[i:i + (1 << 20)] for i in range(0, data.nbytes, 1 << 20)]
    decode: dict[str, float] = {}
    ratio: dict[str, float] = {}
    out = np.empty(1 << 20, dtype=np.uint8)
    for name, codec in _CODECS.items():
        encoded = [(codec.encode(c), c.nbytes) for c in chunks]
        ratio[name] = data.nbytes / sum(len(e) for e, _ in encoded)

        def run(codec: Codec = codec, encoded: list[tuple[bytes | np.ndarray, int]] = encoded) -> None:
            for piece, size in encoded:
                codec.decode_into(piece, out[:size])

        decode[name] = data.nbytes / _best(run, 3)
    return decode, ratio


def _fresh_copy(nbytes: int, rounds: int = 5) -> float:
    """Bytes/s of copying into a newly allocated torch tensor, the median of ``rounds``.

    A tensor this large gets fresh pages from the kernel, faulted in 4 KiB at a time by the copy
    (torch, unlike numpy, does not ask for transparent huge pages): 0.6-1.2 GB/s on the shared
    2-core VM against 4-8 GB/s into reused memory (BENCHMARKS.md, prefix reuse).
    """
    src = torch.ones(nbytes, dtype=torch.uint8)

    def run() -> None:
        dst = torch.empty_like(src)
        dst.copy_(src)
        del dst

    return nbytes / _median(run, rounds)


def _h2d(nbytes: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def run() -> None:
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    run()
    return nbytes / _best(run, 5)


def _median(fn: Callable[[], None], rounds: int) -> float:
    """Median of ``rounds`` runs after one warm-up, in seconds: on a shared machine, what a long run sustains."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return max(sorted(times)[len(times) // 2], 1e-9)


def measure_fetch(folder: str | os.PathLike[str], *, nbytes: int = 32 << 20, rounds: int = 5,
                  threads: int | None = None) -> dict[str, float]:
    """Each step of fetching a streamed block from L3, bytes/s per thread, as the L3 reader runs it (medians).

    ``page_cache_read``: ``preadv`` of a file that is in the page cache into a buffer already faulted
    in (a raw L3 block read into its L2 slot); ``decode``: :data:`STORE_CODEC` decompression into
    memory, per decoded byte; both run as the reader's pool runs them, 1 MiB pieces on ``threads``
    threads at once (default: every core), and report the aggregate speed divided by ``threads``:
    on a machine shared with other work, threads running together get less than one core each,
    and this is the share each gets (one thread measured alone, times the cores, promised the
    streamed 2B about twice the decode speed it got on the shared 2-core VM). ``checksum``: crc32c
    on one thread, as the reader checks a block (on the thread that asked for it); ``map_populate``
    (where the kernel has ``MADV_POPULATE_READ``): mapping the cached file and populating its pages,
    as a raw block is mapped (:meth:`TierStore.map <tierstore.engine.handle.TierStore.map>`). The file is
    written in ``folder`` (the store's disk) and read twice, so the reads hit the page cache. A
    few tenths of a second.
    """
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, threads or os.cpu_count() or 1)
    data = torch.randn(nbytes // 2, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    raw = data.view(torch.uint8).numpy()
    step = 1 << 20
    starts = range(0, raw.nbytes, step)
    out = np.ones_like(raw)
    codec = _CODECS[STORE_CODEC]
    encoded = [codec.encode(raw[i:i + step]) for i in starts]
    path = Path(folder) / f".tierstore-fetch-{os.getpid()}.tmp"
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def rate(piece: Callable[[int], object]) -> float:
            def all_pieces() -> None:
                for _ in pool.map(piece, starts):
                    pass

            return nbytes / _median(all_pieces, rounds) / workers

        try:
            path.write_bytes(raw.tobytes())
            fd = os.open(path, os.O_RDONLY)
            try:
                read = rate(lambda i: os.preadv(fd, [out[i:i + step].data], i))
                populate = _map_populate(fd, nbytes, rounds)
            finally:
                os.close(fd)
        finally:
            path.unlink(missing_ok=True)
        decode = rate(lambda i: codec.decode_into(encoded[i // step], out[i:i + step]))

    def check_all() -> None:
        crc32c.crc32c(out.data)

    check = nbytes / _median(check_all, rounds)
    result = {"page_cache_read": read, "checksum": check, "decode": decode}
    if populate is not None:
        result["map_populate"] = populate
    return result


_MADV_POPULATE_READ = 22
"""Linux 5.14+ (what :mod:`tierstore.tiers.l3_zarr.mapped` populates a raw block's map with)."""


def _map_populate(fd: int, nbytes: int, rounds: int) -> float | None:
    """Bytes/s of mapping a cached file ``MAP_PRIVATE`` and populating it, as a raw L3 block's map is made (median).

    None where the kernel has no ``MADV_POPULATE_READ`` (the store then maps without populating). The file
    is dropped from the page cache and read back by a first map first, as a store's file comes into the
    cache (a freshly written file's large folios map an order of magnitude faster).
    """
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        region = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            region.madvise(_MADV_POPULATE_READ)
        except OSError:
            return None
        finally:
            region.close()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])  # the first map read the file back from the disk
    return nbytes / max(times[len(times) // 2], 1e-9)


def measure(folder: str | os.PathLike[str], *, nbytes: int = 64 << 20) -> Bandwidth:
    """Measure the machine, with the disk test in ``folder`` (the store's folder); about a second."""
    path = Path(folder)
    read, write = _disk(path, nbytes)
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first: the copy into reused memory is what the pools do
    memcpy = nbytes / _best(lambda: np.copyto(dst, src), 5)
    fresh = _fresh_copy(nbytes)
    decode, ratio = _codecs(min(nbytes, 16 << 20))
    fetch = measure_fetch(path, nbytes=min(nbytes, 16 << 20))
    return Bandwidth(disk_read=read, disk_write=write, memcpy=memcpy, h2d_pinned=_h2d(nbytes), decode=decode,
                     ratio=ratio, measured_at=time.time(), disk_path=str(path.resolve()),
                     page_cache_read=fetch["page_cache_read"], checksum=fetch["checksum"], fresh_copy=fresh)
