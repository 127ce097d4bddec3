"""The ``TierStore`` handle: put, get, delete, transactions, statistics, close.

A handle is opened with :func:`tierstore.open`. Reads take no lock beyond a
microsecond catalog lookup; writes are serialised by one writer lock per
handle (a transaction holds it from start to commit, as SQLite's
``BEGIN IMMEDIATE`` does). Committing follows "bytes before rows": block
bytes are written to fresh L3 locations and synced, then one catalog commit
switches them in, then the bytes of replaced versions are freed.

Lock order (a thread holding one may take only those after it): the writer mutex, the L1 tier
lock, the L2 tier lock, the index lock, then the catalog's and L3's own locks. The index lock is
held across every catalog commit that changes a key's row (a writer's commit, a spill's commit)
together with the in-memory state that follows it (row cache, totals, the versions of cache-only
keys); it is never held while taking a tier lock. Work done outside the writer mutex (a spill
of a cache-only block chosen for eviction by any thread) commits only if the key's newest
version is still the one it copied, else it is dropped (versions, not hope).

The reports (``info``, ``history``, ``stats``) are in :mod:`tierstore.store_stats` and the
store's side of the shared tier (``publish``, ``pull``, read-through) in
:mod:`tierstore.store_shared`: mixins ``TierStore`` inherits.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import operator
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from concurrent.futures import Future
from contextlib import contextmanager
from heapq import merge
from pathlib import Path
from typing import TYPE_CHECKING, Any

import crc32c
import numpy as np
import torch

from ._version import __version__
from .activity import save_counters
from .alloc import Allocation
from .catalog import CREATING_SUFFIX, BlockRow, Catalog, now
from .config import CacheConfig, parse_size
from .errors import (
    BlockNotFoundError,
    ConfigError,
    CorruptBlockError,
    DeviceMemoryError,
    InvalidArgumentError,
    InvalidKeyError,
    ReadOnlyError,
    StoreClosedError,
    StoreFullError,
    StoreNotFoundError,
    TierFullError,
    TierStoreError,
    TransactionError,
    UnsafePathError,
    UnsupportedTensorError,
    translate_os_error,
)
from .fsguard import CATALOG_ENTRIES, STORE_FILES, STORE_FOLDERS, refuse_links
from .history import Access, AccessRecorder, summarize
from .lockfile import WriterLock
from .migrator import JournalReport, Migrator, Pin, Plan, StoreHooks, recover_journal
from .records import BlockInfo, StoreStats
from .recovery import recover, refuse_orphaned_data, upgrade_layout
from .residency import Residency, Resident
from .shared import SharedCoordinator
from .store_rows import L1_BIT, L2_BIT, L3_BIT, UNHASHED
from .store_shared import SharedTier
from .store_stats import StoreReports
from .tensors import check_key, check_tensor, dtype_from_name, dtype_name, tensor_bytes, tensor_from_bytes
from .tiers.l1_cuda import DevicePool, is_device_oom
from .tiers.l2_slab import HostArena
from .tiers.l3_codecs import choose_codec
from .tiers.l3_zarr import EMPTY_LOCATION, LAYOUT, Contents, Location, RecoveryReport, ZarrL3
from .txn import Change, Txn, location_of
from .warm import drop_l2_files, save_index, warm_l2

if TYPE_CHECKING:
    from .maintenance import MaintenanceReport

__all__ = ["TierStore", "BlockInfo", "StoreStats", "open_store"]

CATALOG_NAME = "catalog.sqlite"
L2_FILE = "l2.slab"
_ROW_CACHE = 1 << 16
"""Committed rows kept in memory for the hot path (cleared whole when full: simple and O(1))."""
_BF16_CAST = {"auto": None, "always": True, "never": False}
_L1_FIELDS = frozenset({"l1_device", "l1_cache_size"})
"""Fields that ask a read-only handle for an L1 pool (else a reader takes no device memory)."""


class TierStore(SharedTier, StoreReports, MutableMapping[str, torch.Tensor]):
    """A handle on one store. Use :func:`tierstore.open` to get one; it is a context manager.

    It is a ``MutableMapping`` of key to tensor: ``db[k]`` is ``get(k)`` (``BlockNotFoundError``,
    a ``KeyError``, when missing), ``db[k] = t`` a durable ``put``, ``del db[k]`` a ``delete``;
    so it serves wherever a mapping of weights is asked for (accelerate's ``weights_map``, say).
    ``get`` and ``keys`` keep their own signatures: ``get(key, device)`` raises for a missing key
    instead of returning a default, and ``keys(prefix)`` returns a sorted iterator.
    """

    def __init__(self, path: str | Path, config: CacheConfig | None = None, *, readonly: bool = False,
                 remember_config: bool = True, **overrides: Any) -> None:
        self.path = _store_path(path)
        if not isinstance(readonly, (bool, np.bool_)):  # "no" would be truthy: a surprise read-only handle
            raise InvalidArgumentError(f"readonly must be True or False, not {readonly!r}")
        if config is not None and not isinstance(config, CacheConfig):
            raise ConfigError(f"config must be a tierstore.CacheConfig or None, not {type(config).__name__}; "
                              "pass single fields as keywords (tierstore.open(path, l2_cache_size='1GiB'))")
        self.readonly = bool(readonly)
        self._keep_config = remember_config
        self._closed = True
        self._lock: WriterLock | None = None
        catalog_path = self.path / CATALOG_NAME
        # Before anything is opened: a link among the fixed entries would be written through.
        refuse_links(self.path, STORE_FOLDERS + (CATALOG_ENTRIES if readonly else STORE_FILES),
                     what=f"open the store read-{'only' if readonly else 'write'}")
        if readonly:
            if not catalog_path.exists():
                unfinished = catalog_path.with_name(CATALOG_NAME + CREATING_SUFFIX).exists()
                raise StoreNotFoundError(f"no tierstore store at {self.path} (no {CATALOG_NAME})" + (
                    "; its first open did not finish: open it read-write once to create it" if unfinished else ""),
                    path=str(self.path))
        else:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise translate_os_error(exc, what="create the store folder", path=self.path) from None
            self._lock = WriterLock(self.path)
        try:
            self._open(catalog_path, config, overrides)
            if not self.readonly:  # only a config that opened is remembered (a failed one would fail every open)
                self._remember_config()
        except BaseException:
            self._abandon()
            raise
        self._closed = False

    def _open(self, catalog_path: Path, config: CacheConfig | None, overrides: dict[str, Any]) -> None:
        refuse_orphaned_data(self.path, catalog_path)  # read-only too: its advice must be one that works
        fsync = config.fsync if config is not None else overrides.get("fsync", True)
        self._catalog = Catalog(catalog_path, readonly=self.readonly, durable=bool(fsync))
        self.config, asked = self._resolve_config(config, overrides)
        if self.readonly and not asked & _L1_FIELDS:  # a reader takes device memory only when asked to
            self.config = self.config.replace(l1_device=None, l1_cache_size=0)
        self._write_mutex = threading.RLock()
        self._local = threading.local()
        self._counts = {"get": 0, "put": 0, "delete": 0}
        self._hits = {"L1": 0, "L2": 0, "L3": 0}
        self._hit_bytes = {"L1": 0, "L2": 0, "L3": 0}
        layout = self._catalog.l3_layout()
        if layout is None:  # nothing stored yet: a new store starts in the current layout
            layout = LAYOUT
            if not self.readonly:
                self._catalog.commit_l3_layout([], LAYOUT)
        self._l3 = ZarrL3(self.path, fsync=self.config.fsync, readonly=self.readonly, layout=layout)
        self.recovery = RecoveryReport()
        self.journal_recovery = JournalReport()
        """Moves a crash interrupted, undone at open (see :mod:`tierstore.migrator`)."""
        if not self.readonly:
            self._recover()
            file_backed = self.config.l2_file_backed and self.config.l2_cache_size > 0
            drop_l2_files(self.path, slab=L2_FILE, keep_slab=file_backed)
        self.recovery.catalog_rollback = self._catalog.rollback_note
        self._next_block_id = self._catalog.next_block_id()
        self._ids_lock = threading.Lock()
        self._rows: dict[str, tuple[BlockRow, Location]] = {}
        self._rows_lock = threading.Lock()
        self._index_lock = threading.Lock()
        """Held across each catalog commit that changes a key's row and the state that follows it."""
        self._volatile_versions: dict[str, int] = {}
        """Block id of each key whose newest committed version is cache-only (in L1/L2, not in L3)."""
        self._settling = threading.Condition(threading.Lock())
        self._unsettled = 0
        """Commits whose catalog part is done and whose tier admissions are not (see _await_settled)."""
        self._generation = 0
        self._data_version = self._catalog.data_version()
        self._count, self._logical_bytes, self._stored_bytes = self._catalog.totals()
        self._l1: Residency[DevicePool] | None = self._open_l1()
        self._l2: Residency[HostArena] | None = None
        self._l2_generation = 0
        self.warm_blocks = 0
        """Blocks taken back from a file-backed L2 at open (restart-warm)."""
        arena = self._open_l2(strict=not self.readonly or "l2_cache_size" in asked)
        if arena is not None:
            self._l2 = Residency("L2", arena, self.config.l2_eviction_policy)
            if arena.path is not None:
                self._warm_l2()
        self._shared: SharedCoordinator | None = None
        if self.config.shared_url is not None:  # no network until first used
            self._shared = SharedCoordinator(self.config, self._shared_block)
            self._hits["shared"] = 0
            self._hit_bytes["shared"] = 0
        self._migrator = Migrator(self._catalog, self._l3, self._l1, self._l2, self.config, StoreHooks(
            lookup=self._lookup_located, new_block_id=self._new_block_id, next_block_id=lambda: self._next_block_id,
            check_room=self._check_l3_room, commit_spill=self._commit_spill, forget_volatile=self._forget_volatile,
            flush_history=lambda: self._recorder.flush(), spill_l1=self._spill_l1),
            readonly=self.readonly)
        sink = None if self.readonly else self._write_history
        self._recorder = AccessRecorder(sink, interval=self.config.history_flush_interval)

    def _abandon(self) -> None:
        """Release what a failed open built (in reverse order), so nothing of it outlives the error."""
        for name in ("_recorder", "_migrator", "_shared", "_l3", "_catalog"):
            part = getattr(self, name, None)
            if part is not None:
                with contextlib.suppress(Exception):  # the open's own error is the one to report
                    part.close()
        for name in ("_l1", "_l2"):
            tier = getattr(self, name, None)
            if tier is not None:
                with contextlib.suppress(Exception):
                    tier.clear()
                    tier.arena.close()
        if self._lock is not None:
            self._lock.release()

    def _open_l1(self) -> Residency[DevicePool] | None:
        """The device tier: on ``l1_device`` (default: the first GPU; none without one)."""
        size = self.config.l1_cache_size
        if size == 0:  # off: the device is never looked at
            return None
        name = self.config.l1_device or ("cuda" if torch.cuda.is_available() else None)
        if name is None:
            return None
        device = _l1_device(name)
        if size is None:  # half of what the device has free now; the hardware optimizer refines this
            size = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 0
        if size <= 0:
            return None
        pool = DevicePool(size, device=device, chunk_size=min(size, 256 << 20), headroom=self.config.l1_headroom,
                          bf16_fallback=getattr(torch, self.config.l1_bf16_fallback),
                          cast_bf16=_BF16_CAST[self.config.l1_bf16_cast])
        return Residency("L1", pool, self.config.l1_eviction_policy)

    def _open_l2(self, *, strict: bool) -> HostArena | None:
        """The host tier's arena (None when L2 is off).

        ``strict`` (a writer, or a reader that asked for an L2 size): a size this machine cannot
        hold is an error. A reader on a remembered config never fails for its cache: its L2 holds at
        most what the store held at open (it caches only committed blocks) and a quarter of the
        machine's memory, and it reads from L3 alone when even that cannot be had.
        """
        size = self.config.l2_cache_size
        memory = _physical_memory()
        if strict and size > memory:  # refused before mapping: touching the pages could wake the OOM killer
            raise TierFullError(f"l2_cache_size={size} bytes is more memory than this machine has ({memory} "
                                "bytes); lower l2_cache_size", tier="L2")
        if not strict:
            held = -(-self._logical_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
            size = min(size, held, memory // 4)
            if size != self.config.l2_cache_size:
                self.config = self.config.replace(l2_cache_size=size)
        if size <= 0:
            return None
        backing = self.path / L2_FILE if self.config.l2_file_backed and not self.readonly else None
        try:
            return HostArena(size, path=backing, pin=self.config.l2_pin_memory)
        except (TierFullError, StoreFullError):
            if strict:
                raise
        self.config = self.config.replace(l2_cache_size=0)
        return None

    def _warm_l2(self) -> None:
        assert self._l2 is not None
        self._l2_generation, self.warm_blocks = warm_l2(self.path, self._catalog, self._l2)

    def _resolve_config(self, config: CacheConfig | None,
                        overrides: dict[str, Any]) -> tuple[CacheConfig, frozenset[str]]:
        """The config to open with, and the fields the caller gave (the rest come from the catalog)."""
        asked: frozenset[str] = frozenset(CacheConfig.__slots__) if config is not None else frozenset(overrides)
        if config is None:
            config = CacheConfig()
            stored = self._catalog.meta("config")
            if stored is not None:
                try:  # a damaged remembered config falls back to the defaults: it holds no data
                    known = {k: v for k, v in json.loads(stored).items() if k in CacheConfig.__slots__}
                    config = CacheConfig(**known)
                except (ValueError, TypeError, AttributeError, RecursionError):
                    config = CacheConfig()
        if overrides:
            config = config.replace(**overrides)
        return config, asked

    def _remember_config(self) -> None:
        """Keep the config this read-write open succeeded with: the next plain open uses it.

        With ``remember_config=False`` (a one-off open for maintenance) the remembered one stays,
        unless the store has none yet.
        """
        meta = {"tierstore_version": __version__}
        if self._keep_config or self._catalog.meta("config") is None:
            meta["config"] = json.dumps(self.config.to_dict())
        if self._catalog.meta("store_id") is None:
            meta.update(store_id=uuid.uuid4().hex, created=repr(time.time()))
        self._catalog.set_meta(meta)

    def _recover(self) -> None:
        self.journal_recovery = recover_journal(self._catalog, self._l3)
        self.recovery = recover(self._catalog, self._l3)
        if self._l3.layout < LAYOUT:
            upgrade_layout(self._catalog, self._l3)

    # -- handle -------------------------------------------------------------------------------------

    def __enter__(self) -> TierStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.readonly else "read-write")
        return f"<TierStore {str(self.path)!r} {state}>"

    def close(self) -> None:
        """Flush the access history and release everything; calling it twice is fine."""
        if self._closed:
            return
        if getattr(self._local, "txn", None) is not None:
            raise TransactionError("close() inside a transaction; leave the 'with' block first")
        self._migrator.close()
        with self._write_mutex:
            if self._shared is not None:
                self._shared.close()  # background publishing gets shared_timeout to finish
            self._closed = True
            try:
                self._recorder.close()
            except TierStoreError:
                pass  # history is best-effort; blocks are already committed
            self._l3.close()
            if not self.readonly and (self._l1 is not None or self._l2 is not None):
                try:  # per-tier counters add up across runs (tierstore stats)
                    save_counters(self._catalog, self._tier_stats())
                except TierStoreError:
                    pass
            if self._l2 is not None and self._l2.arena.path is not None:
                try:
                    save_index(self.path, self._catalog.meta("store_id") or "", self._l2_generation, self._l2)
                except OSError:
                    pass  # the next open starts cold
            self._catalog.close()
            if self._l1 is not None:
                self._l1.clear()
                self._l1.arena.close()
            if self._l2 is not None:
                self._l2.clear()
                self._l2.arena.close()
            if self._lock is not None:
                self._lock.release()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def l1_pool(self) -> DevicePool | None:
        """The L1 device pool (None when L1 is off), for integrations that watch device memory."""
        return self._l1.arena if self._l1 is not None else None

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed; open it again with tierstore.open()",
                                   path=str(self.path))

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"store {self.path} was opened read-only; open it with readonly=False to write",
                                path=str(self.path))

    # -- transactions -------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[TierStore]:
        """Make the puts and deletes inside the block atomic and durable at exit.

        An exception inside the block rolls everything back. A nested ``transaction()`` is a
        savepoint: its own exception undoes only its changes. Other threads' writes wait until
        the outermost transaction ends; their reads see the last committed state.
        """
        self._check_writable()
        txn: Txn | None = getattr(self._local, "txn", None)
        if txn is not None:
            mark = len(txn.undo)
            try:
                yield self
            except BaseException:
                txn.rollback_to(mark)
                raise
            return
        with self._write_mutex:
            self._check_open()
            txn = Txn(threading.get_ident())
            self._local.txn = txn
            try:
                yield self
            except BaseException:
                self._local.txn = None
                self._abort(txn)
                raise
            self._local.txn = None
            self._commit(txn)

    def _abort(self, txn: Txn) -> None:
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

    def _commit(self, txn: Txn) -> None:
        txn.superseded()
        l2_only = {k for k, c in txn.pending.items() if c.row is not None and c.row.l3_array is None
                   and c.row.nbytes > 0}
        rows = [c.row for k, c in txn.pending.items() if c.row is not None and k not in l2_only]
        deletes = [k for k, c in txn.pending.items() if c.row is None or k in l2_only]
        try:
            lengths = self._l3.prepare()
        except OSError as exc:
            self._abort(txn)
            raise translate_os_error(exc, what="sync block data", path=self._l3.root) from None
        replaced: list[BlockRow] = []
        failure: BaseException | None = None
        with self._index_lock:  # no spill commits between the check below and the versions it leaves
            try:
                if rows or lengths or any(self._catalog.has_block(key) for key in deletes):
                    replaced = self._catalog.commit_blocks(rows, deletes, lengths, self._next_block_id)
                # else: only cache-only blocks that stay in L2 and replace no committed row: no catalog commit
            except BaseException as exc:
                failure = exc
            else:
                self._committed(txn, rows, deletes, replaced, l2_only)
        if failure is not None:  # undone outside the index lock: releasing slots takes tier locks
            self._abort(txn)
            raise failure
        self._l3.free([location_of(row) for row in replaced] + txn.garbage)
        try:
            self._settle_l2(txn, l2_only)
        finally:
            with self._settling:
                self._unsettled -= 1
                self._settling.notify_all()
        if self._shared is not None and self._shared.policy == "write-through" and not self._landing():
            self._shared.enqueue(row.key for row in rows if row.durable)
        for key, change in txn.pending.items():
            self._recorder.record(key, "put" if change.row is not None else "delete")

    def _committed(self, txn: Txn, rows: list[BlockRow], deletes: list[str], replaced: list[BlockRow],
                   l2_only: set[str]) -> None:
        """The catalog committed ``txn``: L3, the row cache, the totals and the versions follow (index lock held)."""
        with self._settling:
            self._unsettled += 1
        self._l3.commit()
        with self._rows_lock:
            self._generation += 1
            if len(self._rows) + len(rows) > _ROW_CACHE:
                self._rows.clear()
            for row in rows[-_ROW_CACHE:]:
                self._rows[row.key] = (row, location_of(row))
            for key in deletes:
                self._rows.pop(key, None)
        for key, change in txn.pending.items():
            if key in l2_only and change.row is not None:
                self._volatile_versions[key] = change.row.block_id
            else:
                self._volatile_versions.pop(key, None)
        existed = {row.key for row in replaced}  # cache-only keys kept in L2 are counted as volatile
        self._count += sum(row.key not in existed for row in rows) - sum(key in existed for key in deletes)
        self._logical_bytes += sum(r.nbytes for r in rows) - sum(r.nbytes for r in replaced)
        self._stored_bytes += sum(r.stored_bytes for r in rows) - sum(r.stored_bytes for r in replaced)

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
                             volatile=key in l2_only, parent=row.parent)
        if l1 is not None:
            for key, change in txn.pending.items():
                row = change.row
                if row is not None and change.l1_slot is not None:  # a device tensor, cache-only: only in L1
                    l1.admit(key, row.block_id, change.l1_slot, dtype_from_name(row.dtype), row.shape,
                             row.checksum, volatile=True, parent=row.parent)

    def _txn(self) -> Txn | None:
        txn: Txn | None = getattr(self._local, "txn", None)
        return txn

    # -- blocks -------------------------------------------------------------------------------------

    def put(self, key: str, tensor: torch.Tensor, *, durable: bool = True, parent: str | None = None) -> None:
        """Store ``tensor`` under ``key`` (replacing any earlier version).

        Outside a transaction the put is its own transaction: when it returns, the block is on
        disk and survives a crash. ``durable=False`` marks a cache-only block (a KV cache entry,
        say): it stays in memory (L2) and reaches the disk only when evicted from there, and it
        is dropped when the store is next opened. A cache-only tensor already on the L1 device
        stays there (a device-to-device copy, no trip through the host); evicted from L1, it is
        written back to L2, or to L3 when L2 has no room, never dropped.

        ``parent`` names the block this one extends in a chain (KV-cache blocks keyed by a chain of
        prefix hashes): while both are in L2 (or L1), the tier evicts the chain's tail first, since a
        block helps only if every block before it is present. The link is kept in the block's catalog
        row (it survives a reopen and comes back with every promotion) and is replaced by the next
        put of ``key``; a parent that is not stored, or deleted later, is simply no link.
        """
        self._check_writable()
        check_key(key)
        check_tensor(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > _physical_memory():  # an expanded view can claim terabytes it does not hold
            raise _no_memory(nbytes, f"put {key!r}")
        if not isinstance(durable, (bool, np.bool_)):
            raise InvalidArgumentError(f"durable must be True or False, not {durable!r}")
        if parent is not None:
            check_key(parent)
            if parent == key:
                raise InvalidArgumentError(f"put {key!r}: a block cannot be its own chain parent")
        txn = self._txn()
        if txn is None:
            with self.transaction():
                self._put(self._txn_or_fail(), key, tensor, durable, parent)
        else:
            self._put(txn, key, tensor, durable, parent)
        self._counts["put"] += 1

    def _txn_or_fail(self) -> Txn:
        txn = self._txn()
        if txn is None:  # pragma: no cover - transaction() always sets it
            raise TransactionError("no transaction is open in this thread")
        return txn

    def _put(self, txn: Txn, key: str, tensor: torch.Tensor, durable: bool, parent: str | None) -> None:
        if not durable and self._l1 is not None and tensor.numel() and self._on_l1(tensor.device):
            l1_slot = self._put_l1(tensor)
            if l1_slot is not None:
                stamp = now()
                previous = txn.pending.get(key)
                created = previous.row.created if previous is not None and previous.row is not None else stamp
                row = BlockRow(key, self._new_block_id(), dtype_name(tensor.dtype), tuple(tensor.shape),
                               l1_slot.nbytes, UNHASHED, False, "raw", None, None, None, None, None, 0, L1_BIT,
                               created, stamp, parent)
                txn.set(key, Change(row, None, l1_slot))
                return
        try:
            data = tensor_bytes(tensor)  # a copy when the tensor is not contiguous on the CPU
        except RuntimeError as exc:
            if not is_device_oom(exc):
                raise
            raise _no_memory(tensor.numel() * tensor.element_size(), f"put {key!r}") from None
        slot = None
        if self._l2 is not None and data.nbytes > 0:
            slot = self._l2.reserve(data.nbytes, self._spill)
            if slot is not None:
                np.copyto(self._l2.arena.as_numpy(slot), data)  # a snapshot: the caller may reuse its tensor
        # A cache-only block kept in L2 is hashed only if it ever goes to disk (see _spill).
        checksum = UNHASHED if slot is not None and not durable else crc32c.crc32c(data.data)
        block_id = self._new_block_id()
        try:
            if durable or slot is None:
                loc = self._write_l3(Contents(key, dtype_name(tensor.dtype), tuple(tensor.shape)), block_id, data,
                                     tensor.element_size())
            else:
                loc = EMPTY_LOCATION  # cache-only and in L2: no disk write now
        except BaseException:
            if slot is not None:
                self._l2.release(slot)  # type: ignore[union-attr]
            raise
        stamp = now()
        previous = txn.pending.get(key)
        old = previous.row if previous is not None else None  # the catalog keeps `created` on replace
        row = BlockRow(
            key=key, block_id=block_id, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape),
            nbytes=data.nbytes, checksum=checksum, durable=durable, codec=loc.codec,
            l3_array=loc.array or None, l3_shard=loc.shard, l3_offset=loc.offset, l3_sizes=loc.sizes_blob(),
            l3_inner=loc.inner, stored_bytes=loc.length, tiers=(L3_BIT if loc.array else 0) | (L2_BIT if slot else 0),
            created=old.created if old is not None else stamp, updated=stamp, parent=parent, l3_chunk=loc.chunk)
        txn.set(key, Change(row, slot))

    def _put_l1(self, tensor: torch.Tensor) -> Allocation | None:
        """A snapshot of device tensor ``tensor`` in a fresh L1 slot (None when L1 has no room)."""
        l1 = self._l1
        assert l1 is not None
        src = tensor.detach().resolve_conj().resolve_neg()
        slot = l1.reserve(src.numel() * src.element_size(), self._spill_l1)
        if slot is None:
            return None
        try:
            with self._device_oom("put into L1"):
                l1.arena.copy_in(slot, src)  # on the current stream: no event to wait for
        except BaseException:
            l1.release(slot)
            raise
        return slot

    def _check_l3_room(self, key: str, nbytes: int) -> None:
        cap = self.config.l3_cache_size
        if cap is not None and self._stored_bytes + nbytes > cap:
            raise StoreFullError(
                f"put {key!r}: L3 holds {self._stored_bytes} of l3_cache_size={cap} bytes and the block "
                f"needs up to {nbytes}; delete blocks or raise l3_cache_size", key=key, tier="L3")

    def _write_l3(self, contents: Contents, block_id: int, data: np.ndarray, itemsize: int) -> Location:
        key = contents.key
        self._check_l3_room(key, data.nbytes)
        codec = choose_codec(str(self.config.l3_compression), itemsize)
        try:
            return self._l3.write(block_id, data, codec, contents)
        except OSError as exc:
            raise translate_os_error(exc, what=f"write block {key!r}", path=self._l3.root, key=key) from None

    def _spill(self, entry: Resident) -> bool:
        """Write a cache-only block leaving L2 to L3 (a journaled move, see :mod:`tierstore.migrator`)."""
        if self._closed or self.readonly:
            return False
        return self._migrator.spill(entry)

    def _commit_spill(self, row: BlockRow, loc: Location, journal_id: int, version: int) -> bool:
        """Commit the row of a cache-only block the migrator copied to L3, if it is still the key's newest.

        ``version`` is the block id of the cache-only version that was copied. A writer that replaced or
        deleted the key since then changed its version under the same lock, so a stale spill is refused
        here (False) and never overwrites a newer row or brings a deleted key back.
        """
        with self._index_lock:
            if self._volatile_versions.get(row.key) != version:
                self._catalog.journal_end([journal_id])
                return False
            if not self._catalog.commit_moved(row, journal_id, self._next_block_id):
                return False  # pragma: no cover - a committed row always clears the version above
            del self._volatile_versions[row.key]
            with self._rows_lock:
                self._generation += 1
                self._rows[row.key] = (row, loc)
            self._count += 1
            self._logical_bytes += row.nbytes
            self._stored_bytes += row.stored_bytes
        if self._shared is not None and self._shared.policy != "explicit" and not self._landing():
            self._shared.enqueue([row.key])  # a cache-only block now in L3 can be published
        return True

    def _forget_volatile(self, key: str, version: int) -> None:
        """Cache-only version ``version`` of ``key`` is dropped without a copy: the key is gone."""
        with self._index_lock:
            if self._volatile_versions.get(key) == version:
                del self._volatile_versions[key]

    def _spill_l1(self, entry: Resident) -> bool:
        """Write back a cache-only block leaving L1 whose only copy is there: to L2, or L3 if L2 is full.

        The L1 -> L2 copy is done here (both ends volatile: a crash loses both, nothing to journal);
        the L3 write goes through the migrator's journaled spill. False, and the block stays in L1,
        when neither tier took it: nothing is ever dropped.
        """
        l1, l2 = self._l1, self._l2
        if self._closed or self.readonly or l1 is None:
            return False
        if l2 is not None:
            slot = l2.reserve(entry.alloc.nbytes, self._spill)
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
                         parent=l1.parent_of(entry.key))
                l1.mark_durable(entry)
                return True
        data = self._l1_bytes(entry)
        if not self._write_back_l3(entry, data):
            return False
        l1.mark_durable(entry)
        return True

    def _l1_bytes(self, entry: Resident) -> np.ndarray:
        """A host copy of an L1 entry's bytes (hashing it if it was not yet)."""
        assert self._l1 is not None
        data = np.empty(entry.alloc.nbytes, dtype=np.uint8)
        self._l1.arena.copy_out(entry.alloc, data)
        if entry.checksum == UNHASHED:
            entry.checksum = crc32c.crc32c(data.data)
        return data

    def _write_back_l3(self, entry: Resident, data: np.ndarray) -> bool:
        """Write L1-only ``entry`` (its bytes ``data``, hashed) to L3 as a cache-only row; False if that failed.

        A journaled move of the migrator, as ``_spill`` is for L2.
        """
        return self._migrator.write_back(entry, data)

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
            l1.shed(lambda: want is not None and pool.reclaimable() >= want, self._spill_l1)
            return pool.shrink(want)

    def _new_block_id(self) -> int:
        with self._ids_lock:
            block_id = self._next_block_id
            self._next_block_id += 1
            return block_id

    def get(self, key: str, device: str | torch.device | None = None,  # type: ignore[override]
            *, copy: bool = False) -> torch.Tensor:
        """The tensor stored under ``key`` (on ``device`` if given).

        From L2 the tensor is a zero-copy view whose slot stays reserved for as long as any tensor
        derived from it lives, so later store activity never changes it; do not modify it in
        place (pass ``copy=True`` for a tensor of your own). Raises ``BlockNotFoundError`` (a
        ``KeyError``) for a missing key and ``CorruptBlockError`` when stored bytes are damaged.
        """
        self._check_open()
        check_key(key)
        if device is not None:
            device = _usable_device(device)
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
        pool_device: torch.device = self._l1.arena.device  # type: ignore[union-attr]
        target = torch.device(device)
        return target.type == pool_device.type and target.index in (None, pool_device.index)

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
                torch.cuda.current_stream(pool.device).wait_event(ready)  # type: ignore[arg-type]
                if ready.query():  # type: ignore[attr-defined]
                    entry.ready = None
            tensor = l1.view(entry, copy=copy)
            if tensor is not None:
                return tensor, "L1"
            # replaced or evicted by another thread since the lookup: promote it afresh
        host, tier = self._get(key, False)
        target = pool.needs_cast(host.dtype) or host.dtype
        slot = l1.reserve(host.numel() * target.itemsize, self._spill_l1) if host.numel() else None
        if slot is None:
            return host.to(pool.device, dtype=target), tier
        try:
            event = pool.cast_into(slot, host, target) if target != host.dtype else pool.copy_in(slot, host)
            if event is not None:  # the caller's stream waits for the copy, not the whole device
                torch.cuda.current_stream(pool.device).wait_event(event)
        except BaseException:
            l1.release(slot)
            raise
        entry = l1.admit(key, row.block_id, slot, target, row.shape, row.checksum, generation=generation,
                         parent=row.parent)
        if entry is None:  # replaced meanwhile: serve this read, cache nothing
            return host.to(pool.device, dtype=target), tier
        entry.ready = event
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
            except _Replaced:  # a writer replaced the block (and freed its file) while we read it
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
            if pending.l1_slot is not None:
                return self._l1_host(pending.l1_slot, dtype_from_name(pending.row.dtype), pending.row.shape), "L1"
            return self._read(pending.row, location_of(pending.row)), "L3"
        l1 = self._l1
        if l1 is not None and key in l1.volatile_keys:  # checked before L2: a write-back admits there first
            with l1.lock:
                entry1 = l1.entries.get(key)
                if entry1 is not None and entry1.volatile:
                    return self._l1_host(entry1.alloc, entry1.dtype, entry1.shape), "L1"
        if l2 is not None and not self.readonly:  # the writer's L2 only ever holds current versions
            self._migrator.await_move(key)  # a prefetch of this block in flight: take its copy
            entry = l2.lookup(key)
            if entry is not None:
                tensor = l2.view(entry, copy=copy)
                if tensor is None:  # replaced or evicted since the lookup (a cache-only successor may
                    raise _Replaced  # be in L1/L2 only, not in the catalog): look it up again
                return tensor, "L2"
        generation = l2.generation if l2 is not None else 0
        try:
            row, loc = self._lookup_located(key)
        except BlockNotFoundError:
            if self._await_settled(key):
                raise _Replaced from None  # a cache-only version was committed and is being admitted
            raise
        if l2 is not None and self.readonly:
            entry = l2.lookup(key, row.block_id)
            tensor = l2.view(entry, copy=copy) if entry is not None else None
            if tensor is not None:
                return tensor, "L2"
        if l2 is None or row.nbytes == 0:
            return self._read(row, loc), "L3"
        slot = l2.reserve(row.nbytes, self._spill)
        if slot is None:
            return self._read(row, loc), "L3"
        try:
            out = l2.arena.as_numpy(slot)
            self._read_into(row, loc, out)  # decompress straight into the L2 slot
        except BaseException:
            l2.release(slot)
            raise
        with l2.lock:  # a refused admission frees the slot: copy it out before another thread reuses it
            entry = l2.admit(key, row.block_id, slot, dtype_from_name(row.dtype), row.shape, row.checksum,
                             generation=generation, parent=row.parent)
            if entry is None:  # the block was replaced while we read it: hand out these bytes, cache nothing
                return tensor_from_bytes(bytearray(out), dtype_from_name(row.dtype), row.shape), "L3"
            tensor = l2.view(entry, copy=copy)  # under the same lock: nobody killed it since the admission
        if tensor is None:  # pragma: no cover - see above
            raise _Replaced
        return tensor, "L3"

    def _l1_host(self, alloc: Allocation, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A host copy of an L1 slot's block (in L2 scratch memory when there is room)."""
        out = self.allocate(shape, dtype)
        if out.numel():
            self._l1.arena.copy_out(alloc, tensor_bytes(out))  # type: ignore[union-attr]
        return out

    def _lookup(self, key: str) -> BlockRow:
        txn = self._txn()
        if txn is not None and key in txn.pending:
            row = txn.pending[key].row
            if row is None:
                raise BlockNotFoundError(f"no block {key!r} in {self.path}", key=key)
            return row
        entry = self._volatile(key)
        if entry is not None and self._l1 is not None and self._l1.entries.get(key) is entry:
            return self._volatile_row(entry, L1_BIT, self._l1.parent_of(key))  # hashed when it leaves L1
        if entry is not None:
            if entry.checksum == UNHASHED:
                entry.checksum = crc32c.crc32c(self._l2.arena.as_numpy(entry.alloc).data)  # type: ignore[union-attr]
            return self._volatile_row(entry, L2_BIT, self._l2.parent_of(key))  # type: ignore[union-attr]
        try:
            return self._lookup_located(key)[0]
        except BlockNotFoundError:
            if not self._await_settled(key):
                raise
        entry = self._volatile(key)  # the cache-only version whose commit was settling
        if entry is None:
            return self._lookup_located(key)[0]
        return self._lookup(key)  # finds the entry now: no further wait

    def _await_settled(self, key: str) -> bool:
        """Wait while a commit of a cache-only version of ``key`` is between its catalog part and its admission.

        A cache-only put removes the key's committed row, then makes its L1/L2 entry resident; a
        reader that looks in between finds neither. True when the key has a cache-only version and
        the reader should look again (once every commit in flight has settled).
        """
        with self._index_lock:  # a commit that removed the row the caller missed has set the version too
            if key not in self._volatile_versions:
                return False
        with self._settling:
            self._settling.wait_for(lambda: self._unsettled == 0, timeout=5.0)
        return key in self._volatile_versions

    def _volatile(self, key: str) -> Resident | None:
        """The entry holding the only copy of cache-only ``key`` (in L1 or L2), if any."""
        for tier in (self._l1, self._l2):
            if tier is not None and key in tier.volatile_keys:
                entry = tier.entries.get(key)
                if entry is not None and entry.volatile and not entry.dead:
                    return entry
        return None

    def _volatile_keys(self) -> set[str]:
        """Keys whose newest committed version is cache-only (a snapshot)."""
        with self._index_lock:
            return set(self._volatile_versions)

    @staticmethod
    def _volatile_row(entry: Resident, tier_bit: int = L2_BIT, parent: str | None = None) -> BlockRow:
        return BlockRow(entry.key, entry.block_id, dtype_name(entry.dtype), entry.shape, entry.alloc.nbytes,
                        entry.checksum, False, "raw", None, None, None, None, None, 0, tier_bit, 0.0, 0.0, parent)

    def _refresh(self) -> None:
        """Read-only handles: forget cached rows and totals once a writer has committed."""
        if not self.readonly:
            return
        version = self._catalog.data_version()
        if version != self._data_version:
            totals = self._catalog.totals()
            with self._rows_lock:
                self._rows.clear()
                self._generation += 1
                self._data_version = version
                self._count, self._logical_bytes, self._stored_bytes = totals

    def _lookup_located(self, key: str) -> tuple[BlockRow, Location]:
        """The committed row of ``key`` with its L3 location (cached)."""
        self._refresh()
        hit = self._rows.get(key)
        if hit is not None:
            return hit
        generation = self._generation
        row = self._catalog.get_block(key)
        if row is None:
            raise BlockNotFoundError(f"no block {key!r} in {self.path}", key=key)
        located = (_checked_size(row), location_of(row))
        with self._rows_lock:
            if generation == self._generation:  # no commit raced this lookup
                if len(self._rows) >= _ROW_CACHE:
                    self._rows.clear()
                self._rows[key] = located
        return located

    def _read(self, row: BlockRow, loc: Location) -> torch.Tensor:
        try:
            buf = np.empty(row.nbytes, dtype=np.uint8)
        except MemoryError:
            raise _no_memory(row.nbytes, f"read block {row.key!r}") from None
        row = self._read_into(row, loc, buf)
        return tensor_from_bytes(buf, dtype_from_name(row.dtype), row.shape)

    def _read_into(self, row: BlockRow, loc: Location, out: np.ndarray) -> BlockRow:
        """Read and verify ``row``'s bytes into ``out``; returns the row read.

        Raises ``_Replaced`` when a writer replaced the block and freed its file meanwhile (the
        caller reads the key again: the new version may differ in size, dtype and shape); a
        block that compaction moved (same block id, same bytes) is followed to its new place.
        """
        for _attempt in range(3):
            try:
                self._l3.read_into(loc, out)
                break
            except FileNotFoundError:
                newer = self._catalog.get_block(row.key)
                if newer is None:
                    if self._await_settled(row.key):  # replaced by a cache-only version, not deleted
                        raise _Replaced from None
                    raise BlockNotFoundError(f"block {row.key!r} was deleted while being read",
                                             key=row.key) from None
                if newer.block_id != row.block_id:
                    raise _Replaced from None
                if location_of(newer) == loc:
                    path = self._l3.shard_path(loc.array, loc.shard)
                    raise CorruptBlockError(
                        f"block {row.key!r}: its data file {path} is missing; run 'tierstore verify --fix' "
                        "to drop damaged blocks", key=row.key, path=str(path), tier="L3") from None
                row, loc = newer, location_of(newer)
            except CorruptBlockError as exc:
                raise CorruptBlockError(f"block {row.key!r}: {exc.message}", key=row.key, path=exc.path,
                                        tier="L3") from None
            except UnsafePathError as exc:
                raise UnsafePathError(f"block {row.key!r}: {exc.message}", key=row.key, path=exc.path,
                                      tier="L3") from None
        else:
            raise TierStoreError(f"block {row.key!r} kept moving while being read; read it again", key=row.key)
        if crc32c.crc32c(out.data) != row.checksum:
            raise CorruptBlockError(
                f"block {row.key!r} failed its checksum in L3 ({loc.array}); the stored bytes are "
                "damaged — restore them or run 'tierstore verify --fix'", key=row.key, tier="L3")
        return row

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype,
                 device: str | torch.device | None = None) -> torch.Tensor:
        """An uninitialised tensor from the L2 pool (ordinary memory if L2 is off or full).

        With ``device`` it is on that device: from the L1 pool when L1 lives there and has room,
        else ordinary device memory. Its memory goes back to the pool when the tensor and every
        view of it are collected. L1 makes room by ``l1_eviction_policy`` (writing back what
        only it holds).
        """
        self._check_open()
        try:
            shape = tuple(operator.index(s) for s in shape)
        except TypeError:
            raise UnsupportedTensorError(f"allocate() takes a shape of ints, not {shape!r:.80}") from None
        if not isinstance(dtype, torch.dtype) or any(s < 0 for s in shape):
            raise UnsupportedTensorError(f"allocate() needs a torch.dtype and sizes >= 0, got {dtype!r}, {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > _physical_memory():
            raise _no_memory(nbytes, f"allocate {shape} {dtype}")
        if device is not None:
            device = _usable_device(device)
            if self._l1 is not None and nbytes > 0 and self._on_l1(device):
                tensor = self._l1.scratch(nbytes, dtype, shape, evict=True, spill=self._spill_l1)
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
            raise _no_memory(nbytes, f"allocate {shape} {dtype}") from None

    def delete(self, key: str) -> None:
        """Remove ``key``; raises ``BlockNotFoundError`` if it is not there."""
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
        self._lookup(key)
        txn.set(key, Change(None))

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
            if not self._await_settled(key):
                return False
        return False

    def __len__(self) -> int:
        self._check_open()
        self._refresh()
        with self._index_lock:  # a spill moves a key from the versions to the count in one step
            count = self._count + len(self._volatile_versions)
        txn = self._txn()
        if txn is not None:
            for key, change in txn.pending.items():
                count += (change.row is not None) - self._exists(key)
        return count

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def __setitem__(self, key: str, tensor: torch.Tensor) -> None:
        self.put(key, tensor)

    def __delitem__(self, key: str) -> None:
        self.delete(key)

    # Mapping would compare stores by reading and comparing every tensor (and so make handles
    # unhashable); two handles are equal only when they are the same handle.
    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__

    def keys(self, prefix: str | None = None) -> Iterator[str]:  # type: ignore[override]
        """Keys in sorted order (those starting with ``prefix`` if given)."""
        self._check_open()
        if prefix is not None and not isinstance(prefix, str):
            raise InvalidKeyError(f"keys(prefix=...) takes a str, not {type(prefix).__name__}")
        volatile = sorted(k for k in self._volatile_keys() if prefix is None or k.startswith(prefix))
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

    def flush(self) -> None:
        """Write the in-memory access history to the catalog now."""
        self._check_open()
        self._recorder.flush()

    def compact(self, *, min_fill: float = 0.5,
                progress: Callable[[int, int], None] | None = None) -> MaintenanceReport:
        """Rewrite the live blocks of packs filled below ``min_fill``; see :func:`tierstore.maintenance.compact`."""
        from .maintenance import compact

        return compact(self, min_fill=min_fill, progress=progress)

    def gc(self) -> MaintenanceReport:
        """Delete shard files no block points at any more; see :func:`tierstore.maintenance.gc`."""
        from .maintenance import gc

        return gc(self)

    def _write_history(self, batch: list[Access]) -> None:
        stats, successors = summarize(batch)
        self._catalog.write_history(batch, stats, successors, self.config.history_max_rows)
        self._migrator.learn(batch)

    # -- tier moves (tierstore.migrator) -----------------------------------------------------------

    def prefetch(self, keys: str | Iterable[str], tier: str = "L2") -> Future[list[str]]:
        """Bring ``keys`` up to ``tier`` ("L2", or "L1") in the background, without blocking gets.

        Returns a ``concurrent.futures.Future`` whose result is the keys resident in ``tier`` once
        the moves ran; keys not in the store are skipped. Each move is journaled (crash-safe).
        """
        self._check_open()
        wanted = [keys] if isinstance(keys, str) else list(keys)
        for key in wanted:
            check_key(key)
        return self._migrator.prefetch(wanted, tier)

    def pin(self, key: str, tier: str = "L2") -> Pin:
        """Bring ``key`` into ``tier`` now and keep it resident there until the pin is released.

        Use it as a context manager (``with db.pin(key): ...``) or call ``release()``. A newer
        version of the key put meanwhile is pinned too. ``TierFullError`` if it cannot fit.
        """
        self._check_open()
        check_key(key)
        if key not in self:
            raise BlockNotFoundError(f"no block {key!r} in {self.path}", key=key)
        return self._migrator.pin(key, tier)

    def migrate(self, dry_run: bool = False) -> Plan:
        """Apply the simple migration policy now: promote hot blocks, demote idle ones.

        With ``dry_run=True`` nothing moves and the returned :class:`~tierstore.migrator.Plan` (a
        printable list of moves) says what would; otherwise it lists the moves carried out.
        """
        self._check_open()
        if not dry_run:
            self._check_writable()
        return self._migrator.migrate(dry_run=dry_run)

    @property
    def migrator(self) -> Migrator:
        """The store's mover (``stats()``, ``wait()``, ``plan()``, the successor table)."""
        return self._migrator


def _unique(keys: Iterator[str]) -> Iterator[str]:
    """Sorted ``keys`` without repeats (a key spilled while being listed is both volatile and committed)."""
    last = None
    for key in keys:
        if key != last:
            yield key
            last = key


class _Replaced(Exception):
    """A block was replaced while being read (its file is gone): read the key again."""


def _checked_size(row: BlockRow) -> BlockRow:
    """``row`` if its byte count is what its dtype and shape need (a damaged catalog row is refused)."""
    try:
        itemsize = dtype_from_name(row.dtype).itemsize
    except UnsupportedTensorError as exc:
        raise UnsupportedTensorError(f"block {row.key!r}: {exc.message}", key=row.key) from None
    if math.prod(row.shape) * itemsize != row.nbytes:
        raise CorruptBlockError(
            f"block {row.key!r}: its catalog row is damaged ({row.nbytes} bytes for {row.dtype} {row.shape}); "
            "restore the catalog or delete the key", key=row.key, tier="L3")
    return row


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - every Linux has both
        return 1 << 62


def _no_memory(nbytes: int, what: str) -> TierFullError:
    return TierFullError(f"{what}: {nbytes} bytes is more memory than this machine has "
                         f"({_physical_memory()} bytes); use a smaller block", tier="L2")


def open_store(path: str | Path, config: CacheConfig | None = None, *, readonly: bool = False,
               **overrides: Any) -> TierStore:
    """Open (or create) the store at ``path``; see :func:`tierstore.open`."""
    return TierStore(path, config, readonly=readonly, **overrides)


def _parse_device(device: object) -> torch.device:
    """``device`` as a ``torch.device``, or ``InvalidArgumentError`` naming what was wrong with it."""
    try:
        parsed: torch.device = torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"not a device: {device!r} ({str(exc).splitlines()[0]})") from None
    return parsed


