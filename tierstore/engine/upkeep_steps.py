"""The upkeep a handle runs at open and close and on request, handed to the engine from above.

The engine sits below :mod:`tierstore.upkeep` in the layering (docs/ARCHITECTURE.md): recovery,
the warm restart of L2 and compaction work on a store, so they import the engine, not the other
way round. The package root (``tierstore/__init__.py``) installs them here once, at import; any
import of a ``tierstore.*`` module runs the root first, so no handle opens without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import TierStoreError

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..tiers.l2_slab import HostArena
    from ..tiers.l3_zarr import RecoveryReport, ZarrL3
    from ..upkeep.compaction import MaintenanceReport
    from .handle import TierStore
    from .residency import Residency

__all__ = ["UpkeepSteps", "install", "steps"]


@dataclass(frozen=True, slots=True)
class UpkeepSteps:
    """The upkeep functions a handle calls (see :mod:`tierstore.upkeep` for each)."""

    refuse_orphaned_data: Callable[[Path, Path], None]
    """At open, before the catalog: stop if L3 data lies there without its catalog."""
    recover: Callable[[Catalog, ZarrL3], RecoveryReport]
    """At open: cut back what a crash left behind."""
    upgrade_layout: Callable[[Catalog, ZarrL3], None]
    """At a read-write open, after ``recover``: move a layout-1 store's L3 to the current layout."""
    warm_l2: Callable[[Path, Catalog, Residency[HostArena]], tuple[int, int]]
    """At open: take back a file-backed L2; ``(generation, blocks taken back)``."""
    drop_l2_files: Callable[..., None]
    """At a read-write open: remove a stale L2 index, and the L2 file when no longer file-backed."""
    save_index: Callable[[Path, str, int, Residency[HostArena]], int]
    """At close: write the index a later warm restart reads."""
    compact: Callable[[TierStore, float, Callable[[int, int], None] | None], MaintenanceReport]
    gc: Callable[[TierStore], MaintenanceReport]


_installed: list[UpkeepSteps] = []


def install(upkeep: UpkeepSteps) -> None:
    """Make ``upkeep`` the steps every handle runs (the package root calls this once)."""
    _installed[:] = [upkeep]


def steps() -> UpkeepSteps:
    """The installed steps."""
    if not _installed:  # pragma: no cover - tierstore/__init__.py installs them at import
        raise TierStoreError("tierstore's upkeep steps are not installed; import tierstore before opening a store")
    return _installed[0]
