"""Planned moves between tiers: journaled, crash-safe, run by one background worker.

Every planned move (a prefetch, a promotion of a hot block, a demotion of an idle one, the spill
of a cache-only block leaving L2) is a small transaction over the catalog's ``journal`` table:
intent, copy, verify, commit, free (the steps and their crash points: :mod:`tierstore.engine.moves`).
The bytes are copied by the mover (:mod:`tierstore.engine.mover`); a demotion of a block whose only
copy is volatile (a cache-only block in L2) writes L3 first, and its row commits through the block
index only if that cache-only version is still the key's newest.

The worker thread executes explicit prefetches (:meth:`Migrator.prefetch`, a
``concurrent.futures.Future``), predicted ones (on each get, the block's likely successors from
:class:`tierstore.predict.predictor.SuccessorTable`, learned from the access history and seeded at
open from the catalog), and every ``migration_time_threshold / 4`` seconds (1-60 s) the simple
policy's plan (:func:`tierstore.engine.planner.simple_plan`). Gets never wait for it: it takes the
same short residency locks a get does. Demand fills on a get miss are the mover's too, called by
the get without a journal: a get must return its bytes now, and a fill survives no crash.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from ..catalog import BlockRow, Catalog
from ..config import CacheConfig
from ..errors import (
    BlockNotFoundError,
    ConfigError,
    StoreClosedError,
    TierFullError,
    TierStoreError,
    traceback_for_log,
)
from ..predict.policies import LEARNED_POLICIES
from ..predict.predictor import SuccessorTable
from ..tiers.l1_cuda import DevicePool
from ..tiers.l2_slab import HostArena
from ..tiers.l3_zarr import Location, ZarrL3
from .index import BlockIndex
from .mover import Mover
from .moves import CRASH_ENV, CRASH_POINTS, RANK, TIERS, JournalReport, Move, Pin, Plan, recover_journal
from .planner import simple_plan
from .residency import Residency, Resident

__all__ = ["CRASH_ENV", "CRASH_POINTS", "JournalReport", "Migrator", "Move", "Pin", "Plan",
           "recover_journal"]

_log = logging.getLogger("tierstore.migrator")
_SEED_SUCCESSORS = 200_000
"""Transitions read back from the catalog at open (the most frequent first)."""
TRIM_EVERY = 128
"""History batches between trims of the catalog's successor table to ``history_max_rows`` rows."""
_LOOKAHEAD = 2
"""How many successors deep a get prefetches (the next two layers, say): one step ahead is too
little when reading a block from L3 takes longer than what the caller does between gets."""


_Job = tuple["Future[Any]", Callable[[], Any]]


