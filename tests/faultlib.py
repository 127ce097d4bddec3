"""Fault-injection helpers: a crash worker killed with SIGKILL, the model it is checked against, store checks.

The worker runs numbered operations ``1, 2, 3, ...``; operation ``t`` is a pure function of ``t``
(:func:`plan`), and so is every byte it writes (:func:`block_bytes`: the first 16 bytes are ``t`` and
the key's index). After each operation returns, the worker appends ``ack T`` to a log and fsyncs it.
The parent kills the worker at a random moment, replays the acknowledged operations on a dict
(:func:`apply`), and checks the store holds exactly that, or that plus the one operation in flight,
never anything in between.

Operations: a single put, a single delete, a transaction of puts and deletes, a transaction rolled
back by an exception, a cache-only put (``durable=False``, gone after the next open), and
maintenance. Maintenance ops are the hook for work other issues add (migration, compaction,
prefetch, pinning): register a function in :data:`MAINTENANCE` that takes ``(db, rng)`` and does not
change what the store holds; ``available`` filters what this build has. Named crash points (the
migrator's) plug in through :func:`crash_points`.

The worker is forked from a "zygote" interpreter that imports tierstore once (an interpreter start
costs ~2 CPU-seconds here), so each kill costs only a fork and an open.
"""

from __future__ import annotations

import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tierstore

KEYS = [f"f/k{i}" for i in range(12)]
VOLATILE_KEYS = [f"vol/k{i}" for i in range(3)]
SMALL_L2 = "8MiB"
DTYPES = ("uint8", "float32", "bfloat16", "int64", "float16")
MAINT_SHARE = float(os.environ.get("TIERSTORE_FAULT_MAINT", "0"))
"""Share of operations that are maintenance before the usual mix (the crash-point test raises it)."""

# ---------------------------------------------------------------------------------------------------------
# The model: operation t and its bytes.


@dataclass(frozen=True)
class Op:
    """Operation ``t``: its kind, the keys it puts, the keys it deletes when present."""

    t: int
    kind: str
    """``put``, ``delete``, ``txn``, ``rollback``, ``volatile`` or ``maint``."""
    puts: tuple[str, ...] = ()
    deletes: tuple[str, ...] = ()


def plan(t: int, seed: int = 0) -> Op:
    """The operation numbered ``t`` (deterministic)."""
    rng = np.random.default_rng([seed, t, 1])
    if MAINT_SHARE and rng.random() < MAINT_SHARE:
        return Op(t, "maint")
    roll = rng.random()
    if roll < 0.30:
        return Op(t, "put", (str(rng.choice(KEYS)),))
    if roll < 0.40:
        return Op(t, "delete", deletes=(str(rng.choice(KEYS)),))
    if roll < 0.75:
        chosen = rng.choice(KEYS, size=int(rng.integers(2, 6)), replace=False).tolist()
        split = int(rng.integers(1, len(chosen) + 1))
        return Op(t, "txn", tuple(sorted(chosen[:split])), tuple(sorted(chosen[split:])))
    if roll < 0.83:
        return Op(t, "rollback", tuple(sorted(rng.choice(KEYS, size=2, replace=False).tolist())))
    if roll < 0.93:
        return Op(t, "volatile", (str(rng.choice(VOLATILE_KEYS)),))
    return Op(t, "maint")


def block_bytes(t: int, key: str, seed: int = 0) -> tuple[str, bytes]:
    """The dtype name and raw bytes operation ``t`` writes under ``key``."""
    index = int(key.rsplit("k", 1)[1])
    rng = np.random.default_rng([seed, t, index, 2])
    size = rng.random()
    if size < 0.6:
        nbytes = int(rng.integers(64, 4096))
    elif size < 0.85:
        nbytes = int(rng.integers(4096, 256 * 1024))
    else:
        nbytes = int(rng.integers(300 * 1024, 1536 * 1024))
    nbytes = max(16, nbytes // 8 * 8)
    if rng.random() < 0.5:
        data = rng.integers(0, 256, nbytes, dtype=np.uint8)
    else:
        data = rng.integers(0, 3, nbytes, dtype=np.uint8)
    data[:8] = np.frombuffer(t.to_bytes(8, "little"), dtype=np.uint8)
    data[8:16] = np.frombuffer(index.to_bytes(8, "little"), dtype=np.uint8)
    return DTYPES[int(rng.integers(0, len(DTYPES)))], data.tobytes()


def block_tensor(t: int, key: str, seed: int = 0) -> torch.Tensor:
    """:func:`block_bytes` as a tensor."""
    dtype, raw = block_bytes(t, key, seed)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype))


