"""``TierStore.get_many``: the same tensors, errors, counts and L2 contents as one ``get`` per key.

The L3 misses of a ``get_many`` are read together through one read-ahead pipeline
(``Mover.read_many_l3`` over ``ZarrL3.read_many``); everything else is a get. These tests hold it to
``{k: get(k)}``: bit for bit (hypothesis over dtypes, sizes, codecs and L2 sizes), hit counts and
access history, missing keys, damaged bytes and lying catalog rows, transactions, and threads that
put, delete and evict the same keys while it reads.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierstore
from tests.conftest import same_bits
from tests.test_faults_concurrency import Event, check_registers
from tests.test_faults_corruption import LYING_ROWS
from tests.test_faults_corruption import _values as corruption_values

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.uint8, torch.bool]


def _tensor(seed: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(numel, generator=gen).to(dtype)
    return torch.randint(0, 100, (numel,), generator=gen).to(dtype)


def _history_counts(db: tierstore.TierStore, keys: list[str]) -> dict[str, list[tuple[str, str | None]]]:
    """Per key, the (op, tier) of each access recorded, in order."""
    return {key: [(op, tier) for _when, _key, op, tier in reversed(db.history(key))] for key in keys}


blocks = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.sampled_from([0, 1, 300, 5_000, 70_000, 300_000, 700_000])),
    min_size=1, max_size=7)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=blocks, compression=st.sampled_from(["auto", "off"]), l2=st.sampled_from([0, "1MiB", "16MiB"]),
       order=st.randoms(use_true_random=False), repeat=st.booleans())
def test_get_many_equals_get_of_each(tmp_path_factory: pytest.TempPathFactory, blocks: list[tuple[torch.dtype, int]],
                                     compression: str, l2: int | str, order: object, repeat: bool) -> None:
    base = tmp_path_factory.mktemp("many")
    values = {f"b{i}": _tensor(i, dtype, numel) for i, (dtype, numel) in enumerate(blocks)}
    with tierstore.open(base / "s", l2_cache_size=l2, l3_compression=compression) as db, db.transaction():
        for key, value in values.items():
            db.put(key, value)
    shutil.copytree(base / "s", base / "t")
    keys = list(values)
    order.shuffle(keys)  # type: ignore[attr-defined]
    asked = keys + keys[:1] if repeat else keys  # a repeated key is read once
    with tierstore.open(base / "s", l2_cache_size=l2) as many, tierstore.open(base / "t", l2_cache_size=l2) as each:
        got = many.get_many(asked)
        want = {key: each.get(key) for key in keys}
        assert list(got) == keys
        for key in keys:
            assert same_bits(got[key], want[key]) and same_bits(got[key], values[key]), key
        assert many.stats().hits == each.stats().hits
        assert many.stats().hit_bytes == each.stats().hit_bytes
        assert many.stats().gets == each.stats().gets == len(keys)
        assert {k: many.tiers_of(k) for k in keys} == {k: each.tiers_of(k) for k in keys}
        assert _history_counts(many, keys) == _history_counts(each, keys)
        again = many.get_many(keys)  # now from L2 where it fit, as a second get would be
        assert all(same_bits(again[key], each.get(key)) for key in keys)
        assert many.stats().hits == each.stats().hits


def test_get_many_reads_l3_misses_together(tmp_path: Path) -> None:
    """Large blocks of several files come back whole and verified; the mover read them in one call."""
    values = {f"w{i}": _tensor(i, torch.bfloat16, 1_500_000 + 4096 * i) for i in range(5)}
    with tierstore.open(tmp_path / "s", l2_cache_size="8MiB") as db, db.transaction():
        for key, value in values.items():
            db.put(key, value)
    with tierstore.open(tmp_path / "s", l2_cache_size="8MiB") as db:
        calls: list[int] = []
        original = db.mover.read_many_l3

        def spy(wanted, copy):  # type: ignore[no-untyped-def]
            calls.append(len(wanted))
            return original(wanted, copy)

        db.mover.read_many_l3 = spy  # type: ignore[method-assign]
        got = db.get_many(reversed(list(values)))
        assert calls == [5]
        assert all(same_bits(got[k], v) for k, v in values.items())
        assert db.stats().hits["L3"] == 5
        in_l2 = [k for k in values if "L2" in db.tiers_of(k)]
        assert in_l2, "the blocks that fit went to L2, as a get's do"
        tensor = db.get_many([in_l2[0]], copy=True)[in_l2[0]]
        assert db.stats().hits["L2"] == 1 and same_bits(tensor, values[in_l2[0]])


def test_missing_key_raises_before_reading(db: tierstore.TierStore) -> None:
    db.put("a", torch.randn(300_000))
    db.put("b", torch.arange(10))
    with pytest.raises(tierstore.BlockNotFoundError) as info:
        db.get_many(["a", "nope", "b"])
    assert info.value.key == "nope"
    assert db.stats().gets == 0
    with pytest.raises(tierstore.InvalidKeyError):
        db.get_many(["a", ""])
    with pytest.raises(tierstore.InvalidArgumentError):
        db.get_many("a")  # one key is get()'s
    with pytest.raises(tierstore.InvalidArgumentError):
        db.get_many(["a"], copy=1)  # type: ignore[arg-type]
    assert db.get_many([]) == {}
    db.close()
    with pytest.raises(tierstore.StoreClosedError):
        db.get_many(["a"])


def test_damaged_block_names_its_key(tmp_path: Path) -> None:
    values = {f"w{i}": _tensor(i, torch.bfloat16, 600_000) for i in range(4)}
    with tierstore.open(tmp_path / "s", l2_cache_size="16MiB") as db, db.transaction():
        for key, value in values.items():
            db.put(key, value)
        db.put("raw", torch.arange(400_000, dtype=torch.int64), compression="off")
    con = sqlite3.connect(tmp_path / "s" / "catalog.sqlite")
    where = {key: (array, offset, stored) for key, array, offset, stored
             in con.execute("SELECT key, l3_array, l3_offset, stored_bytes FROM blocks").fetchall()}
    con.close()
    for key in ("w2", "raw"):
        array, offset, stored = where[key]
        path = tmp_path / "s" / "l3" / array / "0.0"
        data = bytearray(path.read_bytes())
        data[offset + stored // 3] ^= 0x40  # inside this block's bytes (the commit's blocks may share the file)
        path.write_bytes(bytes(data))
    with tierstore.open(tmp_path / "s", l2_cache_size="16MiB") as db:
        used = db.stats().tiers["L2"]["used"]
        for damaged in ("w2", "raw"):
            with pytest.raises(tierstore.CorruptBlockError) as info:
                db.get_many(["w0", damaged, "w3"])
            assert info.value.key == damaged and damaged in str(info.value)
            with pytest.raises(tierstore.CorruptBlockError) as single:
                db.get(damaged)
            assert single.value.key == damaged
        assert db.stats().tiers["L2"]["used"] >= used  # no slot of the damaged reads stays reserved
        got = db.get_many(["w0", "w1", "w3"])
        assert all(same_bits(got[k], values[k]) for k in got)
        l2 = db.stats().tiers["L2"]
        held = sum(values[k].nbytes for k in ("w0", "w1", "w3"))
        assert l2["used"] <= held + (1 << 20), l2  # only the good blocks' slots are taken


@pytest.mark.parametrize("damage", sorted(LYING_ROWS))
def test_lying_rows_raise_what_get_raises(tmp_path: Path, damage: str) -> None:
    """test_faults_corruption's damaged catalog rows: get_many raises what get raises, or returns what it returns."""
    key, assignment = LYING_ROWS[damage]
    values = corruption_values()
    with tierstore.open(tmp_path / "s", l2_cache_size="1MiB") as db, db.transaction():
        for name, value in values.items():
            db.put(name, value)
    con = sqlite3.connect(tmp_path / "s" / "catalog.sqlite")
    con.execute(f"UPDATE blocks SET {assignment} WHERE key = ?", (key,))
    con.commit()
    con.close()
    others = [name for name in values if name != key]
    for readonly in (True, False):
        with tierstore.open(tmp_path / "s", l2_cache_size="1MiB", readonly=readonly) as db:
            try:
                single: torch.Tensor | Exception = db.get(key, copy=True)
            except tierstore.TierStoreError as exc:
                single = exc
        with tierstore.open(tmp_path / "s", l2_cache_size="1MiB", readonly=readonly) as db:
            try:
                many: torch.Tensor | Exception = db.get_many([others[0], key, others[-1]])[key]
            except tierstore.TierStoreError as exc:
                many = exc
        if isinstance(single, Exception):
            assert type(many) is type(single), (many, single)
            assert getattr(many, "key", None) == getattr(single, "key", None)
        else:
            assert isinstance(many, torch.Tensor) and same_bits(many, single), damage


