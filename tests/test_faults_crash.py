"""Crashes: a writer SIGKILLed at random moments (some while it opens and recovers), checked after each kill.

The quick profile runs in the normal suite. The long profile (>= 1,000 kills) runs with ``-m slow`` and
``TIERSTORE_FAULT_KILLS=N`` (default 1000 when the env var is unset but the slow tests are enabled with
``TIERSTORE_SLOW_TESTS=1``). See ``tests/faultlib.py`` for the worker, the model and the checks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests import faultlib


def _report(result: faultlib.CrashResult) -> str:
    return (f"{result.kills} kills ({result.kills_while_opening} while opening/recovering), {result.acked} "
            f"acknowledged ops {dict(sorted(result.ops_by_kind.items()))}, {result.unacked_committed} in-flight "
            f"ops found committed, {result.recoveries_with_work} recoveries with work, {result.seconds:.0f} s")


def test_model_rejects_half_applied_operations() -> None:
    """The checker itself: a transaction seen half-applied, or a lost acknowledged write, must fail."""
    t = 1
    while faultlib.plan(t).kind != "txn" or len(faultlib.plan(t).puts) < 2:
        t += 1
    op = faultlib.plan(t)
    acked = {"f/k0": 0} if "f/k0" not in op.puts + op.deletes else {"f/k11": 0}
    half = dict(acked)
    half[op.puts[0]] = t
    with pytest.raises(AssertionError, match="neither"):
        faultlib.resolve(half, acked, op)
    lost: dict[str, int] = {}
    with pytest.raises(AssertionError, match="neither"):
        faultlib.resolve(lost, acked, op)
    assert faultlib.resolve(faultlib.apply(acked, op), acked, op) is True
    assert faultlib.resolve(acked, acked, op) is False


def test_plan_covers_every_operation_kind() -> None:
    kinds = {faultlib.plan(t).kind for t in range(1, 200)}
    assert kinds == {"put", "delete", "txn", "rollback", "volatile", "maint"}
    sizes = [len(faultlib.block_bytes(t, k)[1]) for t in range(1, 40) for k in faultlib.KEYS]
    assert min(sizes) < 4096 and max(sizes) > 256 * 1024, "the mix needs packed and per-block arrays"


def test_sigkill_quick_profile(tmp_path: Path) -> None:
    seed = int(os.environ.get("TIERSTORE_FAULT_SEED", "8"))
    result = faultlib.run_crashes(tmp_path, kills=8, seed=seed, patience=0.5)
    print("crash quick profile:", _report(result))
    assert result.kills == 8
    assert result.kills_while_opening >= 1
    assert result.acked >= 5


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("TIERSTORE_SLOW_TESTS") or os.environ.get("TIERSTORE_FAULT_KILLS")),
                    reason="long profile: set TIERSTORE_SLOW_TESTS=1 or TIERSTORE_FAULT_KILLS=N (~10 min here)")
def test_sigkill_long_profile(tmp_path: Path) -> None:
    kills = int(os.environ.get("TIERSTORE_FAULT_KILLS", "1000"))
    seed = int(os.environ.get("TIERSTORE_FAULT_SEED", "1"))
    result = faultlib.run_crashes(tmp_path, kills=kills, seed=seed, rw_check_every=2,
                                  deadline=time.monotonic() + 3 * 3600)
    print("crash long profile:", _report(result))
    assert result.kills == kills
    assert result.kills_while_opening >= kills // 20
    assert result.recoveries_with_work >= 1


@pytest.mark.skipif(not faultlib.crash_points(),
                    reason="this build has no named crash points (tierstore.engine.migrator.CRASH_POINTS)")
def test_sigkill_at_every_named_crash_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers kill themselves at each named step of a move (TIERSTORE_CRASH_AT, set in the worker only: this
    process opens the store too); most operations are maintenance (prefetch, pin, migrate, compact, gc)."""
    points = faultlib.crash_points()
    monkeypatch.setattr(faultlib, "MAINT_SHARE", 0.7)  # the workers get the same mix through the environment
    rounds = int(os.environ.get("TIERSTORE_CRASH_POINT_ROUNDS", "2"))
    result = faultlib.run_crashes(tmp_path, kills=rounds * len(points), seed=11, crash_points=points,
                                  worker_env={"TIERSTORE_FAULT_MAINT": "0.7"}, patience=1.5)
    print("named crash points:", _report(result), f"died at each point: {result.points_hit}")
    assert set(result.points_hit) == set(points), f"points never reached: {set(points) - set(result.points_hit)}"
