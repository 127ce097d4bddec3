"""The store's side of the shared tier: fallthrough, publishing, pulling, degraded mode.

:class:`SharedCoordinator` sits between a ``TierStore`` and a
:class:`~tierstore.tiers.shared_s3.SharedS3Tier`. The store hands it plain bytes
(``LocalBlock``) and gets plain bytes back; it never sees the catalog. It keeps
the shared tier's health: after a call fails to reach the server, the tier is
*degraded* and further calls fail at once (no network wait) until a retry time
that backs off exponentially (0.25 s doubling to 30 s); the first call after it
probes the server, and a success clears the state. Local tiers never wait on it.

Publishing runs many uploads at once (``shared_concurrency``) while the calling
thread reads and encodes the next blocks; write-through and on-evict publishing
queue keys for a background thread that does the same in batches.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .config import CacheConfig
from .errors import (
    BlockNotFoundError,
    BlockUnavailableError,
    SharedTierError,
    SharedTierUnavailableError,
    traceback_for_log,
)
from .tiers.l3_codecs import choose_codec
from .tiers.shared_objects import chunk_pool
from .tiers.shared_s3 import BlockHeader, SharedS3Tier, encode_block

__all__ = ["SharedCoordinator", "LocalBlock", "PublishReport", "PullReport", "SharedVerifyReport", "Progress",
           "BlockUnavailableError"]

_log = logging.getLogger("tierstore.shared")
_T = TypeVar("_T")
Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; total is 0 while unknown."""
_WINDOW_BYTES = 256 << 20
"""Encoded bytes held for uploads (or downloads) in flight at once."""
_LAND_BATCH = 64
_BACKOFF_MIN, _BACKOFF_MAX = 0.25, 30.0


@dataclass(frozen=True, slots=True)
class LocalBlock:
    """A committed block's bytes as the store hands them out for publishing."""

    key: str
    data: np.ndarray
    dtype: str
    shape: tuple[int, ...]
    crc32c: int
    durable: bool
    itemsize: int


@dataclass(frozen=True, slots=True)
class PublishReport:
    """What ``publish`` did."""

    name: str | None
    keys: int
    uploaded: int
    existing: int
    bytes_sent: int


@dataclass(frozen=True, slots=True)
class PullReport:
    """What ``pull`` did."""

    name: str
    keys: int
    fetched: int
    skipped: int
    bytes_received: int