def apply(state: dict[str, int], op: Op) -> dict[str, int]:
    """The durable state (key -> tag) after ``op`` commits on ``state``."""
    if op.kind not in ("put", "delete", "txn"):
        return state
    new = dict(state)
    for key in op.deletes:
        new.pop(key, None)
    for key in op.puts:
        new[key] = op.t
    return new


# ---------------------------------------------------------------------------------------------------------
# Maintenance: the hook for migration, compaction, prefetch and pinning.


@dataclass(frozen=True)
class Maintenance:
    """A store operation that must leave the logical content unchanged."""

    name: str
    run: Callable[[Any, np.random.Generator], None]
    available: Callable[[Any], bool]


def _no_required_args(db: Any, name: str) -> bool:
    fn = getattr(db, name, None)
    if not callable(fn):
        return False
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _read_some(db: Any, rng: np.random.Generator) -> None:
    for key in rng.choice(KEYS, size=3, replace=False):
        if key in db:
            db.get(str(key))


def _present(db: Any, rng: np.random.Generator) -> list[str]:
    return [str(k) for k in rng.choice(KEYS, size=4, replace=False) if k in db]


def _prefetch(db: Any, rng: np.random.Generator) -> None:
    keys = [*_present(db, rng), str(rng.choice(VOLATILE_KEYS))]
    db.prefetch(keys).result(timeout=60)


def _pin(db: Any, rng: np.random.Generator) -> None:
    for key in _present(db, rng)[:1]:
        try:
            with db.pin(key):
                db.get(key)
        except tierstore.TierFullError:
            pass  # it does not fit beside what L2 holds: a refusal, not a fault


MAINTENANCE: list[Maintenance] = [
    Maintenance("read", _read_some, lambda db: True),
    Maintenance("prefetch", _prefetch, lambda db: callable(getattr(db, "prefetch", None))),
    Maintenance("pin", _pin, lambda db: callable(getattr(db, "pin", None))),
    # Filled in as the other issues land: each runs only where this build has the method.
    Maintenance("compact", lambda db, rng: db.compact(), lambda db: _no_required_args(db, "compact")),
    Maintenance("migrate", lambda db, rng: db.migrate(), lambda db: _no_required_args(db, "migrate")),
    Maintenance("maintain", lambda db, rng: db.maintain(), lambda db: _no_required_args(db, "maintain")),
    Maintenance("gc", lambda db, rng: db.gc(), lambda db: _no_required_args(db, "gc")),
    Maintenance("flush", lambda db, rng: db.flush(), lambda db: _no_required_args(db, "flush")),
]


def crash_points() -> list[str]:
    """Named crash points of this build (``tierstore.engine.migrator.CRASH_POINTS``), none before the migrator."""
    try:
        from tierstore.engine import migrator
    except ImportError:
        return []
    return list(getattr(migrator, "CRASH_POINTS", ()))


# ---------------------------------------------------------------------------------------------------------
# The worker (runs in the forked child).


def worker_config(round_no: int) -> dict[str, Any]:
    """Store options of the writer of ``round_no``: every third one keeps L2 in a file (restart-warm)."""
    return {"l2_cache_size": SMALL_L2, "l2_file_backed": round_no % 3 == 1}


class _Rollback(Exception):
    pass


