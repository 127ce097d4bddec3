"""The spill race: a cache-only block evicted from L2 by another thread is written to L3 while the writer
replaces or deletes the key. The spill must be dropped, never committed over the newer version.

Before the fix, right after a durable put returned, ``get`` served the old cache-only bytes, ``info`` said
``durable=False``, a reopen lost keys whose durable put had returned, and deleted keys came back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tierstore
from tests.conftest import same_bits

BLOCK = (1 << 20) - 3072  # just under 1 MiB: many spills through an 8 MiB L2
ROUNDS = 120
KEYS = [f"k{i}" for i in range(4)]


def _value(tag: int) -> torch.Tensor:
    return torch.full((BLOCK,), tag % 251, dtype=torch.uint8)


class _Readers:
    """Threads that keep filling L2 with other blocks, so every cache-only block is evicted (spilled) soon."""

    def __init__(self, db: tierstore.TierStore, n: int = 2) -> None:
        self.db = db
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.reads = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        keys = [f"fill{j}" for j in range(12)]
        j = i
        try:
            while not self.stop.is_set():
                self.db.get(keys[j % len(keys)])
                self.reads += 1
                j += 1
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def __enter__(self) -> _Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors[:3]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, tierstore.TierStore]]:
    path = tmp_path / "s"
    db = tierstore.open(path, l2_cache_size="8MiB", fsync=False)
    for j in range(12):
        db.put(f"fill{j}", torch.full((BLOCK,), 200 + j, dtype=torch.uint8))
    try:
        yield path, db
    finally:
        db.close()


def test_durable_put_after_cache_only_put_wins_over_a_racing_spill(store: tuple[Path, tierstore.TierStore]) -> None:
    path, db = store
    stale = 0
    with _Readers(db) as readers:
        for r in range(ROUNDS):
            key = KEYS[r % len(KEYS)]
            db.put(key, _value(2 * r), durable=False)
            time.sleep(0.0005 * (r % 4))  # let the readers evict (spill) it at various points
            db.put(key, _value(2 * r + 1))
            got = db.get(key)
            info = db.info(key)
            if not same_bits(got, _value(2 * r + 1)) or not info.durable:
                stale += 1
        assert readers.reads > 0
    assert stale == 0, f"{stale} of {ROUNDS} durable puts were overwritten by a stale spill"
    expected = {KEYS[r % len(KEYS)]: _value(2 * r + 1) for r in range(ROUNDS)}
    db.close()
    with tierstore.open(path, l2_cache_size="8MiB") as again:
        for key, value in expected.items():
            assert key in again, f"{key!r}: its acknowledged durable put is lost after reopen"
            assert same_bits(again.get(key), value)
            assert again.info(key).durable
    report = tierstore.verify(path)
    assert report.ok, report.problems[:5]


def test_delete_after_cache_only_put_is_not_undone_by_a_racing_spill(store: tuple[Path, tierstore.TierStore]) -> None:
    path, db = store
    back = 0
    with _Readers(db):
        for r in range(ROUNDS):
            key = f"d{r}"
            db.put(key, _value(r), durable=False)
            time.sleep(0.0005 * (r % 4))
            db.delete(key)
            time.sleep(0.0005)
            if key in db:
                back += 1
    assert back == 0, f"{back} of {ROUNDS} deleted keys came back"
    db.close()
    with tierstore.open(path, l2_cache_size="8MiB") as again:
        revived = list(again.keys(prefix="d"))
        assert revived == [], f"deleted keys present after reopen: {revived[:5]}"
    assert tierstore.verify(path).ok


def test_cache_only_overwrite_during_spill_keeps_the_newest(store: tuple[Path, tierstore.TierStore]) -> None:
    """Two cache-only versions in a row: a spill of the first must not replace the second."""
    _path, db = store
    wrong = 0
    with _Readers(db):
        for r in range(ROUNDS):
            key = KEYS[r % len(KEYS)]
            db.put(key, _value(3 * r), durable=False)
            time.sleep(0.0005 * (r % 3))
            db.put(key, _value(3 * r + 1), durable=False)
            if not same_bits(db.get(key), _value(3 * r + 1)):
                wrong += 1
    assert wrong == 0, f"{wrong} of {ROUNDS} gets served an older cache-only version"


def test_a_promotion_never_replaces_the_only_copy_of_a_cache_only_version() -> None:
    """A reader promoting an older version (its generation read before a writer's commit admitted a newer
    cache-only one) must not kill that newer entry: it is the only copy (found by tests/test_l1_threads.py)."""
    from tierstore.engine.residency import Residency
    from tierstore.tiers.l2_slab import HostArena

    with HostArena("1MiB", pin=False) as arena:
        tier = Residency("L2", arena)
        generation = tier.generation  # the reader looked the key up here ...
        tier.discard("k")  # ... a writer's commit replaced it ...
        newer = arena.alloc(4096)
        assert newer is not None
        assert tier.admit("k", 7, newer, torch.uint8, (4096,), 0, volatile=True) is not None
        stale = arena.alloc(4096)
        assert stale is not None
        # even with the generation re-read after the discard, the promotion is refused
        assert tier.admit("k", 3, stale, torch.uint8, (4096,), 0, generation=tier.generation) is None
        assert tier.admit("k", 3, arena.alloc(4096), torch.uint8, (4096,), 0, generation=generation) is None
        entry = tier.entries["k"]
        assert entry.block_id == 7 and entry.volatile and "k" in tier.volatile_keys
        tier.clear()


def test_planned_spills_racing_cache_only_overwrites_keep_the_newest(tmp_path: Path) -> None:
    """The migrator's planned L2 -> L3 demotions of cache-only blocks (journaled, the bytes written by the
    mover) run on the worker thread while this thread overwrites those keys: a spill of a superseded
    version is dropped (counted stale), never committed over the newer one, and the store verifies."""
    path = tmp_path / "s"
    wrong = 0
    with tierstore.open(path, l2_cache_size="8MiB", fsync=False, migration_time_threshold=0.01) as db:
        stop = threading.Event()
        errors: list[BaseException] = []

        def planner() -> None:
            try:
                while not stop.is_set():
                    db.migrate()
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=planner, daemon=True)
        thread.start()
        try:
            for r in range(ROUNDS):
                key = KEYS[r % len(KEYS)]
                db.put(key, _value(r), durable=False)
                db.get(key)  # an access, so the plan sees the block idle soon after
                time.sleep(0.0005 * (r % 5))
                if not same_bits(db.get(key), _value(r)):
                    wrong += 1
        finally:
            stop.set()
            thread.join(30)
        assert not errors, errors[:3]
        stats = db.migrator.stats()
        assert stats["spilled"] + stats["stale"] > 0, stats
        for r in range(ROUNDS - len(KEYS), ROUNDS):
            assert same_bits(db.get(KEYS[r % len(KEYS)]), _value(r))
    assert wrong == 0, f"{wrong} of {ROUNDS} gets served an older version than the last put"
    report = tierstore.verify(path)
    assert report.ok, report.problems[:5]
