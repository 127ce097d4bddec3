"""Durability: real SIGKILL crashes, damaged files, and the on-disk Zarr layout.

The crash test runs a writer in another process and kills it with SIGKILL at random moments. Every
transaction's content is a pure function of its number, so the parent can recompute what each key must
hold. Each block's first 8 bytes are the number of the transaction that wrote it (its "tag"), which makes
a half-visible transaction easy to see: all keys a transaction put must carry its tag, or none of them.

Starting a Python interpreter that imports torch costs ~2 CPU-seconds here, so the default test starts
one child interpreter (a "zygote") that imports tierstore once and forks a fresh writer process per kill;
every writer is a separate process killed with a real SIGKILL. ``TIERSTORE_SLOW_TESTS=1`` also runs the
variant that starts a new interpreter per kill.
"""

from __future__ import annotations

import functools
import inspect
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tierstore
from tests.faultlib import check_files_match_catalog, forking_server

# ---------------------------------------------------------------------------------------------------------
# Deterministic transactions (this source is also sent to the child process, so keep it self-contained).

CRASH_KEYS = 8
PACK_LIMIT = 256 * 1024
SMALL_L2 = "8MiB"
"""Stores here get a small L2 (the default 256 MiB arena is prefaulted on every open, ~0.2 s here)."""


def txn_plan(t: int) -> tuple[list[str], str | None]:
    """Keys transaction ``t`` puts, and the key it deletes if that key exists (never one it puts)."""
    rng = np.random.default_rng([t, 1])
    keys = [f"crash/k{i}" for i in range(CRASH_KEYS)]
    puts = sorted(rng.choice(keys, size=int(rng.integers(1, 4)), replace=False).tolist())
    rest = [k for k in keys if k not in puts]
    delete = str(rng.choice(rest)) if rng.random() < 0.35 else None
    return puts, delete


def block_bytes(t: int, key: str) -> tuple[str, bytes]:
    """The dtype name and raw bytes transaction ``t`` writes under ``key`` (first 8 bytes: ``t``)."""
    index = int(key.rsplit("k", 1)[1])
    rng = np.random.default_rng([t, index, 2])
    if rng.random() < 0.4:
        nbytes = int(rng.integers(300 * 1024, 2 * 1024 * 1024)) // 4 * 4
    else:
        nbytes = int(rng.integers(1024, 4 * 1024)) // 4 * 4
    if rng.random() < 0.5:
        data = rng.integers(0, 256, nbytes, dtype=np.uint8)  # incompressible: stored raw
    else:
        data = rng.integers(0, 4, nbytes, dtype=np.uint8)  # compresses well
    data[:8] = np.frombuffer(t.to_bytes(8, "little"), dtype=np.uint8)
    dtype = ("uint8", "float32", "bfloat16")[int(rng.integers(0, 3))]
    return dtype, data.tobytes()


def block_tensor(t: int, key: str) -> torch.Tensor:
    """``block_bytes`` as a tensor (float views keep NaN payloads: the store must keep them bit-exact)."""
    dtype, raw = block_bytes(t, key)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype))


def apply_txn(state: dict[str, int], t: int) -> dict[str, int]:
    """The committed state (key -> tag) after transaction ``t`` commits on ``state``."""
    puts, delete = txn_plan(t)
    new = dict(state)
    if delete is not None:
        new.pop(delete, None)
    for key in puts:
        new[key] = t
    return new


def writer_loop(store: str, start: int, log_path: str) -> None:
    """Run transactions ``start, start+1, ...`` forever, acknowledging each commit in the log."""
    import tierstore as ts

    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    db = ts.open(store, l2_cache_size=SMALL_L2)
    os.write(log, b"opened\n")
    os.fsync(log)
    t = start
    while True:
        puts, delete = txn_plan(t)
        with db.transaction():
            for key in puts:
                db.put(key, block_tensor(t, key))
            if delete is not None and delete in db:
                db.delete(delete)
        os.write(log, f"committed {t}\n".encode())
        os.fsync(log)
        t += 1


_CHILD_MAIN = '''
def _main() -> None:
    store, mode = sys.argv[1], sys.argv[2]
    if mode == "run":  # one writer in this interpreter: argv = store run START LOG
        writer_loop(store, int(sys.argv[3]), sys.argv[4])
        return
    # zygote: tierstore is imported; fork one writer per "START LOG" line, report "PID" then "exit STATUS"
    for line in sys.stdin:
        start, log_path = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                sys.stdin.close()
                writer_loop(store, int(start), log_path)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            os._exit(3)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {status}", flush=True)


_main()
'''

