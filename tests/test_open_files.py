"""File descriptors: bounded while a store works, closed when their file is deleted, all gone at close.

Each test counts the entries of ``/proc/self/fd`` that point into its store (other descriptors of the
test process are none of the store's business) before, during and after the work.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import tierstore
from tierstore.tiers.l3_zarr import OPEN_FILES, PACK_SLOTS
from tierstore.tiers.open_files import OpenFiles

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")

WRITE_FDS = 8
"""Besides the read cache: LOCK, the catalog and its -wal and -shm, an active shard per pack, slack."""


def store_fds(store: Path) -> list[str]:
    """Targets of this process's descriptors that lie in ``store`` (a deleted file ends in ' (deleted)')."""
    prefix = str(store.resolve()) + os.sep
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed since the listing (the listing's own descriptor, another thread's)
            continue
        if target.startswith(prefix):
            out.append(target)
    return out


def deleted(fds: list[str]) -> list[str]:
    return [t for t in fds if t.endswith(" (deleted)")]


def small(i: int) -> torch.Tensor:
    return torch.full((100,), i, dtype=torch.int64)


def large(i: int) -> torch.Tensor:
    return torch.full((100_000,), i, dtype=torch.float32)  # 400 KB: an array file of its own


def fill(db: tierstore.TierStore, n: int) -> None:
    for first in range(0, n, PACK_SLOTS):
        with db.transaction():  # whole shards per commit: every full shard was once the committed active one
            for i in range(first, min(n, first + PACK_SLOTS)):
                db.put(f"k{i}", small(i))


