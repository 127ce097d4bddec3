"""Which blocks a volatile tier holds, who is using them, and what it gives up next.

A :class:`Residency` sits on top of one tier's memory (an arena with
``alloc``/``free``/``as_numpy``/``view``: the L2 host arena now, the L1 device
pool later) and keeps, per resident block, its slot, its version (block id)
and how many views of it are alive. It knows nothing of the catalog or of
other tiers: the store tells it what to admit and what was replaced, and
hands it a ``spill`` callback for blocks whose only copy is here.

The rule that no tensor changes under its holder lives here: a slot with live
views is taken out of the eviction policy, and a slot whose block was
replaced or deleted is freed only when its last view is garbage-collected.
View finalizers only append to a deque (they may run in any thread, inside
any lock); the releases are applied at the next operation under the lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from ..predict.policies import LEARNED_POLICIES, Policy, make_policy
from ..tensors import copy_bytes
from ..tiers.slab_allocator import Allocation

__all__ = ["Arena", "Resident", "Residency"]


class Arena(Protocol):
    """The memory of a volatile tier."""

    @property
    def capacity(self) -> int: ...

    def alloc(self, nbytes: int) -> Allocation | None: ...

    def free(self, a: Allocation) -> None: ...

    def view(self, a: Allocation, dtype: torch.dtype, shape: tuple[int, ...],
             on_release: Callable[[], None] | None = None) -> torch.Tensor: ...


def _storage_uses(tensor: torch.Tensor) -> int:
    # How many tensors (and storage handles) share ``tensor``'s memory: PyTorch counts them in the
    # storage's reference count, which is the one place that sees every view, slice and export.
    return int(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))


@dataclass(slots=True, eq=False)  # identity semantics: entries live in sets
class Resident:
    """One block held by the tier."""

    key: str
    block_id: int
    alloc: Allocation
    dtype: torch.dtype
    shape: tuple[int, ...]
    checksum: int
    volatile: bool
    """True while this is the block's only copy (a cache-only block not yet spilled to L3)."""
    pins: int = 0
    dead: bool = False
    base: torch.Tensor | None = None
    """A tensor over the slot, made on the first get; every get hands out an alias of it."""
    base_uses: int = 0
    ready: torch.cuda.Event | None = None
    """L1 on CUDA: the event of the copy that filled the slot, until a reader has waited on it."""
    compression: str | None = None
    """The codec setting its put asked for, used if it is spilled to L3; None: the store's."""

    @property
    def in_use(self) -> bool:
        """Whether some tensor handed out (or derived from one) still views the slot."""
        return self.base is not None and _storage_uses(self.base) > self.base_uses

    @property
    def evictable(self) -> bool:
        """Neither viewed nor pinned nor already gone."""
        return not self.pins and not self.dead and not self.in_use


A = TypeVar("A", bound=Arena)