CHILD_CODE = "\n".join([
    "from __future__ import annotations",
    "import os, sys, traceback",
    "import numpy as np",
    "import torch",
    "import tierstore",
    f"CRASH_KEYS = {CRASH_KEYS}",
    f"SMALL_L2 = {SMALL_L2!r}",
    *(textwrap.dedent(inspect.getsource(f)) for f in (txn_plan, block_bytes, block_tensor, writer_loop)),
    _CHILD_MAIN,
])


# ---------------------------------------------------------------------------------------------------------
# Checking a store against the model.


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_expected = functools.lru_cache(maxsize=64)(block_bytes)
"""The parent recomputes the same blocks round after round."""


def read_state(db: tierstore.TierStore) -> dict[str, int]:
    """key -> tag of every block, after checking each block holds exactly what its tag's transaction wrote."""
    state: dict[str, int] = {}
    for key in db:
        tensor = db.get(key)
        raw = _raw(tensor)
        tag = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
        dtype, expected = _expected(tag, key) if tag >= 0 and key.startswith("crash/k") else ("?", b"")
        assert tensor.dtype == getattr(torch, dtype, None) and raw == expected, (
            f"{key!r} holds bytes that no transaction wrote (tag {tag}, dtype {tensor.dtype}, {len(raw)} bytes)")
        state[key] = tag
    assert len(db) == len(state), f"len(db) = {len(db)} but keys() lists {len(state)}"
    return state


def resolve(actual: dict[str, int], acked: dict[str, int], unacked: int, with_unacked: dict[str, int]) -> bool:
    """Whether the unacknowledged transaction committed; fail on anything but 'fully absent' or 'fully there'."""
    if actual == acked:
        return False
    if actual == with_unacked:
        return True
    puts, delete = txn_plan(unacked)
    lost = {k: t for k, t in acked.items() if actual.get(k) != t and k not in puts and k != delete}
    partial = {k: actual.get(k) for k in puts}
    raise AssertionError(
        f"store matches neither the acknowledged state nor it plus txn {unacked} (puts {puts}, deletes {delete})"
        f"\n  acknowledged state: {acked}\n  with txn {unacked}:   {with_unacked}\n  actual:             {actual}"
        f"\n  acknowledged keys lost/changed: {lost}\n  tags of txn {unacked}'s keys: {partial}")


# ---------------------------------------------------------------------------------------------------------
# Launching writers.

Launch = Callable[[int, Path], tuple[int, Callable[[], int]]]
"""(start txn, log path) -> (writer pid, wait() -> wait status)."""


@contextmanager
def zygote_launcher(store: Path, errlog: Path) -> Iterator[Launch]:
    with forking_server([sys.executable, "-c", CHILD_CODE, str(store), "serve"], errlog) as spawn:
        yield lambda start, log: spawn(f"{start} {log}")


@contextmanager
def spawn_launcher(store: Path, errlog: Path) -> Iterator[Launch]:
    procs: list[subprocess.Popen[bytes]] = []

    def launch(start: int, log: Path) -> tuple[int, Callable[[], int]]:
        with open(errlog, "ab") as err:
            proc = subprocess.Popen([sys.executable, "-c", CHILD_CODE, str(store), "run", str(start), str(log)],
                                    stderr=err)
        procs.append(proc)

        def wait() -> int:
            code = proc.wait(timeout=60)
            return (-code) if code < 0 else code << 8  # as an os.waitpid status

        return proc.pid, wait

    try:
        yield launch
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _log_lines(log: Path) -> list[str]:
    text = log.read_text() if log.exists() else ""
    return [line for line in text.split("\n")[:-1]]  # only complete lines


def _wait_opened(log: Path, deadline: float) -> None:
    while "opened" not in _log_lines(log):
        assert time.monotonic() < deadline, f"the writer did not open the store in time ({log})"
        time.sleep(0.005)


def _wait_committed(log: Path, deadline: float) -> None:
    while not any(line.startswith("committed ") for line in _log_lines(log)):
        assert time.monotonic() < deadline, f"the writer committed nothing in time ({log})"
        time.sleep(0.005)


