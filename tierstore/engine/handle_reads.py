"""The get path of a :class:`~tierstore.engine.handle.TierStore` (mixin): where a read finds its block.

In order: the transaction's pending change, the volatile L1/L2 entry of a cache-only key, the L2
residency, then the block index (cached row, else the catalog) and L3 through the mover, which fills
a fresh L2 slot. A get for the L1 device promotes through the mover into an L1 slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import crc32c
import numpy as np
import torch

from ..catalog import BlockRow, Catalog
from ..catalog.tier_bits import L1_BIT, L2_BIT, UNHASHED
from ..config import CacheConfig, parse_size
from ..errors import (
    BlockNotFoundError,
    ConfigError,
    DeviceMemoryError,
    InvalidArgumentError,
    InvalidKeyError,
    TierStoreError,
)
from ..tensors import check_key, dtype_from_name, dtype_name, tensor_bytes
from ..tiers.l1_cuda import DevicePool, event_done, is_device_oom
from ..tiers.l2_slab import HostArena
from ..tiers.l3_zarr import ZarrL3
from ..tiers.slab_allocator import Allocation
from .access_recorder import AccessRecorder
from .devices import usable_device
from .index import BlockIndex
from .migrator import Migrator
from .mover import Mover, Replaced
from .residency import Residency, Resident
from .shared_coordinator import SharedCoordinator
from .transaction import Txn, location_of

__all__ = ["StoreReads"]


class StoreReads:
    """Reads of a :class:`~tierstore.engine.handle.TierStore` (mixin)."""

    path: Path
    readonly: bool
    config: CacheConfig
    _closed: bool
    _catalog: Catalog
    _l3: ZarrL3
    _l1: Residency[DevicePool] | None
    _l2: Residency[HostArena] | None
    _index: BlockIndex
    _mover: Mover
    _migrator: Migrator
    _recorder: AccessRecorder
    _shared: SharedCoordinator | None
    _counts: dict[str, int]
    _hits: dict[str, int]
    _hit_bytes: dict[str, int]

    if TYPE_CHECKING:
        def _check_open(self) -> None: ...
        def _txn(self) -> Txn | None: ...
        def allocate(self, shape: tuple[int, ...], dtype: torch.dtype,
                     device: str | torch.device | None = None) -> torch.Tensor: ...
        def _get_shared(self, key: str, device: str | torch.device | None, copy: bool) -> tuple[torch.Tensor, str]: ...

    def get(self, key: str, device: str | torch.device | None = None, *, copy: bool = False) -> torch.Tensor:
        """The tensor stored under ``key`` (on ``device`` if given).

        From L2 the tensor is a zero-copy view whose slot stays reserved for as long as any tensor
        derived from it lives, so later store activity never changes it; do not modify it in
        place (pass ``copy=True`` for a tensor of your own). Raises ``BlockNotFoundError`` (a
        ``KeyError``) for a missing key and ``CorruptBlockError`` when stored bytes are damaged.
        """
        self._check_open()
        check_key(key)
        if device is not None:
            device = usable_device(device)
        if not isinstance(copy, (bool, np.bool_)):
            raise InvalidArgumentError(f"get {key!r}: copy must be True or False, not {copy!r}", key=key)
        try:
            tensor, tier = self._get_local(key, device, copy)
        except BlockNotFoundError:
            txn = self._txn()
            if self._shared is None or (txn is not None and key in txn.pending):
                raise
            tensor, tier = self._get_shared(key, device, copy)
        self._counts["get"] += 1
        self._hits[tier] += 1
        self._hit_bytes[tier] += tensor.nbytes
        self._recorder.record(key, "get", tier)
        self._migrator.on_get(key, device)
        return tensor

    def _get_local(self, key: str, device: str | torch.device | None, copy: bool) -> tuple[torch.Tensor, str]:
        if device is not None and self._l1 is not None and self._on_l1(device):
            return self._get_l1(key, copy)
        tensor, tier = self._get(key, copy)
        return (tensor if device is None else tensor.to(device)), tier

    def _on_l1(self, device: str | torch.device) -> bool:
        if self._l1 is None:
            return False
        pool_device: torch.device = self._l1.arena.device
        target = torch.device(device)
        return target.type == pool_device.type and target.index in (None, pool_device.index)

    def shrink_l1(self, nbytes: int | str | None = None) -> int:
        """Give L1 device memory back to PyTorch (for the model); returns the bytes released.

        Evicts blocks by ``l1_eviction_policy`` until ``nbytes`` (default: all it can) of whole
        pool chunks are free, then hands those chunks to PyTorch's caching allocator. Blocks whose
        only copy is in L1 are written back to L2 (or L3) first; blocks still viewed stay. 0 if
        L1 is off.
        """
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
            tensor, tier = self._get(key, copy)
            return tensor.to(pool.device), tier
        generation = l1.generation  # before the lookup: a commit after it makes the promotion's admission fail
        row = self._lookup(key)
        try:
            with self._device_oom(f"get {key!r} into L1"):
                return self._promote(key, row, copy, generation)
        except DeviceMemoryError:
            self.shrink_l1()  # give the device everything L1 can spare, then try once more
            if pool.device.type == "cuda":
                torch.cuda.empty_cache()
        with self._device_oom(f"get {key!r} into L1 (after shrinking L1)"):
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
        host, tier = self._get(key, False)
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
    def _device_oom(self, what: str) -> Iterator[None]:
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

    def _get(self, key: str, copy: bool) -> tuple[torch.Tensor, str]:
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

    def _lookup(self, key: str) -> BlockRow:
        txn = self._txn()
        if txn is not None and key in txn.pending:
            row = txn.pending[key].row
            if row is None:
                raise BlockNotFoundError(f"no block {key!r} in {self.path}", key=key)
            return row
        entry, l1, l2 = self._volatile(key), self._l1, self._l2
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
        entry = self._volatile(key)  # the cache-only version whose commit was settling
        if entry is None:
            return self._index.lookup(key)[0]
        return self._lookup(key)  # finds the entry now: no further wait

    def _volatile(self, key: str) -> Resident | None:
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

    def __contains__(self, key: object) -> bool:
        self._check_open()
        try:
            check_key(key)
        except InvalidKeyError:
            return False  # no invalid key can ever be stored
        assert isinstance(key, str)
        txn = self._txn()
        if txn is not None and key in txn.pending:
            return txn.pending[key].row is not None
        return self._exists(key)

    def _exists(self, key: str) -> bool:
        for _attempt in range(2):
            if self._volatile(key) is not None or self._catalog.has_block(key):
                return True
            if not self._index.await_settled(key):
                return False
        return False
