"""The fault suite's concurrency tier: evictor threads racing writers that put, overwrite (durably and
cache-only) and delete the same keys, with readers in other processes; then the same mix under SIGKILL.

Every acknowledged operation is checked against a model (a register model within a session, the durable
state across a crash), and ``verify`` is clean at the end. Bounded in time: a few seconds each.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tierstore
from tests import faultlib
from tests.test_faults_concurrency import Event, check_registers

SHARED = [f"m/k{i}" for i in range(4)]
FILL = [f"~fill/{i}" for i in range(8)]
L2 = "2MiB"


def _value(vid: int, size: int) -> torch.Tensor:
    """Every int64 holds ``vid``: a torn or mixed block is visible. Sizes from packed to per-block arrays."""
    return torch.full(((60, 9_000, 70_000, 150_000)[size % 4],), vid, dtype=torch.int64)


def _vid(tensor: torch.Tensor) -> int:
    vids = torch.unique(tensor)
    assert tensor.dtype == torch.int64 and vids.numel() == 1, f"a torn or foreign block: {vids[:5]}"
    return int(vids[0])


def _fill(db: tierstore.TierStore) -> None:
    for i, key in enumerate(FILL):
        if key not in db:
            db.put(key, torch.full((80_000,), -1 - i, dtype=torch.int64))


def _evictor(db: tierstore.TierStore, stop: threading.Event, errors: list[str], me: int) -> None:
    """Reads filler blocks through the small L2 (spilling whatever cache-only block is the victim)."""
    n = me
    try:
        while not stop.is_set():
            db.get(FILL[n % len(FILL)])
            if n % 24 == 0:
                db.migrate()
            elif n % 24 == 12:
                db.prefetch(SHARED[: 1 + n % len(SHARED)]).result(timeout=60)
            n += 1
    except BaseException as exc:
        errors.append(f"evictor {me}: {type(exc).__name__}: {exc}")


def _read_for(store: Path, seconds: float, started: Path | None = None) -> list[int]:
    """A read-only handle reading every shared key for ``seconds``: the value ids it saw (each block whole)."""
    seen: list[int] = []
    with tierstore.open(store, readonly=True) as ro:
        if started is not None:
            started.touch()
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            for key in SHARED:
                try:
                    seen.append(_vid(ro.get(key, copy=True)))
                except tierstore.BlockNotFoundError:
                    pass
    return seen


def test_evictors_racing_writers_against_a_register_model(tmp_path: Path) -> None:
    store = tmp_path / "store"
    writers, seconds = 3, 2.0
    events: list[list[Event]] = [[] for _ in range(writers)]
    durable: dict[int, bool] = {}
    errors: list[str] = []
    counter = iter(range(1, 1 << 40))
    lock = threading.Lock()
    with tierstore.open(store, fsync=False, l2_cache_size=L2) as db:
        _fill(db)
        stop = threading.Event()
        evictors = [threading.Thread(target=_evictor, args=(db, stop, errors, i)) for i in range(2)]
        started = tmp_path / "reader-started"
        reader = faultlib.start_child(lambda: {"seen": _read_for(store, seconds + 1.0, started)})
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline, "the reader process did not start"
            time.sleep(0.01)

        def work(me: int) -> None:
            rng = np.random.default_rng(me)
            log, clock = events[me], time.perf_counter_ns
            try:
                end, cap = time.monotonic() + seconds, time.monotonic() + 60
                while time.monotonic() < end or (len(log) < 40 and time.monotonic() < cap):  # enough ops under load
                    op = int(rng.integers(0, 10))
                    key = SHARED[int(rng.integers(0, len(SHARED)))]
                    if op < 5:
                        with lock:
                            vid = next(counter)
                        keep = op >= 2  # a cache-only overwrite in 2 of 5 writes
                        durable[vid] = keep
                        t0 = clock()
                        db.put(key, _value(vid, int(rng.integers(0, 4))), durable=keep)
                        log.append(Event("put", key, vid, t0, clock()))
                    elif op == 5:
                        t0 = clock()
                        try:
                            db.delete(key)
                        except tierstore.BlockNotFoundError:
                            log.append(Event("get", key, None, t0, clock()))
                        else:
                            log.append(Event("delete", key, None, t0, clock()))
                    else:
                        t0 = clock()
                        try:
                            got: int | None = _vid(db.get(key))
                        except tierstore.BlockNotFoundError:
                            got = None
                        log.append(Event("get", key, got, t0, clock()))
            except BaseException as exc:
                errors.append(f"writer {me}: {type(exc).__name__}: {exc}")

        pool = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
        for thread in evictors + pool:
            thread.start()
        for thread in pool:
            thread.join(120)
        stop.set()
        for thread in evictors:
            thread.join(120)
        assert not errors, errors[:3]
        final = {key: (_vid(db.get(key)) if key in db else None) for key in SHARED}
        assert sorted(k for k in db if not k.startswith("~fill/")) == sorted(
            k for k, v in final.items() if v is not None)
        spills = db.migrator.stats()
        seen = reader.result()["seen"]
    end = time.perf_counter_ns()
    flat = [e for log in events for e in log]
    flat += [Event("get", key, value, end, end + 1) for key, value in final.items()]
    checked = check_registers(flat)
    puts = sum(e.kind == "put" for e in flat)
    assert checked >= 50 and puts >= 30, (checked, puts)
    assert set(seen) <= set(durable), "the reader process saw a value no put wrote"
    expected = {k: v for k, v in final.items() if v is not None and durable[v]}  # cache-only: gone on reopen
    with tierstore.open(store, l2_cache_size=L2) as again:
        assert {k: _vid(again.get(k)) for k in SHARED if k in again} == expected
        assert all(again.info(k).durable for k in expected)
    report = tierstore.verify(store)
    assert report.ok, report.problems[:5]
    print(f"register model: {checked} reads, {puts} puts, reader saw {len(seen)} blocks, migrator {spills}")


# -- the same mix under SIGKILL -------------------------------------------------------------------------------


def _plan(t: int) -> tuple[str, tuple[str, ...]]:
    rng = np.random.default_rng([t, 7])
    roll = rng.random()
    keys = tuple(sorted(rng.choice(SHARED, size=2, replace=False).tolist()))
    if roll < 0.35:
        return "put", keys[:1]
    if roll < 0.65:
        return "cache", keys[:1]
    if roll < 0.8:
        return "delete", keys[:1]
    return "txn", keys


def _apply(state: dict[str, int], t: int) -> dict[str, int]:
    """The durable state after op ``t`` (a cache-only put replaces the durable row: gone after a reopen)."""
    kind, keys = _plan(t)
    new = dict(state)
    for key in keys:
        if kind in ("put", "txn"):
            new[key] = t
        else:
            new.pop(key, None)
    return new


def _crash_writer(store: Path, start: int, log_path: Path) -> dict[str, Any]:
    """Runs ops ``start, start+1, ...`` with two evictor threads until it is killed; logs begin and ack."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    db = tierstore.open(store, l2_cache_size=L2)
    _fill(db)
    stop, errors = threading.Event(), list[str]()
    for i in range(2):
        threading.Thread(target=_evictor, args=(db, stop, errors, i), daemon=True).start()
    os.write(log, b"opened\n")
    t = start
    while not errors:
        kind, keys = _plan(t)
        os.write(log, f"begin {t}\n".encode())
        size = t % 4
        if kind == "put":
            db.put(keys[0], _value(t, size))
        elif kind == "cache":
            db.put(keys[0], _value(t, size), durable=False)
        elif kind == "delete":
            if keys[0] in db:
                db.delete(keys[0])
        else:
            with db.transaction():
                for key in keys:
                    db.put(key, _value(t, size + 1))
        os.write(log, f"ack {t}\n".encode())  # the kernel keeps it across SIGKILL: no fsync needed
        t += 1
    return {"errors": errors}


