"""Misuse: locks, read-only handles, bad keys and values, hostile keys, use after close, threads."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierstore
from tests.conftest import same_bits

SMALL_L2 = "8MiB"
"""Stores here get a small L2 (the default 256 MiB arena is prefaulted on every open, ~0.2 s here)."""

# ---------------------------------------------------------------------------------------------------------
# A helper process: tierstore imported once, driven by JSON lines on stdin (one reply line each).

PROBE_CODE = r'''
import hashlib, json, sys, time
import tierstore

def digest(t):
    raw = t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode() + raw).hexdigest()

handles = {}
for line in sys.stdin:
    cmd = json.loads(line)
    op, reply = cmd["op"], {}
    try:
        if op == "open_writer":
            start = time.monotonic()
            try:
                tierstore.open(cmd["path"]).close()
                reply = {"error": None}
            except Exception as exc:
                reply = {"error": type(exc).__name__, "locked": isinstance(exc, tierstore.StoreLockedError),
                         "blocking": isinstance(exc, BlockingIOError), "path": getattr(exc, "path", None)}
            reply["elapsed"] = time.monotonic() - start
        elif op == "ro_open":
            handles[cmd["name"]] = tierstore.open(cmd["path"], readonly=True)
        elif op == "ro_read":
            db = handles[cmd["name"]]
            reply = {"len": len(db), "keys": list(db.keys()),
                     "blocks": {k: digest(db.get(k)) for k in db.keys()},
                     "contains": {k: k in db for k in cmd.get("probe", [])}}
        elif op == "ro_close":
            handles.pop(cmd["name"]).close()
    except Exception as exc:
        reply = {"unexpected": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(reply), flush=True)
'''


class Probe:
    """Another process that opens stores on request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"probe process died:\n{self.proc.stderr.read()}")
        reply: dict[str, Any] = json.loads(line)
        assert "unexpected" not in reply, reply["unexpected"]
        return reply

    def close(self) -> None:
        self.proc.kill()  # it holds nothing by now; exiting an interpreter with torch loaded takes a while
        self.proc.wait()


@pytest.fixture(scope="module")
def probe() -> Iterator[Probe]:
    helper = Probe()
    try:
        yield helper
    finally:
        helper.close()


def digest(tensor: torch.Tensor) -> str:
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode() + raw).hexdigest()


def snapshot(db: tierstore.TierStore) -> dict[str, str]:
    """Every key with a digest of its dtype, shape and bytes."""
    state = {key: digest(db.get(key)) for key in db}
    assert len(db) == len(state)
    return state


def data_files(store: Path) -> dict[str, int]:
    """Data files under l3/ with their sizes (zarr metadata left out)."""
    l3 = store / "l3"
    return {str(p.relative_to(store)): p.stat().st_size for p in l3.rglob("*") if p.is_file()
            and p.name != "zarr.json"}


# ---------------------------------------------------------------------------------------------------------
# The writer lock.


def test_second_writer_in_another_process_is_refused(tmp_path: Path, probe: Probe) -> None:
    store = tmp_path / "store"
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
        db.put("k", torch.arange(10))
        reply = probe(op="open_writer", path=str(store))
        assert reply["error"] == "StoreLockedError" and reply["locked"] and reply["blocking"], reply
        assert reply["elapsed"] < 5.0, f"the refusal took {reply['elapsed']:.1f} s: it must not wait"
        assert reply["path"] == str(store)
        assert torch.equal(db.get("k"), torch.arange(10))  # the holder is unaffected
        db.put("k2", torch.ones(3))
    assert probe(op="open_writer", path=str(store))["error"] is None  # closing released the lock


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
        db.put("k", torch.arange(10))
        for _ in range(2):  # a refused open must not release or disturb the holder's lock
            with pytest.raises(tierstore.StoreLockedError) as info:
                tierstore.open(store)
            assert isinstance(info.value, BlockingIOError)
        db.put("k2", torch.ones(3))
        assert torch.equal(db.get("k"), torch.arange(10)) and len(db) == 2
    with tierstore.open(store) as again:
        assert len(again) == 2