def test_plain_put_get_keeps_descriptors_bounded_and_close_closes_all(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert store_fds(store) == []
    peak = 0
    with tierstore.open(store, fsync=False, l2_cache_size=0) as db:
        fill(db, 4 * PACK_SLOTS * OPEN_FILES // 16)  # 1024 small blocks in 16 shards
        for i in range(12):
            db.put(f"big{i}", large(i))
        peak = len(store_fds(store))
        for i in range(0, 1024, 7):
            assert int(db.get(f"k{i}")[0]) == i
            peak = max(peak, len(store_fds(store)))
        for i in range(12):
            assert float(db.get(f"big{i}")[0]) == i
        peak = max(peak, len(store_fds(store)))
        for i in range(12):
            db.put(f"big{i}", large(i + 100))  # the old array files go, and so do their descriptors
        assert deleted(store_fds(store)) == []
    assert peak <= OPEN_FILES + WRITE_FDS
    assert store_fds(store) == [], "descriptors left open after close()"


def test_reads_of_many_shards_stay_under_the_bound(tmp_path: Path) -> None:
    store = tmp_path / "store"
    n = PACK_SLOTS * (OPEN_FILES + 40)  # more shard files than the cache may hold
    with tierstore.open(store, fsync=False, l2_cache_size=0) as db:
        fill(db, n)
    with tierstore.open(store, readonly=True) as ro:
        peak = 0
        for i in range(0, n, PACK_SLOTS // 2):
            assert int(ro.get(f"k{i}")[0]) == i
            peak = max(peak, len(store_fds(store)))
        assert OPEN_FILES <= peak <= OPEN_FILES + WRITE_FDS
    assert store_fds(store) == []


def test_compact_and_gc_close_the_descriptors_of_the_files_they_delete(tmp_path: Path) -> None:
    store = tmp_path / "store"
    n = PACK_SLOTS * 20
    with tierstore.open(store, fsync=False, l2_cache_size=0) as db:
        fill(db, n)
        for i in range(n):
            assert int(db.get(f"k{i}")[0]) == i  # every shard in the read cache
        with db.transaction():
            for i in range(n):
                if i % 4:
                    db.delete(f"k{i}")
        report = db.compact(min_fill=0.9)
        assert report.shards_rewritten >= 19
        assert deleted(store_fds(store)) == [], "compacted shard files still held open"
        for i in range(0, n, 4):
            assert int(db.get(f"k{i}")[0]) == i
        for i in range(0, n, 4):
            db.delete(f"k{i}")
        db.gc()
        assert deleted(store_fds(store)) == [], "collected shard files still held open"
        assert len(store_fds(store)) <= OPEN_FILES + WRITE_FDS
    assert store_fds(store) == []


def test_prefetch_leaves_no_descriptor_behind(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with tierstore.open(store, fsync=False, l2_cache_size=0) as db:
        fill(db, PACK_SLOTS * 8)
        for i in range(6):
            db.put(f"big{i}", large(i))
    with tierstore.open(store, fsync=False, l2_cache_size="64MiB") as db:
        done = db.prefetch([f"k{i}" for i in range(PACK_SLOTS * 8)] + [f"big{i}" for i in range(6)])
        assert len(done.result(timeout=60)) == PACK_SLOTS * 8 + 6
        assert len(store_fds(store)) <= OPEN_FILES + WRITE_FDS
        for i in range(6):
            db.delete(f"big{i}")
        assert deleted(store_fds(store)) == [], "the prefetcher's descriptors of deleted files stay open"
    assert store_fds(store) == []


def test_threaded_readers_while_writers_replace_and_compact(tmp_path: Path) -> None:
    """6 reader threads; the main thread overwrites 8 large and 192 small blocks and compacts, 3 rounds."""
    store = tmp_path / "store"
    n_small, n_large, readers, rounds = PACK_SLOTS * 6, 8, 6, 3
    with tierstore.open(store, fsync=False, l2_cache_size=0) as db:
        fill(db, n_small)
        for i in range(n_large):
            db.put(f"big{i}", large(i))
        stop = threading.Event()
        errors: list[BaseException] = []
        peak = [0]

        def read(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while not stop.is_set():
                    key = f"big{rng.randrange(n_large)}" if rng.random() < 0.2 else f"k{rng.randrange(n_small)}"
                    db.get(key)
                    if rng.random() < 0.05:
                        peak[0] = max(peak[0], len(store_fds(store)))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(s,)) for s in range(readers)]
        for t in threads:
            t.start()
        try:
            for r in range(rounds):
                for i in range(n_large):
                    db.put(f"big{i}", large(i + 1000 * r))
                with db.transaction():
                    for i in range(r % 2, n_small, 2):
                        db.put(f"k{i}", small(i))
                db.compact(min_fill=0.9)
                peak[0] = max(peak[0], len(store_fds(store)))
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
        # Descriptors in use by a read when their file went are closed by that read; none is left.
        assert deleted(store_fds(store)) == []
        assert peak[0] <= OPEN_FILES + WRITE_FDS + readers
    assert store_fds(store) == []


_RLIMIT_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
import torch, tierstore
with tierstore.open(sys.argv[1], fsync=False, l2_cache_size=0) as db:
    for first in range(0, 16_384, 64):
        with db.transaction():
            for i in range(first, first + 64):
                db.put(f"k{i}", torch.tensor([i]))
    assert len(db) == 16_384 and int(db.get("k16383")[0]) == 16_383
print("ok")
"""


def test_16k_small_puts_under_an_open_file_limit_of_256(tmp_path: Path) -> None:
    """256 transactions of 64 puts: each fills a shard that the next one leaves for a fresh one."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tierstore.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _RLIMIT_CHILD, str(tmp_path / "store")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


# -- OpenFiles on its own ---------------------------------------------------------------------------


def test_open_files_is_bounded_and_never_closes_a_descriptor_in_use(tmp_path: Path) -> None:
    """6 threads read 300 files (each holds its own number) while one thread discards them."""
    paths = []
    for i in range(300):
        path = tmp_path / f"f{i}"
        path.write_bytes(i.to_bytes(4, "little") * 256)
        paths.append(str(path))
    files = OpenFiles(16, lambda p: os.open(p, os.O_RDONLY))
    stop = threading.Event()
    errors: list[BaseException] = []
    peak = [0]

    def read(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                i = rng.randrange(len(paths))
                fd = files.acquire(paths[i])
                try:
                    # A descriptor closed under this read could have been reused by another open: the
                    # bytes would then be another file's number.
                    assert int.from_bytes(os.pread(fd, 4, 4 * rng.randrange(256)), "little") == i
                finally:
                    files.release(paths[i], fd)
                peak[0] = max(peak[0], len(files))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def discard() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            files.discard(rng.sample(paths, 5))

    threads = [threading.Thread(target=read, args=(s,)) for s in range(6)]
    dropper = threading.Thread(target=discard)
    for t in [*threads, dropper]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    dropper.join()
    assert not errors, errors[:3]
    assert peak[0] <= 16 + 6
    files.close()
    assert len(files) == 0


def test_open_files_closes_a_discarded_descriptor_at_its_last_release(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    files = OpenFiles(4, lambda p: os.open(p, os.O_RDONLY))
    a = files.acquire(str(path))
    b = files.acquire(str(path))
    assert a == b
    files.discard([str(path)])
    assert len(files) == 1
    files.release(str(path), a)
    os.fstat(a)  # still open: one reader holds it
    files.release(str(path), b)
    assert str(path) not in store_fds(tmp_path)
    assert len(files) == 0