def test_evictors_racing_writers_under_sigkill(tmp_path: Path) -> None:
    store = tmp_path / "store"
    kills = int(os.environ.get("TIERSTORE_MIX_KILLS", "6"))
    rng = np.random.default_rng(5)
    state: dict[str, int] = {}
    next_t, acked, inflight_committed = 1, 0, 0
    for round_no in range(kills):
        log = tmp_path / f"round{round_no}.log"
        child = faultlib.start_child(lambda: _crash_writer(store, next_t, log))  # noqa: B023
        deadline = time.monotonic() + 60
        while not (log.exists() and "opened" in log.read_text()):
            assert time.monotonic() < deadline, f"round {round_no}: the writer did not open"
            time.sleep(0.005)
        seen = _read_for(store, float(rng.uniform(0.4, 1.2)))  # a reader in another process than the writer
        os.kill(child.pid, signal.SIGKILL)
        _, status = os.waitpid(child.pid, 0)
        os.close(child.fd)
        assert os.WIFSIGNALED(status), f"round {round_no}: the writer ended on its own ({status})"
        lines = log.read_text().split()
        acks = [int(x) for k, x in zip(lines[1::2], lines[2::2], strict=False) if k == "ack"]
        begun = [int(x) for k, x in zip(lines[1::2], lines[2::2], strict=False) if k == "begin"]
        assert acks == list(range(next_t, next_t + len(acks))), f"round {round_no}: {lines[:20]}"
        assert all(v < next_t + len(begun) for v in seen), "a reader saw a value no writer began"
        for t in acks:
            state = _apply(state, t)
        acked += len(acks)
        with tierstore.open(store, l2_cache_size=L2) as db:  # recovery; cache-only blocks are dropped
            actual = {k: _vid(db.get(k)) for k in SHARED if k in db}
            assert all(db.info(k).durable for k in actual)
        inflight = next_t + len(acks)
        if inflight in begun and actual == _apply(state, inflight) and actual != state:
            state = _apply(state, inflight)
            inflight_committed += 1
        assert actual == state, (f"round {round_no}: acknowledged ops {next_t}..{inflight - 1} leave {state}, "
                                 f"the store holds {actual}")
        report = tierstore.verify(store)
        assert report.ok, (round_no, report.problems[:5])
        next_t = inflight + 1
    assert acked >= kills, f"only {acked} acknowledged ops in {kills} rounds"
    print(f"mix under SIGKILL: {kills} kills, {acked} acknowledged ops, {inflight_committed} in-flight committed")
