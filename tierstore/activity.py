"""What a store did, from its catalog: per-tier counters, accesses over time windows, timelines.

``stats`` and ``plot`` read these. Per-tier counters of the volatile tiers
(hits, misses, evictions, spills, bypasses) live only in a running handle;
:func:`save_counters` adds a handle's counters to the ``tier_counters`` row of
``store_meta`` at close, so that they add up across runs. A tier's promotions
are its misses that found room (``misses - bypasses``: each brings the block in
from below); its demotions are its evictions plus spills.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalog import Catalog
from .config import CacheConfig

if TYPE_CHECKING:
    from .store import TierStore

__all__ = ["WINDOWS", "COUNTERS", "save_counters", "load_counters", "access_windows", "lifetime_counts",
           "tier_overview", "Timeline",
           "timeline"]

WINDOWS = {"1m": 60.0, "1h": 3600.0, "1d": 86400.0}
COUNTERS = ("hits", "misses", "evictions", "spills", "bypasses")
VOLATILE = ("L1", "L2")
"""The tiers whose counters live only in a running handle."""
META_COUNTERS = "tier_counters"
WINDOW_COUNTS = "SELECT op, tier, count(*) FROM access_log WHERE ts >= ? GROUP BY op, tier"
HIT_TOTALS = ("SELECT coalesce(sum(get_count), 0), coalesce(sum(hits_l1), 0), coalesce(sum(hits_l2), 0), "
              "coalesce(sum(hits_l3), 0) FROM block_stats")
PUT_TOTAL = "SELECT coalesce(sum(put_count), 0) FROM block_stats"
OP_TOTALS = "SELECT op, count(*) FROM access_log GROUP BY op"
TIME_RANGE = "SELECT min(ts), max(ts) FROM access_log"
ALL_ACCESSES = "SELECT ts, key, op, tier FROM access_log ORDER BY id"
CURRENT_SIZES = "SELECT key, nbytes FROM blocks"


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


def access_windows(catalog: Catalog, now: float | None = None) -> dict[str, dict[str, int]]:
    """Gets, puts, deletes and gets served per tier in the last minute, hour and day."""
    now = time.time() if now is None else now
    out = {}
    for name, seconds in WINDOWS.items():
        row = {"get": 0, "put": 0, "delete": 0, "L1": 0, "L2": 0, "L3": 0}
        for op, tier, count in catalog.query(WINDOW_COUNTS, (now - seconds,)):
            row[op] = row.get(op, 0) + count
            if op == "get" and tier in row:
                row[tier] += count
        out[name] = row
    return out


def lifetime_counts(catalog: Catalog) -> dict[str, Any]:
    """Gets, puts, deletes and gets served per tier over every run (what ``tierstore stats`` shows).

    Gets, puts and hits come from the per-key statistics, the same totals as :func:`tier_overview`'s
    hit rates; deletes (which keep no per-key row) from the access log, so they count only what
    the log still holds (``history_max_rows``).
    """
    gets, l1, l2, l3 = catalog.query_one(HIT_TOTALS)
    (puts,) = catalog.query_one(PUT_TOTAL)
    ops = dict(catalog.query(OP_TOTALS, ()))
    return {"gets": int(gets), "puts": int(puts), "deletes": int(ops.get("delete", 0)),
            "hits": {"L1": int(l1), "L2": int(l2), "L3": int(l3)}}


def tier_overview(db: TierStore) -> dict[str, dict[str, Any]]:
    """Per tier: capacity, used, blocks, hit rate, promotions, demotions (and L3's compression, fragmentation).

    Capacities come from the configuration the store was last opened with; ``used`` and
    ``blocks`` of L1 and L2 are those of this handle (None where it holds no such tier).
    """
    from .maintenance import fragmentation  # maintenance needs the store; import at call time

    catalog = db._catalog
    stored = catalog.meta("config")
    config = CacheConfig(**{k: v for k, v in json.loads(stored).items() if k in CacheConfig.__slots__}) \
        if stored else db.config
    stats = db.stats()
    gets, *hits = catalog.query_one(HIT_TOTALS)
    counters = load_counters(catalog)
    live_counters = {t: stats.tiers.get(t, {}) for t in ("L1", "L2")}
    share, dead = fragmentation(catalog)
    out: dict[str, dict[str, Any]] = {}
    for tier, capacity, served in (("L1", config.l1_cache_size, hits[0]), ("L2", config.l2_cache_size, hits[1]),
                                   ("L3", config.l3_cache_size, hits[2])):
        live = stats.tiers.get(tier, {})
        row: dict[str, Any] = {"capacity": capacity, "used": live.get("used"), "blocks": live.get("blocks"),
                               "hits": int(served), "hit_rate": served / gets if gets else None}
        if tier != "L3":
            total = {n: counters.get(tier, {}).get(n, 0) + int(live_counters[tier].get(n, 0)) for n in COUNTERS}
            row.update(promotions=max(0, total["misses"] - total["bypasses"]),
                       demotions=total["evictions"] + total["spills"])
        else:
            row.update(used=stats.stored_bytes, blocks=stats.blocks, compression_ratio=stats.compression_ratio,
                       fragmentation=share, dead_bytes=dead)
        out[tier] = row
    return out


@dataclass(frozen=True, slots=True)
class Timeline:
    """The access log binned in time: what ``tierstore plot`` draws."""

    edges: np.ndarray
    """Bin edges (unix time), ``bins + 1`` of them."""
    served: dict[str, np.ndarray]
    """Gets served by each tier (L1, L2, L3) per bin."""
    puts: np.ndarray
    blocks: np.ndarray
    """Blocks stored at the end of each bin (replaying puts and deletes)."""
    logical_bytes: np.ndarray
    """Their raw bytes (each key counted at its current size)."""
    heat_keys: list[str]
    """The most accessed keys, hottest first."""
    heat: np.ndarray
    """Accesses of each of ``heat_keys`` per bin (``len(heat_keys) x bins``)."""

    @property
    def hit_rate(self) -> np.ndarray:
        """Share of gets served from memory (L1 or L2) per bin; NaN where a bin has no gets."""
        gets = sum(self.served.values())
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gets > 0, (self.served["L1"] + self.served["L2"]) / gets, math.nan)


def timeline(catalog: Catalog, *, bins: int = 60, top: int = 30) -> Timeline:
    """Bin the whole access log into ``bins`` intervals; a heat map of the ``top`` keys."""
    first, last = catalog.query_one(TIME_RANGE)
    if first is None:
        first = last = time.time()
    edges = np.linspace(first, max(last, first + 1e-3), bins + 1)
    rows = catalog.query(ALL_ACCESSES)
    sizes = dict(catalog.query(CURRENT_SIZES))
    ts = np.array([r[0] for r in rows], dtype=np.float64)
    index = np.clip(np.searchsorted(edges, ts, side="right") - 1, 0, bins - 1)
    ops = np.array([r[2] for r in rows], dtype=object)
    tiers = np.array([r[3] or "" for r in rows], dtype=object)
    served = {t: np.bincount(index[(ops == "get") & (tiers == t)], minlength=bins) for t in ("L1", "L2", "L3")}
    puts = np.bincount(index[ops == "put"], minlength=bins)
    live: dict[str, int] = {}
    blocks = np.zeros(bins, dtype=np.int64)
    nbytes = np.zeros(bins, dtype=np.int64)
    total = 0
    for (_, key, op, _), b in zip(rows, index, strict=True):
        if op == "put" and key not in live:
            live[key] = sizes.get(key, 0)
            total += live[key]
        elif op == "delete" and key in live:
            total -= live.pop(key)
        blocks[b], nbytes[b] = len(live), total
    present = np.bincount(index, minlength=bins) > 0
    for b in range(1, bins):  # bins without accesses keep the previous state
        if not present[b]:
            blocks[b], nbytes[b] = blocks[b - 1], nbytes[b - 1]
    counts: dict[str, int] = {}
    for _, key, op, _ in rows:
        if op != "delete":
            counts[key] = counts.get(key, 0) + 1
    hot = sorted(counts, key=lambda k: (-counts[k], k))[:top]
    where = {k: i for i, k in enumerate(hot)}
    heat = np.zeros((len(hot), bins), dtype=np.int64)
    for (_, key, op, _), b in zip(rows, index, strict=True):
        if op != "delete" and key in where:
            heat[where[key], b] += 1
    return Timeline(edges, served, puts, blocks, nbytes, hot, heat)
