"""Upkeep: recovery at open, verification, compaction and garbage collection, warm restart."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..engine.upkeep_steps import UpkeepSteps
from . import compaction, recovery, warm_restart

if TYPE_CHECKING:
    from ..engine.handle import TierStore

__all__ = ["handle_steps"]


def _compact(db: TierStore, min_fill: float, progress: compaction.Progress | None) -> compaction.MaintenanceReport:
    return compaction.compact(db, min_fill=min_fill, progress=progress)


def handle_steps() -> UpkeepSteps:
    """The steps :mod:`tierstore.engine.upkeep_steps` hands every handle."""
    return UpkeepSteps(refuse_orphaned_data=recovery.refuse_orphaned_data, recover=recovery.recover,
                       upgrade_layout=recovery.upgrade_layout,
                       warm_l2=warm_restart.warm_l2, drop_l2_files=warm_restart.drop_l2_files,
                       save_index=warm_restart.save_index, compact=_compact,
                       gc=compaction.gc)
