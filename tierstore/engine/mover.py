"""The mover: the only code that copies a block's bytes from one tier to another.

It fills L2 from L3 on a get miss, promotes into L1 (casting where the device needs it), writes
a cache-only block leaving L1 back to L2, writes a cache-only block leaving L2 or L1 to L3 (a
spill: :meth:`Mover.write_l3`, which reads the L3 copy back and checks it), and it holds the one
checksum check every copy passes (:func:`check_bytes`). It journals nothing: a get calls it
directly (a fill survives no crash, so there is nothing to settle), and the migrator calls it
between its journal's intent and commit, passing its crash points as ``step``. A spill is a
journaled move: the residencies' eviction callbacks reach the migrator's journal (``attach``),
which calls :meth:`Mover.write_l3` for the bytes and commits the row through the block index.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import crc32c
import numpy as np
import torch

from ..catalog import BlockRow, Catalog, now
from ..catalog.tier_bits import UNHASHED
from ..errors import BlockNotFoundError, CorruptBlockError, TierFullError, TierStoreError, UnsafePathError
from ..tensors import dtype_from_name, dtype_name, host_bytes, tensor_from_bytes
from ..tiers.codecs import choose_codec
from ..tiers.l1_cuda import DevicePool
from ..tiers.l2_slab import HostArena
from ..tiers.l3_zarr import Contents, Location, ZarrL3
from ..tiers.slab_allocator import Allocation
from .index import BlockIndex
from .residency import Residency, Resident
from .transaction import location_of

__all__ = ["Mover", "Replaced", "check_bytes", "checksum_ok", "no_memory", "physical_memory"]

T = TypeVar("T")

Step = Callable[[str], None]
"""A journaled move's crash point (``copied``, ``verified``, ``committed``, ``freed``); a no-op for a get."""


_L3_BIT = 4


def _no_step(point: str) -> None:
    pass


class Replaced(Exception):
    """A block was replaced while being read (its file is gone): read the key again."""


def checksum_ok(data: np.ndarray, checksum: int) -> bool:
    """Whether ``data`` hashes (crc32c) to ``checksum``."""
    return bool(crc32c.crc32c(data.data) == checksum)


def check_bytes(key: str, data: np.ndarray, checksum: int, where: str, doing: str = "", *,
                crc: int | None = None) -> None:
    """``CorruptBlockError`` unless ``data`` copied from L3 matches the catalog's ``checksum``.

    ``where`` names the L3 array, ``doing`` what the copy was for (", while being promoted");
    ``crc`` is ``data``'s crc32c when the read already computed it (``ZarrL3.read_into`` does).
    """
    if not (checksum_ok(data, checksum) if crc is None else crc == checksum):
        raise _checksum_error(key, where, doing)


def _checksum_error(key: str, where: str, doing: str = "") -> CorruptBlockError:
    return CorruptBlockError(f"block {key!r} failed its checksum in L3 ({where}){doing}; the stored bytes are "
                             "damaged - restore them or run 'tierstore verify --fix'", key=key, tier="L3")


def _named(exc: CorruptBlockError | UnsafePathError, key: str) -> TierStoreError:
    """``exc`` again, its message and fields naming the block's ``key``."""
    return type(exc)(f"block {key!r}: {exc.message}", key=key, path=exc.path, tier="L3")


@functools.cache
def physical_memory() -> int:
    """Bytes of RAM this machine has (no copy can be larger); asked once per process (every put checks it)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - every Linux has both
        return 1 << 62


def no_memory(nbytes: int, what: str) -> TierFullError:
    """The error for a block larger than the machine's memory."""
    return TierFullError(f"{what}: {nbytes} bytes is more memory than this machine has "
                         f"({physical_memory()} bytes); use a smaller block", tier="L2")


def _file_order(loc: Location) -> tuple[str, int, int]:
    """Where a block's bytes start: reading in this order reads each shard file front to back."""
    return loc.array, loc.shard, loc.offset


