"""The pending changes of one transaction, with savepoints.

A transaction belongs to one thread. Each put or delete becomes a
:class:`Change`; a nested ``transaction()`` marks the undo log and rolls back
to the mark on error. Bytes a change wrote (an L3 location, an L2 slot) that
end up superseded are collected so the store can free them once the outcome
is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import BlockRow
from ..tiers.l3_zarr import Location
from ..tiers.slab_allocator import Allocation

__all__ = ["Change", "Txn", "location_of"]


@dataclass(frozen=True, slots=True)
class Change:
    """A pending put (``row``) or delete (``row is None``); ``slot`` holds an L2 copy of a put,
    ``l1_slot`` the L1 copy of a cache-only put of a device tensor (its only copy)."""

    row: BlockRow | None
    slot: Allocation | None = None
    l1_slot: Allocation | None = None
    compression: str | None = None
    """The put's own codec setting (``put(compression=)``), None for the store's."""
    loc: Location | None = None
    """Where the put wrote its bytes in L3 (None: read it from ``row``), so a commit need not rebuild it."""

    @property
    def location(self) -> Location:
        """Where this put's bytes are in L3 (an empty location for none); a put, not a delete."""
        assert self.row is not None
        return self.loc if self.loc is not None else location_of(self.row)


@dataclass(slots=True)
class Txn:
    """Pending changes of one transaction (owned by the thread ``owner``)."""

    owner: int
    pending: dict[str, Change] = field(default_factory=dict)
    undo: list[tuple[str, Change | None]] = field(default_factory=list)
    garbage: list[Location] = field(default_factory=list)
    """L3 bytes written in this transaction that no committed row will point at."""
    dropped_slots: list[Allocation] = field(default_factory=list)
    """L2 slots of superseded puts, to give back."""
    dropped_l1: list[Allocation] = field(default_factory=list)
    """L1 slots of superseded puts, to give back."""

    def set(self, key: str, change: Change) -> None:
        """Record ``change`` for ``key`` (superseding an earlier one in this transaction)."""
        self.undo.append((key, self.pending.get(key)))
        self.pending[key] = change

    def _drop(self, change: Change | None) -> None:
        if change is not None and change.row is not None:
            self.garbage.append(change.location)
            if change.slot is not None:
                self.dropped_slots.append(change.slot)
            if change.l1_slot is not None:
                self.dropped_l1.append(change.l1_slot)

    def rollback_to(self, mark: int) -> None:
        """Undo every change made after ``len(undo) == mark`` (a savepoint)."""
        while len(self.undo) > mark:
            key, previous = self.undo.pop()
            self._drop(self.pending.get(key))
            if previous is None:
                del self.pending[key]
            else:
                self.pending[key] = previous

    def superseded(self) -> None:
        """Collect the bytes of changes overwritten within the transaction (call before commit)."""
        live = {id(change) for change in self.pending.values()}
        seen: set[int] = set()
        for _key, previous in self.undo:
            if previous is not None and id(previous) not in live and id(previous) not in seen:
                seen.add(id(previous))
                self._drop(previous)


def location_of(row: BlockRow) -> Location:
    """Where ``row``'s bytes are in L3 (an empty location for a block with none there)."""
    return Location.from_columns(row.l3_columns)
