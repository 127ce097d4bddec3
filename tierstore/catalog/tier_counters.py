"""Per-tier counters of the volatile tiers, added up across runs in the ``tier_counters`` row of ``store_meta``.

Hits, misses, evictions, spills and bypasses of L1 and L2 live only in a running handle; the
handle adds its counters here at close (:func:`save_counters`), so that ``tierstore stats`` reports
them over every run.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sqlite_catalog import Catalog

__all__ = ["COUNTERS", "VOLATILE", "load_counters", "save_counters"]

COUNTERS = ("hits", "misses", "evictions", "spills", "bypasses")
VOLATILE = ("L1", "L2")
"""The tiers whose counters live only in a running handle."""
META_COUNTERS = "tier_counters"


def load_counters(catalog: Catalog) -> dict[str, dict[str, int]]:
    """Counters of every run so far, per tier."""
    text = catalog.meta(META_COUNTERS)
    return json.loads(text) if text else {}


def save_counters(catalog: Catalog, tiers: dict[str, dict[str, Any]]) -> None:
    """Add a closing handle's per-tier counters to those of earlier runs (no write when all are zero)."""
    tiers = {t: v for t, v in tiers.items() if t in VOLATILE}
    if not any(int(values.get(n, 0)) for values in tiers.values() for n in COUNTERS):
        return
    total = load_counters(catalog)
    for tier, values in tiers.items():
        row = total.setdefault(tier, dict.fromkeys(COUNTERS, 0))
        for name in COUNTERS:
            row[name] = row.get(name, 0) + int(values.get(name, 0))
    catalog.set_meta({META_COUNTERS: json.dumps(total)})
