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
                    reason="this build has no named crash points (tierstore.migrator.CRASH_POINTS)")
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


def test_a_kill_during_the_first_open_leaves_no_half_made_catalog(tmp_path: Path) -> None:
    """SIGKILL before the last schema script of a first open: no catalog at an early schema version is left;
    a read-only open says what to do (typed), and the next read-write open creates the store whole."""
    import signal
    import sqlite3

    import torch

    import tierstore
    from tierstore import catalog

    store = tmp_path / "s"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        scripts = catalog.schema_scripts()

        def dying() -> object:
            for i, script in enumerate(scripts):
                if i == len(scripts) - 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield script

        catalog.schema_scripts = dying  # type: ignore[assignment]
        try:
            tierstore.open(store, l2_cache_size=0)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    path = store / "catalog.sqlite"
    if path.exists():
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == catalog.SCHEMA_VERSION
    with pytest.raises(tierstore.StoreNotFoundError, match="open it read-write once"):
        tierstore.open(store, readonly=True)
    with tierstore.open(store, l2_cache_size=0) as db:
        db.put("k", torch.ones(4))
    with tierstore.open(store, readonly=True) as db:
        assert torch.equal(db.get("k"), torch.ones(4))
    assert not (store / "catalog.sqlite.tmp").exists()
    faultlib.verify_clean(store)


def test_an_empty_catalog_opened_read_only_gives_advice_that_works(tmp_path: Path) -> None:
    import torch

    import tierstore

    fresh = tmp_path / "fresh"  # no data: creating it is the way out
    fresh.mkdir()
    (fresh / "catalog.sqlite").write_bytes(b"")
    with pytest.raises(tierstore.SchemaVersionError, match="open it read-write once to create it"):
        tierstore.open(fresh, readonly=True)
    with tierstore.open(fresh, l2_cache_size=0) as db:
        db.put("k", torch.ones(2))
    with tierstore.open(fresh, readonly=True) as db:
        assert torch.equal(db.get("k"), torch.ones(2))
    lost = tmp_path / "lost"  # data beside an emptied catalog: a read-write open would not help
    with tierstore.open(lost, l2_cache_size=0) as db:
        db.put("k", torch.ones(2))
    (lost / "catalog.sqlite").write_bytes(b"")
    for extra in lost.glob("catalog.sqlite-*"):
        extra.unlink()
    for readonly in (True, False):
        with pytest.raises(tierstore.CatalogError, match="restore the catalog from a backup"):
            tierstore.open(lost, readonly=readonly)
