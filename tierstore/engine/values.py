"""Values the store hands out about itself: one block's facts, and a snapshot of the whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["BlockInfo", "StoreStats"]


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """What the catalog knows of one block."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    tiers: tuple[str, ...]
    checksum: int
    stored_bytes: int
    codec: str
    durable: bool
    block_id: int
    access_count: int
    last_access: float | None
    created: float
    updated: float
    parent: str | None = None
    """The key of the block this one extends in a chain (``put(..., parent=...)``), which may be gone."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of a store's contents and activity since it was opened."""

    path: str
    readonly: bool
    blocks: int
    logical_bytes: int
    stored_bytes: int
    compression_ratio: float
    gets: int
    puts: int
    deletes: int
    hits: dict[str, int]
    tiers: dict[str, dict[str, Any]]
    recovery: dict[str, list[str]]
    history_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    hit_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes the gets counted in ``hits`` returned, per tier (``hit_bytes["L3"]``: bytes read from disk)."""
    mapped: int = 0
    """Of the gets served from L3, how many were zero-copy maps of raw bytes (:meth:`TierStore.map`)."""
