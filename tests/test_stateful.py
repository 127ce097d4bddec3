"""A hypothesis state machine drives the real on-disk store against a plain dict."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import tierstore
from tests.conftest import same_bits

KEYS = st.sampled_from(["a", "b", "layer.0/w", "../x", "ключ", "k" * 300])
SIZES = st.sampled_from([0, 1, 7, 1000, 5000, 70_000, 300_000])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.uint8, torch.int64, torch.bool, torch.float16])


def make_tensor(seed: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (size * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8,
                        generator=gen)
    if dtype == torch.bool:
        return (raw % 2).bool()
    return raw.view(dtype)


class StoreMachine(RuleBasedStateMachine):
    """Puts, deletes, transactions (commit or roll back), reopen: the store must equal the model."""

    @initialize()
    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ts-state-"))
        self.db = tierstore.open(self.dir / "s", fsync=False, l2_cache_size="4MiB")
        self.model: dict[str, torch.Tensor] = {}
        self.seed = 0

    def teardown(self) -> None:
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _tensor(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        self.seed += 1
        return make_tensor(self.seed, size, dtype)

    @rule(key=KEYS, size=SIZES, dtype=DTYPES)
    def put(self, key: str, size: int, dtype: torch.dtype) -> None:
        value = self._tensor(size, dtype)
        self.db.put(key, value)
        self.model[key] = value

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        if key in self.model:
            self.db.delete(key)
            del self.model[key]
        else:
            try:
                self.db.delete(key)
            except KeyError:
                return
            raise AssertionError(f"deleting missing {key!r} did not raise")

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        if key in self.model:
            assert same_bits(self.db.get(key), self.model[key])
        else:
            try:
                self.db.get(key)
            except KeyError:
                return
            raise AssertionError(f"get of missing {key!r} did not raise")

    @rule(keys=st.lists(KEYS, min_size=1, max_size=5))
    def get_many(self, keys: list[str]) -> None:
        if all(key in self.model for key in keys):
            got = self.db.get_many(keys)
            assert list(got) == list(dict.fromkeys(keys))
            assert all(same_bits(got[key], self.model[key]) for key in keys)
        else:
            try:
                self.db.get_many(keys)
            except KeyError as exc:
                assert exc.args and any(key not in self.model and key in str(exc) for key in keys), exc
                return
            raise AssertionError(f"get_many of {keys!r} with a missing key did not raise")

    @rule(ops=st.lists(st.tuples(KEYS, st.one_of(st.none(), SIZES), DTYPES), min_size=1, max_size=6),
          commit=st.booleans())
    def transaction(self, ops: list[tuple[str, int | None, torch.dtype]], commit: bool) -> None:
        staged = dict(self.model)
        try:
            with self.db.transaction():
                for key, size, dtype in ops:
                    if size is None:
                        if key in staged:
                            self.db.delete(key)
                            del staged[key]
                    else:
                        staged[key] = self._tensor(size, dtype)
                        self.db.put(key, staged[key])
                if not commit:
                    raise _Rollback
        except _Rollback:
            return
        self.model = staged

    @precondition(lambda self: True)
    @rule()
    def reopen(self) -> None:
        self.db.close()
        self.db = tierstore.open(self.dir / "s", fsync=False, l2_cache_size="4MiB")

    @invariant()
    def same_keys(self) -> None:
        assert sorted(self.db.keys()) == sorted(self.model)
        assert len(self.db) == len(self.model)


class _Rollback(Exception):
    pass


StoreMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestStore = StoreMachine.TestCase


FILL = [f"~fill/{i}" for i in range(6)]


class ConcurrentStoreMachine(StoreMachine):
    """The same model, with cache-only puts and an evictor thread racing every step.

    The evictor keeps reading filler blocks through the small L2 (so the machine's cache-only blocks
    are spilled to L3 by another thread at any point of a put, delete or transaction) and asks the
    migrator to demote now and then. A cache-only block is in the model until the next reopen.
    """

    @initialize()
    def start(self) -> None:
        super().start()
        self.cache_only: set[str] = set()
        for i, key in enumerate(FILL):
            self.db.put(key, torch.full((600_000,), i, dtype=torch.uint8))
        self._start_evictor()

    def _start_evictor(self) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.evictor = threading.Thread(target=self._evict, args=(self.db, self.stop), daemon=True)
        self.evictor.start()

    def _stop_evictor(self) -> None:
        self.stop.set()
        self.evictor.join(30)
        assert not self.errors, self.errors[:3]

    def _evict(self, db: tierstore.TierStore, stop: threading.Event) -> None:
        n = 0
        try:
            while not stop.is_set():
                db.get(FILL[n % len(FILL)])
                if n % 16 == 0:
                    db.migrate()
                n += 1
        except BaseException as exc:  # surfaced by the next invariant
            self.errors.append(exc)

    def teardown(self) -> None:
        self._stop_evictor()
        super().teardown()

    @rule(key=KEYS, size=SIZES, dtype=DTYPES)
    def put_cache_only(self, key: str, size: int, dtype: torch.dtype) -> None:
        value = self._tensor(size, dtype)
        self.db.put(key, value, durable=False)
        self.model[key] = value
        self.cache_only.add(key)

    @rule(key=KEYS, size=SIZES, dtype=DTYPES)
    def put(self, key: str, size: int, dtype: torch.dtype) -> None:
        super().put(key, size, dtype)
        self.cache_only.discard(key)
        assert self.db.info(key).durable

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        super().delete(key)
        self.cache_only.discard(key)
        assert key not in self.db

    @rule(ops=st.lists(st.tuples(KEYS, st.one_of(st.none(), SIZES), DTYPES), min_size=1, max_size=6),
          commit=st.booleans())
    def transaction(self, ops: list[tuple[str, int | None, torch.dtype]], commit: bool) -> None:
        before = dict(self.model)
        super().transaction(ops, commit)
        for key in set(before) | set(self.model):
            if self.model.get(key) is not before.get(key):
                self.cache_only.discard(key)  # a durable put or a delete in the transaction

    @rule()
    def reopen(self) -> None:
        self._stop_evictor()
        super().reopen()
        for key in self.cache_only:  # cache-only blocks do not survive a reopen
            self.model.pop(key, None)
        self.cache_only.clear()
        self._start_evictor()

    @invariant()
    def same_keys(self) -> None:
        assert not self.errors, self.errors[:3]
        assert sorted(k for k in self.db if not k.startswith("~fill/")) == sorted(self.model)
        assert len(self.db) == len(self.model) + len(FILL)

    @invariant()
    def same_values(self) -> None:
        for key, value in self.model.items():
            assert same_bits(self.db.get(key), value), key


ConcurrentStoreMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                                    suppress_health_check=[HealthCheck.too_slow])
TestConcurrentStore = ConcurrentStoreMachine.TestCase
