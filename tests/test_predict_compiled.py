"""The compiled replay (numba) against the pure-Python batch replay it must agree with.

``PredictivePolicy(..., compiled=True)`` replays the learned expert (:mod:`tierstore.predict.compiled_learn`)
and the shadows (:mod:`tierstore.predict.compiled_shadows`, :mod:`tierstore.predict.compiled_recency`) as numba kernels
over arrays; the Python classes are the reference. On random traces both must make the same
decisions, access for access, and leave the same learned weights, scores and tier behind.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_predict_batch import PANELS, chain, traces
from tierstore.errors import ConfigError
from tierstore.predict.compiled_learn import AVAILABLE
from tierstore.predict.compiled_recency import CompiledLIRS, CompiledLRU
from tierstore.predict.compiled_shadows import CompiledARC, CompiledS3FIFO, CompiledWTinyLFU
from tierstore.predict.predictor import PredictivePolicy
from tierstore.predict.shadow_caches import Evictions, ShadowARC, ShadowLIRS, ShadowLRU, ShadowS3FIFO, ShadowWTinyLFU

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="numba is not installed")


@settings(max_examples=120, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 60), epoch=st.integers(1, 40), memory=st.integers(1, 400),
       switch_cost=st.sampled_from([0.0, 0.5, 1.0]), panel=st.sampled_from(PANELS),
       chained=st.booleans(), cut=st.lists(st.booleans(), min_size=1, max_size=7),
       pieces=st.integers(1, 4), every=st.sampled_from([1, 2]))
def test_compiled_replay_makes_the_pure_replays_decisions(keys: list[int], capacity: int, epoch: int, memory: int,
                                                          switch_cost: float, panel: tuple[str, ...], chained: bool,
                                                          cut: list[bool], pieces: int, every: int) -> None:
    options = {"epoch": epoch, "window": memory, "switch_cost": switch_cost, "experts": panel,
               "prediction_window": 8, "horizon_factor": 2}
    parents = chain(keys, cut) if chained else None
    pure: PredictivePolicy[int] = PredictivePolicy(capacity, **options)  # type: ignore[arg-type]
    fast: PredictivePolicy[int] = PredictivePolicy(capacity, compiled=True, **options)  # type: ignore[arg-type]
    pure.predictor.sample_every = fast.predictor.sample_every = every
    step = -(-len(keys) // pieces)
    want, got = bytearray(), bytearray()
    for start in range(0, len(keys), step):
        part = None if parents is None else parents[start:start + step]
        want += pure.simulate(keys[start:start + step], part)
        got += fast.simulate(keys[start:start + step], part)
    assert got == want
    assert fast._compiled is not None
    assert fast._compiled.weights.tolist() == pure.predictor.weights
    assert fast._compiled.samples == pure.predictor.samples
    assert fast.leader == pure.leader and fast.switches == pure.switches and fast.scores == pure.scores
    assert list(fast._resident) == list(pure._resident) and list(fast._outside) == list(pure._outside)
    for x, y in zip(fast.experts, pure.experts, strict=True):
        assert sorted(x) == sorted(y), x.name


@settings(max_examples=60, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 40), pieces=st.integers(1, 3))
def test_compiled_shadows_evict_what_the_python_ones_do(keys: list[int], capacity: int, pieces: int) -> None:
    for python, compiled in ((ShadowARC, CompiledARC), (ShadowS3FIFO, CompiledS3FIFO),
                             (ShadowWTinyLFU, CompiledWTinyLFU), (ShadowLRU, CompiledLRU), (ShadowLIRS, CompiledLIRS)):
        reference, twin = python(capacity), compiled(capacity)
        want: Evictions[int] = []
        got: Evictions[int] = []
        step = -(-len(keys) // pieces)
        for start in range(0, len(keys), step):
            part = keys[start:start + step]
            offset = len(want)
            hits = reference.run(part, want)
            assert twin.run(np.asarray(part, dtype=np.int64), got) == hits, python.name
            assert got[offset:] == want[offset:], python.name
        assert sorted(twin) == sorted(reference), python.name
        assert all(key in twin for key in reference) and -1 not in twin and "a" not in twin
        tier = np.array(sorted(set(keys))[::2], dtype=np.int64)  # what a switch to it would cost
        assert twin.missing_from(tier) == sum(key not in set(tier.tolist()) for key in reference), python.name


def test_compiled_policy_refuses_what_it_cannot_replay() -> None:
    policy: PredictivePolicy[int] = PredictivePolicy(8, compiled=True)
    with pytest.raises(ConfigError):
        policy.record_access(1, 0.0)  # no per-access path
    with pytest.raises(ConfigError):
        policy.simulate([3, -1])  # dense non-negative ids only
    with pytest.raises(ConfigError):
        CompiledARC(4).run(np.array([-2], dtype=np.int64))
    with pytest.raises(ConfigError):
        CompiledARC(4).access(1)
    with pytest.raises(ConfigError):
        CompiledLIRS(4).run(np.array([5, -2], dtype=np.int64))
    fresh: PredictivePolicy[int] = PredictivePolicy(8, compiled=True)
    assert fresh.simulate([1, 2, 1, 2, 100_000, 1]) == bytearray([0, 0, 1, 1, 0, 1])  # arrays grow


@pytest.mark.parametrize("capacity", [150, 700])
def test_compiled_replay_agrees_with_deep_heaps_and_long_lirs_stacks(capacity: int) -> None:
    """A skewed trace long and wide enough for heaps of hundreds of keys and LIRS ghost pruning."""
    rng = np.random.default_rng(capacity)
    hot = rng.zipf(1.3, 30_000) % 5000  # skewed reuse over 5,000 keys
    scan = np.arange(30_000) % 3000 + 10_000  # a loop longer than the cache, interleaved
    keys = np.where(rng.random(30_000) < 0.8, hot, scan).astype(np.int64).tolist()
    options = {"experts": ("predicted", "lirs", "lru"), "epoch": 97}
    pure: PredictivePolicy[int] = PredictivePolicy(capacity, **options)  # type: ignore[arg-type]
    fast: PredictivePolicy[int] = PredictivePolicy(capacity, compiled=True, **options)  # type: ignore[arg-type]
    assert fast.simulate(keys) == pure.simulate(keys)
    assert fast.scores == pure.scores and fast.switches == pure.switches
    for x, y in zip(fast.experts, pure.experts, strict=True):
        assert sorted(x) == sorted(y), x.name