@dataclass(frozen=True, slots=True)
class SharedVerifyReport:
    """What ``verify_shared`` found: one line per problem (empty when all is well)."""

    manifests: int
    blocks: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every listed block is present and matches its content hash."""
        return not self.problems


class SharedCoordinator:
    """Fallthrough reads, publishing and health of one store's shared tier."""

    def __init__(self, config: CacheConfig, read: Callable[[str], LocalBlock | None]) -> None:
        assert config.shared_url is not None
        self.tier = SharedS3Tier(config.shared_url, endpoint=config.shared_endpoint, region=config.shared_region,
                                 credentials=config.shared_credentials, timeout=config.shared_timeout,
                                 concurrency=config.shared_concurrency)
        self.policy = config.shared_publish
        self._compression = str(config.shared_compression or config.l3_compression)
        self._read = read
        self._health = threading.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self._since: float | None = None
        self._last_error: str | None = None
        self._publish_error: str | None = None
        self.counts = collections.Counter[str]()
        self._queue: dict[str, None] = {}
        self._queue_cond = threading.Condition()
        self._busy = False
        self._publisher: threading.Thread | None = None
        self._stopping = False
        self._encoder = concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1),
                                                              thread_name_prefix="tierstore-encode")

    # -- health ------------------------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """Whether the last call failed to reach the server (and no later one succeeded)."""
        return self._since is not None

    def _check_available(self, what: str) -> None:
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise SharedTierUnavailableError(
                f"{what}: shared tier {self.tier.url} is unavailable ({self._last_error}); "
                f"next try in {wait:.1f}s", tier="shared")

    def _failed(self, exc: SharedTierUnavailableError) -> None:
        with self._health:
            self._last_error = exc.message
            self.counts["errors"] += 1
            now = time.monotonic()
            if now < self._retry_at:
                return  # one of a burst of requests in flight together: one failure, one backoff step
            self._failures += 1
            self._retry_at = now + min(_BACKOFF_MAX, _BACKOFF_MIN * 2 ** (self._failures - 1))
            if self._since is None:
                _log.warning("shared tier %s unavailable, working from the local tiers: %s", self.tier.url,
                             exc.message)
            self._since = self._since or time.time()

    def _succeeded(self) -> None:
        if self._since is not None or self._failures:
            with self._health:
                if self._since is not None:
                    _log.info("shared tier %s reachable again", self.tier.url)
                self._failures, self._retry_at, self._since = 0, 0.0, None

    def _call(self, coro: Coroutine[Any, Any, _T], what: str, *, size: int | None = 0) -> _T:
        try:
            self._check_available(what)
        except SharedTierUnavailableError:
            coro.close()
            raise
        return self._tracked(lambda: self.tier.run(coro, what, size=size))

    def _wait(self, future: concurrent.futures.Future[_T], what: str) -> _T:
        return self._tracked(lambda: self.tier.wait(future, what, queued=True))

    def _tracked(self, request: Callable[[], _T]) -> _T:
        """``request()``, with its outcome counted towards the tier's health (degraded mode, backoff)."""
        try:
            result = request()
        except SharedTierUnavailableError as exc:
            self._failed(exc)
            raise
        self._succeeded()
        return result

    # -- reads -------------------------------------------------------------------------------------

    def fetch(self, key: str) -> tuple[BlockHeader, np.ndarray] | None:
        """The verified block published under ``key``, or None if the shared tier has none.

        Raises ``BlockUnavailableError`` (a ``KeyError``) when the shared tier cannot be reached.
        """
        try:
            found = self._call(self._fetch(key), f"fetch {key!r} from the shared tier", size=None)
        except SharedTierUnavailableError as exc:
            raise BlockUnavailableError(f"no block {key!r} in the local tiers, and {exc.message}",
                                        key=key, tier="shared") from None
        if found is not None:
            self.counts["fetched"] += 1
            self.counts["bytes_down"] += found[1].nbytes
        return found

    async def _fetch(self, key: str) -> tuple[BlockHeader, np.ndarray] | None:
        ref = await self.tier.bounded(self.tier.get_ref(key))
        if ref is None:
            return None
        return await self.tier.bounded(self.tier.get_block(ref.hash, ref.nbytes), ref.nbytes)

    def manifest(self, name: str) -> tuple[dict[str, Any], dict[str, BlockHeader]]:
        """``(info, {key: header})`` of the manifest ``name``; ``BlockNotFoundError`` if none."""
        found = self._call(self.tier.get_manifest(name), f"read manifest {name!r}")
        if found is None:
            raise BlockNotFoundError(f"nothing is published as {name!r} in {self.tier.url}", key=name,
                                     tier="shared")
        return found

    def manifests(self) -> list[tuple[str, int]]:
        """``(name, size)`` of every manifest in the shared tier."""
        return self._call(self.tier.manifests(), "list manifests")

    def objects(self, prefix: str = "") -> list[tuple[str, int]]:
        """``(path, size)`` of every object under ``prefix`` of the shared tier."""
        return self._call(self.tier.list_objects(prefix), "list the shared tier")

    # -- publishing --------------------------------------------------------------------------------

    def publish(self, keys: Iterable[str], *, name: str | None = None, info: dict[str, Any] | None = None,
                progress: Progress | None = None) -> PublishReport:
        """Upload the blocks of ``keys`` (and their refs), then the manifest ``name`` if given.

        Blocks already in the bucket are not sent again. The manifest is written only after
        every block it lists is stored, so nobody ever sees a manifest with a missing block.
        """
        self._check_available("publish")
        entries, uploaded, sent = self._upload(keys, progress)
        if name is not None:
            self._call(self.tier.put_manifest(name, entries, {"published": time.time(), **(info or {})}),
                       f"write manifest {name!r}")
        self.counts["published"] += len(entries)
        return PublishReport(name, len(entries), uploaded, len(entries) - uploaded, sent)

    def _upload(self, keys: Iterable[str], progress: Progress | None) -> tuple[dict[str, BlockHeader], int, int]:
        """Read each block here, hash and encode it on the encoder threads, upload it on the loop."""
        entries: dict[str, BlockHeader] = {}
        window: collections.deque[tuple[str, concurrent.futures.Future[tuple[BlockHeader, bool, int]], int]] = \
            collections.deque()
        held = uploaded = sent = done = 0
        limit = 2 * self.tier.concurrency

        def drain() -> None:
            nonlocal held, uploaded, sent, done
            key, future, size = window.popleft()
            header, written, stored = self._wait(future, f"upload {key!r}")
            entries[key] = header
            held -= size
            uploaded += written
            sent += stored if written else 0
            done += size
            if progress is not None:
                progress(done, 0 if window else done)

        try:
            for key in keys:
                block = self._read(key)
                if block is None:
                    continue  # deleted since it was listed
                encoded = self._encoder.submit(self._encode, block)
                window.append((key, self.tier.submit(self._put(key, encoded), size=None), block.data.nbytes))
                held += block.data.nbytes
                while window and (len(window) >= limit or held > _WINDOW_BYTES):
                    drain()
            while window:
                drain()
        except BaseException:
            for _, future, _ in window:
                future.cancel()
            raise
        self.counts["uploaded"] += uploaded
        self.counts["bytes_up"] += sent
        return entries, uploaded, sent

    def _encode(self, block: LocalBlock) -> tuple[BlockHeader, bytes]:
        header = BlockHeader("", block.dtype, block.shape, block.data.nbytes, block.crc32c, block.durable)
        # hashed and encoded in one pass; a large block chunk by chunk on the chunk threads
        return encode_block(block.data, header, choose_codec(self._compression, block.itemsize), pool=chunk_pool())

    async def _put(self, key: str, encoded: concurrent.futures.Future[tuple[BlockHeader, bytes]]
                   ) -> tuple[BlockHeader, bool, int]:
        header, body = await asyncio.wrap_future(encoded)  # encoding time is not the server's: unbounded
        written = await self.tier.bounded(self.tier.put_block(header.hash, body), len(body))
        await self.tier.bounded(self.tier.put_ref(key, header))  # after the block: never a ref to nothing
        return header, written, len(body)

    # -- background publishing ---------------------------------------------------------------------

    def enqueue(self, keys: Iterable[str]) -> None:
        """Publish ``keys`` soon, from a background thread (write-through and on-evict policies)."""
        with self._queue_cond:
            for key in keys:
                self._queue[key] = None
            if self._publisher is None:
                self._publisher = threading.Thread(target=self._publish_loop, name="tierstore-publish", daemon=True)
                self._publisher.start()
            self._queue_cond.notify_all()

    def pending(self) -> int:
        """Keys queued or being published in the background."""
        with self._queue_cond:
            return len(self._queue) + self._busy

    def wait_published(self, timeout: float | None = None) -> bool:
        """Wait until the background queue is empty; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue_cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._queue_cond.wait(left if left is not None else 1.0)
        return True

    def _publish_loop(self) -> None:
        while True:
            with self._queue_cond:
                while not self._queue and not self._stopping:
                    self._queue_cond.wait()
                if self._stopping:
                    return
                batch = list(self._queue)[:256]
                for key in batch:
                    del self._queue[key]
                self._busy = True
            retry = False
            try:
                self._upload(batch, None)
                self.counts["published"] += len(batch)
            except SharedTierUnavailableError:
                retry = True
            except (SharedTierError, BlockNotFoundError) as exc:
                self._publish_failed(batch, exc)
            except Exception as exc:  # the store closed under us, a block went away: never kill the thread
                self._publish_failed(batch, exc)
            with self._queue_cond:
                if retry:  # put them back in front, then wait out the backoff
                    self._queue = {**dict.fromkeys(batch), **self._queue}
                self._busy = False
                self._queue_cond.notify_all()
                if retry and not self._stopping:
                    self._queue_cond.wait(max(0.05, self._retry_at - time.monotonic()))

    def _publish_failed(self, batch: list[str], exc: BaseException) -> None:
        self.counts["publish_failed"] += len(batch)
        self._publish_error = str(exc)
        _log.warning("publishing %d block(s) in the background failed (not retried): %s", len(batch), exc,
                     exc_info=traceback_for_log(exc))

    # -- pulling -----------------------------------------------------------------------------------

    def pull(self, name: str, *, have: Callable[[str, BlockHeader], bool],
             land: Callable[[list[tuple[str, BlockHeader, np.ndarray]]], None],
             progress: Progress | None = None) -> PullReport:
        """Fetch every block of manifest ``name`` not already held (``have``) and ``land`` them in batches."""
        _, entries = self.manifest(name)
        todo = [(key, header) for key, header in entries.items() if not have(key, header)]
        total = sum(h.nbytes for _, h in todo)
        window: collections.deque[tuple[str, concurrent.futures.Future[Any]]] = collections.deque()
        batch: list[tuple[str, BlockHeader, np.ndarray]] = []
        done = received = 0
        pending = iter(todo)
        try:
            while True:
                while len(window) < 2 * self.tier.concurrency:
                    item = next(pending, None)
                    if item is None:
                        break
                    self._check_available(f"pull {name!r}")
                    window.append((item[0], self.tier.submit(self.tier.get_block(item[1].hash, item[1].nbytes),
                                                                             size=item[1].nbytes)))
                if not window:
                    break
                key, future = window.popleft()
                found = self._wait(future, f"pull {key!r}")
                if found is None:
                    raise SharedTierError(f"manifest {name!r} lists {key!r} but its block is missing from "
                                          f"{self.tier.url}; publish it again", key=key, tier="shared")
                batch.append((key, found[0], found[1]))
                received += found[1].nbytes
                done += found[1].nbytes
                if len(batch) >= _LAND_BATCH or sum(b[2].nbytes for b in batch) >= _WINDOW_BYTES:
                    land(batch)
                    batch = []
                if progress is not None:
                    progress(done, total)
            if batch:
                land(batch)
        except BaseException:
            for _, future in window:
                future.cancel()
            raise
        self.counts["fetched"] += len(todo)
        self.counts["bytes_down"] += received
        return PullReport(name, len(entries), len(todo), len(entries) - len(todo), received)

    # -- checking ----------------------------------------------------------------------------------

    def verify(self, names: Iterable[str] | None = None, *, deep: bool = True,
               progress: Progress | None = None) -> SharedVerifyReport:
        """Check that every block the manifests list is there (and, if ``deep``, matches its hash)."""
        names = [n for n, _ in self.manifests()] if names is None else list(names)
        problems: list[str] = []
        hashes: dict[str, tuple[str, int]] = {}
        for name in names:
            try:
                _, entries = self.manifest(name)
            except (BlockNotFoundError, SharedTierError) as exc:
                if isinstance(exc, SharedTierUnavailableError):
                    raise
                problems.append(f"manifest {name!r}: {exc}")
                continue
            for key, header in entries.items():
                hashes.setdefault(header.hash, (f"{name}:{key}", header.nbytes))
        futures = [(h, where, self.tier.submit(self._check(h, size, deep), size=size))
                   for h, (where, size) in hashes.items()]
        for done, (digest, where, future) in enumerate(futures, 1):
            try:
                problem = self._wait(future, f"check block {digest[:16]}")
            except SharedTierUnavailableError:
                for _, _, rest in futures:
                    rest.cancel()
                raise
            except Exception as exc:  # CorruptBlockError and friends: a finding, not a failure
                problem = str(exc)
            if problem:
                problems.append(f"{where} (block {digest[:16]}...): {problem}")
            if progress is not None:
                progress(done, len(futures))
        return SharedVerifyReport(len(names), len(hashes), problems)

    async def _check(self, digest: str, size: int, deep: bool) -> str | None:
        if not deep:
            return None if await self.tier.exists(f"blocks/{digest[:2]}/{digest}") else "missing"
        return None if await self.tier.get_block(digest, size) is not None else "missing"

    # -- the rest ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Health and activity, for ``TierStore.stats()``."""
        retry_in = max(0.0, self._retry_at - time.monotonic())
        return {"url": self.tier.url, "endpoint": self.tier.endpoint, "publish": self.policy,
                "degraded": self.degraded, "degraded_since": self._since, "last_error": self._last_error,
                "last_publish_error": self._publish_error,
                "retry_in": round(retry_in, 3) if self.degraded else 0.0, "queued": self.pending(),
                **{k: self.counts[k] for k in ("published", "uploaded", "fetched", "bytes_up", "bytes_down",
                                               "errors", "publish_failed")}}

    def close(self, timeout: float | None = None) -> int:
        """Give queued publishing up to ``timeout`` seconds (default ``shared_timeout``), then stop.

        Returns how many queued keys were left unpublished.
        """
        if self._publisher is not None and not self.degraded:
            self.wait_published(self.tier.timeout if timeout is None else timeout)
        with self._queue_cond:
            self._stopping = True
            left = len(self._queue)
            self._queue_cond.notify_all()
        if self._publisher is not None:
            self._publisher.join(timeout=self.tier.timeout + 1.0)
        self.tier.close()
        self._encoder.shutdown(wait=False, cancel_futures=True)
        return left
