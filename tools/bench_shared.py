#!/usr/bin/env python
"""Benchmark the shared tier against zarr-python on obstore, on the same S3 server, in one run.

Run from the repository root with a server up (``bash tools/ceph_s3.sh start`` then
``. cephci/env``; or let the script start one, as root, with ``--start``)::

    python tools/bench_shared.py                  # 8 x 16 MiB + 1,000 x 4 KiB bf16, 3 repeats x 3 reads
    python tools/bench_shared.py --quick          # 4 x 16 MiB + 300 x 4 KiB, 3 repeats
    python tools/bench_shared.py --json out.json  # also save every sample

Peers, on the same tensors and server, taking turns inside each repeat (medians reported; the
in-memory gets take ``--reads`` turns per repeat):

- put: tierstore ``db.publish(keys)`` (blocks read from the local store, hashed, encoded
  with the L3 codec, uploaded ``shared_concurrency`` at a time, plus one ref per key) against
  zarr-python direct (``zarr.create_array`` + write per tensor over ``zarr.storage.ObjectStore``
  on ``obstore.store.S3Store``, zstd, 4 MiB chunks);
- get: tierstore fetching the published blocks into memory, verified against their content hash
  (``SharedCoordinator`` with its concurrency; a 16 MiB block is a format-2 object: its header,
  then its 2 MiB chunks by concurrent ranged GETs, each decoded and hashed on the chunk threads),
  and ``db.pull(name)`` (which also writes them to the local L3 with fsync), against zarr-python
  ``open_array(...)[:]`` per tensor;
- model load: a second machine pulling a model the first imported, against importing it itself
  from a safetensors checkpoint on local disk (``load_file`` + ``put`` in one transaction).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import obstore.store
import safetensors.torch
import torch
import zarr
import zarr.storage

import tierstore
from tierstore.config import SharedCredentials

warnings.filterwarnings("ignore", message=".*not yet part of the Zarr.*specification.*")
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def _server(args: argparse.Namespace) -> tuple[dict[str, str], Callable[[], None]]:
    env = os.environ
    if env.get("TIERSTORE_TEST_S3_ENDPOINT"):
        return ({"endpoint": env["TIERSTORE_TEST_S3_ENDPOINT"], "bucket": env["TIERSTORE_TEST_S3_BUCKET"],
                 "access": env["TIERSTORE_TEST_S3_ACCESS_KEY"], "secret": env["TIERSTORE_TEST_S3_SECRET_KEY"]},
                lambda: None)
    if not args.start:
        sys.exit("bench_shared: no server; export TIERSTORE_TEST_S3_* (tools/ceph_s3.sh start) or pass --start")
    ceph = tempfile.mkdtemp(prefix="bench-ceph-")
    run_env = {**env, "CEPH_DIR": ceph}
    subprocess.run(["bash", str(ROOT / "tools" / "ceph_s3.sh"), "start"], check=True, env=run_env)
    return ({"endpoint": "http://127.0.0.1:7480", "bucket": "tierstore-ci", "access": "ciaccesskey",
             "secret": "cisecretkey123"},
            lambda: subprocess.run(["bash", str(ROOT / "tools" / "ceph_s3.sh"), "stop"], env=run_env, check=False))


class Bench:
    """One S3 server, fresh prefixes per measurement, samples kept per (case, peer)."""

    def __init__(self, server: dict[str, str], work: Path, compression: str | None) -> None:
        self.server = server
        self.compression = compression
        self.work = work
        self.samples: dict[str, dict[str, list[float]]] = {}

    def shared(self, prefix: str) -> dict[str, Any]:
        return {"shared_url": f"s3://{self.server['bucket']}/{prefix}", "shared_endpoint": self.server["endpoint"],
                "shared_credentials": SharedCredentials(self.server["access"], self.server["secret"]),
                "shared_timeout": 60.0, "fsync": True, "shared_compression": self.compression}

    def zarr_store(self, prefix: str) -> zarr.storage.ObjectStore:
        s3 = obstore.store.S3Store(self.server["bucket"], prefix=prefix, endpoint=self.server["endpoint"],
                                   access_key_id=self.server["access"], secret_access_key=self.server["secret"],
                                   region="us-east-1", virtual_hosted_style_request=False,
                                   client_options={"allow_http": True})
        return zarr.storage.ObjectStore(s3)

    def record(self, case: str, peer: str, seconds: float) -> None:
        self.samples.setdefault(case, {}).setdefault(peer, []).append(seconds)

    def median(self, case: str, peer: str) -> float:
        return statistics.median(self.samples[case][peer])


def _tensors(count: int, nbytes: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"t/{i:05d}": (torch.randn(nbytes // 2, generator=gen) * 0.02).to(torch.bfloat16)
            for i in range(count)}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_blocks(bench: Bench, case: str, tensors: dict[str, torch.Tensor], repeat: int, reads: int) -> None:
    """put and get of one block size, tierstore against zarr direct.

    Each repeat uploads both copies, then takes ``reads`` turns of tierstore fetch and zarr get
    (reads leave the bucket as it was, so taking turns cancels much of the machine's drift).
    """
    chunk = min(4 * MiB, next(iter(tensors.values())).nbytes) // 2
    for rep in range(repeat):
        tag = f"b{uuid.uuid4().hex[:8]}"
        src = bench.work / f"{tag}-src"
        l2_size = 2 * sum(t.nbytes for t in tensors.values())
        store = bench.zarr_store(f"{tag}/zarr")

        def zarr_put(store: zarr.storage.ObjectStore = store) -> None:
            for key, tensor in tensors.items():
                arr = zarr.create_array(store, name=key, shape=(tensor.numel(),), dtype="uint16", chunks=(chunk,),
                                        overwrite=True)
                arr[:] = tensor.view(torch.int16).numpy().view(np.uint16)

        def zarr_get(store: zarr.storage.ObjectStore = store) -> list[np.ndarray]:
            return [zarr.open_array(store, path=key, mode="r")[:] for key in tensors]

        with tierstore.open(src, **bench.shared(f"{tag}/ts"), l2_cache_size=l2_size) as db:
            with db.transaction():
                for key, tensor in tensors.items():
                    db.put(key, tensor)
            seconds, report = _timed(lambda: db.publish(keys=list(tensors), name="set"))
            assert report.uploaded == len(tensors)
            bench.record(f"{case} put", "tierstore publish", seconds)
            seconds, _ = _timed(zarr_put)
            bench.record(f"{case} put", "zarr direct (obstore)", seconds)
            shared = db.shared
            assert shared is not None
            _, entries = shared.manifest("set")

            def fetch_all(shared: Any = shared, entries: dict[str, Any] = entries) -> int:
                futures = [shared.tier.submit(shared.tier.get_block(h.hash, h.nbytes)) for h in entries.values()]
                return sum(shared.tier.wait(f, "get", queued=True) is not None for f in futures)

            for turn in range(reads):
                seconds, got = _timed(fetch_all)
                assert got == len(tensors)
                bench.record(f"{case} get", "tierstore fetch (verified, to memory)", seconds)
                seconds, arrays = _timed(zarr_get)
                if rep == 0 and turn == 0:
                    assert all(np.array_equal(a, t.view(torch.int16).numpy().view(np.uint16))
                               for a, t in zip(arrays, tensors.values(), strict=True))
                bench.record(f"{case} get", "zarr direct (obstore)", seconds)
        with tierstore.open(bench.work / f"{tag}-dst", **bench.shared(f"{tag}/ts")) as dst:
            seconds, pulled = _timed(lambda: dst.pull("set"))
            assert pulled.fetched == len(tensors)
            if rep == 0:
                for key, tensor in tensors.items():
                    assert torch.equal(dst.get(key).view(torch.int16), tensor.view(torch.int16)), key
            bench.record(f"{case} get", "tierstore pull (to local L3, fsync)", seconds)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(bench.work / f"{tag}-dst", ignore_errors=True)


def run_model(bench: Bench, tensors: dict[str, torch.Tensor], repeat: int) -> None:
    """Second machine: pull what the first imported, against importing the checkpoint itself."""
    checkpoint = bench.work / "model.safetensors"
    safetensors.torch.save_file({k.replace("/", "."): v for k, v in tensors.items()}, str(checkpoint))
    for _ in range(repeat):
        tag = f"m{uuid.uuid4().hex[:8]}"
        fd = os.open(checkpoint, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # a cold checkpoint (as far as the kernel lets us)
        os.close(fd)

        def import_model(path: Path, tag: str = tag) -> None:
            with tierstore.open(path, **bench.shared(f"{tag}/ts")) as db, db.transaction():
                for key, tensor in safetensors.torch.load_file(str(checkpoint)).items():
                    db.put(key, tensor)

        seconds, _ = _timed(lambda tag=tag: import_model(bench.work / f"{tag}-a"))
        bench.record("model load", "import from the checkpoint", seconds)
        with tierstore.open(bench.work / f"{tag}-a", **bench.shared(f"{tag}/ts")) as db:
            db.publish(name="model")
        with tierstore.open(bench.work / f"{tag}-b", **bench.shared(f"{tag}/ts")) as db:
            seconds, report = _timed(lambda: db.pull("model"))
            assert report.fetched == len(tensors)
        bench.record("model load", "pull from the shared tier", seconds)
        for side in "ab":
            shutil.rmtree(bench.work / f"{tag}-{side}", ignore_errors=True)


def report(bench: Bench, sizes: dict[str, tuple[int, int]]) -> str:
    lines = ["| case | peer | median s | MiB/s | blocks/s | vs zarr direct |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for case, peers in bench.samples.items():
        count, nbytes = sizes[case.split()[0]] if case.split()[0] in sizes else sizes["model"]
        base = peers.get("zarr direct (obstore)")
        ref = statistics.median(base) if base else None
        for peer, samples in peers.items():
            med = statistics.median(samples)
            ratio = f"{ref / med:.2f}x" if ref else ""
            lines.append(f"| {case} | {peer} | {med:.3f} | {count * nbytes / MiB / med:.1f} | {count / med:.0f} | "
                         f"{ratio} |")
    model = bench.samples.get("model load")
    if model:
        own, pulled = (statistics.median(model[p]) for p in ("import from the checkpoint", "pull from the shared tier"))
        lines.append(f"\nmodel load: pull / import = {pulled / own:.2f} (time of a second machine pulling, over "
                     "importing the checkpoint itself)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reads", type=int, default=3, help="turns of fetch/zarr get per repeat (default 3)")
    parser.add_argument("--start", action="store_true", help="start a throwaway Ceph RGW (root) if none is set")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compression", default=None,
                        help="shared_compression of the tierstore peers (default: as l3_compression, auto)")
    args = parser.parse_args()
    server, stop = _server(args)
    large_n, small_n = (4, 300) if args.quick else (8, 1000)
    sizes = {"16MiB": (large_n, 16 * MiB), "4KiB": (small_n, 4096), "model": (48, 2 * MiB)}
    work = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    bench = Bench(server, work, args.compression)
    started = time.time()
    try:
        run_blocks(bench, "16MiB", _tensors(large_n, 16 * MiB, 1), args.repeat, args.reads)
        run_blocks(bench, "4KiB", _tensors(small_n, 4096, 2), args.repeat, args.reads)
        run_model(bench, _tensors(*sizes["model"], 3), args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        stop()
    text = report(bench, sizes)
    print(f"# bench_shared: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.time() - started:.0f} s, server {server['endpoint']}, shared_compression={args.compression}\n")
    print(text)
    if args.json:
        args.json.write_text(json.dumps(bench.samples, indent=1))


if __name__ == "__main__":
    main()
