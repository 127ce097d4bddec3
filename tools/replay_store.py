"""Replay a trace through a real store, to show that its L2 makes the simulator's decisions.

Each unique key becomes a 4 KiB block (1024 float32 values) put durably into a fresh store; the
store is reopened (a cold L2 of exactly ``capacity`` blocks: the slab allocator packs 256 such
blocks per MiB, so the capacity is rounded up to a multiple of 256 and the simulation uses the same
number) with ``l2_eviction_policy`` set to the policy, the background migrator paused (so L2 holds
only what eviction decides), and every access is a ``get``. Where each get was served comes back
from the store's own access log (``db.history``), so the comparison is access by access.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

import tierstore
from tierstore.predict.policies import access, make_policy

__all__ = ["STORE_POLICIES", "round_capacity", "replay_store", "simulate_policy"]

STORE_POLICIES = ("lru", "fifo", "lfu", "predictive")
BLOCK_ELEMENTS = 1024
BLOCK_BYTES = BLOCK_ELEMENTS * 4
PER_MIB = (1 << 20) // BLOCK_BYTES


def round_capacity(capacity: int) -> int:
    """The entry count a store's L2 can hold exactly: a multiple of 256 4-KiB blocks."""
    return max(PER_MIB, -(-capacity // PER_MIB) * PER_MIB)


def simulate_policy(keys: Sequence[int], policy: str, capacity: int) -> bytearray:
    """The store's own policy class through the reference driver (``tierstore.predict.policies.access``)."""
    table = make_policy(policy, capacity=capacity * BLOCK_BYTES, block_size=BLOCK_BYTES)
    hits = bytearray(len(keys))
    for i, key in enumerate(keys):
        hits[i] = access(table, key, float(i), capacity * BLOCK_BYTES, BLOCK_BYTES)
    return hits


def replay_store(keys: Sequence[int], unique: int, policy: str, capacity: int,
                 workdir: Path | None = None) -> bytearray:
    """Per access, 1 where the real store served the get from L2 (``capacity`` from :func:`round_capacity`)."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="replay-store-") as folder:
        path = Path(folder) / "store"
        options = {"fsync": False, "l2_cache_size": capacity * BLOCK_BYTES, "l2_eviction_policy": policy,
                   "history_max_rows": len(keys) + 1024, "history_flush_interval": 60.0}
        names = [f"k{k}" for k in range(unique)]
        with tierstore.open(path, **options) as db:
            for start in range(0, unique, 1000):
                with db.transaction():
                    for k in range(start, min(unique, start + 1000)):
                        db.put(names[k], torch.full((BLOCK_ELEMENTS,), float(k)))
        with tierstore.open(path, **options) as db:
            db.migrator.pause()
            get = db.get
            for key in keys:
                get(names[key])
            db.flush()
            log = db.history(limit=len(keys))
        served = [tier for _ts, _key, op, tier in reversed(log) if op == "get"]
    if len(served) != len(keys):
        raise RuntimeError(f"the store logged {len(served)} gets for {len(keys)} accesses")
    return bytearray(tier == "L2" for tier in served)