def _usable_device(device: object) -> torch.device:
    """``device`` parsed, if this process can hold a tensor's data there, else ``InvalidArgumentError``.

    Checked up front because torch reports an absent backend as an AssertionError (CUDA on a
    CPU-only build) or a NotImplementedError (``xla``), and ``meta`` would return a tensor with no data.
    """
    parsed = device if isinstance(device, torch.device) else _parse_device(device)
    why = _device_problem(parsed)
    if why is not None:
        raise InvalidArgumentError(f"device {str(parsed)!r}: {why}; use 'cpu' or leave device=None")
    return parsed


def _device_problem(device: torch.device) -> str | None:
    """Why a tensor cannot be placed on ``device`` in this process (None if it can)."""
    kind = device.type
    if kind == "cpu":
        return None
    if kind == "meta":
        return "a meta tensor holds no data"
    backend = getattr(torch, kind, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        return f"this torch build has no usable {kind!r} backend here"
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        return f"there is no {kind} device {device.index} (this process sees {count()})"
    return None


def _l1_device(name: str) -> torch.device:
    """The L1 pool's device from ``l1_device``, or ``ConfigError`` when this machine has none such."""
    device = torch.device(name)  # CacheConfig admits only 'cpu', 'cuda' and 'cuda:N'
    why = _device_problem(device)
    if why is not None:
        raise ConfigError(f"l1_device={name!r}: {why}; open with l1_device=None (the first GPU, if any), "
                          "'cpu' or l1_cache_size=0 (no L1)", tier="L1")
    return device


def _store_path(path: object) -> Path:
    """``path`` as a store folder, refusing what would make a store somewhere unintended."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"a store path is a str or os.PathLike, not {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise InvalidArgumentError(f"a store path is a str, not {type(text).__name__}; decode it first")
    if text == "":  # Path("") is the current directory: make that a deliberate '.'
        raise InvalidArgumentError("the store path is empty; name a folder (use '.' for the current directory)")
    if "\0" in text:
        raise InvalidArgumentError(f"the store path {text!r} holds a NUL character, which no file name can")
    return Path(text)
