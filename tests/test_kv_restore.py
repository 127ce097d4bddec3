"""The restore decision's arithmetic (:class:`tierstore.integrations.kv_restore.RestorePolicy`), on made-up speeds.

What each term of the first-token prediction is made of, and where the decision flips; nothing is
timed here (the measured predictions against the truth are in BENCHMARKS.md, prefix reuse).
"""

from __future__ import annotations

import pytest

from tierstore.integrations.kv_restore import RestorePolicy
from tierstore.plan.bandwidth import Bandwidth

GB = 1e9


def speeds(*, disk: float = 2 * GB, memcpy: float = 8 * GB, fresh: float | None = 1 * GB,
           zstd: float = 4 * GB) -> Bandwidth:
    return Bandwidth(disk_read=disk, disk_write=disk, memcpy=memcpy, h2d_pinned=None,
                     decode={"shuffle-zstd": zstd, "blosc-lz4": 2 * zstd}, ratio={}, measured_at=0.0, disk_path="",
                     fresh_copy=fresh)


def test_an_l3_prefix_costs_its_stored_bytes_read_its_bytes_decoded_and_copied_into_new_memory() -> None:
    policy = RestorePolicy(speeds(), per_block_s=1e-3)
    est = policy.estimate(tokens=1000, nbytes=4 * 10**9, stored_bytes=2 * 10**9, blocks=10, tier="L3",
                          codec="shuffle2-zstd1")
    # 2 GB at 2 GB/s from disk, 4 GB decoded at 4 GB/s (the block's codec id names the measured codec),
    # 4 GB copied into the cache's new tensors at 1 GB/s, 10 gets at 1 ms
    assert est.read_s == pytest.approx(1.0 + 1.0 + 4.0 + 0.01)
    assert est.restore_s == pytest.approx(est.read_s)  # no prefill measured: nothing to compute, no rate
    assert est.recompute_s is None and est.restore  # the cheaper side is unknown: restore
    lz4 = policy.estimate(tokens=1000, nbytes=4 * 10**9, stored_bytes=2 * 10**9, blocks=10, codec="blosclz4-2")
    assert lz4.read_s == pytest.approx(1.0 + 0.5 + 4.0 + 0.01)
    raw = policy.estimate(tokens=1000, nbytes=4 * 10**9, blocks=10, codec="raw")  # stored as it is: no decode
    assert raw.read_s == pytest.approx(2.0 + 4.0 + 0.01)


def test_an_l2_prefix_is_a_memcpy_and_the_copy_into_the_cache() -> None:
    est = RestorePolicy(speeds(), per_block_s=0.0).estimate(tokens=10, nbytes=8 * 10**9, blocks=1, tier="L2",
                                                            codec="shuffle2-zstd1")
    assert est.read_s == pytest.approx(1.0 + 8.0)
    unmeasured = RestorePolicy(speeds(fresh=None), per_block_s=0.0)  # an older probe: memcpy for the copy too
    assert unmeasured.estimate(tokens=10, nbytes=8 * 10**9, blocks=1, tier="L2").read_s == pytest.approx(2.0)


def test_unknown_codecs_are_priced_at_the_slowest_measured_decode() -> None:
    policy = RestorePolicy(speeds(zstd=4 * GB))
    assert policy.decode_bytes_per_s("zstd3") == 4 * GB  # plain zstd: the zstd measurement
    assert policy.decode_bytes_per_s("made-up") == 4 * GB
    assert policy.decode_bytes_per_s("raw") is None and policy.decode_bytes_per_s("") is None


def test_the_prompt_past_the_prefix_and_the_attention_over_it_are_counted_on_the_restore_side() -> None:
    policy = RestorePolicy(speeds(), prefill_tokens_per_s=100.0, per_block_s=0.0)
    est = policy.estimate(tokens=900, nbytes=10**9, blocks=1, tier="L2", prompt_tokens=1000,
                          context_bytes=2 * 10**9)
    assert est.recompute_s == pytest.approx(10.0)  # the whole prompt at 100 tokens/s
    # the last 100 of 1000 tokens, a token's cost growing with its position: 1 - 0.9^2 of the prefill,
    # and the attention's copy of the context (2 GB into new memory at 1 GB/s)
    assert est.compute_s == pytest.approx(10.0 * 0.19 + 2.0)
    assert est.read_s == pytest.approx(0.125 + 1.0)
    assert est.restore_s == pytest.approx(est.read_s + est.compute_s) and est.restore


def test_the_decision_flips_with_the_prefill_speed_and_the_measured_reads() -> None:
    policy = RestorePolicy(speeds(), prefill_tokens_per_s=1000.0, per_block_s=0.0)
    kwargs = dict(tokens=16368, nbytes=1_870_000_000, stored_bytes=1_100_000_000, blocks=448, tier="L3",
                  codec="shuffle2-zstd1", prompt_tokens=16384, context_bytes=2 * 1_880_000_000)
    slow_prefill = policy.estimate(**kwargs)  # type: ignore[arg-type]
    assert slow_prefill.restore and slow_prefill.restore_s < slow_prefill.recompute_s  # type: ignore[operator]
    policy.prefill_tokens_per_s = 5_000.0  # a fast accelerator: 3.3 s for the whole prompt
    fast_prefill = policy.estimate(**kwargs)  # type: ignore[arg-type]
    assert not fast_prefill.restore and fast_prefill.read_s == slow_prefill.read_s
    policy.prefill_tokens_per_s = 1000.0
    policy.observe_restore(slow_prefill.read_s, 10 * slow_prefill.read_s)  # type: ignore[arg-type]
    assert policy.read_scale == pytest.approx(10.0)  # restores took 10x the prediction
    scaled = policy.estimate(**kwargs)  # type: ignore[arg-type]
    assert scaled.restore_s == pytest.approx(10 * scaled.read_s + scaled.compute_s)  # type: ignore[operator]
    assert not scaled.restore  # 10x slower reads lose to 16.4 s of prefill
