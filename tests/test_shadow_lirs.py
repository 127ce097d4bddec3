"""LIRS as a shadow expert of the predictive policy's panel (tierstore.shadow_caches.ShadowLIRS)."""

from __future__ import annotations

import random

from tierstore.policies import access
from tierstore.predict import EXPERTS, PredictivePolicy
from tierstore.shadow_caches import ShadowCache, ShadowLIRS, ShadowS3FIFO


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
