"""Planned moves as values (a move, a plan, a pin), their journaled steps, and the journal's recovery.

Each move the :class:`~tierstore.engine.migrator.Migrator` runs is a small transaction over the
catalog's ``journal`` table:

1. **intent**: the move's row is committed to the journal (a batch of moves: one transaction);
2. **copy**: the bytes go to the destination (an L2/L1 slot, or a fresh L3 array);
3. **verify**: the copy's crc32c is checked against the catalog's checksum (an L3 copy is read
   back from disk);
4. **commit**: the destination is made resident (an L2/L1 admission; for L3, the block's row is
   committed in the same SQLite transaction that deletes the journal row);
5. **free**: the source gives the block up (a demotion) or keeps it (a promotion is a copy).

:func:`recover_journal`, run by the writer at open, settles whatever a crash interrupted: a
journal row still present means its commit never happened, so an L3 copy it made is removed and
the move is dropped (volatile destinations did not survive the crash anyway). Named crash points
let tests kill the process at each step: with ``TIERSTORE_CRASH_AT=<point>`` in the environment
when the store is opened, the process SIGKILLs itself when a move reaches that point
(:data:`CRASH_POINTS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..catalog import Catalog
from ..config import format_size
from ..tiers.l3_zarr import Location, ZarrL3
from .residency import Residency

__all__ = ["CRASH_ENV", "CRASH_POINTS", "RANK", "TIERS", "JournalReport", "Move", "Pin", "Plan", "recover_journal"]

CRASH_ENV = "TIERSTORE_CRASH_AT"
CRASH_POINTS = ("intent", "copied", "verified", "committed", "freed")
"""The steps of a move at which ``TIERSTORE_CRASH_AT`` can kill the process (after each one)."""
TIERS = ("L1", "L2", "L3")
RANK = {"L1": 0, "L2": 1, "L3": 2}
"""Tiers from fastest (0) to slowest."""


@dataclass(frozen=True, slots=True)
class Move:
    """One planned move of ``key`` from tier ``src`` to ``dst``, and why."""

    key: str
    src: str
    dst: str
    nbytes: int
    reason: str

    @property
    def op(self) -> str:
        """``promote`` (towards L1) or ``demote`` (towards L3)."""
        return "promote" if RANK[self.dst] < RANK[self.src] else "demote"

    def __str__(self) -> str:
        return f"{self.op:<7} {self.src}->{self.dst} {format_size(self.nbytes):>10}  {self.key}  ({self.reason})"


class Plan(list[Move]):
    """A list of moves that prints as a table (what ``db.migrate(dry_run=True)`` returns)."""

    @property
    def nbytes(self) -> int:
        """Bytes the plan moves."""
        return sum(m.nbytes for m in self)

    def __str__(self) -> str:
        if not self:
            return "nothing to move"
        head = f"{len(self)} move{'s' if len(self) != 1 else ''}, {format_size(self.nbytes)}"
        return "\n".join([head, *(str(m) for m in self)])


@dataclass(slots=True)
class JournalReport:
    """What :func:`recover_journal` found at open: keys of moves it removed (undone)."""

    undone: list[str] = field(default_factory=list)
    removed_arrays: list[str] = field(default_factory=list)


def recover_journal(catalog: Catalog, l3: ZarrL3) -> JournalReport:
    """Settle the moves a crashed writer left in the journal (run at open, before the L3 sweep).

    A move's journal row is deleted in the same transaction that commits it, so a row still here
    never committed: an L3 copy it made (a fresh array named by the row's block id, which no block
    row points at) is removed, and the move is dropped. Moves into L1/L2 left nothing to undo.
    """
    report = JournalReport()
    rows = catalog.journal_rows()
    for _id, block_id, key, _op, _src, dst, _state, _created in rows:
        report.undone.append(key)
        if dst == "L3" and catalog.block_by_id(block_id) is None:
            array = f"blocks/{block_id:016x}"
            if (l3.root / array).exists():
                report.removed_arrays.append(array)
            l3.free([Location(array, 0, 0, (), 0, "raw")])
    catalog.journal_end([r[0] for r in rows])
    return report


class Pin:
    """A block kept resident in one tier until :meth:`release` (or the end of a ``with`` block)."""

    def __init__(self, residency: Residency[Any], key: str, tier: str) -> None:
        self.key = key
        self.tier = tier
        self._residency: Residency[Any] | None = residency

    @property
    def released(self) -> bool:
        """Whether the pin was released."""
        return self._residency is None

    def release(self) -> None:
        """Let the block be evicted again (calling it twice is fine)."""
        residency, self._residency = self._residency, None
        if residency is not None:
            residency.unpin(self.key)

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Pin {self.key!r} in {self.tier}{' (released)' if self.released else ''}>"
