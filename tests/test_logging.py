"""Background failures are logged through named loggers (the library adds no handler) and kept in stats()."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import tierstore
from tierstore.config import CacheConfig, SharedCredentials
from tierstore.history import Access, AccessRecorder
from tierstore.shared import LocalBlock, SharedCoordinator

_LIVENESS = 60.0  # a bound on waiting for a background thread, far above what it needs: not a timing assertion


def _wait_for(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + _LIVENESS
    while not check():
        assert time.monotonic() < deadline, "the background thread never got there"
        time.sleep(0.01)


def test_library_configures_no_handlers(tmp_path: Path) -> None:
    """In a fresh interpreter (the CLI, an application, adds its own handler): using the library adds none."""
    code = ("import logging, torch, tierstore\n"
            f"with tierstore.open({str(tmp_path / 's')!r}) as db:\n"
            "    db['k'] = torch.ones(2); db['k']\n"
            "names = ('tierstore', 'tierstore.history', 'tierstore.migrator', 'tierstore.shared')\n"
            "print(sum(len(logging.getLogger(n).handlers) for n in names), len(logging.getLogger().handlers))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.split() == ["0", "0"]


def test_history_writer_failure_is_logged_once_and_kept(caplog: pytest.LogCaptureFixture) -> None:
    failing = threading.Event()
    failing.set()
    written: list[Access] = []

    def sink(batch: list[Access]) -> None:
        if failing.is_set():
            raise OSError(28, "No space left on device")
        written.extend(batch)

    caplog.set_level(logging.INFO, logger="tierstore.history")
    recorder = AccessRecorder(sink, interval=0.01)
    try:
        recorder.record("k", "get", "L2")
        _wait_for(lambda: recorder.last_error is not None)
        recorder.record("k", "get", "L2")
        _wait_for(lambda: len([r for r in caplog.records if r.name == "tierstore.history"]) >= 1)
        time.sleep(0.05)  # a few more failing rounds: still only one warning for the same error
        failing.clear()
        _wait_for(lambda: recorder.last_error is None and len(written) == 2)
    finally:
        recorder.close()
    ours = [r for r in caplog.records if r.name == "tierstore.history"]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert any(r.levelno == logging.INFO and "works again" in r.getMessage() for r in ours)


def test_migrator_failure_is_logged_and_in_stats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size="4MiB") as db:
        db.put("big", torch.randn(1 << 18))
    for chunk in (p for p in (store / "l3").rglob("*") if p.is_file() and p.name != "zarr.json"):
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(data)
    caplog.set_level(logging.WARNING, logger="tierstore.migrator")
    with tierstore.open(store, l2_cache_size="4MiB") as db:
        assert db.info("big").tiers == ("L3",)
        with pytest.raises(tierstore.CorruptBlockError):
            db.prefetch("big", tier="L2").result()
        assert "big" in str(db.migrator.stats()["last_error"]) and db.migrator.stats()["failed"] == 1
    logged = [r for r in caplog.records if r.name == "tierstore.migrator"]
    assert len(logged) == 1 and "'big' from L3 to L2" in logged[0].getMessage()
    assert logged[0].exc_info is None  # a typed error: its message is the whole story


def test_shared_publisher_failure_is_logged_and_in_stats(caplog: pytest.LogCaptureFixture) -> None:
    config = CacheConfig(shared_url="s3://bucket/prefix", shared_endpoint="http://127.0.0.1:9",
                         shared_credentials=SharedCredentials("id", "secret"), shared_timeout=1.0)

    def read(key: str) -> LocalBlock | None:
        raise RuntimeError(f"the store closed while {key!r} was queued")

    caplog.set_level(logging.WARNING, logger="tierstore.shared")
    coordinator = SharedCoordinator(config, read)
    try:
        coordinator.enqueue(["k"])
        assert coordinator.wait_published(timeout=_LIVENESS)
        stats = coordinator.stats()
    finally:
        coordinator.close()
    assert stats["publish_failed"] == 1 and "'k' was queued" in stats["last_publish_error"]
    logged = [r for r in caplog.records if r.name == "tierstore.shared"]
    assert len(logged) == 1 and "publishing 1 block(s)" in logged[0].getMessage()
    assert logged[0].exc_info is not None  # not a tierstore error: the traceback is kept


def test_shared_tier_going_down_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tierstore.shared")
    with tierstore.open(tmp_path / "s", shared_url="s3://bucket/prefix", shared_endpoint="http://127.0.0.1:9",
                        shared_credentials=SharedCredentials("id", "secret"), shared_timeout=2.0) as db:
        with pytest.raises(KeyError):
            db.get("elsewhere")
        assert db.stats().tiers["shared"]["degraded"]
    logged = [r for r in caplog.records if r.name == "tierstore.shared"]
    assert len(logged) == 1 and "unavailable" in logged[0].getMessage() and "secret" not in logged[0].getMessage()
