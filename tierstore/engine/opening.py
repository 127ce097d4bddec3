"""Opening a store for a :class:`~tierstore.engine.handle.TierStore`: checks, recovery, tiers, parts.

:func:`open_parts` is what the handle calls in ``__init__``: given the path, the config and the
handle's callbacks (:class:`HandleCalls`), it returns everything the open built
(:class:`OpenedStore`), which the handle keeps. A read-write open takes the writer lock, recovers
what a crash left (journal, L3 sweep), builds the block index, the volatile tiers (L1 on a device,
L2 in host memory, taken back warm when file-backed), the mover and the migrator, the handle's parts
(:class:`Reads`, :class:`Writes`, :class:`Reports`, :class:`SharedAccess`), and remembers the config
only once all of that worked. A failed open releases everything it built (``_Opener._abandon``)
before the error propagates.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
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

__all__ = ["CATALOG_NAME", "L2_FILE", "HandleCalls", "OpenedStore", "open_parts"]

CATALOG_NAME = "catalog.sqlite"
L2_FILE = "l2.slab"
_BF16_CAST = {"auto": None, "always": True, "never": False}
_L1_FIELDS = frozenset({"l1_device", "l1_cache_size"})
"""Fields that ask a read-only handle for an L1 pool (else a reader takes no device memory)."""


@dataclass(frozen=True, slots=True)
class HandleCalls:
    """What the parts built at open call back on the handle: its checks, its transaction, its public writes."""

    check_open: Callable[[], None]
    """Raise ``StoreClosedError`` once the handle is closed."""
    check_writable: Callable[[], None]
    """Also raise ``ReadOnlyError`` on a read-only handle."""
    closed: Callable[[], bool]
    """Whether the handle is closed (or not open yet)."""
    txn: Callable[[], Txn | None]
    """The calling thread's open transaction, if any."""
    write_history: Callable[[list[Access]], None]
    """Write a batch of recorded accesses to the catalog (a read-write handle's history sink)."""
    put: Callable[..., None]
    """``TierStore.put``."""
    transaction: Callable[[], AbstractContextManager[Any]]
    """``TierStore.transaction``."""
    keys: Callable[[str | None], Iterator[str]]
    """``TierStore.keys``."""


@dataclass(frozen=True, slots=True)
class OpenedStore:
    """Everything an open built, for the handle to keep (and to release at close)."""

    path: Path
    readonly: bool
    config: CacheConfig
    """The config the store opened with (remembered in the catalog by a read-write open)."""
    lock: WriterLock | None
    """The writer lock (a read-write open), released at close."""
    catalog: Catalog
    l3: ZarrL3
    index: BlockIndex
    l1: Residency[DevicePool] | None
    l2: Residency[HostArena] | None
    l2_generation: int
    """The file-backed L2's index generation (saved with the index at close)."""
    mover: Mover
    migrator: Migrator
    shared: SharedCoordinator | None
    recorder: AccessRecorder
    reads: Reads
    writes: Writes
    reports: Reports
    shared_access: SharedAccess
    recovery: RecoveryReport
    journal_recovery: JournalReport
    warm_blocks: int


def open_parts(path: str | Path, config: CacheConfig | None, *, readonly: bool, remember_config: bool,
               overrides: dict[str, Any], calls: HandleCalls) -> OpenedStore:
    """Open the store at ``path`` (create it unless ``readonly``); what the open built, for the handle.

    ``config`` (or, without it, the remembered config with ``overrides`` applied) sets the tiers;
    ``remember_config`` keeps it as the store's config. On failure everything built is released
    and the error propagates.
    """
    opener = _Opener(path, config, readonly=readonly, remember_config=remember_config, overrides=overrides,
                     calls=calls)
    return OpenedStore(path=opener.path, readonly=opener.readonly, config=opener.config, lock=opener.lock,
                       catalog=opener.catalog, l3=opener.l3, index=opener.index, l1=opener.l1, l2=opener.l2,
                       l2_generation=opener.l2_generation, mover=opener.mover, migrator=opener.migrator,
                       shared=opener.shared, recorder=opener.recorder, reads=opener.reads, writes=opener.writes,
                       reports=opener.reports, shared_access=opener.shared_access, recovery=opener.recovery,
                       journal_recovery=opener.journal_recovery, warm_blocks=opener.warm_blocks)