class Migrator:
    """The journaled mover of one store, with its worker thread (see the module docstring)."""

    def __init__(self, catalog: Catalog, l3: ZarrL3, l1: Residency[DevicePool] | None,
                 l2: Residency[HostArena] | None, config: CacheConfig, index: BlockIndex, mover: Mover, *,
                 flush_history: Callable[[], None], spilled: Callable[[str], None], readonly: bool = False) -> None:
        self.index = index
        self.mover = mover
        self._flush_history = flush_history
        self._spilled = spilled
        self.catalog = catalog
        self.l3 = l3
        self.l1 = l1
        self.l2 = l2
        self.config = config
        self.readonly = readonly
        self._crash_at = os.environ.get(CRASH_ENV) or None
        self._table: SuccessorTable[str] = SuccessorTable(threshold=config.prediction_threshold)
        self._likely = self._table.likely
        self._learn_lock = threading.Lock()
        self._seeded = threading.Event()
        """Set once the worker has read the catalog's successor table (off the open path)."""
        tuned = [r for r in (l1, l2) if r is not None and r.policy_name in LEARNED_POLICIES]
        count, logical, _stored = catalog.totals() if tuned else (0, 0, 0)
        for residency in tuned:
            if count:
                residency.tune(logical // count)  # the predictive policy counts entries of the mean block
        self._paused = False
        self._last_get: str | None = None
        self._batches = 0
        self.counters = {"promoted": 0, "demoted": 0, "spilled": 0, "prefetched": 0, "predicted": 0,
                         "planned": 0, "failed": 0, "stale": 0,
                         "dropped": 0, "dropped_bytes": 0}
        self.last_error: BaseException | None = None
        self._jobs: deque[_Job] = deque()
        self._settled: set[int] = set()
        """Journal rows a spill already removed (its commit deletes the row in the same transaction)."""
        self._inflight: dict[str, threading.Event] = {}
        """Keys being copied into L2 by the worker now, with an event set when the copy is done."""
        self._wanted: dict[str, str] = {}
        """Predicted successors to bring into L2, filled by gets and drained by the worker."""
        self._wake = threading.Event()
        self._stop = False
        self._busy = threading.Lock()
        self._interval = min(60.0, max(1.0, config.migration_time_threshold / 4))
        self._thread = threading.Thread(target=self._run, name="tierstore-migrator", daemon=True)
        self._thread.start()

    # -- the hot path ---------------------------------------------------------------------------

    def on_get(self, key: str, device: str | torch.device | None = None) -> None:
        """A get of ``key`` (to ``device``) happened: queue its likely successors (a dict lookup when none).

        They go to L1 when the get was for the L1 device (the next layer's weights while this one
        computes), else to L2; successors of successors too, ``_LOOKAHEAD`` steps deep.
        """
        likely = self._likely(key)
        if not likely or self._paused:
            return
        tier = "L2"
        residency: Residency[Any] | None = self.l2
        if device is not None and self.l1 is not None:
            target, pool = torch.device(device), self.l1.arena.device
            if target.type == pool.type and target.index in (None, pool.index):
                tier, residency = "L1", self.l1
        if residency is None:
            return
        entries, wanted = residency.entries, self._wanted
        added = False
        for _depth in range(_LOOKAHEAD):
            ahead: tuple[str, ...] = ()
            for other in likely:
                if other not in entries and other not in wanted and other != key:
                    wanted[other] = tier
                    added = True
                ahead += self._likely(other)
            likely = ahead
        if added:
            self._wake.set()

    def await_move(self, key: str) -> None:
        """Before a get reads ``key`` itself: wait for a promotion of it already in flight (and drop
        a queued one), so the get takes the prefetched copy instead of reading the block twice."""
        if self._wanted:
            self._wanted.pop(key, None)
        event = self._inflight.get(key)
        if event is not None:
            event.wait()

    def learn(self, batch: Sequence[tuple[float, str, str, str | None]]) -> None:
        """Fold a batch of the access history into the successor table (the history thread calls it)."""
        with self._learn_lock:
            previous, add = self._last_get, self._table.add
            for _ts, key, op, _tier in batch:
                if op != "get":
                    continue
                if previous is not None and previous != key:
                    add(previous, key)
                previous = key
            self._last_get = previous
        self._batches += 1
        if self._batches % TRIM_EVERY == 0 and not self.readonly:
            try:  # never raise: the history batch is already committed and must not be written twice
                self.catalog.trim_successors(self.config.history_max_rows)
            except TierStoreError as exc:
                self._note_failure("trimming the successor table", exc)

    # -- public operations ------------------------------------------------------------------------

    @property
    def successors(self) -> SuccessorTable[str]:
        """Which block follows which (learned from the history, seeded from the catalog at open)."""
        self._seeded.wait(60.0)
        return self._table

    def prefetch(self, keys: Iterable[str], tier: str = "L2") -> Future[list[str]]:
        """Bring ``keys`` up to ``tier`` in the background; the future gives the keys resident there.

        Keys not in the store are skipped. The future raises what a move raised (a damaged block's
        ``CorruptBlockError``, say) after the other keys have been moved.
        """
        tier = str(tier).upper()
        residency = self._residency(tier)
        wanted = list(dict.fromkeys(keys))
        return self._submit(lambda: self._promote(wanted, tier, residency, "prefetch", strict=True))

    def pin(self, key: str, tier: str = "L2") -> Pin:
        """Bring ``key`` to ``tier`` now and keep it there until the returned pin is released.

        A cache-only block whose only copy is in L1 is pinned there when L2 is asked for (it is
        held at or above the tier asked for); ``Pin.tier`` says where.
        """
        tier = str(tier).upper()
        residency = self._residency(tier)
        if tier == "L2" and self._resident(self.l2, key) is None:
            above = self._resident(self.l1, key)
            if above is not None and above.volatile:
                return self.pin(key, "L1")
        residency.pin(key)  # first, so that the admission below already carries the pin
        try:
            if self._resident(residency, key) is None:
                self._promote([key], tier, residency, "pin", strict=True)
            if self._resident(residency, key) is None and self._nbytes(key):
                raise TierFullError(f"cannot pin {key!r} in {tier}: it does not fit beside the blocks held "
                                    f"there; release pins or raise the tier's size", key=key, tier=tier)
        except BaseException:
            residency.unpin(key)
            raise
        return Pin(residency, key, tier)

    def plan(self) -> Plan:
        """The simple policy's moves now (thresholds of the configuration), without doing them."""
        self._flush_history()
        return simple_plan(self.catalog, self.config, self.l1, self.l2, self._tier_of, time.time())

    def migrate(self, dry_run: bool = False) -> Plan:
        """Plan with :meth:`plan` and, unless ``dry_run``, carry the plan out (on the worker); the moves done."""
        if dry_run:
            return self.plan()
        done: Plan = self._submit(lambda: self._execute(self.plan(), "planned")).result()
        return done

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the worker has nothing queued (predicted prefetches included); False on timeout."""
        future: Future[None] = self._submit(lambda: None)
        try:
            future.result(timeout)
        except TimeoutError:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._wanted or self._busy.locked():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def pause(self) -> None:
        """Stop background moves (predicted prefetches, the periodic plan); explicit calls still run."""
        self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self._paused = False
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        """Counters of moves done, the queue, and the last error a background move hit."""
        return {**self.counters, "queued": len(self._jobs) + len(self._wanted),
                "successor_keys": len(self._table),
                "last_error": None if self.last_error is None else str(self.last_error)}

    def close(self) -> None:
        """Stop the worker (queued jobs fail with ``StoreClosedError``); calling it twice is fine."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        while self._jobs:
            future, _ = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(StoreClosedError("the store was closed before this move ran"))

    def _note_failure(self, what: str, exc: BaseException) -> None:
        """Keep ``exc`` for ``stats()`` and log it: nobody is waiting on a background move's outcome."""
        self.last_error = exc
        _log.warning("%s failed: %s", what, exc, exc_info=traceback_for_log(exc))

    # -- the worker -------------------------------------------------------------------------------

    def _submit(self, job: Callable[[], Any]) -> Future[Any]:
        if self._stop:
            raise StoreClosedError("the store is closed; open it again with tierstore.open()")
        future: Future[Any] = Future()
        self._jobs.append((future, job))
        self._wake.set()
        return future

    def _seed(self) -> None:
        """Read back the transitions the last process saw (the most frequent first)."""
        try:
            with self._learn_lock:
                for key, follower, count in self.catalog.successor_counts(_SEED_SUCCESSORS):
                    self._table.add(key, follower, count)
        except TierStoreError as exc:
            self._note_failure("reading the successor table back", exc)
        finally:
            self._seeded.set()

    def _run(self) -> None:
        self._seed()
        due = time.monotonic() + self._interval
        while True:
            self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()
            if self._stop:
                return
            with self._busy:
                while self._jobs and not self._stop:
                    future, job = self._jobs.popleft()
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(job())
                        except BaseException as exc:
                            future.set_exception(exc)
                if self._paused:
                    self._wanted.clear()
                    continue
                if self._wanted:
                    self._background(self._prefetch_predicted, "predicted")
                if time.monotonic() >= due:
                    due = time.monotonic() + self._interval
                    if not self.readonly:
                        self._background(lambda: self._execute(self.plan(), "planned"), None)

    def _prefetch_predicted(self) -> list[str]:
        by_tier: dict[str, list[str]] = {"L1": [], "L2": []}
        while self._wanted:
            key, tier = self._wanted.popitem()
            by_tier[tier].append(key)
        done: list[str] = []
        for tier, keys in by_tier.items():
            residency = self.l1 if tier == "L1" else self.l2
            if keys and residency is not None:
                done += self._promote(keys, tier, residency, "predicted successor")
        return done

    def _background(self, work: Callable[[], Any], counter: str | None) -> None:
        try:
            done = work()
            if counter is not None:
                self.counters[counter] += len(done)
        except Exception as exc:  # a background move must not kill the worker; stats() reports it
            self._note_failure("a background move", exc)
            self.counters["failed"] += 1

    # -- moves ------------------------------------------------------------------------------------

    def _residency(self, tier: str) -> Residency[Any]:
        name = str(tier).upper()
        residency = {"L1": self.l1, "L2": self.l2}.get(name) if name in TIERS else None
        if residency is None:
            have = [t for t, r in (("L1", self.l1), ("L2", self.l2)) if r is not None]
            raise ConfigError(f"cannot hold blocks in tier {tier!r}: this store's volatile tiers are "
                              f"{', '.join(have) or 'none'} (L3 holds every block already)")
        return residency

    @staticmethod
    def _resident(residency: Residency[Any] | None, key: str) -> Resident | None:
        if residency is None:
            return None
        entry = residency.entries.get(key)
        return entry if entry is not None and not entry.dead else None

    def _nbytes(self, key: str) -> int:
        """Size of ``key``'s block (BlockNotFoundError for a key that is not there)."""
        entry = self._resident(self.l2, key) or self._resident(self.l1, key)
        return entry.alloc.nbytes if entry is not None else self.index.lookup(key)[0].nbytes

    def _tier_of(self, key: str) -> str:
        if self._resident(self.l1, key) is not None:
            return "L1"
        return "L2" if self._resident(self.l2, key) is not None else "L3"

    def _crash(self, point: str) -> None:
        if self._crash_at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def _promote(self, keys: list[str], tier: str, residency: Residency[Any], reason: str, *,
                 strict: bool = False) -> list[str]:
        moves = Plan()
        for key in keys:
            src = self._tier_of(key)
            if RANK[src] > RANK[tier]:
                moves.append(Move(key, src, tier, 0, reason))
        errors: list[BaseException] = []
        self._execute(moves, "prefetched" if reason == "prefetch" else None, errors)
        if strict and errors:
            raise errors[0]
        return [key for key in keys if self._resident(residency, key) is not None]

    def _execute(self, moves: Sequence[Move], counter: str | None,
                 errors: list[BaseException] | None = None) -> Plan:
        """Journal ``moves`` (one transaction), carry each out, clear what is left of the journal."""
        done = Plan()
        if not moves:
            return done
        jobs: list[tuple[Move, int]] = []
        for move in moves:
            spill = move.dst == "L3" and move.src == "L2" and self._volatile(move.key)
            jobs.append((move, self.index.new_block_id() if spill else self._block_id(move.key)))
        ids = [0] * len(jobs) if self.readonly else self.catalog.journal_begin(
            [(block_id, m.key, m.op, m.src, m.dst) for m, block_id in jobs])
        self._crash("intent")
        open_ids = set(ids) - {0}
        try:
            for (move, block_id), journal_id in zip(jobs, ids, strict=True):
                try:
                    moved = self._move(move, block_id, journal_id)
                except TierStoreError as exc:
                    self.counters["failed"] += 1
                    self._note_failure(f"moving {move.key!r} from {move.src} to {move.dst}", exc)
                    if errors is not None:
                        errors.append(exc)
                    moved = False
                if journal_id in self._settled:  # a spill's commit (or its undo) removed the row already
                    self._settled.discard(journal_id)
                    open_ids.discard(journal_id)
                if moved:
                    done.append(move)
                    self.counters["promoted" if move.op == "promote" else "demoted"] += 1
                    if counter is not None:
                        self.counters[counter] += 1
        finally:
            if open_ids:
                self.catalog.journal_end(sorted(open_ids))
        return done

    def _volatile(self, key: str) -> bool:
        entry = self._resident(self.l2, key)
        return entry is not None and entry.volatile

    def _block_id(self, key: str) -> int:
        for residency in (self.l1, self.l2):
            entry = self._resident(residency, key)
            if entry is not None:
                return entry.block_id
        try:
            return self.index.lookup(key)[0].block_id
        except BlockNotFoundError:
            return 0

    def _move(self, move: Move, block_id: int, journal_id: int) -> bool:
        if move.op == "promote":
            return self._to_l2(move.key) if move.dst == "L2" else self._to_l1(move.key)
        l1, l2 = self.l1, self.l2
        if move.src == "L1":
            entry = self._resident(l1, move.key)
            if l1 is None or entry is None or (entry.volatile and not self.mover.write_back_l1(entry)):
                return False
            if move.dst == "L2" and l2 is not None and not self._to_l2(move.key):
                return False
            freed = l1.evict(move.key, entry.block_id)
            if freed and move.dst == "L3" and l2 is not None:
                l2.evict(move.key)
            self._crash("freed")
            return freed
        entry = self._resident(l2, move.key)
        if l2 is None or entry is None:
            return False
        if entry.volatile and not self._spill(entry, block_id, journal_id):
            return False
        freed = l2.evict(move.key, entry.block_id)
        self._crash("freed")
        return freed

    def _promotable(self, key: str) -> tuple[BlockRow, Location] | None:
        """The committed row and L3 location of ``key``, or None when there is nothing to promote."""
        try:
            row, loc = self.index.lookup(key)
        except BlockNotFoundError:
            return None
        return None if row.nbytes == 0 else (row, loc)

    def _to_l2(self, key: str) -> bool:
        """Copy ``key`` from L3 into an L2 slot, verify it, make it resident."""
        l2 = self.l2
        if l2 is None:
            return False
        if self._resident(l2, key) is not None:
            return True
        generation = l2.generation
        found = self._promotable(key)
        if found is None:
            return False
        row, loc = found
        done = threading.Event()
        other = self._inflight.setdefault(key, done)
        if other is not done:  # another thread is promoting it: take its result
            other.wait()
            return self._resident(l2, key) is not None
        try:
            return self.mover.promote_l2(key, row, loc, generation, self._crash)
        finally:
            del self._inflight[key]
            done.set()

    def _to_l1(self, key: str) -> bool:
        """Copy ``key`` into an L1 slot (through L2 when it has one), casting where the device needs it."""
        l1 = self.l1
        if l1 is None:
            return False
        if self._resident(l1, key) is not None:
            return True
        generation = l1.generation
        host_entry = self._resident(self.l2, key)
        if host_entry is None and self.l2 is not None and self._to_l2(key):
            host_entry = self._resident(self.l2, key)
        found = self._promotable(key) if host_entry is None else None
        return self.mover.promote_l1(key, host_entry, found, generation, self._crash)

    def spill(self, entry: Resident) -> bool:
        """Write a cache-only block leaving L2 to L3 (journaled); False if that could not be done.

        The L2 residency calls this when it must evict the block's only copy; it runs inside
        whatever operation needed the room, so its write stands alone (outside any open
        transaction) and commits its own catalog row.
        """
        if self._stop or self.readonly:
            return False
        l2 = self.l2
        if self.config.l3_admission == "reused" and not self._reused(entry.key) and l2 is not None:
            self.index.forget_volatile(entry.key, entry.block_id)
            l2.mark_durable(entry)  # let it go without a copy: dropped
            self.counters["dropped"] += 1
            self.counters["dropped_bytes"] += entry.alloc.nbytes
            return True
        return self._spill_alone(entry, "L2")

    def _reused(self, key: str) -> bool:
        """Whether ``key`` was read since it was last put (the newest access in its history is a get)."""
        try:
            self._flush_history()
            newest = self.catalog.history(key, 1)
        except TierStoreError:
            return True  # when in doubt, keep it
        return bool(newest) and newest[0][2] == "get"

    def write_back(self, entry: Resident, data: np.ndarray) -> bool:
        """Write a cache-only block leaving L1 (its bytes ``data``, copied out) to L3, journaled as a spill."""
        if self._stop or self.readonly:
            return False
        return self._spill_alone(entry, "L1", data)

    def _spill_alone(self, entry: Resident, src: str, data: np.ndarray | None = None) -> bool:
        """A spill outside any plan: its own journal row (the intent), then :meth:`_spill`."""
        block_id = self.index.new_block_id()
        try:
            journal_id = self.catalog.journal_begin([(block_id, entry.key, "demote", src, "L3")])[0]
        except TierStoreError:
            return False
        self._crash("intent")
        done = self._spill(entry, block_id, journal_id, data)
        self._settled.discard(journal_id)
        return done

    def _spill(self, entry: Resident, block_id: int, journal_id: int, data: np.ndarray | None = None) -> bool:
        """Write ``entry`` (an L2 entry, or an L1 one whose bytes are ``data``) to L3 and commit its row
        under ``journal_id`` if its version is still the key's newest (else count it stale and drop the copy)."""
        from_l2 = data is None
        loc: Location | None = None
        try:
            row, loc = self.mover.write_l3(entry, block_id, self.mover.spill_bytes(entry) if data is None else data,
                                           str(self.config.l3_compression), from_l2, self._crash)
            committed = self.index.commit_spill(row, loc, journal_id, entry.block_id)
            if committed:
                self._spilled(row.key)
        except (TierStoreError, OSError) as exc:
            self._note_failure(f"spilling {entry.key!r} to L3", exc)
            if loc is not None:
                self.l3.free([loc])
            try:
                self.catalog.journal_end([journal_id])
            except TierStoreError:
                pass  # the next open settles it
            self._settled.add(journal_id)
            return False
        self._settled.add(journal_id)
        if committed:
            self._crash("committed")
            self.counters["spilled"] += 1
        else:
            # A writer replaced or deleted the key after this version was chosen for eviction: the copy
            # is dropped, not committed, and the superseded entry may go (the writer discards it anyway).
            self.l3.free([loc])
            self.counters["stale"] += 1
        if from_l2 and self.l2 is not None:
            self.l2.mark_durable(entry)
        return True
