"""The ``TierStore`` handle: put, get, delete, transactions, statistics, close.

A handle is opened with :func:`tierstore.open`. Reads take no lock beyond a
microsecond catalog lookup; writes are serialised by one writer lock per
handle (a transaction holds it from start to commit, as SQLite's
``BEGIN IMMEDIATE`` does). Committing follows "bytes before rows": block
bytes are written to fresh L3 locations and synced, then one catalog commit
switches them in, then the bytes of replaced versions are freed.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import torch

from ._version import __version__
from .catalog import BlockRow, Catalog, now
from .config import CacheConfig
from .errors import (
    BlockNotFoundError,
    CorruptBlockError,
    ReadOnlyError,
    StoreClosedError,
    StoreFullError,
    StoreNotFoundError,
    TierStoreError,
    TransactionError,
    translate_os_error,
)
from .history import Access, AccessRecorder, summarize
from .lockfile import WriterLock
from .tensors import check_key, check_tensor, dtype_from_name, dtype_name, tensor_bytes, tensor_from_bytes
from .tiers.l3_codecs import choose_codec
from .tiers.l3_zarr import Location, RecoveryReport, ZarrL3

__all__ = ["TierStore", "BlockInfo", "StoreStats", "open_store"]

CATALOG_NAME = "catalog.sqlite"
_ROW_CACHE = 1 << 16
"""Committed rows kept in memory for the hot path (cleared whole when full: simple and O(1))."""
L3_BIT = 4


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """What the catalog knows of one block."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    tiers: tuple[str, ...]
    checksum: int
    stored_bytes: int
    codec: str
    durable: bool
    block_id: int
    access_count: int
    last_access: float | None
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of a store's contents and activity since it was opened."""

    path: str
    readonly: bool
    blocks: int
    logical_bytes: int
    stored_bytes: int
    compression_ratio: float
    gets: int
    puts: int
    deletes: int
    hits: dict[str, int]
    tiers: dict[str, dict[str, Any]]
    recovery: dict[str, list[str]]
    history_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Txn:
    """Pending changes of one transaction (owned by one thread)."""

    owner: int
    pending: dict[str, BlockRow | None] = field(default_factory=dict)
    undo: list[tuple[str, BlockRow | None, bool]] = field(default_factory=list)
    garbage: list[Location] = field(default_factory=list)

    def set(self, key: str, row: BlockRow | None) -> None:
        had = key in self.pending
        old = self.pending.get(key)
        self.undo.append((key, old, had))
        if old is not None:
            self.garbage.append(_location(old))
        self.pending[key] = row

    def rollback_to(self, mark: int) -> None:
        while len(self.undo) > mark:
            key, old, had = self.undo.pop()
            current = self.pending.get(key)
            if current is not None:
                self.garbage.append(_location(current))
            if had:
                self.pending[key] = old
            else:
                del self.pending[key]


def _location(row: BlockRow) -> Location:
    if row.l3_array is None or row.l3_sizes is None:
        return Location("", 0, 0, (), 0, row.codec)
    return Location(row.l3_array, row.l3_shard or 0, row.l3_offset or 0,
                    Location.sizes_from_blob(row.l3_sizes), row.l3_inner or 0, row.codec)