def run_op(db: Any, op: Op, seed: int) -> None:
    """Perform ``op`` on ``db`` (the writer's side of :func:`apply`)."""
    if op.kind == "put":
        db.put(op.puts[0], block_tensor(op.t, op.puts[0], seed))
    elif op.kind == "delete":
        if op.deletes[0] in db:
            db.delete(op.deletes[0])
    elif op.kind == "txn":
        with db.transaction():
            for key in op.puts:
                db.put(key, block_tensor(op.t, key, seed))
            for key in op.deletes:
                if key in db:
                    db.delete(key)
    elif op.kind == "rollback":
        try:
            with db.transaction():
                for key in op.puts:
                    db.put(key, block_tensor(op.t, key, seed))
                raise _Rollback
        except _Rollback:
            pass
    elif op.kind == "volatile":
        db.put(op.puts[0], block_tensor(op.t, op.puts[0], seed), durable=False)
    else:
        rng = np.random.default_rng([seed, op.t, 3])
        jobs = [m for m in MAINTENANCE if m.available(db)]
        job = jobs[int(rng.integers(0, len(jobs)))]
        job.run(db, rng)


def writer_loop(store: str, start: int, log_path: str, seed: int, round_no: int) -> None:
    """Open the store and run operations ``start, start+1, ...`` forever, acknowledging each one."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    db = tierstore.open(store, **worker_config(round_no))
    os.write(log, b"opened\n")
    os.fsync(log)
    t = start
    while True:
        run_op(db, plan(t, seed), seed)
        os.write(log, f"ack {t}\n".encode())
        os.fsync(log)
        t += 1


def zygote_main() -> None:
    """Fork one writer per ``STORE START LOG SEED ROUND [CRASH_POINT]`` line on stdin; print its pid, then
    ``exit STATUS``. A crash point is put in the writer's environment (``TIERSTORE_CRASH_AT``)."""
    for line in sys.stdin:
        store, start, log_path, seed, round_no, *point = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                if point:
                    os.environ["TIERSTORE_CRASH_AT"] = point[0]
                sys.stdin.close()
                writer_loop(store, int(start), log_path, int(seed), int(round_no))
            except BaseException:
                import traceback

                traceback.print_exc()
                sys.stderr.flush()
            os._exit(3)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {status}", flush=True)


ZYGOTE = ("import sys; sys.path.insert(0, sys.argv[1]); import faultlib; faultlib.zygote_main()")


Spawn = Callable[[str], tuple[int, Callable[[], int]]]
"""Send one request line to a forking server -> (child pid, wait() -> the child's wait status)."""


@contextmanager
def forking_server(argv: list[str], errlog: Path, env: dict[str, str] | None = None) -> Iterator[Spawn]:
    """Run ``argv``, a process that forks one child per line read on stdin, printing ``PID`` then ``exit STATUS``.

    Forking from a process that imported torch once makes each writer start in milliseconds.
    """
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                bufsize=1, env={**os.environ, **(env or {})})
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def spawn(request: str) -> tuple[int, Callable[[], int]]:
        stdin.write(request + "\n")
        stdin.flush()
        line = stdout.readline()
        assert line.strip().isdigit(), f"zygote failed: {line!r}\n{errlog.read_text()}"

        def wait() -> int:
            done = stdout.readline()
            assert done.startswith("exit "), f"zygote failed: {done!r}\n{errlog.read_text()}"
            return int(done.split()[1])

        return int(line), wait

    try:
        yield spawn
    finally:
        stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def zygote(errlog: Path, env: dict[str, str] | None = None,
           ) -> Iterator[Callable[..., tuple[int, Callable[[], int]]]]:
    """A launcher: ``launch(store, start, log, seed, round) -> (pid, wait)``; ``env`` is added to the workers'."""
    with forking_server([sys.executable, "-c", ZYGOTE, str(Path(__file__).parent)], errlog, env) as spawn:

        def launch(store: Path, start: int, log: Path, seed: int, round_no: int,
                   point: str = "") -> tuple[int, Callable[[], int]]:
            return spawn(f"{store} {start} {log} {seed} {round_no} {point}")

        yield launch