def test_reader_in_another_process_sees_committed_state_only(tmp_path: Path, probe: Probe) -> None:
    store = tmp_path / "store"
    small1, large1 = torch.arange(100, dtype=torch.float32), torch.randn(200_000)
    small2, large2, new = torch.arange(200, dtype=torch.int16), torch.randn(150_000), torch.ones(5000)
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
        db.put("a", small1)
        db.put("big", large1)

        def hold_transaction() -> None:
            try:
                with db.transaction():
                    db.put("a", small2)
                    db.put("big", large2)
                    db.put("new", new)
                    entered.set()
                    assert release.wait(60)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                entered.set()

        writer = threading.Thread(target=hold_transaction)
        writer.start()
        try:
            assert entered.wait(60) and not errors, errors
            probe(op="ro_open", name="r", path=str(store))
            seen = probe(op="ro_read", name="r", probe=["a", "big", "new"])
            assert seen["keys"] == ["a", "big"] and seen["len"] == 2, seen
            assert seen["blocks"] == {"a": digest(small1), "big": digest(large1)}
            assert seen["contains"] == {"a": True, "big": True, "new": False}
            assert probe(op="open_writer", path=str(store))["error"] == "StoreLockedError"
        finally:
            release.set()
            writer.join(60)
        assert not errors, errors
        # the same read-only handle, still open, sees each new commit (len() too: checked last, after the rest)
        lens = [seen["len"]]
        seen = probe(op="ro_read", name="r", probe=["new"])
        assert seen["blocks"] == {"a": digest(small2), "big": digest(large2), "new": digest(new)}
        assert seen["contains"] == {"new": True}
        lens.append(seen["len"])
        db.delete("new")
        seen = probe(op="ro_read", name="r", probe=["new"])
        assert seen["keys"] == ["a", "big"] and seen["contains"] == {"new": False}
        lens.append(seen["len"])
        db.delete("a")
        seen = probe(op="ro_read", name="r", probe=["a"])
        assert seen["keys"] == ["big"] and seen["contains"] == {"a": False}
        lens.append(seen["len"])
    probe(op="ro_close", name="r")
    assert lens == [2, 3, 2, 1], f"len() of a long-lived read-only handle after each commit: {lens}"


# ---------------------------------------------------------------------------------------------------------
# Read-only handles.


def test_readonly_handle_refuses_writes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
        db.put("k", torch.arange(10))
        db.put("big", torch.randn(100_000))
        before = snapshot(db)
    files = data_files(store)
    with tierstore.open(store, readonly=True) as ro:
        writes: list[Callable[[], object]] = [
            lambda: ro.put("k", torch.zeros(3)),
            lambda: ro.put("new", torch.zeros(3)),
            lambda: ro.put("new", torch.zeros(3), durable=False),
            lambda: ro.delete("k"),
            lambda: ro.delete("absent"),
            lambda: ro.transaction().__enter__(),
        ]
        for write in writes:
            with pytest.raises(tierstore.ReadOnlyError) as info:
                write()
            assert isinstance(info.value, PermissionError)
        assert snapshot(ro) == before
        assert ro.stats().readonly
    assert data_files(store) == files
    with tierstore.open(store) as db:
        assert snapshot(db) == before