class Residency(Generic[A]):
    """The residency map and eviction of one volatile tier (thread-safe), over its memory ``A``."""

    def __init__(self, name: str, arena: A, policy: str = "lru") -> None:
        self.name = name
        self.arena: A = arena
        self.lock = threading.RLock()
        self.entries: dict[str, Resident] = {}
        # The predictive policy sizes its shadow caches in entries; until the catalog says how big
        # blocks are, assume 64 KiB ones (the migrator resizes it from real statistics: tune()).
        self.policy_name = policy
        self.policy: Policy[str] = make_policy(policy, capacity=max(1, arena.capacity), block_size=1 << 16)
        self._released: deque[Allocation] = deque()
        self._zombies: dict[int, Resident] = {}
        """Replaced or deleted entries whose slots are still viewed, by slot offset."""
        self.generation = 0
        """Bumped whenever a block is replaced or deleted: an admission that raced it is refused."""
        self.volatile_keys: set[str] = set()
        self.pinned: dict[str, int] = {}
        """Pin counts by key (see :meth:`pin`): a key's entry carries them across replacements."""
        self._parent: dict[str, str] = {}
        """Chain links of resident keys (``put(..., parent=...)``): key -> the block it extends."""
        self._children: dict[str, dict[str, None]] = {}
        """Resident extensions of each key (dicts, not sets: the walk to a tail is reproducible)."""
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.spills = 0
        self.bypasses = 0

    # -- lookups ------------------------------------------------------------------------------------

    def lookup(self, key: str, block_id: int | None = None) -> Resident | None:
        """The live entry of ``key`` (of that ``block_id`` if given), noting the access."""
        with self.lock:
            if self._released:
                self._drain()
            entry = self.entries.get(key)
            if entry is None or (block_id is not None and entry.block_id != block_id):
                self.misses += 1
                self.policy.record_access(key, 0.0)  # a learning policy sees misses too (a no-op for the classic ones)
                return None
            self.hits += 1
            self.policy.record_access(key, 0.0)
            return entry

    def view(self, entry: Resident, *, copy: bool = False) -> torch.Tensor | None:
        """A tensor over the entry's bytes that keeps the slot alive (or an owned copy).

        None when the entry was replaced, deleted or evicted since it was looked up (another
        thread may do that between :meth:`lookup` and this call): its slot may already be free
        or reused, so a view made now would hand out someone else's bytes and free the slot a
        second time when collected. Look the key up again.
        """
        with self.lock:
            if entry.dead:
                return None
            base = entry.base
            if copy:
                # Into reused pool memory when there is room: a fresh allocation faults in its pages
                # and copies at a fraction of memcpy speed. The copy is the caller's alone.
                source = base if base is not None else self.arena.view(entry.alloc, entry.dtype, entry.shape)
                if source.device.type != "cpu":
                    return source.clone()
                owned = self.scratch(entry.alloc.nbytes, entry.dtype, entry.shape)
                return source.clone() if owned is None else copy_bytes(owned, source)
            if base is None:
                release, alloc = self._released.append, entry.alloc
                base = self.arena.view(entry.alloc, entry.dtype, entry.shape, on_release=lambda: release(alloc))
                entry.base = base
                entry.base_uses = _storage_uses(base)
            return base.detach()

    def scratch(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...], *, evict: bool = False,
                spill: Callable[[Resident], bool] | None = None) -> torch.Tensor | None:
        """An unkeyed tensor from the tier's memory, returned to it when garbage-collected.

        With ``evict`` it makes room by policy as :meth:`reserve` does; otherwise it only uses free room.
        """
        with self.lock:
            self._drain()
            alloc = self.reserve(nbytes, spill) if evict else self.arena.alloc(nbytes)
            if alloc is None:
                return None
            release = self._released.append
            return self.arena.view(alloc, dtype, shape, on_release=lambda: release(alloc))

    def parent_of(self, key: str) -> str | None:
        """The chain parent ``key`` was admitted with (None: no link, or not resident)."""
        return self._parent.get(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.entries

    def __iter__(self) -> Iterator[Resident]:
        return iter(list(self.entries.values()))

    # -- admission and eviction ---------------------------------------------------------------------

    def reserve(self, nbytes: int, spill: Callable[[Resident], bool] | None = None) -> Allocation | None:
        """A slot of ``nbytes``, evicting by policy as needed; None when it cannot be made.

        Entries still viewed or pinned are skipped; volatile entries are evicted only if
        ``spill`` writes them elsewhere first (and returns True).
        """
        with self.lock:
            self._drain()
            if nbytes > self.arena.capacity:
                self.bypasses += 1
                return None
            skipped: list[Resident] = []
            try:
                while True:
                    alloc = self.arena.alloc(nbytes)
                    if alloc is not None:
                        return alloc
                    if not self._evict_next(spill, skipped):
                        self.bypasses += 1
                        return None
            finally:
                self._restore(skipped)

    def shed(self, enough: Callable[[], bool], spill: Callable[[Resident], bool] | None = None) -> int:
        """Evict by policy until ``enough()`` is true or nothing more can go; returns how many went.

        The same rules as :meth:`reserve`: held or pinned entries stay, volatile ones go only once
        ``spill`` has written them elsewhere. This is how a tier gives memory back under pressure.
        """
        with self.lock:
            self._drain()
            before = self.evictions
            skipped: list[Resident] = []
            try:
                while not enough() and self._evict_next(spill, skipped):
                    pass
            finally:
                self._restore(skipped)
            return self.evictions - before

    def _evict_next(self, spill: Callable[[Resident], bool] | None, skipped: list[Resident]) -> bool:
        """Evict (or skip, into ``skipped``) the policy's next victim; False when there is none left."""
        if not len(self.policy):
            return False
        entry = self.entries[self._chain_tail(self.policy.victim())]
        if entry.evictable and entry.volatile and spill is not None and spill(entry):
            self.spills += 1
        if not entry.evictable or entry.volatile:  # held, pinned, or its only copy
            self.policy.remove(entry.key)
            skipped.append(entry)
            return True
        self.evictions += 1
        self._kill(entry)
        return True

    def _chain_tail(self, key: str) -> str:
        """``key``, or the tail of its resident chain: a block is useless once a block before it is
        gone, so a chain is evicted from its tail (children before their parents)."""
        children, policy = self._children, self.policy
        for _ in range(len(children)):  # bounded against cycles
            below = children.get(key)
            nxt = next((c for c in below if c in policy), None) if below else None
            if nxt is None:
                break
            key = nxt
        return key

    def _restore(self, skipped: list[Resident]) -> None:
        for entry in skipped:
            if self.entries.get(entry.key) is entry:
                self.policy.insert(entry.key, entry.alloc.size)

    def admit(self, key: str, block_id: int, alloc: Allocation, dtype: torch.dtype, shape: tuple[int, ...],
              checksum: int, *, volatile: bool = False, generation: int | None = None,
              parent: str | None = None, compression: str | None = None) -> Resident | None:
        """Make the block in ``alloc`` resident; None (and the slot freed) if a newer version raced it.

        ``parent`` names the block this one extends in a chain (a KV-cache prefix block): while
        both are resident, eviction takes this one (the chain's tail) before its parent.
        """
        with self.lock:
            old = self.entries.get(key)
            if generation is not None and (generation != self.generation or (old is not None and old.volatile)):
                # A promotion raced a commit, or would replace the only copy of a newer cache-only version.
                self.arena.free(alloc)
                return None
            if old is not None:
                self._kill(old)
            entry = Resident(key, block_id, alloc, dtype, shape, checksum, volatile, self.pinned.get(key, 0),
                             compression=compression)
            self.entries[key] = entry
            if volatile:
                self.volatile_keys.add(key)
            if parent is not None and parent != key:
                self._parent[key] = parent
                self._children.setdefault(parent, {})[key] = None
            self.policy.insert(key, alloc.size)
            return entry

    def discard(self, key: str) -> None:
        """``key`` was replaced or deleted: its entry goes (its slot when the last view does)."""
        with self.lock:
            self.generation += 1
            entry = self.entries.get(key)
            if entry is not None:
                self._kill(entry)

    def tune(self, block_size: int) -> None:
        """Re-create a learned (predictive or kv) policy for blocks of about ``block_size`` bytes (only while empty)."""
        with self.lock:
            if self.policy_name in LEARNED_POLICIES and not self.entries and block_size > 0:
                self.policy = make_policy(self.policy_name, capacity=max(1, self.arena.capacity),
                                          block_size=min(block_size, max(1, self.arena.capacity)))

    def pin(self, key: str) -> None:
        """Keep ``key``'s entry (now and any later version of it) out of eviction until :meth:`unpin`."""
        with self.lock:
            self.pinned[key] = self.pinned.get(key, 0) + 1
            entry = self.entries.get(key)
            if entry is not None:
                entry.pins += 1

    def unpin(self, key: str) -> None:
        """Undo one :meth:`pin` of ``key`` (unknown keys are ignored)."""
        with self.lock:
            count = self.pinned.get(key, 0)
            if not count:
                return
            if count == 1:
                del self.pinned[key]
            else:
                self.pinned[key] = count - 1
            entry = self.entries.get(key)
            if entry is not None and entry.pins:
                entry.pins -= 1

    def evict(self, key: str, block_id: int | None = None) -> bool:
        """Give up ``key``'s entry now (of that version if given) unless it is pinned or the only copy.

        A slot still viewed by a tensor is freed when its last view goes, as with any eviction.
        """
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry.pins or entry.volatile or (block_id is not None and entry.block_id != block_id):
                return False
            self.evictions += 1
            self._kill(entry)
            return True

    def release(self, alloc: Allocation) -> None:
        """Give back a reserved slot that was never admitted."""
        with self.lock:
            self.arena.free(alloc)

    def mark_durable(self, entry: Resident) -> None:
        """The entry now has a copy in L3 (it was spilled), or was superseded: it may be evicted like any other.

        Only the entry itself changes: a newer version of the key admitted meanwhile stays volatile.
        """
        with self.lock:
            entry.volatile = False
            if self.entries.get(entry.key) is entry:
                self.volatile_keys.discard(entry.key)

    def clear(self) -> None:
        """Drop every entry (slots still viewed are freed when their views go)."""
        with self.lock:
            for entry in list(self.entries.values()):
                self._kill(entry)
            self._drain()

    # -- internals ------------------------------------------------------------------------------------

    def _kill(self, entry: Resident) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
            self.volatile_keys.discard(entry.key)
            parent = self._parent.pop(entry.key, None)
            if parent is not None:
                siblings = self._children.get(parent)
                if siblings is not None:
                    siblings.pop(entry.key, None)
                    if not siblings:
                        del self._children[parent]
        self.policy.remove(entry.key)
        entry.dead = True
        if entry.base is None:
            self.arena.free(entry.alloc)
        else:
            # The slot is freed by the view finalizer once the last tensor over it is gone (at once,
            # if nobody else holds one).
            self._zombies[entry.alloc.offset] = entry
            entry.base = None
            self._drain()

    def _drain(self) -> None:
        while self._released:
            alloc = self._released.popleft()
            self._zombies.pop(alloc.offset, None)
            self.arena.free(alloc)

    def stats(self) -> dict[str, int]:
        """Counters and occupancy."""
        with self.lock:
            self._drain()
            held = sum(1 for e in self.entries.values() if e.pins or e.in_use) + len(self._zombies)
            return {"blocks": len(self.entries), "held": held, "volatile": len(self.volatile_keys),
                    "bytes": sum(e.alloc.nbytes for e in self.entries.values()), "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions, "spills": self.spills,
                    "bypasses": self.bypasses}
