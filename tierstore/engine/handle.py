"""The ``TierStore`` handle: put, get, delete, transactions, statistics, close.

A handle is opened with :func:`tierstore.open`. Reads take no lock beyond a
microsecond catalog lookup; writes are serialised by one writer lock per
handle (a transaction holds it from start to commit, as SQLite's
``BEGIN IMMEDIATE`` does). Committing follows "bytes before rows": block
bytes are written to fresh L3 locations and synced, then one catalog commit
switches them in, then the bytes of replaced versions are freed.

Lock order (a thread holding one may take only those after it): the writer mutex, the L1 tier
lock, the L2 tier lock, the index lock (:attr:`BlockIndex.lock`), then the catalog's and L3's own
locks. The index lock is held across every catalog commit that changes a key's row (a writer's
commit, a spill's commit, compaction) together with the in-memory state that follows it (row cache,
totals, the versions of cache-only keys); it is never held while taking a tier lock. Work done
outside the writer mutex (a spill of a cache-only block chosen for eviction by any thread) commits
only if the key's newest version is still the one it copied, else it is dropped (versions, not hope).

This module keeps the handle's lifecycle, transactions and public API; the work is done by parts
the handle composes (built at open by :func:`tierstore.engine.opening.open_parts`, each given the parts it
needs and the handle's callbacks, :class:`~tierstore.engine.opening.HandleCalls`):
the get path (:class:`~tierstore.engine.handle_reads.Reads`), the put path and the commit
(:class:`~tierstore.engine.handle_writes.Writes`), the reports ``info``, ``history``, ``stats``
(:class:`~tierstore.engine.handle_reports.Reports`) and the store's side of the shared tier, ``publish``,
``pull``, read-through (:class:`~tierstore.engine.handle_shared.SharedAccess`). The block index
(:mod:`tierstore.engine.index`) and the mover (:mod:`tierstore.engine.mover`) are objects the handle,
the migrator and upkeep share.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..catalog import Catalog
from ..catalog.tier_counters import save_counters
from ..config import CacheConfig
from ..errors import (
    BlockNotFoundError,
    ReadOnlyError,
    StoreClosedError,
    TierStoreError,
    TransactionError,
)
from ..tensors import check_key
from ..tiers.l1_cuda import DevicePool
from ..tiers.l3_zarr import ZarrL3
from .access_recorder import Access, summarize
from .index import BlockIndex
from .migrator import Migrator, Pin, Plan
from .mover import Mover
from .opening import CATALOG_NAME, L2_FILE, HandleCalls, open_parts
from .shared_coordinator import Progress, PublishReport, PullReport, SharedCoordinator, SharedVerifyReport
from .transaction import Txn
from .upkeep_steps import steps
from .values import BlockInfo, StoreStats

if TYPE_CHECKING:
    from ..upkeep.compaction import MaintenanceReport

__all__ = ["TierStore", "BlockInfo", "StoreStats", "open_store", "CATALOG_NAME", "L2_FILE"]



class TierStore(MutableMapping[str, torch.Tensor]):
    """A handle on one store. Use :func:`tierstore.open` to get one; it is a context manager.

    It is a ``MutableMapping`` of key to tensor: ``db[k]`` is ``get(k)`` (``BlockNotFoundError``,
    a ``KeyError``, when missing), ``db[k] = t`` a durable ``put``, ``del db[k]`` a ``delete``;
    so it serves wherever a mapping of weights is asked for (accelerate's ``weights_map``, say).
    ``get`` and ``keys`` keep their own signatures: ``get(key, device)`` raises for a missing key
    instead of returning a default, and ``keys(prefix)`` returns a sorted iterator.
    """

    # -- handle -------------------------------------------------------------------------------------

    def __init__(self, path: str | Path, config: CacheConfig | None = None, *, readonly: bool = False,
                 remember_config: bool = True, **overrides: Any) -> None:
        self._closed = True
        self._write_mutex = threading.RLock()
        self._local = threading.local()
        calls = HandleCalls(check_open=self._check_open, check_writable=self._check_writable,
                            closed=lambda: self._closed, txn=self._txn, write_history=self._write_history,
                            put=self.put, transaction=self.transaction, keys=self.keys)
        opened = open_parts(path, config, readonly=readonly, remember_config=remember_config, overrides=overrides,
                            calls=calls)
        self.path, self.readonly, self.config = opened.path, opened.readonly, opened.config
        self.recovery, self.journal_recovery = opened.recovery, opened.journal_recovery
        """What the open recovered: the L3 sweep's report and the interrupted moves undone (tierstore.engine.moves)."""
        self.warm_blocks = opened.warm_blocks
        """Blocks taken back from a file-backed L2 at open (restart-warm)."""
        self._lock, self._catalog, self._l3, self._index = opened.lock, opened.catalog, opened.l3, opened.index
        self._l1, self._l2, self._l2_generation = opened.l1, opened.l2, opened.l2_generation
        self._mover, self._migrator, self._shared = opened.mover, opened.migrator, opened.shared
        self._recorder, self._reads, self._writes = opened.recorder, opened.reads, opened.writes
        self._reports, self._shared_access = opened.reports, opened.shared_access
        self._closed = False

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
                    save_counters(self._catalog, self._reports.tier_stats())
                except TierStoreError:
                    pass
            if self._l2 is not None and self._l2.arena.path is not None:
                try:
                    steps().save_index(self.path, self._catalog.meta("store_id") or "", self._l2_generation, self._l2)
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
    def catalog(self) -> Catalog:
        """The store's catalog (for reports, upkeep and tools; it hands out no raw connection)."""
        return self._catalog

    @property
    def index(self) -> BlockIndex:
        """The store's block index: cached rows, totals, block ids (for the migrator and upkeep)."""
        return self._index

    @property
    def mover(self) -> Mover:
        """The store's mover (the only code that copies bytes between tiers)."""
        return self._mover

    @property
    def l3(self) -> ZarrL3:
        """The L3 tier (for upkeep: compaction and gc rewrite and remove its files)."""
        return self._l3

    @contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """Hold the writer mutex for work beside transactions (``compact()``, ``gc()``): other writes wait.

        Refused inside a transaction, where the work could not be undone with it.
        """
        self._check_writable()
        if self._txn() is not None:
            raise TransactionError(f"{what} cannot run inside a transaction; leave the 'with' block first")
        with self._write_mutex:
            self._check_open()
            yield

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

    # -- reads -------------------------------------------------------------------------------------

    def get(self, key: str, device: str | torch.device | None = None, *, copy: bool = False,  # type: ignore[override]
            mapped: bool = False) -> torch.Tensor:
        """The tensor stored under ``key`` (on ``device`` if given).

        From L2 the tensor is a zero-copy view whose slot stays reserved for as long as any tensor
        derived from it lives, so later store activity never changes it; do not modify it in
        place (pass ``copy=True`` for a tensor of your own). ``mapped=True`` serves a block stored
        raw in L3 and held by no faster tier as :meth:`map` does (no copy, no L2 slot), anything
        else as an ordinary get. Raises ``BlockNotFoundError`` (a ``KeyError``) for a missing key
        and ``CorruptBlockError`` when stored bytes are damaged.
        """
        return self._reads.get(key, device, copy, self._shared_access.get_shared if self._shared is not None else None,
                               mapped=mapped)

    def get_many(self, keys: Iterable[str], device: str | torch.device | None = None, *,
                 copy: bool = False) -> dict[str, torch.Tensor]:
        """``{key: get(key, device, copy=copy)}`` for each of ``keys`` (each once, in the order given).

        The blocks a get would read from L3 are looked up first and read together, in the order
        their bytes lie on disk, through one read-ahead pipeline: the disk reads the next blocks
        while earlier ones decode, straight into their outputs (fresh L2 slots, as a get fills
        them). Everything else (L2 hits, pending changes, cache-only blocks, an L1 device) is a
        get. Each key's access is recorded and counted as its get's would be. Raises what get
        raises: ``BlockNotFoundError`` for a missing key (before anything is read),
        ``CorruptBlockError`` naming the damaged block's key, ``InvalidKeyError`` for a bad key.
        """
        return self._reads.get_many(keys, device, copy,
                                    self._shared_access.get_shared if self._shared is not None else None)

    def map(self, key: str) -> torch.Tensor | None:
        """A zero-copy view of ``key``'s bytes in L3 when the block is stored raw there, else None.

        The view maps the block's region of its shard file (``MAP_PRIVATE``: writes into the tensor
        stay in this process's private pages and never reach the file) and is checked against the
        catalog's checksum whenever the map reads from the disk and on the block's first map
        (``l3_verify_maps``: ``"disk"``, the default; ``"always"`` checks every map, as every other L3
        read is checked); the disk read happens in this call (the pages are
        populated), so a background thread can map ahead of use. L3 never rewrites committed bytes
        in place, so the tensor never changes under its holder, even when the block is replaced,
        deleted or compacted away meanwhile (the file's pages live on until the last tensor over
        them is collected). While the tensor lives its pages count in the process's resident set,
        as page cache the kernel can reclaim once it is gone. The access is recorded as a get's.

        None when a get would serve the block from elsewhere (a pending change of this thread's
        transaction, a cache-only block, a copy in L2) or read it differently (stored with a codec,
        or the kernel cannot map it): use :meth:`get` (``get(key, mapped=True)`` does both). Raises
        ``InvalidKeyError`` for a bad key and ``CorruptBlockError`` when the mapped bytes fail their
        checksum.
        """
        return self._reads.map(key)

    def shrink_l1(self, nbytes: int | str | None = None) -> int:
        """Give L1 device memory back to PyTorch (for the model); returns the bytes released.

        Evicts blocks by ``l1_eviction_policy`` until ``nbytes`` (default: all it can) of whole
        pool chunks are free, then hands those chunks to PyTorch's caching allocator. Blocks whose
        only copy is in L1 are written back to L2 (or L3) first; blocks still viewed stay. 0 if
        L1 is off.
        """
        return self._reads.shrink_l1(nbytes)

    def __contains__(self, key: object) -> bool:
        return self._reads.contains(key)

    # -- writes ------------------------------------------------------------------------------------

    def put(self, key: str, tensor: torch.Tensor, *, durable: bool = True, parent: str | None = None,
            compression: bool | str | None = None) -> None:
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

        ``compression`` overrides the store's ``l3_compression`` for this block (the same forms:
        ``"off"``, ``"zstd:3"``, ``True``...), both when it is written now and when a cache-only
        block is spilled later: ``"off"`` for blocks read back every step (spilled K/V, weights
        streamed every token), where decoding would cost more than the disk saves. A setting
        that is not a codec raises ``InvalidArgumentError`` and stores nothing.
        """
        self._writes.put(key, tensor, durable=durable, parent=parent, compression=compression)

    def delete(self, key: str) -> None:
        """Remove ``key``; raises ``BlockNotFoundError`` if it is not there."""
        self._writes.delete(key)

    # -- reports -----------------------------------------------------------------------------------

    def info(self, key: str) -> BlockInfo:
        """Everything the catalog knows of ``key``."""
        return self._reports.info(key)

    def tiers_of(self, key: str) -> tuple[str, ...]:
        """The tiers holding ``key``'s current version now ("L1", "L2", "L3"), without the catalog
        round trip and history flush :meth:`info` makes: cheap enough to ask once per streamed weight."""
        return self._reports.tiers_of(key)

    def history(self, key: str | None = None, limit: int = 100) -> list[Access]:
        """The newest ``limit`` accesses (of ``key``), newest first."""
        return self._reports.history(key, limit)

    def stats(self) -> StoreStats:
        """Counts, sizes and activity, per tier."""
        return self._reports.stats()

    # -- the shared tier ---------------------------------------------------------------------------

    @property
    def shared(self) -> SharedCoordinator | None:
        """The shared tier of this store (``shared_url``), or None."""
        return self._shared

    def publish(self, prefix: str | None = None, *, keys: Iterable[str] | None = None, name: str | None = None,
                progress: Progress | None = None) -> PublishReport:
        """Upload blocks (``keys``, or all under ``prefix``) to the shared tier; blocks already there are skipped.

        With ``name``, a manifest listing them is written last, for ``pull(name)`` on other machines.
        Every published key can also be read by other machines' ``get`` (fallthrough).
        """
        return self._shared_access.publish(prefix, keys=keys, name=name, progress=progress)

    def pull(self, name: str, *, progress: Progress | None = None) -> PullReport:
        """Fetch every block of the manifest ``name`` that this store lacks (checked by content hash)."""
        return self._shared_access.pull(name, progress=progress)

    def verify_shared(self, names: Iterable[str] | None = None, *, deep: bool = True,
                      progress: Progress | None = None) -> SharedVerifyReport:
        """Check the shared tier: every block each manifest lists exists (``deep``: and matches its hash)."""
        return self._shared_access.verify_shared(names, deep=deep, progress=progress)

    def wait_published(self, timeout: float | None = None) -> bool:
        """Wait for background publishing (write-through, on-evict); False if ``timeout`` ran out."""
        return self._shared_access.wait_published(timeout)

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
                self._writes.abort(txn)
                raise
            self._local.txn = None
            self._writes.commit(txn)

    def _txn(self) -> Txn | None:
        txn: Txn | None = getattr(self._local, "txn", None)
        return txn

    # -- blocks -------------------------------------------------------------------------------------

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype,
                 device: str | torch.device | None = None) -> torch.Tensor:
        """An uninitialised tensor from the L2 pool (ordinary memory if L2 is off or full).

        With ``device`` it is on that device: from the L1 pool when L1 lives there and has room,
        else ordinary device memory. Its memory goes back to the pool when the tensor and every
        view of it are collected. L1 makes room by ``l1_eviction_policy`` (writing back what
        only it holds).
        """
        return self._reads.allocate(shape, dtype, device)

    def __len__(self) -> int:
        return self._reads.count()

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
        return self._reads.keys(prefix)

    def flush(self) -> None:
        """Write the in-memory access history to the catalog now."""
        self._check_open()
        self._recorder.flush()

    def compact(self, *, min_fill: float = 0.5,
                progress: Callable[[int, int], None] | None = None) -> MaintenanceReport:
        """Rewrite the live blocks of packs filled below ``min_fill``.

        See :func:`tierstore.upkeep.compaction.compact`.
        """
        return steps().compact(self, min_fill, progress)

    def gc(self) -> MaintenanceReport:
        """Delete shard files no block points at any more; see :func:`tierstore.upkeep.compaction.gc`."""
        return steps().gc(self)

    def _write_history(self, batch: list[Access]) -> None:
        stats, successors = summarize(batch)
        self._catalog.write_history(batch, stats, successors, self.config.history_max_rows)
        self._migrator.learn(batch)

    # -- tier moves (tierstore.engine.migrator) -----------------------------------------------------------

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

        With ``dry_run=True`` nothing moves and the returned :class:`~tierstore.engine.migrator.Plan` (a
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


def open_store(path: str | Path, config: CacheConfig | None = None, *, readonly: bool = False,
               **overrides: Any) -> TierStore:
    """Open (or create) the store at ``path``; see :func:`tierstore.open`."""
    return TierStore(path, config, readonly=readonly, **overrides)