@pytest.mark.parametrize("kind", ["missing", "empty-folder", "file"])
def test_readonly_open_of_no_store(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nothing"
    if kind == "empty-folder":
        path.mkdir()
    elif kind == "file":
        path.write_text("not a store")
    with pytest.raises(tierstore.StoreNotFoundError) as info:
        tierstore.open(path, readonly=True)
    assert isinstance(info.value, FileNotFoundError)
    if kind == "missing":
        assert not path.exists()  # a read-only open creates nothing
    elif kind == "empty-folder":
        assert list(path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Bad keys and values leave the store unchanged.

BAD_KEYS: list[Any] = [1, 1.5, None, b"bytes", ("k",), Path("k"), ["k"], "", "a\x00b", "\x00", "x" * 1025,
                       "\u00e9" * 513, "\U0001f600" * 256 + "x", "\ud800", "a\udfffb", "ok\ud83d"]
GOOD_EDGE_KEYS = ["x" * 1024, "\u00e9" * 512, "\U0001f600" * 256, " ", "\n", "\t\r", "\uffff", "\U0010ffff"]


def _bad_tensors() -> list[Any]:
    dense = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return [
        dense.to_sparse(),
        dense.to_sparse_csr(),
        torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (4,)),
        torch.quantize_per_tensor(dense, 0.1, 0, torch.quint8),
        torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        torch.empty(3, 4, device="meta"),
        np.arange(12, dtype=np.float32),
        [1.0, 2.0],
        3.0,
        None,
        "tensor",
    ]


@pytest.fixture
def populated(tmp_path: Path) -> Iterator[tuple[tierstore.TierStore, Path]]:
    store = tmp_path / "store"
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
        with db.transaction():
            db.put("small", torch.arange(100, dtype=torch.int32))
            db.put("large", torch.randn(100_000))
            db.put("bf16", torch.randn(64, dtype=torch.bfloat16))
        yield db, store


def test_bad_keys_are_refused_and_change_nothing(populated: tuple[tierstore.TierStore, Path]) -> None:
    db, store = populated
    before, files = snapshot(db), data_files(store)
    value = torch.ones(4)
    contains_problems: list[str] = []
    for key in BAD_KEYS:
        calls: list[Callable[[], object]] = [lambda k=key: db.put(k, value), lambda k=key: db.get(k),
                                             lambda k=key: db.delete(k), lambda k=key: db.info(k)]
        for call in calls:
            with pytest.raises(tierstore.InvalidKeyError) as info:
                call()
            assert isinstance(info.value, ValueError), key
        try:  # a key that cannot be stored is not in the store (checked last); never a raw driver error
            if (key in db) is not False:
                contains_problems.append(f"{key!r} in db is True")
        except tierstore.InvalidKeyError:
            pass
        except Exception as exc:
            contains_problems.append(f"{key!r} in db raised {type(exc).__name__}: {exc}")
        assert snapshot(db) == before and data_files(store) == files, f"store changed after key {key!r}"
    with pytest.raises(tierstore.InvalidKeyError), db.transaction():  # a bad key rolls back the whole txn
        db.put("inside", value)
        db.put("x" * 1025, value)
    assert snapshot(db) == before and "inside" not in db and data_files(store) == files
    assert not contains_problems, contains_problems


def test_edge_keys_that_are_valid_round_trip(populated: tuple[tierstore.TierStore, Path]) -> None:
    db, _ = populated
    for i, key in enumerate(GOOD_EDGE_KEYS):
        assert len(key.encode("utf-8")) <= 1024
        db.put(key, torch.full((3,), i))
    for i, key in enumerate(GOOD_EDGE_KEYS):
        assert torch.equal(db.get(key), torch.full((3,), i)) and key in db
        assert db.info(key).key == key
        assert key in set(db.keys(prefix=key))
    assert len(db) == 3 + len(GOOD_EDGE_KEYS)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's beta/deprecation notes on sparse, quantized, nested
def test_bad_values_are_refused_and_change_nothing(populated: tuple[tierstore.TierStore, Path]) -> None:
    db, store = populated
    before, files = snapshot(db), data_files(store)
    for value in _bad_tensors():
        for key in ("small", "brand-new"):  # neither overwrite nor create
            with pytest.raises(tierstore.UnsupportedTensorError) as info:
                db.put(key, value)
            assert isinstance(info.value, TypeError)
        assert snapshot(db) == before and data_files(store) == files, f"store changed after {type(value)}"
        with pytest.raises(tierstore.UnsupportedTensorError), db.transaction():
            db.put("inside", torch.ones(3))
            db.put("large", torch.randn(100_000))
            db.put("small", value)
        assert snapshot(db) == before and data_files(store) == files, f"txn with {type(value)} left changes"
    db.close()
    with tierstore.open(store, readonly=True) as ro:
        assert snapshot(ro) == before


# ---------------------------------------------------------------------------------------------------------
# Keys never name files.

HOSTILE_KEYS = ["../../escape_probe", "../escape_probe2", "/abs/abs_probe", "..", ".", "/", "//", "./",
                "dir_probe/sub_probe/file_probe", "C:\\win_probe", "..\\..\\bs_probe", "\\\\srv\\share_probe",
                "~/home_probe", "$HOME/env_probe", "catalog.sqlite", "LOCK", "l3", "l3/packs/raw/0.0",
                "l3/blocks/0000000000000001/0.0", "zarr.json", "probe\nnewline", "probe*?<>|\"'"]
_HEX16 = "[0-9a-f]{16}"
_CODEC = "[a-z0-9-]+"
_LAYOUT = [
    "catalog\\.sqlite(-wal|-shm|-journal|-headroom|-commits)?", "LOCK", "l2\\.slab", "l3", "l3/zarr\\.json",
    "l3/packs", "l3/packs/zarr\\.json", f"l3/packs/{_CODEC}", f"l3/packs/{_CODEC}/(zarr\\.json|[0-9]+\\.0)",
    "l3/blocks", "l3/blocks/zarr\\.json", f"l3/blocks/{_HEX16}", f"l3/blocks/{_HEX16}/(zarr\\.json|0\\.0)",
]


def check_layout(root: Path, store: Path) -> None:
    """Everything under ``root`` is the store's own layout (or was there before)."""
    import re

    layout = re.compile("|".join(f"(?:{p})" for p in _LAYOUT))
    for path in root.rglob("*"):
        if store in path.parents:
            rel = path.relative_to(store).as_posix()
            assert layout.fullmatch(rel), f"unexpected entry in the store: {rel!r}"
            assert "probe" not in rel, rel
        else:
            assert path == store or path in store.parents or path.name == "cwd", f"a file appeared outside: {path}"


def test_hostile_keys_stay_in_the_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "a" / "b" / "store"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    outside = [Path("/abs"), Path("/abs/abs_probe"), Path.home() / "home_probe", Path("C:\\win_probe")]
    assert not any(p.exists() for p in outside)
    values = {key: torch.full((80_000,), i, dtype=torch.int32) for i, key in enumerate(HOSTILE_KEYS)}  # 320 KB
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
        with db.transaction():
            for key, value in values.items():
                db.put(key, value)
        check_layout(tmp_path, store)
        for key, value in values.items():
            assert torch.equal(db.get(key), value), key
        with db.transaction():  # now small, packed
            for i, key in enumerate(HOSTILE_KEYS):
                values[key] = torch.full((10,), -i, dtype=torch.int32)
                db.put(key, values[key])
        for key in HOSTILE_KEYS[::2]:
            db.delete(key)
            del values[key]
        assert sorted(db.keys()) == sorted(values)
        check_layout(tmp_path, store)
    with tierstore.open(store, readonly=True) as ro:
        for key, value in values.items():
            assert torch.equal(ro.get(key), value), key
    check_layout(tmp_path, store)
    assert not any(p.exists() for p in outside)
    assert list((tmp_path / "cwd").iterdir()) == []


def _valid_key(key: str) -> bool:
    try:
        return "\x00" not in key and 0 < len(key.encode("utf-8")) <= 1024
    except UnicodeEncodeError:
        return False


_path_chars = st.sampled_from([*"./\\:~*?$ \n", "..", "../", "l3", "zarr.json", "0", "\U0001f600", "\u00e9"])
KEYS = (st.text(min_size=1, max_size=200) | st.lists(_path_chars, min_size=1, max_size=30).map("".join)
        | st.text(min_size=1, max_size=1024)).filter(_valid_key)


def test_any_valid_key_round_trips_without_touching_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "a" / "b" / "store"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    model: dict[str, torch.Tensor] = {}
    with tierstore.open(store, fsync=False, l2_cache_size=SMALL_L2) as db:

        @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(key=KEYS, large=st.booleans())
        def check(key: str, large: bool) -> None:
            value = torch.full((70_000 if large else 7,), len(model), dtype=torch.int32)
            db.put(key, value)
            model[key] = value
            assert torch.equal(db.get(key), value)
            assert key in db and db.info(key).key == key
            assert key in set(db.keys(prefix=key))
            assert len(db) == len(model)
            check_layout(tmp_path, store)

        check()
        assert sorted(db.keys()) == sorted(model)
    with tierstore.open(store, readonly=True) as ro:
        for key, value in model.items():
            assert torch.equal(ro.get(key), value)
    assert list((tmp_path / "cwd").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Use after close.


def _closed_calls(db: tierstore.TierStore) -> dict[str, Callable[[], object]]:
    return {
        "put": lambda: db.put("k", torch.ones(3)),
        "get": lambda: db.get("k"),
        "delete": lambda: db.delete("k"),
        "contains": lambda: "k" in db,
        "len": lambda: len(db),
        "keys": lambda: db.keys(),
        "keys-prefix": lambda: db.keys(prefix="k"),
        "iter": lambda: iter(db),
        "info": lambda: db.info("k"),
        "stats": lambda: db.stats(),
        "history": lambda: db.history(),
        "flush": lambda: db.flush(),
        "transaction": lambda: db.transaction().__enter__(),
    }


def test_every_method_after_close_raises_store_closed(tmp_path: Path) -> None:
    db = tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2)
    db.put("k", torch.arange(5))
    kept = db.get("k")
    db.close()
    db.close()  # twice is fine
    assert db.closed
    for name, call in _closed_calls(db).items():
        with pytest.raises(tierstore.StoreClosedError):
            call()
            pytest.fail(f"{name} worked on a closed store")
    assert torch.equal(kept, torch.arange(5))  # what get() returned stays valid
    with tierstore.open(tmp_path / "store") as again:  # the lock was released
        assert torch.equal(again.get("k"), torch.arange(5))


def test_readonly_handle_after_close(tmp_path: Path) -> None:
    with tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2) as db:
        db.put("k", torch.arange(5))
    ro = tierstore.open(tmp_path / "store", readonly=True)
    ro.close()
    ro.close()
    for call in _closed_calls(ro).values():
        with pytest.raises(tierstore.StoreClosedError):
            call()


