"""The KV-aware policy (``kv``): it follows the eviction protocol, replays like it, and is deterministic.

:class:`tierstore.predict.kv_policy.KVPolicy` is the predictive policy with an adaptive LRFU expert
leading its panel; its batch replay (``simulate``, pure and compiled) must make the per-access
protocol's decisions, and driven through :func:`tierstore.predict.policies.access` it must never
exceed the capacity and must report hits exactly when a dict model of the tier holds the key.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_predict_batch import chain, per_access, traces
from tierstore.config import EVICTION_POLICIES
from tierstore.errors import ConfigError
from tierstore.predict.compiled_learn import AVAILABLE
from tierstore.predict.kv_policy import TAKEOVER, AdaptiveLRFU, KVPolicy, ShadowLRFU
from tierstore.predict.policies import access, make_policy
from tierstore.predict.shadow_caches import Evictions
from tierstore.predict.takeover import TakeoverRule


@settings(max_examples=80, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 50), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
       chained=st.booleans(), cut=st.lists(st.booleans(), min_size=1, max_size=5))
def test_kv_policy_follows_the_protocol(keys: list[int], capacity: int, sizes: list[int], chained: bool,
                                        cut: list[bool]) -> None:
    # a takeover loads keys as one entry each: only for a caller whose keys all are (the simulator);
    # (0.0, 1): a takeover whenever another expert tops the panel for an epoch, so most unit runs have some
    unit = set(sizes) == {1}
    policy: KVPolicy[int] = KVPolicy(capacity, epoch=8, window=64, takeover=(0.0, 1) if unit else None)
    parents = chain(keys, cut) if chained else None
    model: dict[int, int] = {}  # what the tier holds, as the driver sees it: key -> size
    for i, key in enumerate(keys):
        size = sizes[key % len(sizes)]
        before, takeovers = set(policy._resident), policy.takeovers
        hit = access(policy, key, float(i), capacity, size, None if parents is None else parents[i])
        assert hit == (key in model)
        for gone in before - set(policy._resident):
            del model[gone]
        loaded = set(policy._resident) - before - {key}
        if loaded or (key in policy and key not in model and policy.takeovers > takeovers):
            # only a takeover brings in keys of its own, all of them unit-size (the tier held only such)
            assert policy.takeovers == takeovers + 1 and all(v == 1 for v in model.values())
            model.update((k, 1) for k in loaded)
        if key in policy:
            model[key] = model.get(key, size)
        assert policy.used == sum(model.values()) <= capacity
        assert set(model) == set(policy._resident) and len(policy) == len(model)


@settings(max_examples=60, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 40), chained=st.booleans(),
       cut=st.lists(st.booleans(), min_size=1, max_size=5), pieces=st.integers(1, 3),
       takeover=st.sampled_from([None, (0.0, 1), (0.05, 2), TAKEOVER]))
def test_kv_batch_replay_makes_the_protocols_decisions(keys: list[int], capacity: int, chained: bool,
                                                       cut: list[bool], pieces: int,
                                                       takeover: tuple[float, int] | None) -> None:
    # (0.0, 1): a takeover whenever another expert tops the panel for an epoch, so most examples have some
    options: dict[str, Any] = {"epoch": 5, "window": 60, "prediction_window": 8, "takeover": takeover}
    parents = chain(keys, cut) if chained else None
    slow: KVPolicy[int] = KVPolicy(capacity, **options)
    expected = per_access(slow, keys, parents)
    kinds = [False, True] if AVAILABLE else [False]
    for compiled in kinds:
        fast: KVPolicy[int] = KVPolicy(capacity, compiled=compiled, **options)
        step = -(-len(keys) // pieces)
        got = bytearray()
        for start in range(0, len(keys), step):
            got += fast.simulate(keys[start:start + step], None if parents is None else parents[start:start + step])
        assert got == expected
        assert fast.leader == slow.leader and fast.scores == slow.scores
        assert list(fast._resident) == list(slow._resident) and list(fast._outside) == list(slow._outside)
        assert (fast.takeovers, fast.loaded, fast.switches) == (slow.takeovers, slow.loaded, slow.switches)
        assert fast._children == slow._children and fast._parent == slow._parent


def _phases(capacity: int) -> list[int]:
    """A shared hot set the LRFU expert keeps, then a loop 1.5x the cache, which LRU-like experts miss entirely."""
    rng = np.random.default_rng(3)
    hot = [int(k) for k in rng.integers(0, capacity // 2, 6000)]
    cold = [10_000 + i for i in range(6000)]
    first = [k for pair in zip(hot, cold, strict=True) for k in pair]
    return first + list(range(20_000, 20_000 + capacity * 3 // 2)) * 40


@pytest.mark.parametrize("compiled", [False, True] if AVAILABLE else [False])
def test_a_takeover_makes_the_tier_a_copy_of_the_expert(compiled: bool) -> None:
    capacity = 64
    keys = _phases(capacity)
    policy: KVPolicy[int] = KVPolicy(capacity, epoch=16, window=512, compiled=compiled, takeover=(0.05, 4))
    before = KVPolicy[int](capacity, epoch=16, window=512, compiled=compiled, takeover=None)
    copies = 0
    hits = without = 0
    for start in range(0, len(keys), 16):  # one epoch a call: check the tier at every epoch's end
        chunk = keys[start:start + 16]
        leader, copy = policy.leader, policy._copy_of
        if copy >= 0:  # the tier is an exact copy of the expert it follows: same keys, same hits
            expert = policy.experts[copy]
            assert set(policy._resident) == set(expert) and not policy._outside
            expected = [key in expert for key in chunk[:1]]  # the expert's own answer for the next access
        got = policy.simulate(chunk)
        if copy >= 0:
            assert bool(got[0]) == expected[0]
            copies += leader != "lrfu"
        hits += sum(got)
        without += sum(before.simulate(chunk))
    assert policy.takeovers >= 1 and policy.loaded >= 1 and copies > 0  # it took over something besides lrfu
    assert hits > without  # and following a copy beats following decisions on old contents here


def test_the_takeover_rule_needs_a_lead_kept_for_its_epochs() -> None:
    rule = TakeoverRule(0.1, 3)
    assert [rule.step([10.0, 12.0], 0, 0) for _ in range(4)] == [-1, -1, 1, -1]  # 20% ahead for 3 epochs, then anew
    rule = TakeoverRule(0.1, 3)
    assert [rule.step([10.0, s], 0, 0) for s in (12.0, 10.5, 12.0, 12.0)] == [-1, -1, -1, -1]  # lead lost once
    assert rule.step([10.0, 12.0], 0, 0) == 1
    rule = TakeoverRule(0.0, 1)
    assert rule.step([5.0, 1.0], 0, 0) == -1  # the copy is the top scorer already
    assert rule.step([5.0, 1.0], 0, -1) == 0  # the leader, not copied (after a paid switch): copy it
    assert rule.step([5.0, 4.5], 1, -1) == -1  # half a hit ahead is no lead
    rule = TakeoverRule(0.0, 1, warmup=2, floor=10.0)
    assert [rule.step([5.0, s], 0, 0) for s in (20.0, 20.0, 9.0, 20.0)] == [-1, -1, -1, 1]  # warm-up, floor
    rule = TakeoverRule(0.0, 1, 3.0)
    assert rule.step([100.0, 120.0], 0, 0) == -1  # 20 ahead, noise 3 x sqrt(220) = 44.5
    assert rule.step([100.0, 150.0], 0, 0) == 1
    with pytest.raises(ConfigError):
        TakeoverRule(-0.1, 3)
    with pytest.raises(ConfigError):
        TakeoverRule(0.1, 0)


@settings(max_examples=40, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 40))
def test_lrfu_batches_report_what_single_accesses_do(keys: list[int], capacity: int) -> None:
    for make in (lambda: ShadowLRFU[int](capacity, 3.0 * capacity), lambda: AdaptiveLRFU[int](capacity, epoch=7)):
        one, batch = make(), make()
        hits, gone = 0, []
        for i, key in enumerate(keys):
            hits += key in one
            out = one.access(key)
            if out is not None:
                gone.append((i, out))
        evicted: Evictions[int] = []
        assert batch.run(keys, evicted) == hits
        assert evicted == gone and list(one) == list(batch)
        assert len(list(batch)) <= capacity


def test_lrfu_orders_by_decayed_count() -> None:
    lrfu: ShadowLRFU[str] = ShadowLRFU(2, half_life=4)
    for key in "aaab":
        lrfu.access(key)
    assert lrfu.access("c") == "b"  # b: count 1, a: about 3
    lfu_like: ShadowLRFU[str] = ShadowLRFU(2, half_life=1_000_000)  # counts barely decay: LFU
    lru_like: ShadowLRFU[str] = ShadowLRFU(2, half_life=1)  # counts halve every access: LRU
    for shadow in (lfu_like, lru_like):
        for key in "aaab":
            shadow.access(key)
    assert lfu_like.access("c") == "b"  # a was used 3 times, b once
    assert lru_like.access("c") == "a"  # a was used last 1 access before b


def test_kv_policy_is_deterministic_and_wins_on_a_shared_prefix_stream() -> None:
    rng = np.random.default_rng(7)
    keys: list[int] = []
    for request in range(3000):  # a shared 8-block system prompt, then one-off blocks
        keys += list(range(8)) if rng.random() < 0.3 else []
        keys += [1000 + 20 * request + j for j in range(int(rng.integers(1, 20)))]
    runs = [KVPolicy[int](16).simulate(keys) for _ in range(2)]
    assert runs[0] == runs[1]
    lru = make_policy("lru")
    lru_hits = sum(access(lru, k, float(i), 16) for i, k in enumerate(keys))
    assert sum(runs[0]) > 1.5 * lru_hits


def test_the_store_can_pick_the_kv_policy() -> None:
    assert "kv" in EVICTION_POLICIES
    policy = make_policy("kv", capacity=1 << 20, block_size=1 << 12)
    assert isinstance(policy, KVPolicy) and policy.name == "kv"
    assert access(policy, "a", 0.0, 1 << 20, 1 << 12) is False and access(policy, "a", 1.0, 1 << 20, 1 << 12)
    with pytest.raises(ConfigError):
        make_policy("kv")  # it needs a capacity


@pytest.mark.skipif(not AVAILABLE, reason="numba is not installed")
@settings(max_examples=40, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 40), half_life=st.sampled_from([1.0, 2.5, 40.0, 1e6]),
       pieces=st.integers(1, 3))
def test_compiled_lrfu_evicts_what_the_python_one_does(keys: list[int], capacity: int, half_life: float,
                                                       pieces: int) -> None:
    from tierstore.predict.compiled_shadows import CompiledLRFU

    reference, twin = ShadowLRFU[int](capacity, half_life * capacity), CompiledLRFU(capacity, half_life * capacity)
    want: Evictions[int] = []
    got: Evictions[int] = []
    step = -(-len(keys) // pieces)
    for n, start in enumerate(range(0, len(keys), step)):
        part = keys[start:start + step]
        assert twin.run(np.asarray(part, dtype=np.int64), got) == reference.run(part, want)
        assert got == want and sorted(twin) == sorted(reference)
        reference.rerank(half_life * (n + 2))
        twin.rerank(half_life * (n + 2))
