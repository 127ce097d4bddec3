"""The migrator: journaled moves, crash points, prefetch, pins, the simple plan, learned successors."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import tierstore
from tests.conftest import same_bits
from tierstore.engine.migrator import CRASH_ENV, CRASH_POINTS, Move, Pin, Plan
from tierstore.errors import BlockNotFoundError, ConfigError, InvalidKeyError, StoreClosedError, TierFullError
from tierstore.predict.predictor import SuccessorTable

BLOCK = 64 * 1024  # float32 elements: 256 KiB a block


def tensor(i: int) -> torch.Tensor:
    return torch.arange(BLOCK, dtype=torch.float32) * 0.5 + i


def open_small(path: Path, **overrides: object) -> tierstore.TierStore:
    options: dict[str, object] = {"l2_cache_size": "4MiB", "fsync": False}
    options.update(overrides)
    return tierstore.open(path, **options)


def tiers(db: tierstore.TierStore, key: str) -> tuple[str, ...]:
    return db.info(key).tiers


def test_prefetch_brings_blocks_to_l2(store_path: Path) -> None:
    with open_small(store_path) as db:
        for i in range(24):  # 6 MiB through a 4 MiB L2: the first ones are evicted
            db.put(f"d{i}", tensor(i))
        assert "L2" not in tiers(db, "d0")
        future = db.prefetch(["d0", "d1", "missing"])
        assert future.result(timeout=60) == ["d0", "d1"]
        assert "L2" in tiers(db, "d0") and "L2" in tiers(db, "d1")
        assert same_bits(db.get("d0"), tensor(0))
        assert db.prefetch("d1", tier="l2").result(timeout=60) == ["d1"]
        assert db.migrator.stats()["prefetched"] == 2
        assert db.catalog.journal_size() == 0


def test_prefetch_and_pin_refuse_bad_input(store_path: Path) -> None:
    with open_small(store_path) as db:
        db.put("a", tensor(0))
        with pytest.raises(ConfigError):
            db.prefetch(["a"], tier="L7")
        with pytest.raises(ConfigError):  # no L1 in this store
            db.prefetch(["a"], tier="L1")
        with pytest.raises(InvalidKeyError):
            db.prefetch(["a", ""])
        with pytest.raises(BlockNotFoundError):
            db.pin("missing")
        with pytest.raises(ConfigError):
            db.pin("a", tier="L3")
        assert same_bits(db.get("a"), tensor(0))
    with pytest.raises(StoreClosedError):
        db.prefetch(["a"])


def test_pin_keeps_a_block_resident_until_released(store_path: Path) -> None:
    with open_small(store_path) as db:
        for i in range(24):
            db.put(f"d{i}", tensor(i))
        with db.pin("d0") as pin:
            assert "L2" in tiers(db, "d0")
            for i in range(1, 24):  # churn L2 twice over
                db.get(f"d{i}")
            assert "L2" in tiers(db, "d0")
            db.put("d0", tensor(100))  # a newer version stays pinned too
            for i in range(1, 24):
                db.get(f"d{i}")
            assert "L2" in tiers(db, "d0") and same_bits(db.get("d0"), tensor(100))
        assert pin.released
        for i in range(1, 24):
            db.get(f"d{i}")
        assert "L2" not in tiers(db, "d0")


def test_pin_that_cannot_fit_raises_tier_full(store_path: Path) -> None:
    with open_small(store_path, l2_cache_size="1MiB") as db:
        db.put("big", torch.zeros(1 << 19))  # 2 MiB: larger than L2
        with pytest.raises(TierFullError):
            db.pin("big")
        assert db._l2 is not None and not db._l2.pinned


def test_pin_and_prefetch_into_l1(store_path: Path) -> None:
    with open_small(store_path, l1_device="cpu", l1_cache_size="2MiB") as db:
        db.put("w", tensor(3).to(torch.bfloat16))
        with db.pin("w", tier="L1"):
            assert "L1" in tiers(db, "w")
            assert same_bits(db.get("w", device="cpu"), tensor(3).to(torch.bfloat16))
        db.put("v", tensor(4))
        assert db.prefetch(["v"], tier="L1").result(timeout=60) == ["v"]
        assert "L1" in tiers(db, "v")


def test_migrate_dry_run_promotes_hot_and_demotes_idle(store_path: Path) -> None:
    with open_small(store_path, l1_device="cpu", l1_cache_size="2MiB", migration_time_threshold=600) as db:
        for i in range(24):
            db.put(f"d{i}", tensor(i))
        for _ in range(5):
            db.get("d0")  # -> L1 (>= migration_threshold_high_freq = 4)
        for _ in range(2):
            db.get("d1")  # stays in L2 after its gets (>= medium = 2): already there, no move
        plan = db.migrate(dry_run=True)
        assert isinstance(plan, Plan)
        assert [(m.key, m.src, m.dst) for m in plan] == [("d0", "L2", "L1")]
        assert "promote L2->L1" in str(plan) and "migration_threshold_high_freq=4" in str(plan)
        assert "L1" not in tiers(db, "d0")  # a dry run moves nothing
        done = db.migrate()
        assert [(m.key, m.dst) for m in done] == [("d0", "L1")]
        assert "L1" in tiers(db, "d0")
        assert str(Plan()) == "nothing to move"
    with open_small(store_path, migration_time_threshold=0.05) as db:  # L1 on the CPU still (remembered)
        db.put("kv", tensor(7), durable=False)  # cache-only, on the L1 device: its only copy is in L1
        assert tiers(db, "kv") == ("L1",)
        db.get("kv")
        time.sleep(0.2)
        plan = db.migrate(dry_run=True)
        assert ("kv", "L1", "L3") in [(m.key, m.src, m.dst) for m in plan]
        assert db.catalog.get_block("kv") is None
        db.migrate()  # written back to L2 (where there is room), then on to L3 while it stays idle
        for _ in range(3):
            if tiers(db, "kv") == ("L3",):
                break
            time.sleep(0.1)
            db.migrate()
        assert tiers(db, "kv") == ("L3",)  # written to L3 first, then freed from the volatile tiers
        assert db.catalog.get_block("kv") is not None
        assert same_bits(db.get("kv"), tensor(7))
        assert db.catalog.journal_size() == 0
        assert db.migrator.stats()["spilled"] == 1


def test_move_prints() -> None:
    move = Move("layers.0.w", "L3", "L2", 1 << 20, "prefetch")
    assert move.op == "promote" and str(move).startswith("promote L3->L2")
    assert Move("k", "L1", "L3", 0, "idle").op == "demote"
    assert "2 moves" in str(Plan([move, move]))


def test_successor_table() -> None:
    table: SuccessorTable[str] = SuccessorTable(threshold=0.7, min_count=2, max_successors=2, max_keys=3)
    table.add("a", "b")
    assert table.likely("a") == ()  # seen once: not enough support
    table.add("a", "b")
    assert table.likely("a") == ("b",)
    table.add("a", "c")
    assert table.likely("a") == ()  # 2 of 3 < 0.7
    assert table.probability("a", "b") == pytest.approx(2 / 3)
    table.add("a", "d", 5)  # a third follower wears the others down (Misra-Gries)
    assert table.probability("a", "b") <= 2 / 8
    for key in ("x", "y", "z"):
        table.add(key, "q")
    assert len(table) == 3 and table.probability("a", "d") == 0.0  # "a" was the least recently fed


def test_gets_prefetch_learned_successors_and_history_persists(store_path: Path) -> None:
    with open_small(store_path, prediction_threshold=0.6) as db:
        for i in range(24):
            db.put(f"d{i}", tensor(i))
        for _ in range(4):  # d0 is always followed by d1
            db.get("d0")
            db.get("d1")
            db.get("d5")
        db.flush()
        assert db.migrator.successors.likely("d0") == ("d1",)
        count = db.info("d0").access_count
        for i in range(6, 24):
            db.get(f"d{i}")  # push d1 out of L2
        assert "L2" not in tiers(db, "d1")
        db.get("d0")
        assert db.migrator.wait(timeout=60)
        assert "L2" in tiers(db, "d1")
        assert db.migrator.stats()["predicted"] >= 1
    with open_small(store_path, prediction_threshold=0.6) as db:  # a new process would see the same
        assert db.migrator.successors.likely("d0") == ("d1",)
        assert db.info("d0").access_count == count + 1
        assert [a[1] for a in db.history(limit=3)] == ["d0", "d23", "d22"]
        assert "L2" not in tiers(db, "d1")  # a fresh L2 (not file-backed)
        db.get("d0")
        assert db.migrator.wait(timeout=60)
        assert "L2" in tiers(db, "d1")


# -- crash points: a real child process kills itself at each step of a move ----------------------

DURABLE = 8


def small(i: int) -> torch.Tensor:
    return torch.arange(BLOCK // 4, dtype=torch.float32) * 0.5 + i  # 64 KiB


def crash_child(path: str, scenario: str, point: str, marks: str) -> None:
    """A writer that kills itself (SIGKILL) when a move reaches ``point``; runs in a real child process."""
    os.environ[CRASH_ENV] = point
    with tierstore.open(path, l2_cache_size="1MiB", fsync=False) as db:
        for i in range(DURABLE):
            db.put(f"d{i}", small(i))
    idle = 0.05 if scenario == "demote" else 600.0  # no periodic plan in the other scenarios
    # writeback: no L2, so cache-only blocks leaving L1 go straight to L3 (Migrator.write_back)
    sizes = {"l1_device": "cpu", "l1_cache_size": "512KiB", "l2_cache_size": 0} if scenario == "writeback" else {
        "l2_cache_size": "1MiB"}
    db = tierstore.open(path, fsync=False, migration_time_threshold=idle, **sizes)
    Path(marks, "ready").touch()
    if scenario in ("spill", "writeback"):  # cache-only blocks pushed out of L2 (or L1) by later ones
        for i in range(24):
            db.put(f"c{i}", small(100 + i), durable=False)
    elif scenario == "demote":  # an idle cache-only block demoted by the plan
        db.put("c0", small(100), durable=False)
        time.sleep(0.2)
        db.migrate()
    elif scenario == "promote":
        db.prefetch([f"d{i}" for i in range(DURABLE)]).result()
    Path(marks, "survived").touch()
    db.close()


CASES = [("demote", p) for p in CRASH_POINTS] + [("promote", "intent"), ("promote", "committed"),
                                                  ("spill", "verified"), ("writeback", "copied"),
                                                  ("writeback", "committed")]
"""Every step of a move into L3 (the one whose crash leaves files to clean up), and a sample of the
others: each case is a fresh interpreter importing torch, and the suite must stay quick."""


def orphan_arrays(store: Path) -> set[str]:
    blocks = store / "l3" / "blocks"
    on_disk = {f"blocks/{p.name}" for p in blocks.iterdir() if p.name != "zarr.json"} if blocks.exists() else set()
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        live = {r[0] for r in conn.execute("SELECT l3_array FROM blocks WHERE l3_array LIKE 'blocks/%'")}
    return on_disk - live


def test_crash_at_every_step_of_a_move_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    # Real child processes, forked from a server that imported torch once (a fresh interpreter each
    # would spend most of the test importing it); each child SIGKILLs itself at its crash point.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "tierstore"])
    children = []
    for scenario, point in CASES:
        store, marks = tmp_path / f"{scenario}-{point}", tmp_path / f"{scenario}-{point}.marks"
        marks.mkdir()
        proc = context.Process(target=crash_child, args=(str(store), scenario, point, str(marks)))
        proc.start()
        children.append((scenario, point, store, marks, proc))
    for scenario, point, store, marks, proc in children:
        proc.join(300)
        assert proc.exitcode == -signal.SIGKILL, (scenario, point, proc.exitcode)
        assert (marks / "ready").exists() and not (marks / "survived").exists()
        with sqlite3.connect(store / "catalog.sqlite") as conn:
            journal = conn.execute("SELECT key, op, src, dst FROM journal").fetchall()
        uncommitted_copy = bool(orphan_arrays(store))
        if scenario == "promote" or point in ("intent", "copied", "verified"):
            assert journal, (scenario, point)  # the crash came mid-move
        else:
            assert not journal, (scenario, point)  # committed: the row went in the same transaction
        if scenario != "promote" and point in ("copied", "verified"):
            assert uncommitted_copy, (scenario, point)
        with tierstore.open(store, l2_cache_size="1MiB", fsync=False) as db:
            assert sorted(db.journal_recovery.undone) == sorted(r[0] for r in journal)
            assert db.catalog.journal_size() == 0
            assert sorted(db.keys()) == sorted(f"d{i}" for i in range(DURABLE))  # cache-only blocks dropped
            assert len(db) == DURABLE
            for i in range(DURABLE):
                assert same_bits(db.get(f"d{i}"), small(i)), (scenario, point, i)
        assert not orphan_arrays(store), (scenario, point)
        with tierstore.open(store, l2_cache_size="1MiB", fsync=False) as db:
            assert not db.journal_recovery.undone and not db.recovery.removed_files
            assert len(db) == DURABLE


# -- model check: the store with moves in the mix equals a dict ----------------------------------

KEYS = st.sampled_from(["a", "b", "c", "layer.0/w", "kv/1"])
COUNTS = st.sampled_from([0, 1, 25, 20_000, 70_000])  # float32 elements: up to 280 KB against a 1 MiB L2
TIERS = st.sampled_from(["L1", "L2"])


class MigratorMachine(RuleBasedStateMachine):
    """Puts (durable and cache-only), gets, deletes, prefetches, pins, plans and reopens against a dict."""

    @initialize()
    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ts-migrate-"))
        self.db = self._open()
        self.model: dict[str, tuple[torch.Tensor, bool]] = {}
        self.pins: list[Pin] = []
        self.seed = 0

    def _open(self) -> tierstore.TierStore:
        return tierstore.open(self.dir / "s", fsync=False, l2_cache_size="1MiB", l1_device="cpu",
                              l1_cache_size="512KiB", migration_threshold_high_freq=3,
                              migration_threshold_medium_freq=1, prediction_threshold=0.5,
                              history_flush_interval=0.05)

    def teardown(self) -> None:
        for pin in self.pins:
            pin.release()
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(key=KEYS, count=COUNTS, durable=st.booleans())
    def put(self, key: str, count: int, durable: bool) -> None:
        self.seed += 1
        value = torch.arange(count, dtype=torch.float32) + self.seed
        self.db.put(key, value, durable=durable)
        self.model[key] = (value, durable)

    @rule(key=KEYS, device=st.sampled_from([None, "cpu"]))
    def get(self, key: str, device: str | None) -> None:
        if key in self.model:
            assert same_bits(self.db.get(key, device=device, copy=True), self.model[key][0])
        else:
            with pytest.raises(BlockNotFoundError):
                self.db.get(key)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        if key in self.model:
            self.db.delete(key)
            del self.model[key]

    @rule(keys=st.lists(KEYS, max_size=4), tier=TIERS)
    def prefetch(self, keys: list[str], tier: str) -> None:
        resident = self.db.prefetch(keys, tier=tier).result(timeout=60)
        assert set(resident) <= set(keys) & set(self.model)

    @rule(key=KEYS, tier=TIERS)
    def pin(self, key: str, tier: str) -> None:
        if key not in self.model:
            with pytest.raises(BlockNotFoundError):
                self.db.pin(key, tier=tier)
            return
        try:
            pin = self.db.pin(key, tier=tier)
        except TierFullError:
            return
        assert pin.tier in self.db.info(key).tiers or self.model[key][0].numel() == 0
        self.pins.append(pin)

    @precondition(lambda self: bool(self.pins))
    @rule()
    def unpin(self) -> None:
        self.pins.pop(0).release()

    @rule(dry_run=st.booleans())
    def migrate(self, dry_run: bool) -> None:
        plan = self.db.migrate(dry_run=dry_run)
        assert all(m.key in self.model for m in plan)

    @rule()
    def reopen(self) -> None:
        for pin in self.pins:
            pin.release()
        self.pins.clear()
        self.db.close()
        self.model = {k: v for k, v in self.model.items() if v[1]}  # cache-only blocks do not survive
        self.db = self._open()

    @invariant()
    def matches_model(self) -> None:
        assert self.db.migrator.wait(timeout=60)
        assert len(self.db) == len(self.model)
        assert self.db.catalog.journal_size() == 0
        assert self.db.migrator.stats()["last_error"] is None


TestMigratorMachine = MigratorMachine.TestCase
TestMigratorMachine.settings = settings(max_examples=15, stateful_step_count=25, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])


def test_replay_through_a_real_store_makes_the_simulated_decisions(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import replay_store

    rng = random.Random(3)
    hot = list(range(200))
    keys = [rng.choice(hot) if rng.random() < 0.6 else rng.randrange(200, 700) for _ in range(2500)]
    capacity = replay_store.round_capacity(100)
    assert capacity == 256
    for policy in ("lru", "lfu"):
        simulated = replay_store.simulate_policy(keys, policy, capacity)
        stored = replay_store.replay_store(keys, 700, policy, capacity, tmp_path)
        assert 0 < sum(stored) < len(keys)
        assert stored == simulated, policy  # the same hit or miss at every access


def test_device_gets_prefetch_the_next_layer_into_l1(store_path: Path) -> None:
    layers = [f"layer.{i}.w" for i in range(6)]
    with open_small(store_path, l1_device="cpu", l1_cache_size="1MiB", prediction_threshold=0.9) as db:
        for i, key in enumerate(layers):
            db.put(key, tensor(i))
        for _ in range(3):  # a forward pass reads the layers in order
            for key in layers:
                db.get(key, device="cpu")
        db.flush()
        assert db.migrator.successors.likely("layer.2.w") == ("layer.3.w",)
        for key in layers[:4]:  # 1 MiB of L1 holds 4 layers: the last ones read are there
            db.get(key, device="cpu")
        assert db.migrator.wait(timeout=60)
        assert "L1" in tiers(db, "layer.4.w")  # prefetched after layer.3 was read
        assert same_bits(db.get("layer.4.w", device="cpu"), tensor(4))


def test_cli_journal_and_successors(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tierstore.cli import main

    with open_small(store_path) as db:
        db.put("a", tensor(0))
        db.put("b", tensor(1))
        for _ in range(3):
            db.get("a")
            db.get("b")
    assert main(["successors", str(store_path), "a", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"next_key": "b", "count": 3, "probability": 1.0, "prefetched": True}]
    assert main(["journal", str(store_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    with open_small(store_path) as db:  # a move in flight, as a crash would leave it
        db.migrator.catalog.journal_begin([(99, "a", "promote", "L3", "L2")])
        assert main(["journal", str(store_path)]) == 0
        assert "1 moves in flight" in " ".join(capsys.readouterr().out.split())
        assert main(["journal", str(store_path), "--json"]) == 0
        assert [(r["key"], r["src"], r["dst"]) for r in json.loads(capsys.readouterr().out)] == [("a", "L3", "L2")]
    with open_small(store_path) as db:
        assert db.journal_recovery.undone == ["a"] and db.migrator.catalog.journal_size() == 0


def test_successor_history_is_bounded(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tierstore.engine.migrator, "TRIM_EVERY", 1)
    with open_small(store_path, history_max_rows=5) as db:
        db.put("a", torch.zeros(4))
        for i in range(12):
            db.put(f"k{i}", torch.zeros(4))
        for _ in range(3):
            db.get("a")
            db.get("k0")  # the frequent pair survives the trim
        for i in range(1, 12):
            db.get(f"k{i}")
        db.flush()
        assert len(db.migrator.catalog.successor_counts(100)) == 5
        assert ("a", "k0", 3) in db.migrator.catalog.successor_counts(100)
        assert len(db.history(limit=100)) == 5


def test_l3_admission_reused_drops_cache_only_blocks_never_read(store_path: Path) -> None:
    with pytest.raises(ConfigError):
        open_small(store_path, l3_admission="sometimes")
    with open_small(store_path, l2_cache_size="1MiB", l3_admission="reused") as db:
        db.put("kv0", small(0), durable=False)
        db.put("kv1", small(1), durable=False)
        assert same_bits(db.get("kv0"), small(0))  # read since its put: worth an SSD write
        for i in range(2, 40):  # 2.5 MiB of cache-only blocks through 1 MiB of L2
            db.put(f"kv{i}", small(i), durable=False)
        assert same_bits(db.get("kv0"), small(0)) and "L3" in tiers(db, "kv0")
        assert "kv1" not in db
        with pytest.raises(BlockNotFoundError):
            db.get("kv1")
        stats = db.migrator.stats()
        assert stats["dropped"] >= 20 and stats["spilled"] >= 1
        assert len(db) == 40 - stats["dropped"]
    with open_small(store_path.with_name("other"), l2_cache_size="1MiB") as db:  # the default keeps every one
        for i in range(40):
            db.put(f"kv{i}", small(i), durable=False)
        assert len(db) == 40 and same_bits(db.get("kv1"), small(1))


def test_read_only_handles_prefetch_and_pin_without_writing(store_path: Path) -> None:
    with open_small(store_path) as db:
        db.put("a", tensor(0))
        db.put("b", tensor(1))
    before = (store_path / "catalog.sqlite").stat().st_mtime_ns
    with tierstore.open(store_path, readonly=True, l2_cache_size="4MiB") as reader:
        assert reader.prefetch(["a"]).result(timeout=60) == ["a"]
        assert "L2" in reader.info("a").tiers
        with reader.pin("b"):
            assert same_bits(reader.get("b"), tensor(1))
        assert reader.migrate(dry_run=True) is not None
        with pytest.raises(tierstore.ReadOnlyError):
            reader.migrate()
    assert (store_path / "catalog.sqlite").stat().st_mtime_ns == before
