"""Store the units a plan streams raw as raw blocks: ``tierstore plan STORE --apply``.

A unit streamed every token costs its decompression on every pass; where the plan says decoding
would be the bottleneck it fetches the unit raw (:attr:`~tierstore.plan.placement.Plan.raw_units`),
which needs the unit's blocks stored raw. :func:`store_raw` rewrites them through the public store
API with ``put(..., compression="off")`` (a block's own codec; the store keeps its setting for
later puts). All the units' tensors are rewritten in one transaction: a crash
leaves the store as it was, and the values do not change (only how L3 keeps them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import open as open_store
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..plan.placement import Plan

__all__ = ["store_raw", "unit_keys"]


def unit_keys(keys: list[str], unit: str, prefix: str = "") -> list[str]:
    """The tensors of ``unit`` (``model.layers.3``) among ``keys``: ``prefix + unit + ".<param>"``."""
    head = f"{prefix}{unit}."
    return [k for k in keys if k.startswith(head)]


def store_raw(store: str | Path, chosen: Plan, *, prefix: str = "") -> int:
    """Rewrite the tensors of ``chosen.raw_units`` in the store at ``store`` as raw L3 blocks; how many.

    Blocks already raw are left alone. Raises ``ConfigError`` when a unit has no tensors in the
    store (a plan made for another model or prefix).
    """
    with open_store(store, l2_cache_size=0, remember_config=False) as db:
        keys = list(db.keys(prefix or None))
        todo: list[str] = []
        for unit in chosen.raw_units:
            found = unit_keys(keys, unit, prefix)
            if not found:
                raise ConfigError(f"plan --apply: the store has no tensors of unit {unit!r} under prefix "
                                  f"{prefix!r}; plan this store (and prefix) again")
            todo += [k for k in found if db.info(k).codec != "raw"]
        with db.transaction():
            for key in todo:
                db.put(key, db.get(key, copy=True), compression="off")
    return len(todo)
