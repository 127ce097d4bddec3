"""The state the batch replay works on, as each owner exports it: the predictor, its Belady expert, the panel.

:mod:`tierstore.predict.batch_replay` and :mod:`tierstore.predict.compiled_learn` do the per-access work
of the predictive policy in one tight loop over local variables, not through the owners' per-access
methods. They get that state from the owners' ``export_state()`` and hand it back with
``load_state()`` (the tracker's is :class:`tierstore.predict.access_tracker.TrackerState`), so no
module reads another object's private attributes.

A snapshot's containers (dicts, deques, lists) are the owner's own, not copies: a loop that mutates
them mutates the owner, in place, as the per-access path does. Its scalars are copies: a loop
advances them in the snapshot and hands it back to ``load_state``, which takes every field as the
owner's. Plain slotted dataclasses, not frozen ones: the batch replay exports and loads them once
an epoch (every 64 accesses or more), where a frozen one's ``replace`` cost 5-10 us a call.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["PredictorState", "BeladyState", "PanelState"]

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class PredictorState(Generic[K]):
    """:class:`tierstore.predict.predictor.SimpleMLPredictor`'s working state (``weights``, ``samples``: public)."""

    pending: dict[K, tuple[int, tuple[float, ...]]]
    """Each key's sample awaiting its label: (tick it was taken, features)."""
    expiry: deque[tuple[int, K]]
    """The pending samples in the order they were taken: (tick, key), to label 0 past the horizon."""
    probability: dict[K, float]
    """Each key's reuse probability as of its latest access."""
    draw: int
    """The sampling generator's state (a 32-bit linear congruential generator)."""
    cut: int
    """A draw below it samples the access (constant: ``2**32 // sample_every``)."""
    log_horizon: float
    """``log1p(horizon)``, the gap features' scale (constant)."""


@dataclass(slots=True)
class BeladyState(Generic[K]):
    """:class:`tierstore.predict.predictor.PredictedNextUse`'s contents and its two lazy heaps."""

    version: dict[K, int]
    """The keys it holds, each with the serial of its latest heap entries (older entries are stale)."""
    far: list[tuple[float, int, K]]
    """Heap of (-expected tick, serial, key): the key expected back last on top."""
    due: list[tuple[float, int, K]]
    """Heap of (deadline tick, serial, key): the key overdue first on top."""
    serial: int
    """The latest serial handed out."""


@dataclass(slots=True)
class PanelState(Generic[K]):
    """:class:`tierstore.predict.predictor.PredictivePolicy`'s tier and epoch state (the experts are public)."""

    resident: OrderedDict[K, int]
    """The tier's keys -> size, least recently used first."""
    outside: OrderedDict[K, None]
    """Resident keys the leader does not hold, oldest first: the first victims."""
    parent: dict[K, K]
    """Each chained key's parent (the prefix it extends)."""
    children: dict[K, dict[K, None]]
    """Each key's resident extensions, in insertion order."""
    hits: list[int]
    """Each expert's hits in the current epoch."""
    used: int
    """The tier's occupancy, in the unit of the sizes inserted."""
    leader: int
    """The index of the expert the tier follows."""
    countdown: int
    """Accesses left in the current epoch."""
    lineage: dict[K, K] | None = None
    """Each chained key's parent, kept after eviction (where a takeover may reload keys), else None."""
