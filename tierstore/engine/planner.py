"""The simple migration policy: which blocks to promote (hot) and demote (idle) now.

Pure planning over the catalog's statistics and what L1/L2 hold; nothing moves here (the
migrator carries a plan out, journaled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..catalog import Catalog
from ..config import CacheConfig
from .moves import RANK, Move, Plan
from .residency import Residency

__all__ = ["simple_plan"]

HOT_LIMIT = 10_000
"""Hot blocks the periodic plan considers for promotion."""


def simple_plan(catalog: Catalog, config: CacheConfig, l1: Residency[Any] | None, l2: Residency[Any] | None,
                tier_of: Callable[[str], str], t: float) -> Plan:
    """The moves the configuration's thresholds ask for at time ``t``.

    Blocks idle longer than ``migration_time_threshold`` go back to L3; blocks accessed
    ``migration_threshold_high_freq`` times go to L1, ``..._medium_freq`` times to L2, as far as the
    room left in each tier after the demotions allows.
    """
    idle_after = config.migration_time_threshold
    moves = Plan()
    budget: dict[str, int] = {}
    leaving: set[str] = set()
    for name, residency in (("L1", l1), ("L2", l2)):
        if residency is None:
            continue
        held = 0
        for entry in list(residency.entries.values()):
            held += entry.alloc.nbytes
            if entry.pins or entry.dead or entry.key in leaving:
                continue
            stats = catalog.block_stats(entry.key) or {}
            last = float(stats.get("last_access") or 0.0)
            if last and t - last > idle_after:
                moves.append(Move(entry.key, name, "L3", entry.alloc.nbytes,
                                  f"idle {t - last:.0f}s > migration_time_threshold={idle_after:g}s"))
                leaving.add(entry.key)  # an L1 -> L3 move frees its L2 copy too
                held -= entry.alloc.nbytes
        budget[name] = residency.arena.capacity - held
    high, medium = config.migration_threshold_high_freq, config.migration_threshold_medium_freq
    for key, count, last, nbytes in catalog.hot_blocks(medium, HOT_LIMIT):
        if t - last > idle_after:
            continue
        if count >= high and l1 is not None:
            target, knob, limit = "L1", "migration_threshold_high_freq", high
        elif l2 is not None:
            target, knob, limit = "L2", "migration_threshold_medium_freq", medium
        else:
            continue
        src = tier_of(key)
        if RANK[src] <= RANK[target] or budget.get(target, 0) < nbytes or nbytes == 0:
            continue
        budget[target] -= nbytes
        moves.append(Move(key, src, target, nbytes, f"{count} accesses >= {knob}={limit}"))
    return moves