def run_crash_rounds(tmp_path: Path, launcher: Callable[[Path, Path], AbstractContextManager[Launch]], kills: int,
                     seed: int,
                     wait_for_open: bool) -> tuple[int, int]:
    """Kill a writer ``kills`` times and check the store after each; returns (writers SIGKILLed, acked txns)."""
    store = tmp_path / "store"
    errlog = tmp_path / "writer-stderr.txt"
    rng = random.Random(seed)
    state: dict[str, int] = {}
    next_txn = 1
    acked_total = unacked_committed = killed = 0
    with launcher(store, errlog) as launch:
        for round_no in range(kills):
            log = tmp_path / f"round{round_no}.log"
            pid, wait = launch(next_txn, log)
            # every third writer is killed at a random moment counted from its start (so some die while
            # opening and recovering the store); the others at a random moment after the open
            if wait_for_open and round_no % 3:
                _wait_opened(log, time.monotonic() + 120)
            if wait_for_open and round_no % 4 == 1:  # some acknowledged transactions whatever the machine's load
                _wait_committed(log, time.monotonic() + 120)
            time.sleep(rng.uniform(0.02, 0.3))
            os.kill(pid, signal.SIGKILL)
            status = wait()
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"round {round_no}: the writer ended on its own (status {status}) before the kill:\n"
                f"{errlog.read_text()}")
            killed += 1

            lines = _log_lines(log)
            acked = [int(m.group(1)) for m in map(re.compile(r"committed (\d+)$").match, lines) if m]
            assert acked == list(range(next_txn, next_txn + len(acked))), f"round {round_no}: log {lines}"
            for t in acked:
                state = apply_txn(state, t)
            unacked = next_txn + len(acked)
            with_unacked = apply_txn(state, unacked)

            # a read-only handle sees the committed state as the crash left it (no recovery has run)
            context = f"seed {seed}, round {round_no}, acknowledged {acked}"
            actual: dict[str, int] = {}
            if (store / "catalog.sqlite").exists():  # (the first writer may die before creating it)
                try:
                    with tierstore.open(store, readonly=True) as ro:
                        actual = read_state(ro)
                except tierstore.SchemaVersionError:
                    if state or acked:  # only the very first writer can die before the schema is committed
                        raise
                except Exception as exc:
                    raise AssertionError(f"{context}: reading the store after the crash failed: {exc!r}") from exc
            try:
                committed = resolve(actual, state, unacked, with_unacked)
            except AssertionError as exc:
                raise AssertionError(f"{context}: {exc}") from None
            if committed:
                state = with_unacked
                unacked_committed += 1
            acked_total += len(acked)
            next_txn = unacked + 1  # transaction numbers are never reused, so tags stay unique

            if round_no % 4 == 3 or round_no == kills - 1:
                # a writer's open recovers: the same state, and no file the catalog does not reference
                try:
                    with tierstore.open(store) as db:
                        assert read_state(db) == state
                        assert not db.stats().recovery["missing"]
                    check_files_match_catalog(store)
                except Exception as exc:
                    raise AssertionError(f"{context}: after a read-write open (recovery): {exc!r}") from exc
    print(f"crash test: {kills} kills, {acked_total} acknowledged transactions, {unacked_committed} "
          "unacknowledged ones found committed")
    assert acked_total >= 5, f"only {acked_total} transactions were acknowledged in {kills} rounds"
    with tierstore.open(store, readonly=True) as ro:
        assert read_state(ro) == state
    return killed, acked_total


def test_sigkill_during_transactions_loses_nothing_acknowledged(tmp_path: Path) -> None:
    seed = int(os.environ.get("TIERSTORE_CRASH_SEED", "20240611"))
    kills, acknowledged = run_crash_rounds(tmp_path, zygote_launcher, kills=20, seed=seed, wait_for_open=True)
    assert kills == 20 and acknowledged >= 5


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TIERSTORE_SLOW_TESTS"), reason="set TIERSTORE_SLOW_TESTS=1 (~80 s)")
def test_sigkill_fresh_interpreter_per_kill(tmp_path: Path) -> None:
    kills, acknowledged = run_crash_rounds(tmp_path, spawn_launcher, kills=15, seed=7, wait_for_open=True)
    assert kills == 15 and acknowledged >= 5


def test_child_code_helpers_agree_with_parent() -> None:
    """The model the parent uses is the code the child runs (sanity for the crash test itself)."""
    namespace: dict[str, Any] = {}
    exec(CHILD_CODE.replace("\n_main()\n", "\n"), namespace)
    for t in (1, 17, 123):
        assert namespace["txn_plan"](t) == txn_plan(t)
        for key in txn_plan(t)[0]:
            assert namespace["block_bytes"](t, key) == block_bytes(t, key)
    sizes = [len(block_bytes(t, f"crash/k{i}")[1]) for t in range(1, 16) for i in range(CRASH_KEYS)]
    assert min(sizes) <= PACK_LIMIT < max(sizes), "the crash mix needs both packed and per-block arrays"


