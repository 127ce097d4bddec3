"""Eviction policies, the predictor and the trace-replay tool, on tiny traces with known answers."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import random
import sys
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tierstore.errors import ConfigError, TierFullError
from tierstore.predict.policies import FIFO, LFU, LRU, Policy, access, make_policy
from tierstore.predict.predictor import AccessPatternTracker, PredictivePolicy, SimpleMLPredictor
from tierstore.predict.shadow_caches import ShadowARC, ShadowCache, ShadowLRU, ShadowS3FIFO, ShadowWTinyLFU

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import replay  # noqa: E402
import replay_formats  # noqa: E402
import replay_policies  # noqa: E402

# Silberschatz's reference string: 3 frames give FIFO 15 faults, LRU 12, OPT 9 with demand paging,
# and 8 when OPT may decline to cache a key (bypass), as the simulator's OPT does (checked by brute force).
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def replay_policy(policy: Policy[Any], keys: Sequence[Hashable], capacity: int,
                  parents: Sequence[Hashable | None] | None = None) -> list[bool]:
    return [access(policy, key, float(i), capacity, 1, None if parents is None else parents[i])
            for i, key in enumerate(keys)]


def simulate(name: str, keys: Sequence[int], capacity: int) -> list[int]:
    dense = np.unique(np.asarray(keys), return_inverse=True)[1].reshape(-1).tolist()
    return list(replay_policies.SIMULATORS[name](dense, max(dense) + 1, capacity, lambda done: None))


def zipf_trace(n: int, universe: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.2, size=n) % universe
    scan = np.arange(universe, universe + n // 4)  # one-hit wonders mixed in
    keys = np.concatenate([ranks, scan])
    rng.shuffle(keys)
    return [int(k) for k in keys]


# --- classic policies --------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "faults"), [(LRU, 12), (FIFO, 15)])
def test_textbook_faults(policy: Callable[[], Policy[int]], faults: int) -> None:
    hits = replay_policy(policy(), TEXTBOOK, 3)
    assert len(TEXTBOOK) - sum(hits) == faults


@pytest.mark.parametrize(("name", "faults"), [("lru", 12), ("fifo", 15), ("opt", 8)])
def test_reference_simulators_textbook(name: str, faults: int) -> None:
    assert len(TEXTBOOK) - sum(simulate(name, TEXTBOOK, 3)) == faults


def test_lfu_evicts_least_frequent_then_least_recent() -> None:
    lfu: LFU[str] = LFU()
    replay_policy(lfu, ["a", "a", "b", "c"], 2)  # b (count 1) goes, not a (count 2)
    assert "a" in lfu and "c" in lfu and "b" not in lfu
    ties: LFU[str] = LFU()
    replay_policy(ties, ["x", "y", "z"], 2)  # equal counts: the least recently used goes
    assert set(ties._sizes) == {"y", "z"}
    assert ties.victim() == "y"


def test_classic_policies_match_reference_simulators() -> None:
    keys = zipf_trace(3000, 300, seed=1)
    for name, make in (("lru", LRU), ("fifo", FIFO), ("lfu", LFU)):
        ours = [int(h) for h in replay_policy(make(), keys, 40)]
        assert ours == simulate(name, keys, 40), name


def test_byte_capacity_and_removal() -> None:
    lru: LRU[str] = LRU()
    access(lru, "big", 0.0, 10, size=6)
    access(lru, "small", 1.0, 10, size=3)
    access(lru, "mid", 2.0, 10, size=4)  # 6+3+4 > 10: "big" goes
    assert "big" not in lru and lru.used == 7
    lru.remove("small")
    lru.remove("never-there")
    assert lru.used == 4 and len(lru) == 1
    assert access(lru, "huge", 3.0, 10, size=11) is False and "huge" not in lru


def test_empty_victim_raises_tier_full() -> None:
    policies: list[Policy[str]] = [LRU(), FIFO(), LFU(), PredictivePolicy(4)]
    for policy in policies:
        with pytest.raises(TierFullError):
            policy.victim()


def test_make_policy() -> None:
    assert isinstance(make_policy("LRU"), LRU)
    assert isinstance(make_policy("fifo"), FIFO)
    assert isinstance(make_policy("lfu"), LFU)
    assert isinstance(make_policy("predictive", capacity=8), PredictivePolicy)
    with pytest.raises(ConfigError):
        make_policy("predictive")
    with pytest.raises(ConfigError):
        make_policy("mru")


# --- ARC, S3-FIFO, W-TinyLFU, OPT -------------------------------------------------------------


def test_opt_bounds_every_policy() -> None:
    keys = zipf_trace(4000, 400, seed=2)
    best = sum(simulate("opt", keys, 50))
    for name in ("lru", "fifo", "lfu", "arc", "s3fifo", "wtinylfu"):
        assert sum(simulate(name, keys, 50)) <= best, name


def test_scan_resistant_policies_beat_lru_on_hot_set_plus_scan() -> None:
    hot = list(range(20))
    keys: list[int] = []
    for burst in range(60):  # a hot set touched twice, then a burst of never-again keys
        keys += hot + hot + list(range(1000 + 30 * burst, 1000 + 30 * burst + 30))
    lru = sum(simulate("lru", keys, 30))
    for name in ("arc", "s3fifo", "wtinylfu"):
        assert sum(simulate(name, keys, 30)) > lru, name


@pytest.mark.parametrize("shadow", [ShadowLRU, ShadowARC, ShadowS3FIFO, ShadowWTinyLFU])
def test_shadows_reproduce_reference_simulators(shadow: Callable[[int], ShadowCache[int]]) -> None:
    keys = zipf_trace(4000, 500, seed=3)
    dense = np.unique(np.asarray(keys), return_inverse=True)[1].reshape(-1).tolist()
    for capacity in (7, 60):
        cache = shadow(capacity)
        ours = []
        for key in dense:
            ours.append(int(key in cache))
            gone = cache.access(key)
            assert gone is None or gone not in cache
            assert sum(1 for _ in cache) <= capacity
        assert ours == simulate(cache.name, keys, capacity), (cache.name, capacity)


# --- predictor and predictive policy ------------------------------------------------------------


def test_tracker_statistics_and_successors() -> None:
    tracker: AccessPatternTracker[str] = AccessPatternTracker(window=4)
    for i, key in enumerate(["a", "b", "a", "b", "a", "c"]):
        tracker.record(key, now=10.0 * i)
    stats = tracker.stats("a")
    assert stats is not None and stats.count == 3 and stats.last_tick == 5 and stats.gap == 2.0
    assert stats.time_gap == pytest.approx(20.0)
    assert tracker.stats("zzz") is None
    assert tracker.recent() == ["a", "b", "a", "c"]
    assert tracker.in_window("a") == 2
    assert tracker.successors("b") == [("a", 1.0)]
    assert dict(tracker.successors("a")) == pytest.approx({"b": 2 / 3, "c": 1 / 3})


def test_successor_table_is_bounded() -> None:
    tracker: AccessPatternTracker[int] = AccessPatternTracker(max_successors=2)
    for other in range(1, 50):
        tracker.record(0, 0.0)
        tracker.record(other, 0.0)
    assert len(tracker.successors(0)) <= 2


def test_predictor_learns_reuse_and_gates_successors() -> None:
    tracker: AccessPatternTracker[int] = AccessPatternTracker()
    predictor = SimpleMLPredictor(tracker, horizon=50, threshold=0.7)
    rng = random.Random(0)
    fresh = 10_000
    for _ in range(300):  # a loop of 10 keys, interleaved with one-hit wonders
        for key in range(10):
            tracker.record(key, 0.0)
            predictor.observe(key)
            fresh += 1
            tracker.record(fresh, 0.0)
            predictor.observe(fresh)
    assert predictor.samples > 1000
    assert predictor.reuse_probability(3) > 0.7 > predictor.reuse_probability(fresh)
    assert predictor.likely_successors(3) == []  # 3 is followed by a fresh key every time
    for _ in range(50):
        for key in (100, 101):
            tracker.record(key, float(rng.random()))
            predictor.observe(key)
    [(successor, probability)] = predictor.likely_successors(100)
    assert successor == 101 and probability == pytest.approx(1.0)
    expected = predictor.expected_next_access(5)
    assert expected is not None
    assert predictor.expected_next_access(-1) is None


def test_tracker_without_window_or_successors_keeps_the_same_statistics() -> None:
    full: AccessPatternTracker[int] = AccessPatternTracker(window=8)
    lean: AccessPatternTracker[int] = AccessPatternTracker(0, max_successors=0)  # the policy's tracker
    rng = random.Random(1)
    for i in range(500):
        key = rng.randrange(40)
        full.record(key, float(i))
        lean.record(key, float(i))
    for key in range(40):
        assert lean.stats(key) == full.stats(key)
    assert lean.recent() == [] and lean.in_window(3) == 0 and lean.successors(3) == []
    assert full.successors(3) and len(full.recent()) == 8


def test_predictor_samples_a_share_of_the_accesses_at_random() -> None:
    """Training on every n-th access would alias with the loop below (keys on odd ticks only)."""
    counts: dict[int, int] = {}
    for every in (1, 2, 4):
        tracker: AccessPatternTracker[int] = AccessPatternTracker(0, max_successors=0)
        predictor = SimpleMLPredictor(tracker, horizon=50, sample_every=every)
        fresh = 10_000
        for _ in range(300):
            for key in range(10):
                for k in (key, fresh):
                    tracker.record(k, 0.0)
                    predictor.observe(k)
                fresh += 1
        counts[every] = predictor.samples
        assert predictor.reuse_probability(3) > 0.7 > predictor.reuse_probability(fresh - 1)
        assert len(predictor.weights) == len(predictor.features(3)) == 6
    assert counts[1] > 5000 and 0.4 < counts[2] / counts[1] < 0.6 and 0.15 < counts[4] / counts[1] < 0.35


def loop_trace(length: int, passes: int) -> list[int]:
    return list(range(length)) * passes


def test_predictive_beats_lru_on_a_loop() -> None:
    keys = loop_trace(120, 30)
    capacity = 30
    lru = sum(replay_policy(LRU(), keys, capacity))
    policy: PredictivePolicy[int] = PredictivePolicy(capacity)
    ours = sum(replay_policy(policy, keys, capacity))
    best = sum(simulate("opt", keys, capacity))
    assert lru == 0
    assert ours >= 0.8 * best
    assert len(policy) <= capacity and policy.used == len(policy)


def test_predictive_stays_within_capacity_and_is_deterministic() -> None:
    keys = zipf_trace(3000, 300, seed=4)
    runs = []
    for _ in range(2):
        policy: PredictivePolicy[int] = PredictivePolicy(40)
        hits = replay_policy(policy, keys, 40)
        assert len(policy) <= 40
        runs.append(hits)
    assert runs[0] == runs[1]
    assert sum(runs[0]) <= sum(simulate("opt", keys, 40))


def test_predictive_evicts_chain_tails_first() -> None:
    policy: PredictivePolicy[str] = PredictivePolicy(3)
    replay_policy(policy, ["a", "b", "c"], 3, parents=[None, "a", "b"])
    assert policy.victim() == "c"  # "a" is the oldest, but "b" and "c" are useless without it
    access(policy, "x", 3.0, 3)
    assert set(policy._resident) == {"a", "b", "x"}
    policy.remove("b")
    assert policy.victim() == "a"


# --- trace formats and the replay tool --------------------------------------------------------


def test_trace_readers(tmp_path: Path) -> None:
    keys = np.array([5, 1, 5, 70000, 2], dtype=">i4")
    (tmp_path / "orm-test.trace.xz").write_bytes(lzma.compress(keys.tobytes()))
    (tmp_path / "scarab-test.trace.xz").write_bytes(lzma.compress(keys.astype(">i8").tobytes()))
    (tmp_path / "trace_vaultservice.gz").write_bytes(gzip.compress(keys.astype(">i8").tobytes()))
    (tmp_path / "multi9.trace.gz").write_bytes(gzip.compress(b"*comment\n5\n1\n*x\n5\n70000\n2\n"))
    (tmp_path / "keys.txt").write_text("5\n1\n5\n70000\n2\n")
    (tmp_path / "cloudPhysicsIO.csv").write_text(
        "version,time,op,size,lbn\n" + "".join(f"1,0,2a,512,{k}\n" for k in keys))
    (tmp_path / "request.trace.xz").write_bytes(lzma.compress(b"1 5 10\n2 1 10\n3 5 10\n4 5 20\n"))
    lines = [{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1, 2, 3]},
             {"timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": [1, 2, 9]}]
    (tmp_path / "synthetic_trace.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")

    expected = [5, 1, 5, 70000, 2]
    for name, fmt in (("orm-test.trace.xz", "int32"), ("scarab-test.trace.xz", "int64"),
                      ("trace_vaultservice.gz", "int64"), ("multi9.trace.gz", "lirs"),
                      ("keys.txt", "text"), ("cloudPhysicsIO.csv", "cloudphysics")):
        assert replay_formats.guess_format(tmp_path / name) == fmt
        assert replay_formats.read_trace(tmp_path / name).keys.tolist() == expected, name
    assert replay_formats.read_trace(tmp_path / "orm-test.trace.xz", limit=2).keys.tolist() == [5, 1]
    request = replay_formats.read_trace(tmp_path / "request.trace.xz")
    assert replay_formats.guess_format(tmp_path / "request.trace.xz") == "adaptsize"
    assert request.keys[0] == request.keys[2] != request.keys[3]  # key = (id, size)
    mooncake = replay_formats.read_trace(tmp_path / "synthetic_trace.jsonl")
    assert mooncake.keys.tolist() == [1, 2, 3, 1, 2, 9]
    assert mooncake.request is not None and mooncake.request.tolist() == [0, 0, 0, 1, 1, 1]


def test_prefix_hits_stop_at_first_miss() -> None:
    hits = np.array([1, 1, 0, 1, 0, 1, 1, 1], dtype=np.uint8)
    request = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    assert replay.prefix_hits(hits, request) == 4  # 2 from request 0, none from 1, 2 from 2
    parents = replay.chain_parents(np.array([7, 8, 9, 7]), np.array([0, 0, 0, 1]))
    assert parents == [-1, 7, 8, -1]


def test_replay_json_output(tmp_path: Path) -> None:
    trace = tmp_path / "synthetic_trace.jsonl"
    rng = random.Random(5)
    all_keys: list[int] = []
    with trace.open("w") as f:
        for t in range(60):
            ids = [*rng.choice([[1, 2, 3], [4, 5], [1, 2, 6]]), 100 + t]
            all_keys += ids
            f.write(json.dumps({"timestamp": t, "hash_ids": ids}) + "\n")
    printed: list[str] = []
    code = replay.main([str(trace), "--capacity", "10%,5", "--policy", "lru,arc,opt,predictive,kv",
                        "--json", "--quiet", "--prefix-aware"], out=printed.append)
    assert code == 0
    document = json.loads(printed[0])
    assert document["trace"] == "synthetic_trace.jsonl"
    assert document["accesses"] == len(all_keys)
    assert document["unique"] == len(set(all_keys))
    assert set(document["results"]) == {"lru", "arc", "opt", "predictive", "kv"}
    for rates in document["results"].values():
        assert set(rates) == {"10%", "5"}
        assert all(0.0 <= rate <= 1.0 for rate in rates.values())
    for name, rates in document["prefix_results"].items():
        assert all(rates[c] <= document["results"][name][c] for c in rates)
    assert document["results"]["opt"]["5"] >= document["results"]["lru"]["5"]


def test_replay_text_output(tmp_path: Path) -> None:
    trace = tmp_path / "tiny.txt"
    trace.write_text("\n".join(str(k) for k in loop_trace(20, 10)))
    buffer = io.StringIO()
    replay.main([str(trace), "--capacity", "25%", "--policy", "lru,opt", "--quiet"],
                out=lambda line: buffer.write(line + "\n"))
    text = buffer.getvalue()
    assert "lru" in text and "opt" in text and "0.000" in text