class _Opener:
    """One open in progress: builds the parts onto itself, in order, and releases them if a step fails."""

    def __init__(self, path: str | Path, config: CacheConfig | None, *, readonly: bool, remember_config: bool,
                 overrides: dict[str, Any], calls: HandleCalls) -> None:
        self.calls = calls
        self.path = _store_path(path)
        if not isinstance(readonly, (bool, np.bool_)):  # "no" would be truthy: a surprise read-only handle
            raise InvalidArgumentError(f"readonly must be True or False, not {readonly!r}")
        if config is not None and not isinstance(config, CacheConfig):
            raise ConfigError(f"config must be a tierstore.CacheConfig or None, not {type(config).__name__}; "
                              "pass single fields as keywords (tierstore.open(path, l2_cache_size='1GiB'))")
        self.readonly = bool(readonly)
        self.keep_config = remember_config
        self.lock: WriterLock | None = None
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
            self.lock = WriterLock(self.path)
        try:
            self._open(catalog_path, config, overrides)
            if not self.readonly:  # only a config that opened is remembered (a failed one would fail every open)
                self._remember_config()
        except BaseException:
            self._abandon()
            raise

    def _open(self, catalog_path: Path, config: CacheConfig | None, overrides: dict[str, Any]) -> None:
        steps().refuse_orphaned_data(self.path, catalog_path)  # read-only too: its advice must be one that works
        fsync = config.fsync if config is not None else overrides.get("fsync", True)
        self.catalog = Catalog(catalog_path, readonly=self.readonly, durable=bool(fsync))
        self.config, asked = self._resolve_config(config, overrides)
        if self.readonly and not asked & _L1_FIELDS:  # a reader takes device memory only when asked to
            self.config = self.config.replace(l1_device=None, l1_cache_size=0)
        self.counts = {"get": 0, "put": 0, "delete": 0, "mapped": 0}
        self.hits = {"L1": 0, "L2": 0, "L3": 0}
        self.hit_bytes = {"L1": 0, "L2": 0, "L3": 0}
        layout = self.catalog.l3_layout()
        if layout is None:  # nothing stored yet: a new store starts in the current layout
            layout = LAYOUT
            if not self.readonly:
                self.catalog.commit_l3_layout([], LAYOUT)
        self.l3 = ZarrL3(self.path, fsync=self.config.fsync, readonly=self.readonly, layout=layout)
        self.recovery = RecoveryReport()
        self.journal_recovery = JournalReport()
        """Moves a crash interrupted, undone at open (see :mod:`tierstore.engine.moves`)."""
        if not self.readonly:
            self._recover()
            file_backed = self.config.l2_file_backed and self.config.l2_cache_size > 0
            steps().drop_l2_files(self.path, slab=L2_FILE, keep_slab=file_backed)
        self.recovery.catalog_rollback = self.catalog.rollback_note
        self.index = BlockIndex(self.catalog, self.path, readonly=self.readonly,
                                 l3_capacity=self.config.l3_cache_size)
        self.l1: Residency[DevicePool] | None = self._open_l1()
        self.l2: Residency[HostArena] | None = None
        self.l2_generation = 0
        self.warm_blocks = 0
        """Blocks taken back from a file-backed L2 at open (restart-warm)."""
        arena = self._open_l2(strict=not self.readonly or "l2_cache_size" in asked)
        if arena is not None:
            self.l2 = Residency("L2", arena, self.config.l2_eviction_policy)
            if arena.path is not None:
                self._warm_l2()
        self.mover = Mover(self.catalog, self.l3, self.l1, self.l2, self.index,
                           verify_maps=self.config.l3_verify_maps)
        self.shared: SharedCoordinator | None = None
        if self.config.shared_url is not None:  # no network until first used
            self.shared = SharedCoordinator(self.config, lambda key: self.shared_access.block(key))
            self.hits["shared"] = 0
            self.hit_bytes["shared"] = 0
        self.migrator = Migrator(self.catalog, self.l3, self.l1, self.l2, self.config, self.index, self.mover,
                                  flush_history=lambda: self.recorder.flush(),
                                  spilled=lambda key: self.writes.spilled(key), readonly=self.readonly)
        self.mover.attach(spill_l2=lambda entry: self.writes.spill(entry),
                           may_write=lambda: not self.calls.closed() and not self.readonly,
                           write_back_l3=lambda entry, data: self.migrator.write_back(entry, data))
        sink = None if self.readonly else self.calls.write_history
        self.recorder = AccessRecorder(sink, interval=self.config.history_flush_interval)
        self._build_parts()

    def _build_parts(self) -> None:
        """The handle's parts it delegates to: reads, writes, reports, shared-tier access."""
        self.reads = Reads(path=self.path, readonly=self.readonly, catalog=self.catalog, l1=self.l1, l2=self.l2,
                            index=self.index, mover=self.mover, migrator=self.migrator, recorder=self.recorder,
                            counts=self.counts, hits=self.hits, hit_bytes=self.hit_bytes, txn=self.calls.txn,
                            check_open=self.calls.check_open)
        self.shared_access = SharedAccess(path=self.path, readonly=self.readonly, catalog=self.catalog,
                                           shared=self.shared, reads=self.reads, check_open=self.calls.check_open,
                                           check_writable=self.calls.check_writable, put=self.calls.put,
                                           transaction=self.calls.transaction, keys=self.calls.keys)
        self.writes = Writes(readonly=self.readonly, config=self.config, catalog=self.catalog, l3=self.l3,
                              l1=self.l1, l2=self.l2, index=self.index, mover=self.mover, migrator=self.migrator,
                              recorder=self.recorder, shared=self.shared, counts=self.counts, reads=self.reads,
                              txn=self.calls.txn, transaction=self.calls.transaction,
                              check_writable=self.calls.check_writable,
                              closed=self.calls.closed, landing=self.shared_access.landing)
        self.reports = Reports(path=self.path, readonly=self.readonly, config=self.config, recovery=self.recovery,
                                catalog=self.catalog, recorder=self.recorder, l1=self.l1, l2=self.l2,
                                shared=self.shared, counts=self.counts, hits=self.hits, hit_bytes=self.hit_bytes,
                                index=self.index, mover=self.mover, reads=self.reads, check_open=self.calls.check_open)

    def _abandon(self) -> None:
        """Release what a failed open built (in reverse order), so nothing of it outlives the error."""
        for name in ("recorder", "migrator", "shared", "l3", "catalog"):
            part = getattr(self, name, None)
            if part is not None:
                with contextlib.suppress(Exception):  # the open's own error is the one to report
                    part.close()
        for name in ("l1", "l2"):
            tier = getattr(self, name, None)
            if tier is not None:
                with contextlib.suppress(Exception):
                    tier.clear()
                    tier.arena.close()
        if self.lock is not None:
            self.lock.release()

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
            held = -(-self.index.logical_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
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
        assert self.l2 is not None
        self.l2_generation, self.warm_blocks = steps().warm_l2(self.path, self.catalog, self.l2)

    def _resolve_config(self, config: CacheConfig | None,
                        overrides: dict[str, Any]) -> tuple[CacheConfig, frozenset[str]]:
        """The config to open with, and the fields the caller gave (the rest come from the catalog)."""
        asked: frozenset[str] = frozenset(CacheConfig.__slots__) if config is not None else frozenset(overrides)
        if config is None:
            config = CacheConfig()
            stored = self.catalog.meta("config")
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
        if self.keep_config or self.catalog.meta("config") is None:
            meta["config"] = json.dumps(self.config.to_dict())
        if self.catalog.meta("store_id") is None:
            meta.update(store_id=uuid.uuid4().hex, created=repr(time.time()))
        self.catalog.set_meta(meta)

    def _recover(self) -> None:
        self.journal_recovery = recover_journal(self.catalog, self.l3)
        self.recovery = steps().recover(self.catalog, self.l3)
        if self.l3.layout < LAYOUT:
            steps().upgrade_layout(self.catalog, self.l3)


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
