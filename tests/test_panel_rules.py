"""The predictive policy's panel: LIRS as a shadow expert, and the rule that picks whom to follow."""

from __future__ import annotations

import random
from collections.abc import Iterator

from tierstore.predict.policies import access
from tierstore.predict.predictor import EXPERTS, PredictivePolicy
from tierstore.predict.shadow_caches import ShadowCache, ShadowLIRS, ShadowS3FIFO


def hit_rate(cache: ShadowCache[int], keys: list[int]) -> float:
    hits = 0
    for key in keys:
        hits += key in cache
        cache.access(key)
    return hits / len(keys)


def loop_with_scan() -> list[int]:
    """A loop of 120 keys (longer than a 100-entry cache) with a never-again key every 4th step."""
    keys: list[int] = []
    for rep in range(80):
        for i in range(120):
            keys.append(i)
            if i % 4 == 0:
                keys.append(10_000 + rep * 1000 + i)
    return keys


def test_lirs_worked_example() -> None:
    # capacity 3: two LIR slots and one resident-HIR slot
    cache: ShadowLIRS[str] = ShadowLIRS(3)
    assert [cache.access(k) for k in "abc"] == [None, None, None]  # a, b LIR; c resident HIR
    assert cache.access("d") == "c"  # the HIR queue's front goes; c stays in the stack as a ghost
    assert set(cache) == {"a", "b", "d"}
    # c comes back while remembered: d (resident HIR) goes, c becomes LIR and a (the stack's
    # bottom LIR) is demoted to resident HIR
    assert cache.access("c") == "d"
    assert set(cache) == {"a", "b", "c"} and "d" not in cache
    assert cache.access("e") == "a"  # a is the HIR queue's only key
    assert set(cache) == {"b", "c", "e"}


def test_lirs_keeps_capacity_and_bounds_its_history() -> None:
    rng = random.Random(7)
    for capacity in (2, 9, 50):
        cache: ShadowLIRS[int] = ShadowLIRS(capacity)
        for _ in range(20_000):
            key = rng.randrange(40) if rng.random() < 0.6 else rng.randrange(100_000)
            was_in = key in cache
            gone = cache.access(key)
            assert gone is None or (not was_in and gone not in cache)
            resident = list(cache)
            assert len(resident) <= capacity and all(k in cache for k in resident)
            assert len(cache._stack) <= 4 * capacity + 1  # ghosts are capped at 2x capacity


def test_lirs_beats_s3fifo_on_a_loop_longer_than_the_cache() -> None:
    keys = loop_with_scan()
    assert hit_rate(ShadowLIRS(100), keys) > hit_rate(ShadowS3FIFO(100), keys) + 0.15


def test_panel_includes_lirs_and_follows_it_where_it_leads() -> None:
    assert "lirs" in EXPERTS
    assert "lirs" in [e.name for e in PredictivePolicy[int](100).experts]
    keys = loop_with_scan()
    policy: PredictivePolicy[int] = PredictivePolicy(100, experts=("s3fifo", "lirs"))
    hits = sum(access(policy, key, float(i), 100) for i, key in enumerate(keys))
    assert policy.leader == "lirs"
    assert hits / len(keys) > hit_rate(ShadowS3FIFO(100), keys) + 0.15


class FixedExpert:
    """A shadow expert whose contents the test sets by hand."""

    def __init__(self, name: str, keys: str) -> None:
        self.name, self.keys = name, set(keys)

    def access(self, key: str) -> str | None:
        return None

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)


def panel(scores: list[float]) -> PredictivePolicy[str]:
    """A tier holding a-d, following an expert that holds a-d; challengers far (w-z) and near (a-c, z)."""
    policy: PredictivePolicy[str] = PredictivePolicy(4, experts=("lru", "arc", "s3fifo"))
    policy.experts = [FixedExpert("lead", "abcd"), FixedExpert("far", "wxyz"), FixedExpert("near", "abcz")]
    for key in "abcd":
        policy.insert(key)
    policy.scores = scores
    return policy


def test_switch_goes_to_the_challenger_worth_most_after_its_switching_cost() -> None:
    # "far" scores higher (10 vs 8) but the tier lacks all 4 of its keys: worth 10 - 4 = 6;
    # "near" lacks only z: worth 8 - 1 = 7, so the panel follows "near"
    assert panel([0.0, 10.0, 8.0]).switch_target() == 2
    assert panel([0.0, 10.0, 1.5]).switch_target() == 1  # near is worth 0.5, far 6
    assert panel([0.0, 3.5, 0.5]).switch_target() == 0  # far is worth -0.5, near is not ahead
    policy = panel([0.0, 0.0, 0.0])
    policy._hits = [0, 0, 9]  # an epoch in which only "near" scored; the access to a adds 1 to lead and near
    policy._countdown = 1
    policy.record_access("a", 0.0)
    assert policy.leader == "near" and policy.switches == 1
    assert policy.victim() == "d"  # the resident key the new leader does not hold goes first
