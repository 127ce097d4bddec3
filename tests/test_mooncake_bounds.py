"""The oracle bounds in tools/mooncake_bounds.py on tiny traces with known answers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import mooncake_bounds as mb
from replay_policies import lru


def test_next_gaps() -> None:
    assert mb.next_gaps([1, 2, 1, 3, 2]) == [2, 3, 1 << 40, 1 << 40, 1 << 40]


def test_keep_everything_is_plain_lru() -> None:
    rng = np.random.default_rng(3)
    keys = [int(k) for k in rng.integers(0, 40, 2000)]
    for capacity in (1, 5, 20):
        assert mb.lru_with_oracle(keys, capacity, lambda i: True) == sum(lru(keys, 40, capacity, lambda _: None))


def test_dead_block_oracle_never_loses_and_helps_on_one_timers() -> None:
    # a hot pair interleaved with keys seen once: LRU of 2 loses the pair, the oracle keeps it
    keys: list[int] = []
    for i in range(50):
        keys += [0, 1, 100 + i]
    gaps = mb.next_gaps(keys)
    reused = lambda i: gaps[i] < len(keys)  # noqa: E731
    assert sum(lru(keys, 200, 2, lambda _: None)) == 0
    assert mb.lru_with_oracle(keys, 2, reused) == 98
    assert mb.lfu_with_oracle(keys, 2, reused) == 98
    assert mb.reject_when_full_with_oracle(keys, 2, reused) == 98


def test_fixed_set_on_a_loop() -> None:
    keys = list(range(10)) * 5
    assert mb.reject_when_full_with_oracle(keys, 3, lambda i: True) == 3 * 4


def test_measure_on_a_tiny_jsonl(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    requests = [[0, 1, 2], [0, 1, 3], [4, 5], [0, 1, 2, 6], [4, 5, 7]] * 4
    trace.write_text("\n".join(json.dumps({"timestamp": i, "hash_ids": ids}) for i, ids in enumerate(requests)))
    results = mb.measure(trace, ["50%"])
    row = results["capacities"]["50%"]
    assert 0.0 <= row["lru"] <= row["opt"] <= 1.0
    assert row["dead_block_oracle"]["lru"] >= row["lru"]
    assert "turn gaps" in mb.report(results)
