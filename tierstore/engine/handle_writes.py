"""The put path of a :class:`~tierstore.engine.handle.TierStore` (:class:`Writes`) and its commit protocol.

Committing follows "bytes before rows": block bytes are written to fresh L3 locations and synced,
then one catalog commit switches them in (under the index lock, with the block index updated in
the same step), then the bytes of replaced versions are freed and the volatile tiers admit the
new versions.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import crc32c
import numpy as np
import torch

from ..catalog import BlockRow, Catalog, now
from ..catalog.tier_bits import L1_BIT, L2_BIT, L3_BIT, UNHASHED
from ..config import CacheConfig, normalize_compression
from ..errors import ConfigError, InvalidArgumentError, TransactionError, translate_os_error
from ..tensors import check_key, check_tensor, dtype_from_name, dtype_name, tensor_bytes
from ..tiers.codecs import choose_codec
from ..tiers.l1_cuda import DevicePool, is_device_oom
from ..tiers.l2_slab import HostArena
from ..tiers.l3_zarr import EMPTY_LOCATION, Contents, Location, ZarrL3
from ..tiers.slab_allocator import Allocation
from .access_recorder import AccessRecorder
from .handle_reads import Reads
from .index import BlockIndex
from .migrator import Migrator
from .mover import Mover, no_memory, physical_memory
from .residency import Residency, Resident
from .shared_coordinator import SharedCoordinator
from .transaction import Change, Txn, location_of

__all__ = ["Writes"]


class Writes:
    """The put path and the commit of a :class:`~tierstore.engine.handle.TierStore`: the handle delegates here.

    A write looks blocks up as a read does (through ``reads``); the handle answers the calling
    thread's transaction, opens one (``transaction``), checks it may write and whether it is closed;
    ``landing`` says whether the calling thread is storing blocks fetched from the shared tier.
    """

    def __init__(self, *, readonly: bool, config: CacheConfig, catalog: Catalog, l3: ZarrL3,
                 l1: Residency[DevicePool] | None, l2: Residency[HostArena] | None, index: BlockIndex,
                 mover: Mover, migrator: Migrator, recorder: AccessRecorder, shared: SharedCoordinator | None,
                 counts: dict[str, int], reads: Reads, txn: Callable[[], Txn | None],
                 transaction: Callable[[], AbstractContextManager[object]], check_writable: Callable[[], None],
                 closed: Callable[[], bool], landing: Callable[[], bool]) -> None:
        self.readonly = readonly
        self.config = config
        self._catalog = catalog
        self._l3 = l3
        self._l1 = l1
        self._l2 = l2
        self._index = index
        self._mover = mover
        self._migrator = migrator
        self._recorder = recorder
        self._shared = shared
        self._counts = counts
        self._reads = reads
        self._txn = txn
        self.transaction = transaction
        self._check_writable = check_writable
        self._closed = closed
        self._landing = landing

    def _unshared(self, freed: list[Location]) -> list[Location]:
        """``freed`` less the blocks whose L3 array other rows still name: a commit's large compressed blocks
        share one array (a run, catalog schema 4), which goes only with the last of them (the dead blocks'
        bytes stay in it until then: compaction rewrites packs, not runs)."""
        arrays = {loc.array for loc in freed if loc.array.startswith("blocks/")}
        shared = self._catalog.arrays_in_use(arrays) if arrays else set()
        return [loc for loc in freed if loc.array not in shared] if shared else freed

    def abort(self, txn: Txn) -> None:
        self._l3.rollback()
        if self._l1 is not None:
            for slot in [c.l1_slot for c in txn.pending.values() if c.l1_slot is not None] + txn.dropped_l1:
                self._l1.release(slot)
        if self._l2 is not None:
            for change in txn.pending.values():
                if change.slot is not None:
                    self._l2.release(change.slot)
            for slot in txn.dropped_slots:
                self._l2.release(slot)

    def commit(self, txn: Txn) -> None:
        txn.superseded()
        l2_only = {k for k, c in txn.pending.items() if c.row is not None and c.row.l3_array is None
                   and c.row.nbytes > 0}
        located = [(c.row, c.location) for k, c in txn.pending.items() if c.row is not None and k not in l2_only]
        rows = [row for row, _loc in located]
        deletes = [k for k, c in txn.pending.items() if c.row is None or k in l2_only]
        try:
            lengths = self._l3.prepare()
        except OSError as exc:
            self.abort(txn)
            raise translate_os_error(exc, what="sync block data", path=self._l3.root) from None
        replaced: list[BlockRow] = []
        failure: BaseException | None = None
        index = self._index
        with index.lock:  # no spill commits between the check below and the versions it leaves
            try:
                if rows or lengths or any(self._catalog.has_block(key) for key in deletes):
                    replaced = self._catalog.commit_blocks(rows, deletes, lengths, index.next_block_id)
                # else: only cache-only blocks that stay in L2 and replace no committed row: no catalog commit
            except BaseException as exc:
                failure = exc
            else:
                index.begin_settling()
                self._l3.commit()
                index.committed(located, deletes, replaced, {
                    key: change.row.block_id if key in l2_only and change.row is not None else None
                    for key, change in txn.pending.items()})
        if failure is not None:  # undone outside the index lock: releasing slots takes tier locks
            self.abort(txn)
            raise failure
        self._l3.free(self._unshared([location_of(row) for row in replaced] + txn.garbage))
        try:
            self._settle_l2(txn, l2_only)
        finally:
            index.end_settling()
        if self._shared is not None and self._shared.policy == "write-through" and not self._landing():
            self._shared.enqueue(row.key for row in rows if row.durable)
        for key, change in txn.pending.items():
            self._recorder.record(key, "put" if change.row is not None else "delete")

    def _settle_l2(self, txn: Txn, l2_only: set[str]) -> None:
        """After a commit: committed puts become resident, replaced and deleted blocks leave L1 and L2.

        Every discard comes before the first admission: a reader may evict a block admitted to L1
        at once (writing it back to L2), and a later L2 discard of that key would drop that copy.
        """
        l1, l2 = self._l1, self._l2
        if l1 is not None:
            for slot in txn.dropped_l1:
                l1.release(slot)
            for key in txn.pending:
                l1.discard(key)
        if l2 is not None:
            for slot in txn.dropped_slots:
                l2.release(slot)
            for key, change in txn.pending.items():
                l2.discard(key)
                row = change.row
                if row is not None and change.slot is not None:
                    l2.admit(key, row.block_id, change.slot, dtype_from_name(row.dtype), row.shape, row.checksum,
                             volatile=key in l2_only, parent=row.parent, compression=change.compression)
        if l1 is not None:
            for key, change in txn.pending.items():
                row = change.row
                if row is not None and change.l1_slot is not None:  # a device tensor, cache-only: only in L1
                    l1.admit(key, row.block_id, change.l1_slot, dtype_from_name(row.dtype), row.shape,
                             row.checksum, volatile=True, parent=row.parent, compression=change.compression)

    def put(self, key: str, tensor: torch.Tensor, *, durable: bool = True, parent: str | None = None,
            compression: bool | str | None = None) -> None:
        """:meth:`TierStore.put <tierstore.engine.handle.TierStore.put>`."""
        self._check_writable()
        check_key(key)
        check_tensor(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > physical_memory():  # an expanded view can claim terabytes it does not hold
            raise no_memory(nbytes, f"put {key!r}")
        if not isinstance(durable, (bool, np.bool_)):
            raise InvalidArgumentError(f"durable must be True or False, not {durable!r}")
        if parent is not None:
            check_key(parent)
            if parent == key:
                raise InvalidArgumentError(f"put {key!r}: a block cannot be its own chain parent")
        codec_setting = None if compression is None else _compression(key, compression)
        txn = self._txn()
        if txn is None:
            with self.transaction():
                self._put(self._txn_or_fail(), key, tensor, durable, parent, codec_setting)
        else:
            self._put(txn, key, tensor, durable, parent, codec_setting)
        self._counts["put"] += 1

    def _txn_or_fail(self) -> Txn:
        txn = self._txn()
        if txn is None:  # pragma: no cover - transaction() always sets it
            raise TransactionError("no transaction is open in this thread")
        return txn

    def _put(self, txn: Txn, key: str, tensor: torch.Tensor, durable: bool, parent: str | None,
             compression: str | None) -> None:
        if not durable and self._l1 is not None and tensor.numel() and self._reads.on_l1(tensor.device):
            l1_slot = self._put_l1(tensor)
            if l1_slot is not None:
                stamp = now()
                previous = txn.pending.get(key)
                created = previous.row.created if previous is not None and previous.row is not None else stamp
                row = BlockRow.cache_only(key, self._index.new_block_id(), dtype_name(tensor.dtype),
                                          tuple(tensor.shape), l1_slot.nbytes, UNHASHED, tier=L1_BIT, created=created,
                                          updated=stamp, parent=parent)
                txn.set(key, Change(row, None, l1_slot, compression))
                return
        try:
            data = tensor_bytes(tensor)  # a copy when the tensor is not contiguous on the CPU
        except RuntimeError as exc:
            if not is_device_oom(exc):
                raise
            raise no_memory(tensor.numel() * tensor.element_size(), f"put {key!r}") from None
        slot, l2 = None, self._l2
        if l2 is not None and data.nbytes > 0:
            slot = l2.reserve(data.nbytes, self.spill)
            if slot is not None:
                np.copyto(l2.arena.as_numpy(slot), data)  # a snapshot: the caller may reuse its tensor
        # A cache-only block kept in L2 is hashed only if it ever goes to disk (see spill).
        checksum = UNHASHED if slot is not None and not durable else crc32c.crc32c(data.data)
        block_id = self._index.new_block_id()
        name, shape = dtype_name(tensor.dtype), tuple(tensor.shape)
        try:
            if durable or slot is None:
                loc = self._write_l3(Contents(key, name, shape), block_id, data,
                                     tensor.element_size(), compression)
            else:
                loc = EMPTY_LOCATION  # cache-only and in L2: no disk write now
        except BaseException:
            if slot is not None and l2 is not None:
                l2.release(slot)
            raise
        stamp = now()
        previous = txn.pending.get(key)
        old = previous.row if previous is not None else None  # the catalog keeps `created` on replace
        row = BlockRow.stored(key, block_id, name, shape, data.nbytes, checksum,
                              durable=durable, l3=loc.to_columns(),
                              tiers=(L3_BIT if loc.array else 0) | (L2_BIT if slot else 0),
                              created=old.created if old is not None else stamp, updated=stamp, parent=parent)
        txn.set(key, Change(row, slot, compression=compression, loc=loc))

    def _put_l1(self, tensor: torch.Tensor) -> Allocation | None:
        """A snapshot of device tensor ``tensor`` in a fresh L1 slot (None when L1 has no room)."""
        l1 = self._l1
        assert l1 is not None
        src = tensor.detach().resolve_conj().resolve_neg()
        slot = l1.reserve(src.numel() * src.element_size(), self._mover.write_back_l1)
        if slot is None:
            return None
        try:
            with self._reads.device_oom("put into L1"):
                l1.arena.copy_in(slot, src)  # on the current stream: no event to wait for
        except BaseException:
            l1.release(slot)
            raise
        return slot

    def _write_l3(self, contents: Contents, block_id: int, data: np.ndarray, itemsize: int,
                  compression: str | None) -> Location:
        key = contents.key
        self._index.check_room(key, data.nbytes)
        codec = choose_codec(compression or str(self.config.l3_compression), itemsize)
        try:
            return self._l3.write(block_id, data, codec, contents)
        except OSError as exc:
            raise translate_os_error(exc, what=f"write block {key!r}", path=self._l3.root, key=key) from None

    def spill(self, entry: Resident) -> bool:
        """Write a cache-only block leaving L2 to L3 (a journaled move, see :mod:`tierstore.engine.migrator`)."""
        if self._closed() or self.readonly:
            return False
        return self._migrator.spill(entry)

    def spilled(self, key: str) -> None:
        """The migrator committed cache-only ``key`` to L3: it can be published now."""
        if self._shared is not None and self._shared.policy != "explicit" and not self._landing():
            self._shared.enqueue([key])

    def delete(self, key: str) -> None:
        """:meth:`TierStore.delete <tierstore.engine.handle.TierStore.delete>`."""
        self._check_writable()
        check_key(key)
        txn = self._txn()
        if txn is None:
            with self.transaction():
                self._delete(self._txn_or_fail(), key)
        else:
            self._delete(txn, key)
        self._counts["delete"] += 1

    def _delete(self, txn: Txn, key: str) -> None:
        self._reads.lookup(key)
        txn.set(key, Change(None))


def _compression(key: str, value: object) -> str:
    """``put``'s ``compression`` argument as a codec setting, or ``InvalidArgumentError``."""
    if not isinstance(value, (bool, str)):
        raise InvalidArgumentError(f"put {key!r}: compression must be a bool or a codec name, "
                                   f"not {type(value).__name__}")
    try:
        return normalize_compression(value)
    except ConfigError as exc:
        raise InvalidArgumentError(f"put {key!r}: {exc}") from None