def test_inside_a_transaction(db: tierstore.TierStore) -> None:
    db.put("a", torch.randn(200_000))
    db.put("b", torch.randn(200_000))
    with db.transaction():
        db.put("a", torch.ones(300_000))
        db.delete("b")
        db.put("c", torch.zeros(5))
        got = db.get_many(["a", "c"])
        assert torch.equal(got["a"], torch.ones(300_000)) and torch.equal(got["c"], torch.zeros(5))
        with pytest.raises(tierstore.BlockNotFoundError):
            db.get_many(["a", "b"])
    assert sorted(db.get_many(["a", "c"])) == ["a", "c"]


def _value(vid: int, numel: int) -> torch.Tensor:
    return torch.full((numel,), vid, dtype=torch.int64)


def _vid(tensor: torch.Tensor) -> int:
    vids = torch.unique(tensor)
    assert vids.numel() == 1, f"a torn or mixed block: {vids[:5]}"
    return int(vids[0])


def _race(tmp_path: Path, read: Callable[[tierstore.TierStore, list[str]], dict[str, torch.Tensor]],
          cache_only_shared: bool) -> int:
    """Readers calling ``read`` while writers replace (with other sizes) and delete the same keys, and put
    cache-only keys that spill through a small L2 while an evictor reads filler blocks and migrates:
    every tensor is one whole version a put wrote, and every read of the shared keys is linearizable
    (the register model of test_faults_concurrency). The store verifies clean afterwards. Returns the
    number of reads the register check took."""
    keys = [f"k{i}" for i in range(4)]
    cache_keys = [f"c{i}" for i in range(2)]
    events: list[list[Event]] = [[] for _ in range(5)]
    written: set[int] = set()
    errors: list[str] = []
    counter = iter(range(1, 1 << 40))
    lock = threading.Lock()
    stop = time.monotonic() + 2.0
    clock = time.perf_counter_ns
    with tierstore.open(tmp_path / "s", fsync=False, l2_cache_size="3MiB") as db:
        for i in range(6):
            db.put(f"fill{i}", torch.full((100_000,), -1, dtype=torch.int64))

        def writer(me: int) -> None:
            rng = np.random.default_rng(me)
            try:
                while time.monotonic() < stop:
                    op = int(rng.integers(0, 6))
                    with lock:
                        vid = next(counter)
                        written.add(vid)
                    numel = (30, 20_000, 90_000, 200_000, 120_000, 0)[op]
                    if op == 4:  # a cache-only key: spilled to L3 when evicted, read back from there
                        db.put(cache_keys[int(rng.integers(0, 2))], _value(vid, numel), durable=False)
                        continue
                    key = keys[int(rng.integers(0, len(keys)))]
                    if op == 5:
                        t0 = clock()
                        try:
                            db.delete(key)
                        except tierstore.BlockNotFoundError:
                            events[me].append(Event("get", key, None, t0, clock()))
                        else:
                            events[me].append(Event("delete", key, None, t0, clock()))
                        continue
                    t0 = clock()
                    db.put(key, _value(vid, numel), durable=not (cache_only_shared and op % 2))
                    events[me].append(Event("put", key, vid, t0, clock()))
            except BaseException as exc:
                errors.append(f"writer {me}: {type(exc).__name__}: {exc}")

        def reader(me: int) -> None:
            rng = np.random.default_rng(10 + me)
            reads = 0
            try:
                while time.monotonic() < stop:
                    chosen = rng.permutation(len(keys))[:int(rng.integers(1, 5))]
                    asked = [keys[int(i)] for i in chosen] + cache_keys[:int(rng.integers(0, 3))]
                    t0 = clock()
                    try:
                        got = read(db, asked)
                    except tierstore.BlockNotFoundError as exc:
                        if exc.key in keys:
                            events[me].append(Event("get", str(exc.key), None, t0, clock()))
                        continue
                    end = clock()
                    assert list(got) == asked
                    for key, tensor in got.items():
                        vid = _vid(tensor)
                        if key in keys:
                            events[me].append(Event("get", key, vid, t0, end))
                        else:
                            assert vid in written, (key, vid)
                    reads += 1
                assert reads > 5, reads
            except BaseException as exc:
                errors.append(f"reader {me}: {type(exc).__name__}: {exc}")

        def evictor() -> None:
            try:
                while time.monotonic() < stop:
                    got = read(db, [f"fill{i}" for i in range(6)])
                    assert all(_vid(t) == -1 for t in got.values())
                    db.migrate()
            except BaseException as exc:
                errors.append(f"evictor: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        threads += [threading.Thread(target=reader, args=(i,)) for i in range(2, 5)]
        threads.append(threading.Thread(target=evictor))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors[:3]
        end = clock()
        final = [Event("get", key, _vid(db.get(key)) if key in db else None, end, end + 1) for key in keys]
    flat = [e for log in events for e in log] + final
    checked = check_registers(flat)  # raises on a read that no order of the writes explains
    report = tierstore.verify(tmp_path / "s")
    assert report.ok, report
    return checked


def test_get_many_racing_puts_deletes_spills_and_evictions(tmp_path: Path) -> None:
    assert _race(tmp_path, lambda db, keys: db.get_many(keys), cache_only_shared=False) >= 20


def test_get_and_get_many_with_shared_keys_alternating_cache_only(tmp_path: Path) -> None:
    """Keys whose puts alternate durable and cache-only, read by get and get_many while their cache-only
    versions spill: a reader that misses a version leaving L2 finds it in L3 (it failed 3 of 12 runs with
    BlockNotFoundError when the index answered "gone" for a key spilled between the miss and the question)."""
    assert _race(tmp_path, lambda db, keys: {key: db.get(key) for key in keys} if len(keys) % 2 else
                 db.get_many(keys), cache_only_shared=True) >= 20


def test_export_in_batches_writes_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """export_safetensors reads its tensors with one get_many per batch: cut into many batches, the file is
    byte for byte the file of one batch, and safetensors reads every tensor back."""
    from safetensors.torch import load_file

    from tierstore.integrations import checkpoint

    values = {f"t.{i}": _tensor(i, (torch.bfloat16, torch.float32, torch.int64)[i % 3], 50_000 * (i + 1))
              for i in range(7)}
    values["t.empty"] = torch.zeros(0)
    with tierstore.open(tmp_path / "s", l2_cache_size="2MiB") as db:
        with db.transaction():
            for key, value in values.items():
                db.put(key, value)
        checkpoint.export_safetensors(db, tmp_path / "one.safetensors")
        monkeypatch.setattr(checkpoint, "_EXPORT_BATCH", 600_000)
        assert len(list(checkpoint._batches([(k, k, db.info(k)) for k in values]))) > 3
        checkpoint.export_safetensors(db, tmp_path / "many.safetensors")
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "many.safetensors").read_bytes()
    loaded = load_file(tmp_path / "many.safetensors")
    assert set(loaded) == set(values) and all(same_bits(loaded[k], v) for k, v in values.items())
