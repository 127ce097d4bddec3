"""The predictive policy's batch replay (``PredictivePolicy.simulate``) against the per-access protocol.

The batch path is a second implementation of the per-access work (:mod:`tierstore.predict.batch_replay`),
so these tests hold it to the same decisions, access for access, on random traces: the hit
sequence, and the state both leave behind (learned weights, tier order, leader, scores).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore.errors import ConfigError
from tierstore.predict.access_tracker import AccessPatternTracker
from tierstore.predict.policies import access
from tierstore.predict.predictor import PredictedNextUse, PredictivePolicy, SimpleMLPredictor
from tierstore.predict.shadow_caches import Evictions, ShadowARC, ShadowLIRS, ShadowLRU, ShadowS3FIFO, ShadowWTinyLFU

PANELS = [("s3fifo", "arc", "wtinylfu", "predicted", "lru", "lirs"), ("predicted", "lru"), ("lru", "arc"),
          ("wtinylfu", "s3fifo", "predicted"), ("lirs", "s3fifo")]


@st.composite
def traces(draw: st.DrawFn) -> list[int]:
    """Random keys from a small or a large key space, with loops (longer than small caches) mixed in."""
    universe = draw(st.sampled_from([4, 30, 400, 5000]))
    keys: list[int] = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            length = draw(st.integers(2, 80))
            keys += list(range(length)) * draw(st.integers(1, 6))
        else:
            keys += draw(st.lists(st.integers(0, universe), min_size=1, max_size=200))
    return keys


def chain(keys: Sequence[int], cut: Sequence[bool]) -> list[int | None]:
    """Each key's parent: the previous key, unless a request starts there (or it is the same key)."""
    return [None if i == 0 or cut[i % len(cut)] else keys[i - 1] for i in range(len(keys))]


def per_access(policy: PredictivePolicy[Any], keys: Sequence[Hashable],
               parents: Sequence[Hashable | None] | None) -> bytearray:
    return bytearray(access(policy, key, float(i), policy.capacity, 1, None if parents is None else parents[i])
                     for i, key in enumerate(keys))


def same_state(a: PredictivePolicy[Any], b: PredictivePolicy[Any]) -> None:
    assert a.predictor.weights == b.predictor.weights
    assert a.predictor.samples == b.predictor.samples
    assert a.tracker.tick == b.tracker.tick and a.tracker.first_gap == b.tracker.first_gap
    assert list(a._resident) == list(b._resident) and list(a._outside) == list(b._outside)
    assert a._children == b._children and a._parent == b._parent and a.used == b.used
    assert a.leader == b.leader and a.switches == b.switches and a.scores == b.scores
    assert a._countdown == b._countdown and a._hits == b._hits
    for x, y in zip(a.experts, b.experts, strict=True):
        assert list(x) == list(y), x.name


@settings(max_examples=120, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 60), epoch=st.integers(1, 40), memory=st.integers(1, 400),
       switch_cost=st.sampled_from([0.0, 0.5, 1.0]), panel=st.sampled_from(PANELS),
       chained=st.booleans(), cut=st.lists(st.booleans(), min_size=1, max_size=7),
       pieces=st.integers(1, 4))
def test_simulate_makes_the_protocols_decisions(keys: list[int], capacity: int, epoch: int, memory: int,
                                                switch_cost: float, panel: tuple[str, ...], chained: bool,
                                                cut: list[bool], pieces: int) -> None:
    options = {"epoch": epoch, "window": memory, "switch_cost": switch_cost, "experts": panel,
               "prediction_window": 8, "horizon_factor": 2}
    parents = chain(keys, cut) if chained else None
    slow: PredictivePolicy[int] = PredictivePolicy(capacity, **options)  # type: ignore[arg-type]
    fast: PredictivePolicy[int] = PredictivePolicy(capacity, **options)  # type: ignore[arg-type]
    expected = per_access(slow, keys, parents)
    step = -(-len(keys) // pieces)  # in pieces: a later call resumes where the last one stopped
    got = bytearray()
    for start in range(0, len(keys), step):
        got += fast.simulate(keys[start:start + step], None if parents is None else parents[start:start + step])
    assert got == expected
    same_state(fast, slow)


def test_simulate_with_default_knobs_and_string_keys() -> None:
    keys = [f"block-{(i * 7919) % 301 if i % 3 else i % 37}" for i in range(6000)]
    slow: PredictivePolicy[str] = PredictivePolicy(40)
    fast: PredictivePolicy[str] = PredictivePolicy(40)
    assert fast.simulate(keys) == per_access(slow, keys, None)
    same_state(fast, slow)
    assert 0 < len(fast) <= 40


@settings(max_examples=40, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 40))
def test_shadow_batches_report_what_single_accesses_do(keys: list[int], capacity: int) -> None:
    for shadow in (ShadowLRU, ShadowARC, ShadowS3FIFO, ShadowWTinyLFU, ShadowLIRS):
        one, batch = shadow(capacity), shadow(capacity)  # type: ignore[abstract]
        hits, gone = 0, []
        for i, key in enumerate(keys):
            hits += key in one
            out = one.access(key)
            if out is not None:
                gone.append((i, out))
        evicted: Evictions[int] = []
        assert batch.run(keys, evicted) == hits, shadow.name
        assert evicted == gone and list(one) == list(batch), shadow.name


@settings(max_examples=40, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 40), every=st.sampled_from([1, 2, 4]))
def test_belady_expert_batch_learns_like_single_accesses(keys: list[int], capacity: int, every: int) -> None:
    def expert() -> PredictedNextUse[int]:  # a tracker with a window and successors, as the policy's has not
        return PredictedNextUse(capacity, SimpleMLPredictor(AccessPatternTracker(16, max_successors=3),
                                                            horizon=2 * capacity + 5, sample_every=every))

    one, batch = expert(), expert()
    hits, gone = 0, []
    for i, key in enumerate(keys):
        one.predictor.tracker.record(key, float(i))
        one.predictor.observe(key)
        hits += key in one
        out = one.access(key)
        if out is not None:
            gone.append((i, out))
        elif key not in one:
            gone.append((i, key))  # not admitted: the batch reports the key itself
    evicted: Evictions[int] = []
    assert batch.run(keys, evicted) == hits
    assert evicted == gone and list(one) == list(batch)
    assert one.predictor.weights == batch.predictor.weights
    assert one.predictor._probability == batch.predictor._probability
    assert one.predictor.samples == batch.predictor.samples
    for key in set(keys):
        assert one.predictor.tracker.successors(key) == batch.predictor.tracker.successors(key)
        assert one.predictor.tracker.in_window(key) == batch.predictor.tracker.in_window(key)


def test_simulate_rejects_mismatched_input() -> None:
    policy: PredictivePolicy[str] = PredictivePolicy(4096, block_size=1024)
    with pytest.raises(ConfigError):
        policy.simulate(["a", "b"], ["a"])
    access(policy, "a", 0.0, 4096, 1024)  # byte sizes: not a unit-size replay any more
    with pytest.raises(ConfigError):
        policy.simulate(["b"])
    assert "a" in policy and policy.used == 1024
    with pytest.raises(ConfigError):
        PredictivePolicy(8, experts=("lru", "predicted", "lru"))