class Mover:
    """Copies between L3, L2 (``Residency[HostArena]``) and L1 (``Residency[DevicePool]``) of one store."""

    def __init__(self, catalog: Catalog, l3: ZarrL3, l1: Residency[DevicePool] | None,
                 l2: Residency[HostArena] | None, index: BlockIndex, *, verify_maps: str = "always") -> None:
        self.catalog = catalog
        self._verify_maps = verify_maps
        self._verified_maps: set[tuple[int, Location]] = set()
        """Block versions (id, where) whose mapped bytes passed their checksum (``l3_verify_maps`` ``"once"``
        and ``"disk"``; under ``"disk"`` a version leaves it before a map that reads from the disk)."""
        self.index = index
        self.l3 = l3
        self.l1 = l1
        self.l2 = l2
        self._spill_l2: Callable[[Resident], bool] = lambda entry: False
        self._spill_to_l3: Callable[[Resident, np.ndarray], bool] = lambda entry, data: False
        self._may_write: Callable[[], bool] = lambda: False

    def attach(self, *, spill_l2: Callable[[Resident], bool], write_back_l3: Callable[[Resident, np.ndarray], bool],
               may_write: Callable[[], bool]) -> None:
        """The journaled writes to L3 (the migrator's), and whether the store may write now (open, writable)."""
        self._spill_l2, self._spill_to_l3, self._may_write = spill_l2, write_back_l3, may_write

    def spill_l2(self, entry: Resident) -> bool:
        """L2's eviction callback: a cache-only block leaving L2 goes to L3 (journaled)."""
        return self._spill_l2(entry)

    # -- L3 -> host / L2 ----------------------------------------------------------------------------

    def read_l3(self, row: BlockRow, loc: Location) -> torch.Tensor:
        """``row``'s tensor, read from L3 into fresh memory and verified."""
        try:
            buf = host_bytes(row.nbytes)
        except MemoryError:
            raise no_memory(row.nbytes, f"read block {row.key!r}") from None
        row = self.read_l3_into(row, loc, buf)
        return tensor_from_bytes(buf, dtype_from_name(row.dtype), row.shape)

    def read_l3_into(self, row: BlockRow, loc: Location, out: np.ndarray) -> BlockRow:
        """Read and verify ``row``'s bytes into ``out``; returns the row read.

        Raises :class:`Replaced` when a writer replaced the block and freed its file meanwhile (the
        caller reads the key again: the new version may differ in size, dtype and shape); a
        block that compaction moved (same block id, same bytes) is followed to its new place.
        """
        try:  # the common case first, without the moved-file machinery (the hot path of a small get)
            crc = self.l3.read_into(loc, out)
        except FileNotFoundError:
            row, loc = self._moved(row, loc)
            row, loc, crc = self._follow(row, loc, lambda where: self.l3.read_into(where, out))
        except (CorruptBlockError, UnsafePathError) as exc:
            raise _named(exc, row.key) from None
        check_bytes(row.key, out, row.checksum, loc.array, crc=crc)
        return row

    def _follow(self, row: BlockRow, loc: Location, read: Callable[[Location], T]) -> tuple[BlockRow, Location, T]:
        """``read(loc)``, following the block to where compaction moved it when its file is gone
        (:meth:`_moved`); L3's errors named with the key."""
        for _attempt in range(3):
            try:
                return row, loc, read(loc)
            except FileNotFoundError:
                row, loc = self._moved(row, loc)
            except (CorruptBlockError, UnsafePathError) as exc:
                raise _named(exc, row.key) from None
        raise TierStoreError(f"block {row.key!r} kept moving while being read; read it again", key=row.key)

    def map_l3(self, row: BlockRow, loc: Location) -> torch.Tensor | None:
        """``row``'s tensor as a zero-copy view of its raw bytes in L3, verified; None when not stored raw.

        Nothing is copied: the view maps the shard file ``MAP_PRIVATE`` (writes into it stay the
        holder's, see :mod:`tierstore.tiers.l3_zarr.mapped`), and L3 never rewrites committed bytes
        in place, so it never changes under its holder. The catalog's checksum is checked over the
        mapped bytes, as every L3 read is; with ``l3_verify_maps="once"`` on this version's first map
        only, with ``"disk"`` also on every map that reads some of its pages from the disk.
        Raises as :meth:`read_l3_into` does (``Replaced``, ...).
        """
        nbytes, block_id = row.nbytes, row.block_id
        row, loc, data = self._follow(row, loc, lambda where: self._map_raw(block_id, where, nbytes))
        if data is None:
            return None
        version = (row.block_id, loc)
        if self._verify_maps == "always" or version not in self._verified_maps:
            check_bytes(row.key, data, row.checksum, loc.array)
            if self._verify_maps != "always":
                self._verified_maps.add(version)
        return tensor_from_bytes(data, dtype_from_name(row.dtype), row.shape)

    def _map_raw(self, block_id: int, loc: Location, nbytes: int) -> np.ndarray | None:
        """Map a raw block; under ``l3_verify_maps="disk"`` first forget that its version was checked
        unless every page is cached already (alone in its file): the map is about to read from the disk.

        Forgetting before the map, not after, keeps another thread's map of the same version from
        trusting pages this one is reading in, before this one has checked them.
        """
        if self._verify_maps != "disk":
            return self.l3.map_raw(loc, nbytes)

        def before_map(cached: bool) -> None:
            if not cached:
                self._verified_maps.discard((block_id, loc))
        return self.l3.map_raw(loc, nbytes, before_map=before_map)

    def _moved(self, row: BlockRow, loc: Location) -> tuple[BlockRow, Location]:
        """Where ``row``'s block is now that the file at ``loc`` is gone: compaction moved it (same block id).

        Raises :class:`Replaced` when a writer replaced it (read the key again), ``BlockNotFoundError``
        when it was deleted and ``CorruptBlockError`` when the catalog still names the missing file.
        """
        newer = self.catalog.get_block(row.key)
        if newer is None:
            if self.index.await_settled(row.key):  # replaced by a cache-only version, not deleted
                raise Replaced from None
            raise BlockNotFoundError(f"block {row.key!r} was deleted while being read", key=row.key) from None
        if newer.block_id != row.block_id:
            raise Replaced from None
        if location_of(newer) == loc:
            path = self.l3.shard_path(loc.array, loc.shard)
            raise CorruptBlockError(
                f"block {row.key!r}: its data file {path} is missing; run 'tierstore verify --fix' "
                "to drop damaged blocks", key=row.key, path=str(path), tier="L3") from None
        return newer, location_of(newer)

    def fill_l2(self, key: str, row: BlockRow, loc: Location, generation: int,
                copy: bool) -> tuple[torch.Tensor, str] | None:
        """A get miss: decompress ``row`` straight into a fresh L2 slot and admit it; None when L2 has no room.

        Returns the tensor (a view of the slot, or this read's own bytes when a writer replaced the
        block meanwhile) and the tier it came from.
        """
        l2 = self.l2
        assert l2 is not None
        slot = l2.reserve(row.nbytes, self.spill_l2)
        if slot is None:
            return None
        try:
            out = l2.arena.as_numpy(slot)
            self.read_l3_into(row, loc, out)
        except BaseException:
            l2.release(slot)
            raise
        return self._admit_filled(key, row, slot, out, generation, copy)

    def read_many_l3(self, wanted: Sequence[tuple[BlockRow, Location, int]],
                     copy: bool) -> list[tuple[torch.Tensor, str] | None]:
        """Get misses of several blocks ``(row, location, L2 generation)``, read through one L3 pipeline.

        What :meth:`fill_l2` (or :meth:`read_l3` where L2 has no room or is off) does for one block,
        for all of them at once: each gets its output (a fresh L2 slot, else fresh host memory), then
        ``ZarrL3.read_many`` reads them in file and offset order, the disk reading the next blocks
        while earlier ones decode, and each is checked against its row's checksum and admitted to
        L2. Returns, per block in the given order, ``(tensor, tier)`` as :meth:`fill_l2` does, or
        None where its file was gone (replaced, deleted or compacted meanwhile: the caller reads
        that key again the ordinary way). Raises the first block's ``CorruptBlockError`` (naming its
        key) after the others were settled; no slot is left reserved.
        """
        l2 = self.l2
        outs: list[tuple[np.ndarray, Allocation | None]] = []
        try:
            for row, _loc, _generation in wanted:
                slot = l2.reserve(row.nbytes, self.spill_l2) if l2 is not None and row.nbytes else None
                if slot is not None:
                    assert l2 is not None
                    outs.append((l2.arena.as_numpy(slot), slot))
                    continue
                try:
                    outs.append((host_bytes(row.nbytes), None))
                except MemoryError:
                    raise no_memory(row.nbytes, f"read block {row.key!r}") from None
            order = sorted(range(len(wanted)), key=lambda i: _file_order(wanted[i][1]))
            crcs = self.l3.read_many([(wanted[i][1], outs[i][0]) for i in order])
        except BaseException:
            self._release_slots(slot for _out, slot in outs)
            raise
        results: list[tuple[torch.Tensor, str] | None] = [None] * len(wanted)
        failure: BaseException | None = None
        for position, i in enumerate(order):
            row, loc, generation = wanted[i]
            out, slot = outs[i]
            crc = crcs[position]
            if isinstance(crc, int) and crc == row.checksum:
                if slot is None:
                    results[i] = tensor_from_bytes(out, dtype_from_name(row.dtype), row.shape), "L3"
                else:
                    results[i] = self._admit_filled(row.key, row, slot, out, generation, copy)
                continue
            self._release_slots([slot])
            if isinstance(crc, FileNotFoundError):
                continue  # replaced, deleted or moved meanwhile: the caller's ordinary read sorts it out
            if failure is None:
                if isinstance(crc, (CorruptBlockError, UnsafePathError)):
                    failure = _named(crc, row.key)
                elif isinstance(crc, BaseException):
                    failure = crc  # what a get would have raised (an I/O error)
                else:
                    failure = _checksum_error(row.key, loc.array)
        if failure is not None:
            raise failure
        return results

    def _release_slots(self, slots: Iterable[Allocation | None]) -> None:
        l2 = self.l2
        for slot in slots:
            if slot is not None and l2 is not None:
                l2.release(slot)

    def _admit_filled(self, key: str, row: BlockRow, slot: Allocation, out: np.ndarray, generation: int,
                      copy: bool) -> tuple[torch.Tensor, str]:
        """Admit a slot just filled and checked from L3; this read's own bytes when the block was replaced."""
        l2 = self.l2
        assert l2 is not None
        with l2.lock:  # a refused admission frees the slot: copy it out before another thread reuses it
            entry = l2.admit(key, row.block_id, slot, dtype_from_name(row.dtype), row.shape, row.checksum,
                             generation=generation, parent=row.parent)
            if entry is None:  # the block was replaced while we read it: hand out these bytes, cache nothing
                return tensor_from_bytes(bytearray(out), dtype_from_name(row.dtype), row.shape), "L3"
            tensor = l2.view(entry, copy=copy)  # under the same lock: nobody killed it since the admission
        if tensor is None:  # pragma: no cover - see above
            raise Replaced
        return tensor, "L3"

    def promote_l2(self, key: str, row: BlockRow, loc: Location, generation: int, step: Step = _no_step) -> bool:
        """A planned promotion L3 -> L2: copy, verify, admit; False when there was no room or no block."""
        l2 = self.l2
        assert l2 is not None
        slot = l2.reserve(row.nbytes, self.spill_l2)
        if slot is None:
            return False
        try:
            out = l2.arena.as_numpy(slot)
            try:
                crc = self.l3.read_into(loc, out)
            except FileNotFoundError:  # replaced or deleted meanwhile: nothing to promote
                l2.release(slot)
                return False
            except CorruptBlockError as exc:
                raise CorruptBlockError(f"block {key!r}: {exc.message}", key=key, path=exc.path, tier="L3") from None
            step("copied")
            check_bytes(key, out, row.checksum, loc.array, ", while being promoted", crc=crc)
            step("verified")
        except BaseException:
            l2.release(slot)
            raise
        entry = l2.admit(key, row.block_id, slot, dtype_from_name(row.dtype), row.shape, row.checksum,
                         generation=generation, parent=row.parent)
        step("committed")
        step("freed")  # a promotion is a copy: the source keeps the block
        return entry is not None

    def read_l3_checked(self, key: str, row: BlockRow, loc: Location) -> np.ndarray:
        """``row``'s bytes read from L3 into fresh memory and verified (a promotion that skips L2)."""
        buf = host_bytes(row.nbytes)
        crc = self.l3.read_into(loc, buf)
        check_bytes(key, buf, row.checksum, loc.array, ", while being promoted", crc=crc)
        return buf

    def promote_l1(self, key: str, host_entry: Resident | None, found: tuple[BlockRow, Location] | None,
                   generation: int, step: Step = _no_step) -> bool:
        """A planned promotion into L1: from ``host_entry`` (its L2 copy) or else ``found`` (its L3 row).

        False when the L2 copy was replaced or evicted meanwhile, there is nothing to promote, or
        L1 has no free room.
        """
        l2 = self.l2
        if host_entry is not None and l2 is not None:
            host = l2.view(host_entry)
            if host is None:  # replaced or evicted meanwhile: nothing to prefetch
                return False
            block_id, shape, checksum = host_entry.block_id, host_entry.shape, host_entry.checksum
            parent = l2.parent_of(key)
        elif found is not None:
            row, loc = found
            buf = self.read_l3_checked(key, row, loc)
            block_id, shape, checksum, parent = row.block_id, row.shape, row.checksum, row.parent
            host = tensor_from_bytes(buf, dtype_from_name(row.dtype), shape)
        else:
            return False
        copied = self.into_l1(key, host, block_id=block_id, shape=shape, checksum=checksum, parent=parent,
                              generation=generation, on_stream=False, step=step)
        return copied is not None and copied[0] is not None

    # -- host -> L1 ---------------------------------------------------------------------------------

    def into_l1(self, key: str, host: torch.Tensor, *, block_id: int, shape: tuple[int, ...], checksum: int,
                parent: str | None, generation: int, on_stream: bool,
                step: Step = _no_step) -> tuple[Resident | None, Any] | None:
        """Copy ``host`` (an L2 view or a fresh read) into an L1 slot, cast where the device has no bf16 math.

        ``on_stream``: the caller's CUDA stream waits for the copy (a get, which evicts to make room,
        writing back what only L1 holds); else this thread waits for it (the migrator, which takes
        only free room). Returns ``(entry or None if replaced meanwhile, the copy's event)``, or None
        when L1 has no room (or the block is empty).
        """
        l1 = self.l1
        assert l1 is not None
        pool = l1.arena
        target = pool.needs_cast(host.dtype) or host.dtype
        if host.numel() == 0:
            return None
        slot = l1.reserve(host.numel() * target.itemsize, self.write_back_l1 if on_stream else None)
        if slot is None:
            return None
        try:
            event = pool.cast_into(slot, host, target) if target != host.dtype else pool.copy_in(slot, host)
            if event is not None:
                if on_stream:  # the caller's stream waits for the copy, not the whole device
                    torch.cuda.current_stream(pool.device).wait_event(event)
                else:
                    event.synchronize()
            step("copied")
            step("verified")  # the source was verified on its way into L2 (or just read and checked)
        except BaseException:
            l1.release(slot)
            raise
        entry = l1.admit(key, block_id, slot, target, shape, checksum, generation=generation, parent=parent)
        step("committed")
        step("freed")
        return entry, event

    # -- L1 -> L2 / L3 ------------------------------------------------------------------------------

    def write_back_l1(self, entry: Resident) -> bool:
        """Write back a cache-only block leaving L1 whose only copy is there: to L2, or L3 if L2 is full.

        The L1 -> L2 copy is done here (both ends volatile: a crash loses both, nothing to journal);
        the L3 write goes through the migrator's journaled spill. False, and the block stays in L1,
        when neither tier took it: nothing is ever dropped.
        """
        l1, l2 = self.l1, self.l2
        if not self._may_write() or l1 is None:
            return False
        if l2 is not None:
            slot = l2.reserve(entry.alloc.nbytes, self.spill_l2)
            if slot is not None:
                out = l2.arena.as_numpy(slot)
                try:
                    l1.arena.copy_out(entry.alloc, out)
                except BaseException:
                    l2.release(slot)
                    raise
                if entry.checksum == UNHASHED:
                    entry.checksum = crc32c.crc32c(out.data)
                l2.admit(entry.key, entry.block_id, slot, entry.dtype, entry.shape, entry.checksum, volatile=True,
                         parent=l1.parent_of(entry.key), compression=entry.compression)
                l1.mark_durable(entry)
                return True
        data = self.l1_bytes(entry)
        if not self._spill_to_l3(entry, data):
            return False
        l1.mark_durable(entry)
        return True

    # -- L2 / L1 -> L3 ------------------------------------------------------------------------------

    def spill_bytes(self, entry: Resident) -> np.ndarray:
        """The bytes of a cache-only L2 entry, to write to L3 (a view of its slot, not a copy)."""
        assert self.l2 is not None, "only an L2 residency spills its entries"
        return self.l2.arena.as_numpy(entry.alloc)

    def write_l3(self, entry: Resident, block_id: int, data: np.ndarray, compression: str, from_l2: bool,
                 step: Step = _no_step) -> tuple[BlockRow, Location]:
        """Write a cache-only block leaving memory (its bytes ``data``) to L3 as ``block_id``, verified.

        Hashes the block first if it never was; reads a compressed copy back and checks it
        (``CorruptBlockError``, the new copy freed, when it does not match). Returns the row to
        commit (durable=False, held in L3 only, with the block's parent link taken from the tier
        it leaves: L2 when ``from_l2``, else L1) and its L3 location; it commits nothing.
        """
        self.index.check_room(entry.key, data.nbytes)
        codec = choose_codec(entry.compression or compression, entry.dtype.itemsize)
        if entry.checksum < 0:  # a cache-only block is hashed the first time it leaves memory
            entry.checksum = crc32c.crc32c(data.data)
        loc = self.l3.write_now(block_id, data, codec, Contents(entry.key, dtype_name(entry.dtype), entry.shape))
        try:
            step("copied")
            if loc.array:
                back = np.empty(data.nbytes, dtype=np.uint8)
                if self.l3.read_into(loc, back) != entry.checksum:  # read_into returns the crc32c it read
                    raise CorruptBlockError(f"spilling {entry.key!r}: the L3 copy does not match its checksum",
                                            key=entry.key, tier="L3")
            step("verified")
        except BaseException:
            self.l3.free([loc])
            raise
        holder = self.l2 if from_l2 else self.l1
        parent = holder.parent_of(entry.key) if holder is not None else None  # the link goes to L3 too
        stamp = now()
        row = BlockRow.stored(entry.key, block_id, dtype_name(entry.dtype), entry.shape, data.nbytes,
                              entry.checksum, durable=False, l3=loc.to_columns(), tiers=_L3_BIT, created=stamp,
                              updated=stamp, parent=parent)
        return row, loc

    def l1_bytes(self, entry: Resident) -> np.ndarray:
        """A host copy of an L1 entry's bytes (hashing it if it was not yet)."""
        assert self.l1 is not None
        data = np.empty(entry.alloc.nbytes, dtype=np.uint8)
        self.l1.arena.copy_out(entry.alloc, data)
        if entry.checksum == UNHASHED:
            entry.checksum = crc32c.crc32c(data.data)
        return data
