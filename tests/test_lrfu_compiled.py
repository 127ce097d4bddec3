"""The compiled LRFU (indexed heap) makes the pure-Python LRFU's (lazy heap) decisions, access for access.

:class:`tierstore.predict.compiled_shadows.CompiledLRFU` keeps one heap entry per resident key and
updates it in place; :class:`tierstore.predict.kv_policy.ShadowLRFU`, the reference, pushes a new
entry per access and skips stale ones. Both must evict the same key at the same access, on random
traces (hypothesis, with re-rankings between pieces) and on the real traces of ``/work/shared/traces``
(when present), alone and inside :class:`tierstore.predict.kv_policy.AdaptiveLRFU`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_predict_batch import traces
from tierstore.predict.compiled_learn import AVAILABLE
from tierstore.predict.kv_policy import AdaptiveLRFU, ShadowLRFU
from tierstore.predict.shadow_caches import Evictions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import replay_formats

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="numba is not installed")

TRACES = Path("/work/shared/traces")
# every trace with keys (the Azure CSVs carry none), the first PREFIX accesses of the long ones
NAMES = ("synthetic_trace.jsonl", "cloudPhysicsIO.csv", "orm-busy.trace.xz", "orm-night.trace.xz", "web07.trace.xz",
         "scarab-recs.trace.xz", "trace_vaultservice.gz", "request.trace.xz", "2_pools.trace.gz", "cpp.trace.gz",
         "cs.trace.gz", "gli.trace.gz", "ps.trace.gz", "multi1.trace.gz", "multi2.trace.gz", "multi3.trace.gz",
         "loop.trace.gz", "scan.trace.gz", "zigzag.trace.gz", "backf.trace.gz")
PREFIX = 60_000


def dense(path: Path, limit: int | None) -> list[int]:
    """The trace's keys as dense ids (first seen, first numbered), as the replay tools pass them."""
    keys = replay_formats.read_trace(path, None, limit).keys
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # ids in order of first appearance
    return [int(k) for k in order[inverse.reshape(-1)].tolist()]


def compare(keys: list[int], capacity: int, half_life: float, pieces: int, rerank: bool) -> int:
    """Replay ``keys`` through both LRFUs in ``pieces`` batches; assert the same hits and evictions; the hits."""
    from tierstore.predict.compiled_shadows import CompiledLRFU

    reference, twin = ShadowLRFU[int](capacity, half_life * capacity), CompiledLRFU(capacity, half_life * capacity)
    step, total = -(-len(keys) // pieces), 0
    for n, start in enumerate(range(0, len(keys), step)):
        part = keys[start:start + step]
        want: Evictions[int] = []
        got: Evictions[int] = []
        hits = reference.run(part, want)
        assert twin.run(np.asarray(part, dtype=np.int64), got) == hits
        assert got == want, f"first differing eviction at piece {n}"
        total += hits
        if rerank:
            reference.rerank(half_life * capacity * (1 + n % 3))
            twin.rerank(half_life * capacity * (1 + n % 3))
    assert sorted(twin) == sorted(reference)
    assert int(twin.ints[3]) == len(list(reference))  # the indexed heap holds exactly the resident keys
    return total


@settings(max_examples=60, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 60), half_life=st.sampled_from([1.0, 1.5, 3.0, 40.0, 1e9]),
       pieces=st.integers(1, 5), rerank=st.booleans())
def test_compiled_lrfu_matches_the_reference_on_random_traces(keys: list[int], capacity: int, half_life: float,
                                                               pieces: int, rerank: bool) -> None:
    compare(keys, capacity, half_life, pieces, rerank)


@settings(max_examples=30, deadline=None)
@given(keys=traces(), capacity=st.integers(1, 40), epoch=st.integers(1, 20))
def test_compiled_adaptive_lrfu_matches_the_reference(keys: list[int], capacity: int, epoch: int) -> None:
    pure = AdaptiveLRFU[int](capacity, epoch=epoch, window=4 * epoch)
    fast = pure.compiled()
    want: Evictions[int] = []
    got: Evictions[int] = []
    assert fast.run(np.asarray(keys, dtype=np.int64), got) == pure.run(keys, want)  # type: ignore[arg-type]
    assert got == want and fast.scores == pure.scores and fast.half_life == pure.half_life


@pytest.mark.parametrize("name", NAMES)
def test_compiled_lrfu_matches_the_reference_on_the_shared_traces(name: str) -> None:
    path = TRACES / name
    if not path.exists():
        pytest.skip(f"{path} is not here")
    keys = dense(path, PREFIX)
    unique = max(keys) + 1
    hits = [compare(keys, max(1, unique * share // 100), half_life, pieces=7, rerank=half_life == 8.0)
            for share in (1, 10) for half_life in (1.0, 8.0)]
    assert sum(hits) > 0 or name in ("loop.trace.gz", "scan.trace.gz")  # the replay did something


def test_compiled_adaptive_lrfu_matches_the_reference_on_mooncake() -> None:
    path = TRACES / "synthetic_trace.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    keys = dense(path, None)  # in full: 121,877 block accesses
    for capacity in (439, 2196):  # 1% and 5% of its 43,924 blocks
        pure = AdaptiveLRFU[int](capacity)
        fast = pure.compiled()
        step = 64 * 1024
        for start in range(0, len(keys), step):
            part = keys[start:start + step]
            want: Evictions[int] = []
            got: Evictions[int] = []
            assert fast.run(np.asarray(part, dtype=np.int64), got) == pure.run(part, want)  # type: ignore[arg-type]
            assert got == want
        assert fast.half_life == pure.half_life and fast.scores == pure.scores
