"""The get path of a :class:`~tierstore.engine.handle.TierStore` (:class:`Reads`): where a read finds its block.

In order: the transaction's pending change, the volatile L1/L2 entry of a cache-only key, the L2
residency, then the block index (cached row, else the catalog) and L3 through the mover, which fills
a fresh L2 slot. A get for the L1 device promotes through the mover into an L1 slot.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from heapq import merge
from pathlib import Path

import crc32c
import numpy as np
import torch

from ..catalog import BlockRow, Catalog
from ..catalog.tier_bits import L1_BIT, L2_BIT, UNHASHED
from ..config import parse_size
from ..errors import (
    BlockNotFoundError,
    ConfigError,
    DeviceMemoryError,
    InvalidArgumentError,
    InvalidKeyError,
    TierStoreError,
    UnsupportedTensorError,
)
from ..tensors import check_key, dtype_from_name, dtype_name, tensor_bytes
from ..tiers.l1_cuda import DevicePool, event_done, is_device_oom
from ..tiers.l2_slab import HostArena
from ..tiers.l3_zarr import Location
from ..tiers.slab_allocator import Allocation
from .access_recorder import AccessRecorder
from .devices import usable_device
from .index import BlockIndex
from .migrator import Migrator
from .mover import Mover, Replaced, no_memory, physical_memory
from .residency import Residency, Resident
from .transaction import Txn, location_of

__all__ = ["Reads", "ReadThrough"]

ReadThrough = Callable[[str, "str | torch.device | None", bool], tuple[torch.Tensor, str]]
"""Where a read goes on a local miss (the shared tier): ``(key, device, copy) -> (tensor, tier)``."""


class Reads:
    """The get path of a :class:`~tierstore.engine.handle.TierStore`: the handle delegates its reads here.

    It is given the parts it reads through (the tiers, the block index, the mover, the migrator,
    the recorder, the handle's counters) and two questions for the handle: the calling thread's
    transaction and whether the store is still open.
    """

    def __init__(self, *, path: Path, readonly: bool, catalog: Catalog, l1: Residency[DevicePool] | None,
                 l2: Residency[HostArena] | None, index: BlockIndex, mover: Mover, migrator: Migrator,
                 recorder: AccessRecorder, counts: dict[str, int], hits: dict[str, int],
                 hit_bytes: dict[str, int], txn: Callable[[], Txn | None], check_open: Callable[[], None]) -> None:
        self.path = path
        self.readonly = readonly
        self._catalog = catalog
        self._l1 = l1
        self._l2 = l2
        self._index = index
        self._mover = mover
        self._migrator = migrator
        self._recorder = recorder
        self._counts = counts
        self._hits = hits
        self._hit_bytes = hit_bytes
        self._txn = txn
        self._check_open = check_open

    def get(self, key: str, device: str | torch.device | None, copy: bool,
            read_through: ReadThrough | None, *, mapped: bool = False) -> torch.Tensor:
        """:meth:`TierStore.get <tierstore.engine.handle.TierStore.get>`; ``read_through`` serves a local miss."""
        self._check_open()
        check_key(key)
        if device is not None:
            device = usable_device(device)
        if copy is not False and copy is not True and not isinstance(copy, np.bool_):
            raise InvalidArgumentError(f"get {key!r}: copy must be True or False, not {copy!r}", key=key)
        if mapped is not False and not isinstance(mapped, (bool, np.bool_)):  # the hot path: one identity test
            raise InvalidArgumentError(f"get {key!r}: mapped must be True or False, not {mapped!r}", key=key)
        if mapped:
            if copy:
                raise InvalidArgumentError(f"get {key!r}: mapped=True views the stored bytes and copy=True asks for "
                                           "a copy of them; give one of the two", key=key)
            if device is None or torch.device(device).type == "cpu":
                view = self.map(key)
                if view is not None:
                    return view if device is None else view.to(device)
        try:
            # no device to place on (the hot path): straight to the read, without get_local's device checks
            tensor, tier = self.read(key, copy) if device is None else self.get_local(key, device, copy)
        except BlockNotFoundError:
            txn = self._txn()
            if read_through is None or (txn is not None and key in txn.pending):
                raise
            tensor, tier = read_through(key, device, copy)
        self._counts["get"] += 1
        self._hits[tier] += 1
        self._hit_bytes[tier] += tensor.nbytes
        self._recorder.record(key, "get", tier)
        self._migrator.on_get(key, device)
        return tensor

    def get_many(self, keys: Iterable[str], device: str | torch.device | None, copy: bool,
                 read_through: ReadThrough | None) -> dict[str, torch.Tensor]:
        """:meth:`TierStore.get_many <tierstore.engine.handle.TierStore.get_many>`."""
        self._check_open()
        if isinstance(keys, (str, bytes)):
            raise InvalidArgumentError(f"get_many takes an iterable of keys, not one key ({keys!r:.80}); "
                                       "use get() for one")
        wanted = list(dict.fromkeys(keys))  # each key once, in the order given
        for key in wanted:
            check_key(key)
        if device is not None:
            device = usable_device(device)
        if copy is not False and copy is not True and not isinstance(copy, np.bool_):
            raise InvalidArgumentError(f"get_many: copy must be True or False, not {copy!r}")
        batch: dict[str, tuple[BlockRow, Location, int]] = {}
        if device is None or not self.on_l1(device):  # an L1 device: each key promoted by get()
            for key in wanted:
                found = self._l3_miss(key, read_through)
                if found is not None:
                    batch[key] = found
        read = self._mover.read_many_l3(list(batch.values()), copy) if batch else []
        served = dict(zip(batch, read, strict=True))
        result: dict[str, torch.Tensor] = {}
        for key in wanted:  # in the caller's order: the access history learns which block follows which
            got = served.get(key)
            if got is None:  # not an L3 miss, or its file went away meanwhile: the ordinary get
                result[key] = self.get(key, device, copy, read_through)
                continue
            tensor, tier = got
            if device is not None:
                tensor = tensor.to(device)
            self._counts["get"] += 1
            self._hits[tier] += 1
            self._hit_bytes[tier] += tensor.nbytes
            self._recorder.record(key, "get", tier)
            self._migrator.on_get(key, device)
            result[key] = tensor
        return result

    def _l3_miss(self, key: str, read_through: ReadThrough | None) -> tuple[BlockRow, Location, int] | None:
        """``(row, location, L2 generation)`` when a get of ``key`` would read it from L3 now, else None.

        The same questions :meth:`_get_once` asks, in its order, without reading: a pending change,
        a cache-only entry, a copy in L2 (or a prefetch of it in flight) all leave the key to the
        ordinary get. A key in no tier raises ``BlockNotFoundError`` at once, as a get would, unless
        the shared tier may have it or a cache-only version of it is being committed.
        """
        txn = self._txn()
        if txn is not None and key in txn.pending:
            return None
        l1, l2 = self._l1, self._l2
        if l1 is not None and key in l1.volatile_keys:
            return None
        if l2 is not None and not self.readonly:
            self._migrator.await_move(key)
            if l2.lookup(key) is not None:
                return None
        generation = l2.generation if l2 is not None else 0
        try:
            row, loc = self._index.lookup(key)
        except BlockNotFoundError:
            if read_through is None and self.volatile(key) is None and not self._index.await_settled(key):
                raise
            return None
        if row.nbytes == 0 or (l2 is not None and self.readonly and l2.lookup(key, row.block_id) is not None):
            return None
        return row, loc, generation

    def map(self, key: str) -> torch.Tensor | None:
        """:meth:`TierStore.map <tierstore.engine.handle.TierStore.map>`."""
        self._check_open()
        check_key(key)
        for _attempt in range(4):
            try:
                tensor = self._map_once(key)
                break
            except Replaced:  # a writer replaced the block (and freed its file) while we mapped it
                continue
        else:
            return None  # kept changing: the ordinary get sorts it out
        if tensor is None:
            return None
        self._counts["get"] += 1
        self._counts["mapped"] += 1
        self._hits["L3"] += 1
        self._hit_bytes["L3"] += tensor.nbytes
        self._recorder.record(key, "get", "L3")
        # No migrator.on_get: its prefetch of the likely successors into L2 would copy the blocks a
        # mapping reader maps (it maps those too); the history still learns from the record.
        return tensor

    def _map_once(self, key: str) -> torch.Tensor | None:
        """A mapped view of ``key``'s committed L3 bytes, or None when a get would serve it elsewhere."""
        txn = self._txn()
        if txn is not None and key in txn.pending:  # uncommitted: the transaction's own bytes
            return None
        if self.volatile(key) is not None:  # cache-only: its only copy is in L1/L2
            return None
        l2 = self._l2
        if l2 is not None and key in l2:  # a faster tier holds it (a readonly handle's may be older: get checks)
            return None
        try:
            row, loc = self._index.lookup(key)
        except BlockNotFoundError:
            return None  # missing, or a cache-only version settling: the ordinary get says which
        if row.nbytes == 0:
            return None
        return self._mover.map_l3(row, loc)

    def get_local(self, key: str, device: str | torch.device | None, copy: bool) -> tuple[torch.Tensor, str]:
        if device is not None and self._l1 is not None and self.on_l1(device):
            return self._get_l1(key, copy)
        tensor, tier = self.read(key, copy)
        return (tensor if device is None else tensor.to(device)), tier

    def on_l1(self, device: str | torch.device) -> bool:
        if self._l1 is None:
            return False
        pool_device: torch.device = self._l1.arena.device
        target = torch.device(device)
        return target.type == pool_device.type and target.index in (None, pool_device.index)

    def shrink_l1(self, nbytes: int | str | None = None) -> int:
        """:meth:`TierStore.shrink_l1 <tierstore.engine.handle.TierStore.shrink_l1>`."""
        self._check_open()
        try:  # checked even with L1 off: a bad size is a bug in the caller on every machine
            want = None if nbytes is None else parse_size(nbytes, name="nbytes")
        except ConfigError as exc:
            raise InvalidArgumentError(f"shrink_l1: {exc.message}") from None
        l1 = self._l1
        if l1 is None:
            return 0
        pool = l1.arena
        with l1.lock:
            l1.shed(lambda: want is not None and pool.reclaimable() >= want, self._mover.write_back_l1)
            return pool.shrink(want)

    def _get_l1(self, key: str, copy: bool) -> tuple[torch.Tensor, str]:
        """A get for the L1 device: an L1 hit, or a promotion from L2/L3 into an L1 slot.

        A bf16 block is cast (on the device) to fp16 where the GPU has no bf16 math. A device
        out-of-memory during the promotion shrinks L1 (writing back what only it holds) and tries
        once more; if the device is still out of memory it raises ``DeviceMemoryError`` (a
        ``TierFullError``) and the block stays in L2/L3, readable with ``get(key)``.
        """
        l1 = self._l1
        assert l1 is not None
        pool = l1.arena
        txn = self._txn()
        if txn is not None and key in txn.pending:  # uncommitted: never cached in L1
            tensor, tier = self.read(key, copy)
            return tensor.to(pool.device), tier
        generation = l1.generation  # before the lookup: a commit after it makes the promotion's admission fail
        row = self.lookup(key)
        try:
            with self.device_oom(f"get {key!r} into L1"):
                return self._promote(key, row, copy, generation)
        except DeviceMemoryError:
            self.shrink_l1()  # give the device everything L1 can spare, then try once more
            if pool.device.type == "cuda":
                torch.cuda.empty_cache()
        with self.device_oom(f"get {key!r} into L1 (after shrinking L1)"):
            return self._promote(key, row, copy, generation)

    def _promote(self, key: str, row: BlockRow, copy: bool, generation: int) -> tuple[torch.Tensor, str]:
        l1 = self._l1
        assert l1 is not None
        pool = l1.arena
        entry = l1.lookup(key, row.block_id)
        if entry is not None:
            ready = entry.ready
            if ready is not None:  # a promotion still copying: the caller's stream waits for it
                torch.cuda.current_stream(pool.device).wait_event(ready)
                if event_done(ready):
                    entry.ready = None
            tensor = l1.view(entry, copy=copy)
            if tensor is not None:
                return tensor, "L1"
            # replaced or evicted by another thread since the lookup: promote it afresh
        host, tier = self.read(key, False)
        target = pool.needs_cast(host.dtype) or host.dtype
        copied = self._mover.into_l1(key, host, block_id=row.block_id, shape=row.shape, checksum=row.checksum,
                                     parent=row.parent, generation=generation, on_stream=True)
        admitted, event = copied if copied is not None else (None, None)
        if admitted is None:  # no room, or replaced meanwhile: serve this read, cache nothing
            return host.to(pool.device, dtype=target), tier
        admitted.ready = event
        entry = admitted
        tensor = l1.view(entry, copy=copy)
        if tensor is None:  # replaced or evicted by another thread since the admission
            return host.to(pool.device, dtype=target), tier
        return tensor, tier

    @contextmanager
    def device_oom(self, what: str) -> Iterator[None]:
        """Turn the L1 device running out of memory into ``DeviceMemoryError`` (nothing stored is lost)."""
        try:
            yield
        except DeviceMemoryError:
            raise
        except RuntimeError as exc:
            if not is_device_oom(exc):
                raise
            raise DeviceMemoryError(f"{what}: the device is out of memory ({exc}); the block is still in "
                                    "L2/L3 - free device memory or call shrink_l1(), then retry",
                                    tier="L1") from exc

    def read(self, key: str, copy: bool) -> tuple[torch.Tensor, str]:
        for _attempt in range(4):
            try:
                return self._get_once(key, copy)
            except Replaced:  # a writer replaced the block (and freed its file) while we read it
                continue
        raise TierStoreError(f"block {key!r} was replaced four times while being read; read it again", key=key)

    def _get_once(self, key: str, copy: bool) -> tuple[torch.Tensor, str]:
        l2 = self._l2
        txn = self._txn()
        pending = txn.pending.get(key) if txn is not None else None
        if pending is not None:
            if pending.row is None:
                raise BlockNotFoundError(f"no block {key!r} in {self.path}", key=key)
            if pending.slot is not None and l2 is not None:
                view = l2.arena.view(pending.slot, dtype_from_name(pending.row.dtype), pending.row.shape)
                return view.clone(), "L2"
            if pending.l1_slot is not None and self._l1 is not None:
                dtype = dtype_from_name(pending.row.dtype)
                return self._l1_host(self._l1.arena, pending.l1_slot, dtype, pending.row.shape), "L1"
            return self._mover.read_l3(pending.row, location_of(pending.row)), "L3"
        l1 = self._l1
        if l1 is not None and key in l1.volatile_keys:  # checked before L2: a write-back admits there first
            with l1.lock:
                entry1 = l1.entries.get(key)
                if entry1 is not None and entry1.volatile:
                    return self._l1_host(l1.arena, entry1.alloc, entry1.dtype, entry1.shape), "L1"
        if l2 is not None and not self.readonly:  # the writer's L2 only ever holds current versions
            self._migrator.await_move(key)  # a prefetch of this block in flight: take its copy
            entry = l2.lookup(key)
            if entry is not None:
                tensor = l2.view(entry, copy=copy)
                if tensor is None:  # replaced or evicted since the lookup (a cache-only successor may
                    raise Replaced  # be in L1/L2 only, not in the catalog): look it up again
                return tensor, "L2"
        generation = l2.generation if l2 is not None else 0
        try:
            row, loc = self._index.lookup(key)
        except BlockNotFoundError:
            if self._index.await_settled(key):
                raise Replaced from None  # a cache-only version was committed and is being admitted
            raise
        if l2 is not None and self.readonly:
            entry = l2.lookup(key, row.block_id)
            tensor = l2.view(entry, copy=copy) if entry is not None else None
            if tensor is not None:
                return tensor, "L2"
        if l2 is None or row.nbytes == 0:
            return self._mover.read_l3(row, loc), "L3"
        filled = self._mover.fill_l2(key, row, loc, generation, copy)
        return filled if filled is not None else (self._mover.read_l3(row, loc), "L3")

    def _l1_host(self, pool: DevicePool, alloc: Allocation, dtype: torch.dtype,
                 shape: tuple[int, ...]) -> torch.Tensor:
        """A host copy of an L1 slot's block (in L2 scratch memory when there is room)."""
        out = self.allocate(shape, dtype)
        if out.numel():
            pool.copy_out(alloc, tensor_bytes(out))
        return out

    def lookup(self, key: str) -> BlockRow:
        txn = self._txn()
        if txn is not None and key in txn.pending:
            row = txn.pending[key].row
            if row is None:
                raise BlockNotFoundError(f"no block {key!r} in {self.path}", key=key)
            return row
        entry, l1, l2 = self.volatile(key), self._l1, self._l2
        if entry is not None and l1 is not None and l1.entries.get(key) is entry:
            return self._volatile_row(entry, L1_BIT, l1.parent_of(key))  # hashed when it leaves L1
        if entry is not None and l2 is not None:  # a volatile entry not in L1 is in L2
            if entry.checksum == UNHASHED:
                entry.checksum = crc32c.crc32c(l2.arena.as_numpy(entry.alloc).data)
            return self._volatile_row(entry, L2_BIT, l2.parent_of(key))
        try:
            return self._index.lookup(key)[0]
        except BlockNotFoundError:
            if not self._index.await_settled(key):
                raise
        entry = self.volatile(key)  # the cache-only version whose commit was settling
        if entry is None:
            return self._index.lookup(key)[0]
        return self.lookup(key)  # finds the entry now: no further wait

    def volatile(self, key: str) -> Resident | None:
        """The entry holding the only copy of cache-only ``key`` (in L1 or L2), if any."""
        for tier in (self._l1, self._l2):
            if tier is not None and key in tier.volatile_keys:
                entry = tier.entries.get(key)
                if entry is not None and entry.volatile and not entry.dead:
                    return entry
        return None

    @staticmethod
    def _volatile_row(entry: Resident, tier_bit: int = L2_BIT, parent: str | None = None) -> BlockRow:
        return BlockRow.cache_only(entry.key, entry.block_id, dtype_name(entry.dtype), entry.shape, entry.alloc.nbytes,
                                   entry.checksum, tier=tier_bit, created=0.0, updated=0.0, parent=parent)

    def contains(self, key: object) -> bool:
        self._check_open()
        try:
            check_key(key)
        except InvalidKeyError:
            return False  # no invalid key can ever be stored
        assert isinstance(key, str)
        txn = self._txn()
        if txn is not None and key in txn.pending:
            return txn.pending[key].row is not None
        return self.exists(key)

    def exists(self, key: str) -> bool:
        for _attempt in range(2):
            if self.volatile(key) is not None or self._catalog.has_block(key):
                return True
            if not self._index.await_settled(key):
                return False
        return False

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype,
                 device: str | torch.device | None = None) -> torch.Tensor:
        """:meth:`TierStore.allocate <tierstore.engine.handle.TierStore.allocate>`."""
        self._check_open()
        try:
            shape = tuple(operator.index(s) for s in shape)
        except TypeError:
            raise UnsupportedTensorError(f"allocate() takes a shape of ints, not {shape!r:.80}") from None
        if not isinstance(dtype, torch.dtype) or any(s < 0 for s in shape):
            raise UnsupportedTensorError(f"allocate() needs a torch.dtype and sizes >= 0, got {dtype!r}, {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > physical_memory():
            raise no_memory(nbytes, f"allocate {shape} {dtype}")
        if device is not None:
            device = usable_device(device)
            if self._l1 is not None and nbytes > 0 and self.on_l1(device):
                tensor = self._l1.scratch(nbytes, dtype, shape, evict=True, spill=self._mover.write_back_l1)
                if tensor is not None:
                    return tensor
            return torch.empty(shape, dtype=dtype, device=device)
        if self._l2 is not None and nbytes > 0:
            tensor = self._l2.scratch(nbytes, dtype, shape)
            if tensor is not None:
                return tensor
        try:
            return torch.empty(shape, dtype=dtype)
        except (RuntimeError, MemoryError):
            raise no_memory(nbytes, f"allocate {shape} {dtype}") from None

    def count(self) -> int:
        """How many keys the calling thread sees (its transaction's pending changes counted in)."""
        self._check_open()
        self._index.refresh()
        count = self._index.counted()
        txn = self._txn()
        if txn is not None:
            for key, change in txn.pending.items():
                count += (change.row is not None) - self.exists(key)
        return count

    def keys(self, prefix: str | None = None) -> Iterator[str]:
        """:meth:`TierStore.keys <tierstore.engine.handle.TierStore.keys>`."""
        self._check_open()
        if prefix is not None and not isinstance(prefix, str):
            raise InvalidKeyError(f"keys(prefix=...) takes a str, not {type(prefix).__name__}")
        volatile = sorted(k for k in self._index.volatile_keys() if prefix is None or k.startswith(prefix))
        keys: Iterator[str] = _unique(merge(self._iter_keys(prefix), volatile)) if volatile else self._iter_keys(prefix)
        txn = self._txn()
        if txn is not None and txn.pending:
            present = set(keys)
            for key, change in txn.pending.items():
                if prefix is None or key.startswith(prefix):
                    (present.add if change.row is not None else present.discard)(key)
            return iter(sorted(present))
        return keys

    def _iter_keys(self, prefix: str | None) -> Iterator[str]:
        after = ""
        while True:
            self._check_open()
            page = self._catalog.keys_page(after, 1000, prefix)
            yield from page
            if len(page) < 1000:
                return
            after = page[-1]


def _unique(keys: Iterator[str]) -> Iterator[str]:
    """Sorted ``keys`` without repeats (a key spilled while being listed is both volatile and committed)."""
    last = None
    for key in keys:
        if key != last:
            yield key
            last = key