def test_key_iterator_outliving_its_store(tmp_path: Path) -> None:
    """An iterator from keys() that is consumed after close() raises StoreClosedError, not a catalog error."""
    db = tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2)
    with db.transaction():
        for i in range(1500):  # more than one page of keys
            db.put(f"k{i:05d}", torch.ones(1))
    it = db.keys()
    assert next(it) == "k00000"
    db.close()
    with pytest.raises(tierstore.StoreClosedError):
        list(it)


def test_context_manager_closes_and_releases(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
        db.put("k", torch.arange(5))
    assert db.closed
    with pytest.raises(tierstore.StoreClosedError):
        db.get("k")
    with pytest.raises(RuntimeError, match="boom"), tierstore.open(store) as db2:
        raise RuntimeError("boom")
    assert db2.closed
    with tierstore.open(store) as db3:  # neither left the lock held
        assert torch.equal(db3.get("k"), torch.arange(5))


def test_close_inside_a_transaction_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with tierstore.open(store, l2_cache_size=SMALL_L2) as db:
        with pytest.raises(tierstore.TransactionError), db.transaction():
            db.put("x", torch.ones(2))
            db.close()
        assert not db.closed and "x" not in db  # the transaction rolled back; the handle still works
        db.put("y", torch.ones(2))
    with tierstore.open(store, readonly=True) as ro:
        assert list(ro.keys()) == ["y"]


# ---------------------------------------------------------------------------------------------------------
# Threads.


def _value(thread: int, n: int, large: bool) -> torch.Tensor:
    size = 40_000 if large else 50  # 320 KB (own array) or 400 bytes (packed)
    return torch.arange(size, dtype=torch.int64) + (thread * 1_000_000 + n)


def _check_value(tensor: torch.Tensor) -> None:
    """``tensor`` is some ``_value(...)``: a torn or foreign block fails."""
    assert tensor.dtype == torch.int64 and tensor.numel() in (40_000, 50)
    assert torch.equal(tensor, torch.arange(tensor.numel(), dtype=torch.int64) + int(tensor[0]))


def test_threads_smoke(tmp_path: Path) -> None:
    store = tmp_path / "store"
    errors: list[str] = []
    models: list[dict[str, torch.Tensor]] = [{} for _ in range(4)]
    ops = [0] * 4
    stop = time.monotonic() + 1.0

    with tierstore.open(store, fsync=False, l2_cache_size=SMALL_L2) as db:

        def work(me: int) -> None:
            rng = np.random.default_rng(me)
            model = models[me]
            n = 0
            try:
                while time.monotonic() < stop:
                    n += 1
                    own, shared = f"t{me}/k{rng.integers(4)}", f"shared/{rng.integers(3)}"
                    op = rng.integers(8)
                    if op == 0:
                        value = _value(me, n, bool(rng.integers(2)))
                        db.put(own, value)
                        model[own] = value
                    elif op == 1:
                        if own in model:
                            db.delete(own)
                            del model[own]
                        else:
                            with pytest.raises(tierstore.BlockNotFoundError):
                                db.delete(own)
                    elif op == 2:
                        if own in model:
                            got = db.get(own)
                            assert same_bits(got, model[own]), own
                        else:
                            with pytest.raises(tierstore.BlockNotFoundError):
                                db.get(own)
                    elif op == 3:
                        with db.transaction():
                            first, second = _value(me, n, False), _value(me, n, True)
                            db.put(f"t{me}/k0", first)
                            db.put(f"t{me}/k1", second)
                        model[f"t{me}/k0"], model[f"t{me}/k1"] = first, second
                    elif op == 4:
                        db.put(shared, _value(me, n, bool(rng.integers(2))))
                    elif op == 5:
                        try:
                            db.delete(shared)
                        except tierstore.BlockNotFoundError:
                            pass
                    else:
                        try:
                            _check_value(db.get(shared))
                        except tierstore.BlockNotFoundError:
                            pass
                        assert isinstance(len(db), int) and isinstance(list(db.keys(prefix="shared/")), list)
                    ops[me] += 1
            except BaseException as exc:
                errors.append(f"thread {me}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        assert all(ops), ops

        def check(handle: tierstore.TierStore) -> None:
            for me, model in enumerate(models):
                assert sorted(handle.keys(prefix=f"t{me}/")) == sorted(model)
                for key, value in model.items():
                    assert same_bits(handle.get(key), value), key
            for key in handle.keys(prefix="shared/"):
                _check_value(handle.get(key))
            assert len(handle) == len(list(handle.keys()))

        check(db)
    with tierstore.open(store, readonly=True) as ro:
        check(ro)



@pytest.mark.parametrize("call", [
    lambda db: db.put("b", torch.ones(2), durable="yes"),
    lambda db: db.put("b", torch.ones(2), durable=1),
    lambda db: db.get("a", device="nonsense"),
    lambda db: db.get("a", device=3.5),
    lambda db: db.get("a", device=["cpu"]),
], ids=["durable-str", "durable-int", "device-name", "device-float", "device-list"])
def test_bad_flags_and_devices_get_a_typed_error_and_change_nothing(tmp_path: Path,
                                                                   call: Callable[[Any], Any]) -> None:
    with tierstore.open(tmp_path / "s", l2_cache_size="1MiB") as db:
        db.put("a", torch.arange(6, dtype=torch.int16))
        with pytest.raises(tierstore.InvalidArgumentError):
            call(db)
        assert "b" not in db and len(db) == 1
        assert same_bits(db.get("a", device="cpu"), torch.arange(6, dtype=torch.int16))


# ---------------------------------------------------------------------------------------------------------
# Nonsense arguments: a typed error, and nothing stored changes.

def _absent_device() -> str:
    """A CUDA device this process cannot use: any on a CPU-only torch, else one past the last GPU."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


NONSENSE_CALLS: dict[str, tuple[Callable[[Any], Any], type[tierstore.TierStoreError]]] = {
    # an expanded view claims 16 TiB it does not hold: copying it would be the allocator's RuntimeError
    "put-16TiB-new": (lambda db: db.put("huge", torch.zeros(1).expand(2**42)), tierstore.TierFullError),
    "put-16TiB-over": (lambda db: db.put("small", torch.zeros(1).expand(2**42)), tierstore.TierFullError),
    "get-absent-cuda": (lambda db: db.get("small", device=_absent_device()), tierstore.InvalidArgumentError),
    "allocate-absent-cuda": (lambda db: db.allocate((4,), torch.float32, device=_absent_device()),
                             tierstore.InvalidArgumentError),
    "get-xla": (lambda db: db.get("small", device="xla:0"), tierstore.InvalidArgumentError),
    "allocate-xla": (lambda db: db.allocate((4,), torch.float32, device="xla:0"), tierstore.InvalidArgumentError),
    "get-meta": (lambda db: db.get("small", device="meta"), tierstore.InvalidArgumentError),
    "get-meta-device": (lambda db: db.get("small", device=torch.device("meta")), tierstore.InvalidArgumentError),
    "allocate-meta": (lambda db: db.allocate((4,), torch.float32, device="meta"), tierstore.InvalidArgumentError),
    "get-copy-str": (lambda db: db.get("small", copy="no"), tierstore.InvalidArgumentError),
    "get-copy-int": (lambda db: db.get("small", copy=1), tierstore.InvalidArgumentError),
    "shrink-str": (lambda db: db.shrink_l1("abc"), tierstore.InvalidArgumentError),
    "shrink-negative": (lambda db: db.shrink_l1(-1), tierstore.InvalidArgumentError),
    "shrink-bool": (lambda db: db.shrink_l1(True), tierstore.InvalidArgumentError),
    "compact-str": (lambda db: db.compact(min_fill="x"), tierstore.ConfigError),
    "compact-nan": (lambda db: db.compact(min_fill=float("nan")), tierstore.ConfigError),
    "compact-bool": (lambda db: db.compact(min_fill=True), tierstore.ConfigError),
}


def test_nonsense_arguments_get_a_typed_error_and_change_nothing(populated: tuple[tierstore.TierStore, Path]) -> None:
    db, store = populated
    before, files = snapshot(db), data_files(store)
    for name, (call, error) in NONSENSE_CALLS.items():
        with pytest.raises(error) as info:
            call(db)
        assert isinstance(info.value, tierstore.TierStoreError), name
        assert snapshot(db) == before and data_files(store) == files, f"store changed after {name}"
    with pytest.raises(tierstore.TierFullError), db.transaction():  # and it rolls back the whole transaction
        db.put("inside", torch.ones(3))
        db.put("large", torch.zeros(1).expand(2**42))
    assert snapshot(db) == before and "inside" not in db
    db.close()
    with tierstore.open(store, readonly=True) as ro:
        assert snapshot(ro) == before


@pytest.mark.parametrize("path", [5, None, b"bytes-path", "", "with\x00nul", Path("with\x00nul")],
                         ids=["int", "none", "bytes", "empty", "nul", "path-nul"])
@pytest.mark.parametrize("readonly", [False, True])
def test_nonsense_store_paths_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: Any,
                                          readonly: bool) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # open("") used to make a store here
    with pytest.raises(tierstore.InvalidArgumentError) as info:
        tierstore.open(path, readonly=readonly)
    assert isinstance(info.value, ValueError)
    assert list(tmp_path.rglob("*")) == [tmp_path / "cwd"], "a refused open left files behind"


@pytest.mark.parametrize(("options", "error"), [
    ({"readonly": "no"}, tierstore.InvalidArgumentError), ({"readonly": 1}, tierstore.InvalidArgumentError),
    ({"config": {"l2_cache_size": "1MiB"}}, tierstore.ConfigError), ({"config": "1MiB"}, tierstore.ConfigError),
], ids=["readonly-str", "readonly-int", "config-dict", "config-str"])
def test_nonsense_open_options_are_refused_before_anything_is_made(tmp_path: Path, options: dict[str, Any],
                                                                   error: type[Exception]) -> None:
    with pytest.raises(error):
        tierstore.open(tmp_path / "store", **options)
    assert not (tmp_path / "store").exists()
