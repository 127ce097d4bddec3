"""A failed open changes nothing: its config is not remembered, and a reader never fails for a tier it does not use.

Every case first opens a store successfully with a small L2 (that config is remembered), then fails an
open with a config this machine cannot honour, then checks that plain opens, read-write and read-only,
in this process and in another, still work with the remembered config and see the data.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

import tierstore
from tests import faultlib

GOOD_L2 = 1 << 20
VALUE = torch.arange(1000, dtype=torch.int32)


def _memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _absent_gpu() -> str:
    return f"cuda:{max(7, torch.cuda.device_count())}"  # the cuda:7, or past the last GPU here


def _failures() -> dict[str, tuple[dict[str, Any], type[tierstore.TierStoreError]]]:
    return {
        "l2-bigger-than-memory": ({"l2_cache_size": max(100 << 30, 2 * _memory())}, tierstore.TierFullError),
        "l1-absent-gpu": ({"l1_device": _absent_gpu()}, tierstore.ConfigError),
        "l1-nonsense": ({"l1_device": "nonsense"}, tierstore.ConfigError),
        "l2-2**70": ({"l2_cache_size": 2**70}, tierstore.ConfigError),
    }


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _check_plain_opens(store: Path) -> None:
    """Plain opens (no config, no overrides) work, use the remembered config and see the data."""
    with tierstore.open(store) as db:
        assert db.config.l2_cache_size == GOOD_L2 and not db.config.l2_file_backed
        assert torch.equal(db.get("kept"), VALUE)
    with tierstore.open(store, readonly=True) as ro:
        assert torch.equal(ro.get("kept"), VALUE) and "kept" in ro


def _check_in_another_process(stores: list[Path]) -> None:
    """The same plain opens in a forked child: what a failed open left behind is in the files, not in this process."""
    def reopen() -> dict[str, Any]:
        for store in stores:
            _check_plain_opens(store)
        return {"checked": len(stores)}

    assert faultlib.in_child(reopen) == {"checked": len(stores)}


def test_a_failed_open_is_not_remembered(tmp_path: Path) -> None:
    stores = []
    for name, (bad, error) in _failures().items():
        store = tmp_path / name
        with tierstore.open(store, l2_cache_size=GOOD_L2) as db:
            db.put("kept", VALUE)
        fds = _open_fds()
        for _attempt in range(3):
            with pytest.raises(error) as info:
                tierstore.open(store, **bad)
            assert type(info.value) is not RuntimeError and isinstance(info.value, tierstore.TierStoreError)
        assert _open_fds() <= fds, f"{name}: a failed open left files open"
        _check_plain_opens(store)
        stores.append(store)
    _check_in_another_process(stores)


def test_file_backed_l2_on_a_full_disk_is_not_remembered(tmp_path: Path) -> None:
    with faultlib.tiny_tmpfs(tmp_path / "mnt", "3m") as mnt:
        store = mnt / "store"

        def scenario() -> dict[str, Any]:
            with tierstore.open(store, l2_cache_size=GOOD_L2) as db:
                db.put("kept", VALUE)
            with pytest.raises(tierstore.StoreFullError):
                tierstore.open(store, l2_cache_size="8MiB", l2_file_backed=True)
            _check_plain_opens(store)
            return {}

        faultlib.in_child(scenario)  # a SIGBUS would kill only the child, and fail here
        _check_in_another_process([store])


def _remember(store: Path, **changes: Any) -> None:
    """Make the catalog remember a config as if an open on a bigger machine had succeeded with it."""
    con = sqlite3.connect(store / "catalog.sqlite")
    try:
        row = con.execute("SELECT value FROM store_meta WHERE name = 'config'").fetchone()
        config = {**json.loads(row[0]), **changes}
        con.execute("UPDATE store_meta SET value = ? WHERE name = 'config'", (json.dumps(config),))
        con.commit()
    finally:
        con.close()


def test_a_reader_never_fails_for_a_tier_it_does_not_use(tmp_path: Path) -> None:
    """A store made elsewhere remembers an L1 GPU and an L2 this machine lacks: readers still open."""
    store = tmp_path / "store"
    with tierstore.open(store, l2_cache_size=GOOD_L2) as db:
        db.put("kept", VALUE)
        db.put("other", torch.ones(3000))
    huge = max(100 << 30, 2 * _memory())
    _remember(store, l1_device=_absent_gpu(), l1_cache_size=1 << 30, l2_cache_size=huge, l2_file_backed=True)
    with tierstore.open(store, readonly=True) as ro:
        assert ro.l1_pool is None and ro.config.l1_cache_size == 0  # no device memory unless asked
        held = VALUE.nbytes + 3000 * 4
        assert 0 < ro.config.l2_cache_size <= held + 4096  # no more L2 than the store holds
        for _round in range(2):
            assert torch.equal(ro.get("kept"), VALUE) and torch.equal(ro.get("other"), torch.ones(3000))
    assert not (store / "l2.slab").exists()
    with pytest.raises(tierstore.ConfigError):  # what a reader asks for is built, or refused with a typed error
        tierstore.open(store, readonly=True, l1_device=_absent_gpu())
    with pytest.raises(tierstore.TierFullError):
        tierstore.open(store, readonly=True, l2_cache_size=huge)
    with tierstore.open(store, readonly=True, l2_cache_size=0) as ro:
        assert torch.equal(ro.get("kept"), VALUE)
    with pytest.raises(tierstore.ConfigError):  # a writer builds every tier it is configured with
        tierstore.open(store)
    with tierstore.open(store, l1_device=None, l1_cache_size=0, l2_cache_size=GOOD_L2,
                        l2_file_backed=False) as db:  # the way out the error names
        assert torch.equal(db.get("kept"), VALUE)
    _check_plain_opens(store)