# ---------------------------------------------------------------------------------------------------------
# Damaged files.


def _row(store: Path, key: str) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{store / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        cur = con.execute("SELECT l3_array, l3_shard, l3_offset, l3_chunk, stored_bytes, nbytes, codec FROM blocks "
                          "WHERE key = ?", (key,))
        names = [d[0] for d in cur.description]
        found = cur.fetchone()
    finally:
        con.close()
    assert found is not None, key
    return dict(zip(names, found, strict=True))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x5A]))


def _compressible(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (n,), dtype=torch.int32, generator=gen)


def _random(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, generator=gen)


def _damage_blocks() -> dict[str, torch.Tensor]:
    return {
        # whole 4 KiB granules of noise: compression cannot pay, so they are packed raw
        "small/raw": _random(1024, 1), "small/raw2": _random(2048, 2),
        "small/zstd": _compressible(800, 3), "small/zstd2": _compressible(600, 4),
        "large/raw": _random(200_000, 5), "large/raw2": _random(150_000, 6),
        "large/zstd": _compressible(300_000, 7), "large/zstd2": _compressible(100_000, 8),
    }


@pytest.fixture(scope="module")
def damage_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small packed and two large blocks in each of a raw and a compressed flavour (copied per test)."""
    store = tmp_path_factory.mktemp("damage") / "store"
    blocks = _damage_blocks()
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
        with db.transaction():
            for key, tensor in blocks.items():
                db.put(key, tensor)
        codecs = {key: db.info(key).codec for key in blocks}
    assert codecs["small/raw"] == codecs["large/raw"] == "raw", codecs
    assert codecs["small/zstd"] != "raw" and codecs["large/zstd"] != "raw", codecs
    return store


@pytest.fixture
def damaged_store(damage_template: Path, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    store = tmp_path / "store"
    shutil.copytree(damage_template, store)
    return store, _damage_blocks()


def _damage(store: Path, key: str, how: str) -> None:
    row = _row(store, key)
    path = store / "l3" / str(row["l3_array"]) / f"{row['l3_shard']}.0"
    offset, stored, nbytes = int(row["l3_offset"]), int(row["stored_bytes"]), int(row["nbytes"])
    if how == "flip":
        # inside the encoded data (for a raw block, inside its real bytes, not the granule padding)
        _flip(path, offset + (min(stored, nbytes) // 2))
    elif how == "truncate":
        os.truncate(path, offset + stored // 2)
    elif how == "truncate-empty":
        os.truncate(path, 0)
    elif how == "delete-file":
        path.unlink()
    elif how == "delete-folder":
        assert str(row["l3_array"]).startswith("blocks/")
        for child in path.parent.iterdir():
            child.unlink()
        path.parent.rmdir()
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "truncate", "truncate-empty", "delete-file", "delete-folder"])
def test_damaged_large_block_raises_corrupt(damaged_store: tuple[Path, dict[str, torch.Tensor]], how: str) -> None:
    store, blocks = damaged_store
    damaged = ["large/raw", "large/zstd"]  # one stored raw, one compressed
    for key in damaged:
        _damage(store, key, how)
    with tierstore.open(store) as db:
        for key in damaged:
            with pytest.raises(tierstore.CorruptBlockError) as info:
                db.get(key)
            assert info.value.key == key
            assert not isinstance(info.value, KeyError)
            assert key in db  # damage is reported, never turned into "missing"
        for other, tensor in blocks.items():
            if other not in damaged:
                assert torch.equal(db.get(other), tensor), other
    with tierstore.open(store, readonly=True) as ro:
        for key in damaged:
            with pytest.raises(tierstore.CorruptBlockError):
                ro.get(key)


@pytest.mark.parametrize("flavour", ["raw", "zstd"])
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_packed_block_raises_corrupt(damaged_store: tuple[Path, dict[str, torch.Tensor]], how: str,
                                             flavour: str) -> None:
    store, blocks = damaged_store
    key = f"small/{flavour}"
    if how == "truncate":  # cut the pack shard inside this block: the later blocks of the shard go too
        later = {k for k in blocks if k.startswith("small/")
                 and _row(store, k)["l3_array"] == _row(store, key)["l3_array"]
                 and int(_row(store, k)["l3_offset"]) > int(_row(store, key)["l3_offset"])}
    else:
        later = set()
    _damage(store, key, how)
    with tierstore.open(store) as db:
        with pytest.raises(tierstore.CorruptBlockError) as info:
            db.get(key)
        assert info.value.key == key
        for other in later:
            with pytest.raises(tierstore.CorruptBlockError):
                db.get(other)
        for other, tensor in blocks.items():
            if other != key and other not in later:
                assert torch.equal(db.get(other), tensor), other


@pytest.mark.parametrize("garbage", ["random", "header-kept"])
def test_garbage_catalog_is_a_catalog_error(tmp_path: Path, garbage: str) -> None:
    store = tmp_path / "store"
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db, db.transaction():
        for i in range(50):
            db.put(f"k{i}", _random(100, i))
    catalog = store / "catalog.sqlite"
    size = catalog.stat().st_size
    noise = random.Random(5).randbytes(size)
    if garbage == "header-kept":  # a valid SQLite header, garbage pages behind it
        noise = catalog.read_bytes()[:100] + noise[100:]
    catalog.write_bytes(noise)
    for extra in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
        (store / extra).unlink(missing_ok=True)
    for readonly in (False, True, False):  # a failed open releases the writer lock
        try:
            with tierstore.open(store, readonly=readonly) as db:
                db.get("k0")
                list(db.keys())
        except tierstore.CatalogError as exc:
            assert not isinstance(exc, sqlite3.Error)
        except sqlite3.Error as exc:  # pragma: no cover - the failure this test exists for
            raise AssertionError(f"a raw sqlite3 error leaked: {exc!r}") from exc
        else:
            raise AssertionError(f"opening a catalog of garbage ({garbage}, readonly={readonly}) succeeded")


# ---------------------------------------------------------------------------------------------------------
# The L3 tier is plain Zarr v3.


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("compression", ["off", "zstd", "shuffle-zstd", "blosc-lz4"])
def test_zarr_reads_what_tierstore_wrote(tmp_path: Path, compression: str) -> None:
    zarr = pytest.importorskip("zarr")
    store = tmp_path / "store"
    if compression == "off":
        small, large = _random(900, 1), _random(400_000, 2)  # 3.6 KB packed, 1.6 MB in its own array
    else:
        small, large = _compressible(900, 1), _compressible(400_000, 2)
    with tierstore.open(store, l3_compression=compression, l2_cache_size=SMALL_L2) as db:
        db.put("small", small)
        db.put("large", large)
        assert (db.info("small").codec == "raw") == (compression == "off")
        assert (db.info("large").codec == "raw") == (compression == "off")

    row = _row(store, "large")
    assert str(row["l3_array"]).startswith("blocks/")
    arr = zarr.open_array(str(store / "l3" / str(row["l3_array"])), mode="r")
    size = arr.shape[1]  # (elements, element size) bytes
    assert arr.shape == (large.numel() * 4 // size, size) and arr.dtype == np.uint8
    assert np.asarray(arr[:]).tobytes() == _raw(large)

    row = _row(store, "small")
    assert str(row["l3_array"]).startswith("packs/") and row["l3_offset"] == 0  # the first block of a fresh pack
    pack = zarr.open_array(str(store / "l3" / str(row["l3_array"])), mode="r")
    size = pack.shape[1]
    start = int(row["l3_chunk"]) * 4096 // size  # the block's first granule, as the README says
    shard = np.asarray(pack[start:start + PACK_LIMIT // size]).reshape(-1)
    nbytes = small.numel() * 4
    assert shard[:nbytes].tobytes() == _raw(small)
    assert not shard[nbytes:].any()  # granule padding and unused granules read as the fill value

    group = zarr.open_group(str(store / "l3"), mode="r")
    assert np.asarray(group[str(row["l3_array"])][start:start + nbytes // size]).tobytes() == _raw(small)


def test_sigkill_model_rejects_partial_transactions() -> None:
    """The crash test's checker itself: a half-applied transaction must be reported."""
    state: dict[str, int] = {}
    t = 1
    while len(txn_plan(t)[0]) < 2:
        state = apply_txn(state, t)
        t += 1
    puts, _ = txn_plan(t)
    half = dict(state)
    half[puts[0]] = t
    with pytest.raises(AssertionError, match="neither"):
        resolve(half, state, t, apply_txn(state, t))
    assert resolve(apply_txn(state, t), state, t, apply_txn(state, t)) is True
    assert resolve(state, state, t, apply_txn(state, t)) is False