# ---------------------------------------------------------------------------------------------------------
# Checks.


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes (contiguous, native order)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_state(db: Any, seed: int, *, skip_prefix: str | None = None) -> dict[str, int]:
    """key -> tag of every block, after checking each holds exactly what its tag's operation wrote."""
    state: dict[str, int] = {}
    for key in db:
        if skip_prefix is not None and key.startswith(skip_prefix):
            continue
        tensor = db.get(key, copy=True)
        raw = raw_bytes(tensor)
        tag = int.from_bytes(raw[:8], "little") if len(raw) >= 16 else -1
        assert key in KEYS, f"a key no operation writes durably is in the store: {key!r}"
        dtype, expected = block_bytes(tag, key, seed) if tag > 0 else ("?", b"")
        assert tensor.dtype == getattr(torch, dtype, None) and raw == expected, (
            f"{key!r} holds bytes no operation wrote (tag {tag}, {tensor.dtype}, {len(raw)} bytes)")
        state[key] = tag
    return state


def journal_rows(store: Path) -> int:
    """Rows in the catalog's journal (moves in flight); 0 after a clean recovery."""
    con = sqlite3.connect(f"file:{store / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT count(*) FROM journal").fetchone()[0])
    finally:
        con.close()


def check_files_match_catalog(store: Path, *, zarr_metadata: bool = True) -> None:
    """Every file under l3/ is referenced by the catalog (or is zarr group/array metadata), and vice versa.

    ``zarr_metadata=False`` leaves the zarr.json files out of it: they are for zarr readers, and the
    fault suite damages them on purpose (the store reads by catalog row and checksum).
    """
    con = sqlite3.connect(f"file:{store / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        shards = {(a, s): n for a, s, n in con.execute("SELECT array, shard, length FROM shards")}
        rows = con.execute("SELECT key, l3_array, l3_shard, l3_offset, stored_bytes FROM blocks").fetchall()
    finally:
        con.close()
    l3 = store / "l3"
    expected: dict[Path, int | None] = {l3 / a / f"{s}.0": n for (a, s), n in shards.items()}  # layout 2
    live_dirs: set[Path] = set()
    for key, array, shard, offset, stored in rows:
        if array is None:
            continue
        if array.startswith("blocks/"):
            expected[l3 / array / "0.0"] = None
            if zarr_metadata:
                expected[l3 / array / "zarr.json"] = None
            live_dirs.add(l3 / array)
        else:
            assert (array, shard) in shards, f"{key!r} points at {array}/{shard}, which the shards table lacks"
            assert offset + stored <= shards[array, shard], f"{key!r} ends past its shard's committed length"
    found_files: set[Path] = set()
    for root, _dirs, files in os.walk(l3):
        here = Path(root)
        if here.parent == l3 / "blocks":
            assert here in live_dirs, f"orphan block folder left after recovery: {here}"
        found_files.update(here / name for name in files if zarr_metadata or name != "zarr.json")
    metadata = {l3 / "zarr.json", l3 / "packs" / "zarr.json", l3 / "blocks" / "zarr.json"}
    metadata |= {p / "zarr.json" for p in (l3 / "packs").iterdir() if p.is_dir()} if (l3 / "packs").exists() else set()
    orphans = sorted(str(p.relative_to(store)) for p in found_files - set(expected) - metadata)
    assert not orphans, f"files under l3/ that the catalog does not reference: {orphans}"
    missing = sorted(str(p.relative_to(store)) for p in set(expected) - found_files)
    assert not missing, f"files the catalog references but that are gone: {missing}"
    wrong = {str(p.relative_to(store)): (p.stat().st_size, n) for p, n in expected.items()
             if n is not None and p.stat().st_size != n}
    assert not wrong, f"pack shards whose size is not the committed length (size, committed): {wrong}"


def check_clean(db: Any, store: Path) -> None:
    """After a read-write open: nothing reported missing, files match the catalog."""
    missing = db.stats().recovery["missing"]
    assert not missing, f"recovery reports missing data: {missing}"
    check_files_match_catalog(store, zarr_metadata=False)


def verify_clean(store: Path) -> None:
    """``tierstore.upkeep.verify`` (every block read and checked, every file accounted for) finds nothing.

    Call it with the store closed (verify takes the writer lock).
    """
    from tierstore.upkeep.verify import verify

    report = verify(store)
    assert report.ok, f"verify found problems: {report.problems}"


# ---------------------------------------------------------------------------------------------------------
# The crash loop.


@dataclass
class CrashResult:
    """What a crash run did."""

    kills: int = 0
    acked: int = 0
    unacked_committed: int = 0
    kills_while_opening: int = 0
    recoveries_with_work: int = 0
    self_kills: int = 0
    """Writers that died at a named crash point before the parent's kill."""
    points_hit: dict[str, int] = field(default_factory=dict)
    ops_by_kind: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _log_lines(log: Path) -> list[str]:
    text = log.read_text() if log.exists() else ""
    return text.split("\n")[:-1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def resolve(actual: dict[str, int], acked: dict[str, int], op: Op) -> bool:
    """Whether the unacknowledged ``op`` committed; fail unless it is wholly absent or wholly there."""
    with_op = apply(acked, op)
    if actual == acked:
        return False
    if actual == with_op:
        return True
    raise AssertionError(
        f"the store matches neither the acknowledged state nor it plus op {op}:\n"
        f"  acknowledged: {acked}\n  with op:      {with_op}\n  actual:       {actual}")


POINT_PATIENCE = 60.0
"""Seconds a writer given a named crash point may take to reach it before it is killed anyway."""


def run_crashes(tmp: Path, kills: int, seed: int, *, rw_check_every: int = 2,
                deadline: float | None = None, worker_env: dict[str, str] | None = None,
                crash_points: list[str] | None = None, patience: float = 0.25) -> CrashResult:
    """SIGKILL a writer ``kills`` times (about one in four while it opens and recovers) and check after each.

    Every round: the acknowledged operations are all there with their exact bytes and the one in flight
    is all-or-nothing (a read-only handle, before any recovery). Every ``rw_check_every`` rounds, a
    read-write open recovers and the store is checked clean (no orphan or missing file, shards at their
    committed length, journal empty, no cache-only block left). The other rounds leave the crash's mess
    for the next writer's recovery, which may itself be killed.
    """
    import random

    store = tmp / "store"
    errlog = tmp / "worker-stderr.txt"
    rng = random.Random(seed)
    result = CrashResult()
    state: dict[str, int] = {}
    next_t = 1
    open_times: list[float] = []
    started = time.monotonic()
    with zygote(errlog, worker_env) as launch:
        for round_no in range(kills):
            if deadline is not None and time.monotonic() > deadline:
                break
            log = tmp / "round.log"
            log.unlink(missing_ok=True)
            launched = time.monotonic()
            point = crash_points[round_no % len(crash_points)] if crash_points else ""
            pid, wait = launch(store, next_t, log, seed, round_no, point)
            # a round with a named crash point runs until the writer reaches it (a kill while opening, or
            # after a random wait, could leave a point unreached on a loaded machine: kills while opening
            # are the rounds without a point)
            while_opening = round_no % 4 == 3 and open_times and not point
            if while_opening:
                typical = sorted(open_times)[len(open_times) // 2]
                time.sleep(max(0.0, rng.uniform(0.0, typical * 0.9) - (time.monotonic() - launched)))
            else:
                end = launched + 120
                while "opened" not in _log_lines(log) and _alive(pid):
                    assert time.monotonic() < end, f"round {round_no}: the writer did not open in time"
                    time.sleep(0.002)
                if len(open_times) < 50:
                    open_times.append(time.monotonic() - launched)
                pause = rng.uniform(0.0, patience)
                end = time.monotonic() + (max(pause, POINT_PATIENCE) if point else pause)
                while time.monotonic() < end and (not point or _alive(pid)):
                    time.sleep(0.005)
            if not _alive(pid):  # it killed itself (a named crash point) and was reaped
                result.self_kills += 1
                result.points_hit[point] = result.points_hit.get(point, 0) + 1
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            status = wait()
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"round {round_no}: the writer ended on its own (status {status}):\n{errlog.read_text()[-3000:]}")
            result.kills += 1
            lines = _log_lines(log)
            if "opened" not in lines:
                result.kills_while_opening += 1
            acks = [int(line.split()[1]) for line in lines if line.startswith("ack ")]
            assert acks == list(range(next_t, next_t + len(acks))), f"round {round_no}: log {lines}"
            for t in acks:
                op = plan(t, seed)
                state = apply(state, op)
                result.ops_by_kind[op.kind] = result.ops_by_kind.get(op.kind, 0) + 1
            result.acked += len(acks)
            inflight = plan(next_t + len(acks), seed)
            context = f"seed {seed}, round {round_no}, acknowledged ops {acks[:1]}..{acks[-1:]}"
            actual: dict[str, int] = {}
            if (store / "catalog.sqlite").exists():
                try:
                    with tierstore.open(store, readonly=True) as ro:
                        actual = read_state(ro, seed, skip_prefix="vol/")  # spilled cache-only rows linger
                except tierstore.SchemaVersionError:
                    if state or acks:
                        raise
            try:
                if resolve(actual, state, inflight):
                    state = apply(state, inflight)
                    result.unacked_committed += 1
            except AssertionError as exc:
                raise AssertionError(f"{context}: {exc}") from None
            next_t = inflight.t + 1  # op numbers are never reused, so tags stay unique
            if round_no % rw_check_every == rw_check_every - 1 or round_no == kills - 1:
                if not (store / "catalog.sqlite").exists():
                    continue
                try:
                    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
                        # recovery settled every move a crash left (reads below may journal new ones in
                        # the background; verify after the close checks the journal again)
                        assert journal_rows(store) == 0, "the journal is not empty after recovery"
                        report = db.recovery
                        if report.removed_files or report.truncated:
                            result.recoveries_with_work += 1
                        assert read_state(db, seed) == state
                        assert len(db) == len(state), f"len(db) = {len(db)}, expected {len(state)}"
                        assert not list(db.keys(prefix="vol/")), "cache-only blocks survived a reopen"
                        check_clean(db, store)
                    verify_clean(store)
                except Exception as exc:
                    raise AssertionError(f"{context}: after a read-write open: {exc!r}") from exc
    result.seconds = time.monotonic() - started
    with tierstore.open(store, readonly=True) as ro:
        assert read_state(ro, seed, skip_prefix="vol/") == state
    return result


# ---------------------------------------------------------------------------------------------------------
# Running a scenario in a forked child (resource limits, possible fatal signals) and mounting a tiny disk.


def in_child(fn: Callable[[], dict[str, Any]], timeout: float = 120.0) -> dict[str, Any]:
    """Run ``fn`` in a forked child and return its JSON result; a signal death or a hang fails."""
    return start_child(fn).result(timeout)


@dataclass
class Child:
    """A forked child running a function; :meth:`result` waits for its JSON result."""

    pid: int
    fd: int

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for the child; its result, or AssertionError if it failed, died of a signal or hung."""
        import json

        chunks = []
        end = time.monotonic() + timeout
        os.set_blocking(self.fd, False)
        while True:
            try:
                while chunk := os.read(self.fd, 1 << 16):
                    chunks.append(chunk)
            except BlockingIOError:
                pass
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > end:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                os.close(self.fd)
                raise AssertionError(f"the child did not finish in {timeout} s")
            time.sleep(0.01)
        try:
            while chunk := os.read(self.fd, 1 << 16):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        os.close(self.fd)
        if os.WIFSIGNALED(status):
            raise AssertionError(f"the child died of signal {signal.Signals(os.WTERMSIG(status)).name}")
        result: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
        assert "child_error" not in result, f"{result['child_error']}\n{result.get('traceback')}"
        return result


def start_child(fn: Callable[[], dict[str, Any]]) -> Child:
    """Fork a child that runs ``fn`` and sends back its JSON-able result (no pickle).

    The child runs torch single-threaded (thread pools do not survive a fork; the L3 codec pool
    starts afresh in a forked child by itself).
    """
    import json

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        code = 0
        try:
            torch.set_num_threads(1)
            out = json.dumps(fn()).encode()
        except BaseException as exc:  # reported to the parent
            import traceback

            out = json.dumps({"child_error": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc()}).encode()
            code = 1
        view = memoryview(out)
        while view:
            view = view[os.write(write, view):]
        os.close(write)
        os._exit(code)
    os.close(write)
    return Child(pid, read)


@contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``where`` for the block (skips the test where that is not allowed)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def pickle_bomb(marker: Path) -> bytes:
    """Bytes whose unpickling creates ``marker`` (so a test can tell whether anything unpickled them)."""
    import pickle

    class _Bomb:
        def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(_Bomb())