class TierStore:
    """A handle on one store. Use :func:`tierstore.open` to get one; it is a context manager."""

    def __init__(self, path: str | Path, config: CacheConfig | None = None, *, readonly: bool = False,
                 **overrides: Any) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._closed = True
        self._lock: WriterLock | None = None
        catalog_path = self.path / CATALOG_NAME
        if readonly:
            if not catalog_path.exists():
                raise StoreNotFoundError(f"no tierstore store at {self.path} (no {CATALOG_NAME})",
                                         path=str(self.path))
        else:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise translate_os_error(exc, what="create the store folder", path=self.path) from None
            self._lock = WriterLock(self.path)
        try:
            self._open(catalog_path, config, overrides)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        self._closed = False

    def _open(self, catalog_path: Path, config: CacheConfig | None, overrides: dict[str, Any]) -> None:
        fsync = config.fsync if config is not None else overrides.get("fsync", True)
        self._catalog = Catalog(catalog_path, readonly=self.readonly, durable=bool(fsync))
        self.config = self._resolve_config(config, overrides)
        self._write_mutex = threading.RLock()
        self._local = threading.local()
        self._counts = {"get": 0, "put": 0, "delete": 0}
        self._hits = {"L1": 0, "L2": 0, "L3": 0}
        self._l3 = ZarrL3(self.path, fsync=self.config.fsync, readonly=self.readonly)
        self.recovery = RecoveryReport()
        if not self.readonly:
            self._recover()
        self._next_block_id = self._catalog.next_block_id()
        self._rows: dict[str, tuple[BlockRow, Location]] = {}
        self._rows_lock = threading.Lock()
        self._generation = 0
        self._data_version = self._catalog.data_version()
        self._count, self._logical_bytes, self._stored_bytes = self._catalog.totals()
        sink = None if self.readonly else self._write_history
        self._recorder = AccessRecorder(sink, interval=self.config.history_flush_interval)

    def _resolve_config(self, config: CacheConfig | None, overrides: dict[str, Any]) -> CacheConfig:
        stored = self._catalog.meta("config")
        if config is None:
            base = CacheConfig()
            if stored is not None:
                known = {k: v for k, v in json.loads(stored).items() if k in CacheConfig.__slots__}
                base = CacheConfig(**known)
            config = base
        if overrides:
            config = config.replace(**overrides)
        if not self.readonly:
            meta = {"config": json.dumps(config.to_dict()), "tierstore_version": __version__}
            if self._catalog.meta("store_id") is None:
                meta.update(store_id=uuid.uuid4().hex, created=repr(time.time()))
            self._catalog.set_meta(meta)
        return config

    def _recover(self) -> None:
        """Finish what a crashed writer left: drop cache-only rows, cut torn appends, remove orphans."""
        self._catalog.drop_volatile()
        self._catalog.forget_unused_shards()
        lengths = self._catalog.shard_lengths()
        try:
            self.recovery = self._l3.recover(lengths, self._catalog.live_arrays())
        except OSError as exc:
            raise translate_os_error(exc, what="recover the L3 tier", path=self._l3.root) from None
        last: dict[str, int] = {}
        for array, shard in lengths:
            last[array] = max(last.get(array, -1), shard)
        self._l3.start_shards_after(last)

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
        with self._write_mutex:
            self._closed = True
            try:
                self._recorder.close()
            except TierStoreError:
                pass  # history is best-effort; blocks are already committed
            self._l3.close()
            self._catalog.close()
            if self._lock is not None:
                self._lock.release()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

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
        txn: _Txn | None = getattr(self._local, "txn", None)
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
            txn = _Txn(threading.get_ident())
            self._local.txn = txn
            try:
                yield self
            except BaseException:
                self._local.txn = None
                self._l3.rollback()
                raise
            self._local.txn = None
            self._commit(txn)

    def _commit(self, txn: _Txn) -> None:
        rows = [row for row in txn.pending.values() if row is not None]
        deletes = [key for key, row in txn.pending.items() if row is None]
        try:
            lengths = self._l3.prepare()
        except OSError as exc:
            self._l3.rollback()
            raise translate_os_error(exc, what="sync block data", path=self._l3.root) from None
        try:
            replaced = self._catalog.commit_blocks(rows, deletes, lengths, self._next_block_id)
        except BaseException:
            self._l3.rollback()
            raise
        self._l3.commit()
        with self._rows_lock:
            self._generation += 1
            for row in rows:
                self._rows[row.key] = (row, _location(row))
            for key in deletes:
                self._rows.pop(key, None)
        existed = {row.key for row in replaced}
        self._count += sum(1 for row in rows if row.key not in existed) - sum(1 for k in deletes if k in existed)
        self._logical_bytes += sum(r.nbytes for r in rows) - sum(r.nbytes for r in replaced)
        self._stored_bytes += sum(r.stored_bytes for r in rows) - sum(r.stored_bytes for r in replaced)
        self._l3.free([_location(row) for row in replaced] + txn.garbage)
        for row in rows:
            self._recorder.record(row.key, "put")
        for key in deletes:
            self._recorder.record(key, "delete")

    def _txn(self) -> _Txn | None:
        txn: _Txn | None = getattr(self._local, "txn", None)
        return txn

    # -- blocks -------------------------------------------------------------------------------------

    def put(self, key: str, tensor: torch.Tensor, *, durable: bool = True) -> None:
        """Store ``tensor`` under ``key`` (replacing any earlier version).

        Outside a transaction the put is its own transaction: when it returns, the block is on
        disk and survives a crash. ``durable=False`` marks a cache-only block (a KV cache entry,
        say): it is dropped when the store is next opened.
        """
        self._check_writable()
        check_key(key)
        check_tensor(tensor)
        txn = self._txn()
        if txn is None:
            with self.transaction():
                self._put(self._txn_or_fail(), key, tensor, durable)
        else:
            self._put(txn, key, tensor, durable)
        self._counts["put"] += 1

    def _txn_or_fail(self) -> _Txn:
        txn = self._txn()
        if txn is None:  # pragma: no cover - transaction() always sets it
            raise TransactionError("no transaction is open in this thread")
        return txn

    def _put(self, txn: _Txn, key: str, tensor: torch.Tensor, durable: bool) -> None:
        data = tensor_bytes(tensor)
        cap = self.config.l3_cache_size
        if cap is not None and self._stored_bytes + data.nbytes > cap:
            raise StoreFullError(
                f"put {key!r}: L3 holds {self._stored_bytes} of l3_cache_size={cap} bytes and the block "
                f"needs up to {data.nbytes}; delete blocks or raise l3_cache_size", key=key, tier="L3")
        checksum = crc32c.crc32c(data.data)
        codec = choose_codec(str(self.config.l3_compression), tensor.element_size())
        block_id = self._next_block_id
        self._next_block_id += 1
        try:
            loc = self._l3.write(block_id, data, codec)
        except OSError as exc:
            raise translate_os_error(exc, what=f"write block {key!r}", path=self._l3.root, key=key) from None
        stamp = now()
        old = txn.pending.get(key) if key in txn.pending else self._catalog.get_block(key)
        row = BlockRow(
            key=key, block_id=block_id, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape),
            nbytes=data.nbytes, checksum=checksum, durable=durable, codec=loc.codec,
            l3_array=loc.array or None, l3_shard=loc.shard, l3_offset=loc.offset, l3_sizes=loc.sizes_blob(),
            l3_inner=loc.inner, stored_bytes=loc.length, tiers=L3_BIT,
            created=old.created if old is not None else stamp, updated=stamp)
        txn.set(key, row)

    def get(self, key: str, device: str | torch.device | None = None) -> torch.Tensor:
        """The tensor stored under ``key`` (on ``device`` if given).

        The returned tensor is the caller's own: later store activity never changes it.
        Raises ``BlockNotFoundError`` (a ``KeyError``) for a missing key and
        ``CorruptBlockError`` when the stored bytes fail their checksum.
        """
        self._check_open()
        check_key(key)
        row, loc = self._lookup_located(key)
        tensor = self._read(row, loc)
        self._counts["get"] += 1
        self._hits["L3"] += 1
        self._recorder.record(key, "get", "L3")
        if device is not None:
            tensor = tensor.to(device)
        return tensor

    def _lookup(self, key: str) -> BlockRow:
        return self._lookup_located(key)[0]

    def _lookup_located(self, key: str) -> tuple[BlockRow, Location]:
        """The row of ``key`` as this thread sees it, with its L3 location (cached for committed rows)."""
        txn = self._txn()
        if txn is not None and key in txn.pending:
            pending = txn.pending[key]
            if pending is None:
                raise BlockNotFoundError(f"no block {key!r} in {self.path}", key=key)
            return pending, _location(pending)
        if self.readonly:
            version = self._catalog.data_version()
            if version != self._data_version:  # a writer committed: cached rows may be stale
                with self._rows_lock:
                    self._rows.clear()
                    self._generation += 1
                    self._data_version = version
        hit = self._rows.get(key)
        if hit is not None:
            return hit
        generation = self._generation
        row = self._catalog.get_block(key)
        if row is None:
            raise BlockNotFoundError(f"no block {key!r} in {self.path}", key=key)
        located = (row, _location(row))
        with self._rows_lock:
            if generation == self._generation:  # no commit raced this lookup
                if len(self._rows) >= _ROW_CACHE:
                    self._rows.clear()
                self._rows[key] = located
        return located

    def _read(self, row: BlockRow, loc: Location | None = None) -> torch.Tensor:
        buf = np.empty(row.nbytes, dtype=np.uint8)
        for _attempt in range(3):
            if loc is None:
                loc = _location(row)
            try:
                self._l3.read_into(loc, buf)
                break
            except FileNotFoundError:
                newer = self._catalog.get_block(row.key)  # a writer may have replaced it meanwhile
                if newer is None:
                    raise BlockNotFoundError(f"block {row.key!r} was deleted while being read",
                                             key=row.key) from None
                if newer.block_id == row.block_id:
                    raise CorruptBlockError(
                        f"block {row.key!r}: its data file {self._l3.shard_path(loc.array, loc.shard)} is "
                        "missing; run 'tierstore verify --fix' to drop damaged blocks", key=row.key,
                        path=str(self._l3.shard_path(loc.array, loc.shard)), tier="L3") from None
                row, loc = newer, None
                buf = np.empty(row.nbytes, dtype=np.uint8)
            except CorruptBlockError as exc:
                raise CorruptBlockError(f"block {row.key!r}: {exc.message}", key=row.key, path=exc.path,
                                        tier="L3") from None
        if crc32c.crc32c(buf.data) != row.checksum:
            raise CorruptBlockError(
                f"block {row.key!r} failed its checksum in L3 ({_location(row).array}); the stored bytes are "
                "damaged — restore them or run 'tierstore verify --fix'", key=row.key, tier="L3")
        return tensor_from_bytes(buf, dtype_from_name(row.dtype), row.shape)

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

    def _delete(self, txn: _Txn, key: str) -> None:
        self._lookup(key)
        txn.set(key, None)

    def __contains__(self, key: object) -> bool:
        self._check_open()
        if not isinstance(key, str):
            return False
        txn = self._txn()
        if txn is not None and key in txn.pending:
            return txn.pending[key] is not None
        return self._catalog.has_block(key)

    def __len__(self) -> int:
        self._check_open()
        txn = self._txn()
        if txn is None:
            return self._count
        delta = 0
        for key, row in txn.pending.items():
            committed = self._catalog.has_block(key)
            delta += (row is not None and not committed) - (row is None and committed)
        return self._count + delta

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    def keys(self, prefix: str | None = None) -> Iterator[str]:
        """Keys in sorted order (those starting with ``prefix`` if given)."""
        self._check_open()
        txn = self._txn()
        if txn is not None and txn.pending:
            committed = set(self._iter_keys(prefix))
            for key, row in txn.pending.items():
                if prefix is None or key.startswith(prefix):
                    (committed.add if row is not None else committed.discard)(key)
            return iter(sorted(committed))
        return self._iter_keys(prefix)

    def _iter_keys(self, prefix: str | None) -> Iterator[str]:
        after = ""
        while True:
            page = self._catalog.keys_page(after, 1000, prefix)
            yield from page
            if len(page) < 1000:
                return
            after = page[-1]

    def info(self, key: str) -> BlockInfo:
        """Everything the catalog knows of ``key``."""
        self._check_open()
        check_key(key)
        row = self._lookup(key)
        if not self.readonly:
            self._recorder.flush()
        stats = self._catalog.block_stats(key) or {}
        pending = [a for a in self._recorder.pending() if a[1] == key and a[2] != "delete"]
        count = int(stats.get("access_count", 0)) + len(pending)
        last = max([stats.get("last_access") or 0.0] + [a[0] for a in pending]) or None
        return BlockInfo(
            key=key, dtype=dtype_from_name(row.dtype), shape=row.shape, nbytes=row.nbytes,
            tiers=("L3",) if row.l3_array is not None or row.nbytes == 0 else (), checksum=row.checksum,
            stored_bytes=row.stored_bytes, codec=row.codec, durable=row.durable, block_id=row.block_id,
            access_count=count, last_access=last, created=row.created, updated=row.updated)

    def history(self, key: str | None = None, limit: int = 100) -> list[Access]:
        """The newest ``limit`` accesses (of ``key``), newest first."""
        self._check_open()
        if not self.readonly:
            self._recorder.flush()
        return self._catalog.history(key, limit)

    def flush(self) -> None:
        """Write the in-memory access history to the catalog now."""
        self._check_open()
        self._recorder.flush()

    def stats(self) -> StoreStats:
        """Counts, sizes and activity, per tier."""
        self._check_open()
        ratio = self._logical_bytes / self._stored_bytes if self._stored_bytes else 1.0
        error = self._recorder.last_error
        return StoreStats(
            path=str(self.path), readonly=self.readonly, blocks=self._count, logical_bytes=self._logical_bytes,
            stored_bytes=self._stored_bytes, compression_ratio=ratio, gets=self._counts["get"],
            puts=self._counts["put"], deletes=self._counts["delete"], hits=dict(self._hits),
            tiers={"L3": {"capacity": self.config.l3_cache_size, "used": self._stored_bytes,
                          "blocks": self._count, "compression": self.config.l3_compression}},
            recovery={"removed": list(self.recovery.removed_files), "truncated": list(self.recovery.truncated),
                      "missing": list(self.recovery.missing)},
            history_error=None if error is None else str(error))

    def _write_history(self, batch: list[Access]) -> None:
        stats, successors = summarize(batch)
        self._catalog.write_history(batch, stats, successors, self.config.history_max_rows)


def open_store(path: str | Path, config: CacheConfig | None = None, *, readonly: bool = False,
               **overrides: Any) -> TierStore:
    """Open (or create) the store at ``path``; see :func:`tierstore.open`."""
    return TierStore(path, config, readonly=readonly, **overrides)
