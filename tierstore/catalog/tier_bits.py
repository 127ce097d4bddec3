"""Markers a store keeps in a block row: the checksum of a block not hashed yet, the tier bits."""

from __future__ import annotations

__all__ = ["UNHASHED", "L1_BIT", "L2_BIT", "L3_BIT"]

UNHASHED = -1
"""Checksum of a cache-only block not hashed yet (it has never left L2)."""
L1_BIT = 1
L2_BIT = 2
L3_BIT = 4
