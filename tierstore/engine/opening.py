"""Opening a :class:`~tierstore.engine.handle.TierStore` (its base class): checks, recovery, tiers, parts.

A read-write open takes the writer lock, recovers what a crash left (journal, L3 sweep), builds
the block index, the volatile tiers (L1 on a device, L2 in host memory, taken back warm when
file-backed), the mover and the migrator, the handle's parts (:class:`Reads`, :class:`Writes`,
:class:`Reports`, :class:`SharedAccess`), and remembers the config only once all of that worked.
A failed open releases everything it built (:meth:`StoreOpening._abandon`).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._version import __version__
from ..catalog import CREATING_SUFFIX, Catalog
from ..config import CacheConfig
from ..errors import (
    ConfigError,
    InvalidArgumentError,
    StoreFullError,
    StoreNotFoundError,
    TierFullError,
    translate_os_error,
)
from ..fsguard import CATALOG_ENTRIES, STORE_FILES, STORE_FOLDERS, refuse_links
from ..tiers.l1_cuda import DevicePool
from ..tiers.l2_slab import HostArena
from ..tiers.l3_zarr import LAYOUT, RecoveryReport, ZarrL3
from .access_recorder import AccessRecorder
from .devices import l1_device
from .handle_reads import Reads
from .handle_reports import Reports
from .handle_shared import SharedAccess
from .handle_writes import Writes
from .index import BlockIndex
from .migrator import Migrator
from .mover import Mover, physical_memory
from .moves import JournalReport, recover_journal
from .residency import Residency
from .shared_coordinator import SharedCoordinator
from .upkeep_steps import steps
from .writer_lock import WriterLock

if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager

    from .access_recorder import Access
    from .transaction import Txn

__all__ = ["CATALOG_NAME", "L2_FILE", "StoreOpening"]

CATALOG_NAME = "catalog.sqlite"
L2_FILE = "l2.slab"
_BF16_CAST = {"auto": None, "always": True, "never": False}
_L1_FIELDS = frozenset({"l1_device", "l1_cache_size"})
"""Fields that ask a read-only handle for an L1 pool (else a reader takes no device memory)."""


class StoreOpening:
    """Open and abandon of a :class:`~tierstore.engine.handle.TierStore` (its base class)."""

    if TYPE_CHECKING:
        _closed: bool

        def _check_open(self) -> None: ...
        def _check_writable(self) -> None: ...
        def _txn(self) -> Txn | None: ...
        def _write_history(self, batch: list[Access]) -> None: ...
        def put(self, key: str, tensor: torch.Tensor, *, durable: bool = True, parent: str | None = None) -> None: ...
        def transaction(self) -> AbstractContextManager[Any]: ...
        def keys(self, prefix: str | None = None) -> Iterator[str]: ...

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
        steps().refuse_orphaned_data(self.path, catalog_path)  # read-only too: its advice must be one that works
        fsync = config.fsync if config is not None else overrides.get("fsync", True)
        self._catalog = Catalog(catalog_path, readonly=self.readonly, durable=bool(fsync))
        self.config, asked = self._resolve_config(config, overrides)
        if self.readonly and not asked & _L1_FIELDS:  # a reader takes device memory only when asked to
            self.config = self.config.replace(l1_device=None, l1_cache_size=0)
        self._write_mutex = threading.RLock()
        self._local = threading.local()
        self._counts = {"get": 0, "put": 0, "delete": 0, "mapped": 0}
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
        """Moves a crash interrupted, undone at open (see :mod:`tierstore.engine.moves`)."""
        if not self.readonly:
            self._recover()
            file_backed = self.config.l2_file_backed and self.config.l2_cache_size > 0
            steps().drop_l2_files(self.path, slab=L2_FILE, keep_slab=file_backed)
        self.recovery.catalog_rollback = self._catalog.rollback_note
        self._index = BlockIndex(self._catalog, self.path, readonly=self.readonly,
                                 l3_capacity=self.config.l3_cache_size)
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
        self._mover = Mover(self._catalog, self._l3, self._l1, self._l2, self._index)
        self._shared: SharedCoordinator | None = None
        if self.config.shared_url is not None:  # no network until first used
            self._shared = SharedCoordinator(self.config, lambda key: self._shared_access.block(key))
            self._hits["shared"] = 0
            self._hit_bytes["shared"] = 0
        self._migrator = Migrator(self._catalog, self._l3, self._l1, self._l2, self.config, self._index, self._mover,
                                  flush_history=lambda: self._recorder.flush(),
                                  spilled=lambda key: self._writes.spilled(key), readonly=self.readonly)
        self._mover.attach(spill_l2=lambda entry: self._writes.spill(entry),
                           may_write=lambda: not self._closed and not self.readonly,
                           write_back_l3=lambda entry, data: self._migrator.write_back(entry, data))
        sink = None if self.readonly else self._write_history
        self._recorder = AccessRecorder(sink, interval=self.config.history_flush_interval)
        self._build_parts()

    def _build_parts(self) -> None:
        """The handle's parts it delegates to: reads, writes, reports, shared-tier access."""
        self._reads = Reads(path=self.path, readonly=self.readonly, catalog=self._catalog, l1=self._l1, l2=self._l2,
                            index=self._index, mover=self._mover, migrator=self._migrator, recorder=self._recorder,
                            counts=self._counts, hits=self._hits, hit_bytes=self._hit_bytes, txn=self._txn,
                            check_open=self._check_open)
        self._shared_access = SharedAccess(path=self.path, readonly=self.readonly, catalog=self._catalog,
                                           shared=self._shared, reads=self._reads, check_open=self._check_open,
                                           check_writable=self._check_writable, put=self.put,
                                           transaction=self.transaction, keys=self.keys)
        self._writes = Writes(readonly=self.readonly, config=self.config, catalog=self._catalog, l3=self._l3,
                              l1=self._l1, l2=self._l2, index=self._index, mover=self._mover, migrator=self._migrator,
                              recorder=self._recorder, shared=self._shared, counts=self._counts, reads=self._reads,
                              txn=self._txn, transaction=self.transaction, check_writable=self._check_writable,
                              closed=lambda: self._closed, landing=self._shared_access.landing)
        self._reports = Reports(path=self.path, readonly=self.readonly, config=self.config, recovery=self.recovery,
                                catalog=self._catalog, recorder=self._recorder, l1=self._l1, l2=self._l2,
                                shared=self._shared, counts=self._counts, hits=self._hits, hit_bytes=self._hit_bytes,
                                index=self._index, mover=self._mover, reads=self._reads, check_open=self._check_open)

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
        device = l1_device(name)
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
        memory = physical_memory()
        if strict and size > memory:  # refused before mapping: touching the pages could wake the OOM killer
            raise TierFullError(f"l2_cache_size={size} bytes is more memory than this machine has ({memory} "
                                "bytes); lower l2_cache_size", tier="L2")
        if not strict:
            held = -(-self._index.logical_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
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
        self._l2_generation, self.warm_blocks = steps().warm_l2(self.path, self._catalog, self._l2)

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
        self.recovery = steps().recover(self._catalog, self._l3)
        if self._l3.layout < LAYOUT:
            steps().upgrade_layout(self._catalog, self._l3)

    # -- handle -------------------------------------------------------------------------------------


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
