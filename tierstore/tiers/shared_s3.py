"""The shared tier: immutable, content-addressed blocks in an S3-compatible bucket.

Several machines point at one ``s3://BUCKET/PREFIX``; each keeps its own catalog
and local tiers. What the objects are and how they are named is in
:mod:`tierstore.tiers.shared_objects` (blocks by content hash, refs, manifests).

Because a block's name is its content, uploads are idempotent and two machines
publishing the same block at once end with one object; an S3 PUT is atomic, so
a reader sees a whole object or none; every download is checked against its
name. This module knows nothing of the catalog or of other tiers: it stores and
fetches objects, with timeouts, retries and redacted errors. Its I/O goes through
zarr's ``ObjectStore`` over obstore's ``S3Store``, on one event-loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import configparser
import json
import os
import re
import threading
from collections.abc import AsyncIterator, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import obstore
import obstore.store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.storage import ObjectStore

from ..config import SharedCredentials
from ..errors import CorruptBlockError, SharedTierError, SharedTierUnavailableError
from .shared_objects import (
    CHUNK,
    BlockHeader,
    ChunkLayout,
    block_path,
    chunk_pool,
    content_hash,
    decode_block,
    decode_chunk,
    encode_block,
    finish_chunked,
    manifest_path,
    parse_head,
    parse_json,
    parse_shared_url,
    ref_path,
)

__all__ = ["SharedS3Tier", "BlockHeader", "content_hash", "encode_block", "decode_block", "parse_shared_url",
           "ref_path", "block_path", "manifest_path", "aws_profile_credentials", "aws_profile_region"]

_PART = 4 << 20
"""Range size of parallel GETs of large format-1 objects."""
_HEAD_RANGE = 64 << 10
"""First range read of a chunked block: its header (and, for a small block, all of it)."""
_T = TypeVar("_T")
_SIGNED = re.compile(r"(?i)(x-amz-(?:signature|credential|security-token)=|signature=|credential=|"
                     r"authorization:\s*)[^&\s\"',]+")


_CREDENTIAL_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                       "AWS_CONTAINER_CREDENTIALS_FULL_URI")
"""Environment variables through which the S3 client finds credentials of its own."""


def aws_profile_credentials() -> SharedCredentials | None:
    """Credentials of ``AWS_PROFILE`` (or default) from ``~/.aws/credentials``, when the env has none."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return None  # obstore reads the environment itself
    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", Path.home() / ".aws" / "credentials"))
    profile = os.environ.get("AWS_PROFILE", "default")
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
        section = parser[profile]
        return SharedCredentials(section["aws_access_key_id"], section["aws_secret_access_key"],
                                 section.get("aws_session_token"))
    except (KeyError, configparser.Error, OSError):
        return None


def aws_profile_region() -> str | None:
    """``region`` of ``AWS_PROFILE`` in ``~/.aws/config``, when the env names none."""
    if os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        return None
    path = Path(os.environ.get("AWS_CONFIG_FILE", Path.home() / ".aws" / "config"))
    profile = os.environ.get("AWS_PROFILE", "default")
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
        section = parser[profile if profile == "default" else f"profile {profile}"]
        return section.get("region")
    except (KeyError, configparser.Error, OSError):
        return None


class SharedS3Tier:
    """Objects in ``s3://bucket/prefix``: blocks by content hash, refs, manifests.

    Every call is bounded by ``timeout`` seconds; a server that does not answer, refuses the
    connection or fails with a 5xx raises ``SharedTierUnavailableError``; any other refusal
    ``SharedTierError``. Messages never carry credentials or request signatures.
    """

    def __init__(self, url: str, *, endpoint: str | None = None, region: str | None = None,
                 credentials: SharedCredentials | None = None, timeout: float = 10.0,
                 concurrency: int = 16) -> None:
        self.url = url
        self.bucket, self.prefix = parse_shared_url(url)
        self.timeout = timeout
        self.concurrency = concurrency
        credentials = credentials or aws_profile_credentials()
        env_secrets = (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
                       os.environ.get("AWS_SESSION_TOKEN"))
        self._secrets = tuple(s for s in (*(credentials.secrets() if credentials else ()), *env_secrets) if s)
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, Any] = {"region": region or aws_profile_region() or os.environ.get("AWS_REGION")
                                   or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if self.endpoint:
            options.update(endpoint=self.endpoint, virtual_hosted_style_request=False)
        if credentials is not None:
            options.update(access_key_id=credentials.access_key_id,
                           secret_access_key=credentials.secret_access_key)
            if credentials.session_token:
                options["session_token"] = credentials.session_token
        # Left to find credentials itself, the S3 client ends at the instance metadata service
        # (169.254.169.254), whose refusal reads as a puzzling 403 or a timeout: with nothing
        # found here, no request is made and each call says so (see submit).
        self._no_credentials = credentials is None and not any(os.environ.get(name) for name in _CREDENTIAL_SOURCES)
        if self._no_credentials:
            options["skip_signature"] = True
        client: dict[str, Any] = {"timeout": timedelta(seconds=timeout),
                                  "connect_timeout": timedelta(seconds=min(timeout, 5.0)),
                                  "allow_http": bool(self.endpoint and self.endpoint.startswith("http://"))}
        retry: dict[str, Any] = {"max_retries": 2, "retry_timeout": timedelta(seconds=timeout),
                                 "backoff": {"init_backoff": timedelta(milliseconds=50),
                                             "max_backoff": timedelta(seconds=1), "base": 2}}
        try:
            s3 = obstore.store.S3Store(self.bucket, prefix=self.prefix or None, client_options=client,  # type: ignore[arg-type]
                                       retry_config=retry, **options)  # type: ignore[arg-type]
        except Exception as exc:  # obstore's config errors (bad region, endpoint...)
            raise SharedTierError(f"shared tier {self.url}: {self.redact(str(exc))}", tier="shared") from None
        self.store = ObjectStore(s3)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tierstore-shared", daemon=True)
        self._thread.start()
        self._limit = asyncio.Semaphore(concurrency)
        self._closed = False

    def __repr__(self) -> str:
        return f"<SharedS3Tier {self.url!r} endpoint={self.endpoint!r}>"

    def close(self) -> None:
        """Stop the event-loop thread; calling it twice is fine."""
        if self._closed:
            return
        self._closed = True
        try:  # requests still in flight end now, on the loop, instead of being destroyed pending with it
            asyncio.run_coroutine_threadsafe(_cancel_all(self.timeout), self._loop).result(self.timeout + 1)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # the loop is stuck or already stopped: stopping it is all that is left
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=self.timeout)
        if not self._thread.is_alive():
            self._loop.close()

    # -- errors ------------------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        """``text`` without credentials or request signatures, and without obstore's debug dump."""
        text = text.split("\n\nDebug source", 1)[0]
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _SIGNED.sub(r"\1***", text)

    def _translate(self, exc: BaseException, what: str) -> SharedTierError:
        if isinstance(exc, (asyncio.TimeoutError, concurrent.futures.TimeoutError, TimeoutError)):
            return SharedTierUnavailableError(
                f"{what}: no answer from {self.endpoint or 'S3'} within shared_timeout={self.timeout:g}s",
                tier="shared")
        message = self.redact(str(exc))
        if isinstance(exc, (obstore.exceptions.PermissionDeniedError, obstore.exceptions.UnauthenticatedError)):
            return SharedTierError(f"{what}: access denied by {self.url} ({message}); check the credentials "
                                   "(AWS_* variables, ~/.aws/credentials or shared_credentials)", tier="shared")
        if isinstance(exc, obstore.exceptions.GenericError) and not re.search(r"status code: 4\d\d", message):
            return SharedTierUnavailableError(f"{what}: {message}", tier="shared")
        return SharedTierError(f"{what}: {message}", tier="shared")

    # -- running coroutines ------------------------------------------------------------------------

    def submit(self, coro: Coroutine[Any, Any, _T], *, size: int | None = 0) -> concurrent.futures.Future[_T]:
        """Run ``coro`` on the tier's loop; a future for its result.

        It runs under :meth:`bounded` for an object of ``size`` bytes, or, with ``size=None``,
        as it is: it must then bound its own requests with :meth:`bounded`.
        """
        if self._closed:
            coro.close()
            raise SharedTierError(f"shared tier {self.url} is closed", tier="shared")
        if self._no_credentials:
            coro.close()
            raise SharedTierError(
                f"shared tier {self.url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "add them to ~/.aws/credentials (AWS_PROFILE picks a section) or pass shared_credentials",
                tier="shared")
        future = asyncio.run_coroutine_threadsafe(coro if size is None else self.bounded(coro, size), self._loop)
        if size is not None:
            # Cancelled before bounded() awaited it, ``coro`` would be reported as never awaited. Unwrapped,
            # it is the task's own coroutine: the task throws the cancellation into it, and closing it
            # here first made that throw fail ("Task exception was never retrieved").
            future.add_done_callback(lambda done: _discard(coro) if done.cancelled() else None)
        return future

    def deadline(self, size: int = 0) -> float:
        """Seconds a request for an object of ``size`` bytes may take: ``timeout``, plus as much per 64 MiB."""
        return self.timeout * (1.0 + size / (64 << 20))

    async def bounded(self, coro: Coroutine[Any, Any, _T], size: int = 0) -> _T:
        """Await ``coro`` holding one of the ``concurrency`` slots, cut off after :meth:`deadline`.

        A task cancelled while ``coro`` was failing ends cancelled, not with ``coro``'s error: its
        caller cancelled its future and will never retrieve that error, which asyncio would then
        report as "Task exception was never retrieved" (``wait_for`` returns the result of a request
        that finished in the same loop step as the cancellation).
        """
        try:
            async with self._limit:
                return await asyncio.wait_for(coro, self.deadline(size))
        except Exception:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from None
            raise
        finally:
            _discard(coro)  # cancelled while waiting for a slot: it never ran

    def wait(self, future: concurrent.futures.Future[_T], what: str, *, queued: bool = False) -> _T:
        """The result of ``future``, translated to tierstore errors.

        Each request is cut off on the loop after its :meth:`deadline`; a lone small call
        (``queued=False``) is also given up here one second after ``timeout``, whatever the loop does.
        """
        try:
            return future.result(timeout=None if queued else self.timeout + 1.0)
        except (SharedTierError, CorruptBlockError):
            raise
        except Exception as exc:
            future.cancel()
            raise self._translate(exc, what) from None

    def run(self, coro: Coroutine[Any, Any, _T], what: str, *, size: int | None = 0) -> _T:
        """Run one coroutine on the loop (see :meth:`submit` for ``size``) and wait for it."""
        return self.wait(self.submit(coro, size=size), what, queued=size != 0)

    # -- objects (coroutines: batch them with submit) ----------------------------------------------

    async def put_object(self, path: str, body: bytes, *, skip_existing: bool = False) -> bool:
        """Write ``body`` at ``path``; with ``skip_existing``, only if absent. True if it was written."""
        if skip_existing and await self.store.exists(path):
            return False
        await self.store.set(path, Buffer.from_bytes(body))
        return True

    async def get_object(self, path: str) -> bytes | None:
        """The bytes at ``path``, or None if there is no such object."""
        buf = await self.store.get(path, default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    async def exists(self, path: str) -> bool:
        """Whether an object is at ``path``."""
        return await self.store.exists(path)

    async def delete(self, path: str) -> None:
        """Remove the object at ``path`` (no error if absent)."""
        await self.store.delete(path)

    async def list_objects(self, prefix: str) -> list[tuple[str, int]]:
        """``(path, size)`` of every object under ``prefix`` (relative to the tier's prefix)."""
        out: list[tuple[str, int]] = []
        async for meta in self._metas(prefix):
            out.append((meta["path"], int(meta["size"])))
        return out

    async def _metas(self, prefix: str) -> AsyncIterator[Any]:
        stream = obstore.list(self.store.store, prefix=prefix)
        async for batch in stream:
            for meta in batch:
                yield meta

    # -- blocks, refs, manifests -------------------------------------------------------------------

    async def put_block(self, digest: str, body: bytes) -> bool:
        """Upload a block object (skipped when one with this hash exists: it holds the same bytes)."""
        return await self.put_object(block_path(digest), body, skip_existing=len(body) >= (1 << 20))

    async def get_object_ranged(self, path: str) -> bytearray | None:
        """A large object in ``_PART``-sized ranges fetched at once (one stream is slower than several)."""
        try:
            first = await obstore.get_async(self.store.store, path, options={"range": (0, _PART)})
        except FileNotFoundError:
            return None
        total = int(first.meta["size"])
        out = bytearray(total)
        head = memoryview(await first.bytes_async())
        out[:len(head)] = head
        starts = range(len(head), total, _PART)
        parts = await asyncio.gather(*(obstore.get_range_async(self.store.store, path, start=start,
                                                               end=min(total, start + _PART)) for start in starts))
        for start, part in zip(starts, parts, strict=True):
            view = memoryview(part)
            out[start:start + len(view)] = view
        return out

    async def get_block(self, digest: str, size_hint: int = 0) -> tuple[BlockHeader, np.ndarray] | None:
        """Download and verify the block ``digest``; None if the bucket has no such block.

        ``size_hint`` (the block's raw size, from a ref or manifest) above ``CHUNK`` reads the
        object's header first, then every chunk at once (one ranged GET each), each decoded and
        checked against its hash on the chunk threads as soon as it arrives.
        """
        path = block_path(digest)
        if size_hint > CHUNK:
            return await self._get_chunked(path, digest)
        body = await self.get_object(path)
        if body is None:
            return None
        return await asyncio.to_thread(decode_block, body, digest)  # hashing/decoding off the loop

    async def _get_chunked(self, path: str, digest: str) -> tuple[BlockHeader, np.ndarray] | None:
        try:
            first = await obstore.get_async(self.store.store, path, options={"range": (0, _HEAD_RANGE)})
        except FileNotFoundError:
            return None
        size = int(first.meta["size"])
        head = memoryview(await first.bytes_async())
        end, what = parse_head(head, digest)
        if what is None and end <= size:  # a long chunk list: read the rest of the header
            head = memoryview(b"".join((head, await obstore.get_range_async(self.store.store, path, start=len(head),
                                                                            end=end))))
            end, what = parse_head(head, digest)
        if not isinstance(what, ChunkLayout):  # a format-1 object (written before format 2), or damaged
            body = bytearray(head) if len(head) == size else await self.get_object_ranged(path)
            if body is None:
                return None
            return await asyncio.to_thread(decode_block, body, digest)
        layout = what
        finish_chunked(layout, size, digest)
        out = np.empty(layout.header.nbytes, dtype=np.uint8)
        loop = asyncio.get_running_loop()
        pool = chunk_pool()

        async def one(index: int) -> None:
            start, stop = layout.chunks[index][:2]
            payload: Any = (head[start:stop] if stop <= len(head) else
                            await obstore.get_range_async(self.store.store, path, start=start, end=stop))
            await loop.run_in_executor(pool, decode_chunk, layout, index, payload, out, digest)

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(layout.chunks))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return layout.header, out

    async def put_ref(self, key: str, header: BlockHeader) -> None:
        """Point store key ``key`` at a block."""
        await self.put_object(ref_path(key), json.dumps({"key": key, **header.to_json()}).encode())

    async def get_ref(self, key: str) -> BlockHeader | None:
        """Where ``key`` points, or None."""
        body = await self.get_object(ref_path(key))
        if body is None:
            return None
        obj = parse_json(body, ref_path(key))
        if obj.get("key") != key:  # two keys with one SHA-256: never, but never wrong either
            return None
        return BlockHeader.from_json(obj)

    async def put_manifest(self, name: str, entries: dict[str, BlockHeader], info: dict[str, Any]) -> None:
        """Write the manifest of ``name`` (call it after every block it lists is uploaded)."""
        body = {"format": "tierstore-manifest-v1", "name": name, **info,
                "blocks": {key: header.to_json() for key, header in entries.items()}}
        await self.put_object(manifest_path(name), json.dumps(body, separators=(",", ":")).encode())

    async def get_manifest(self, name: str) -> tuple[dict[str, Any], dict[str, BlockHeader]] | None:
        """``(info, {key: header})`` of ``name``, or None if nothing was published under it."""
        body = await self.get_object(manifest_path(name))
        if body is None:
            return None
        obj = parse_json(body, manifest_path(name))
        blocks = obj.pop("blocks", None)
        if not isinstance(blocks, dict):
            raise SharedTierError(f"manifest {name!r} lists no blocks", tier="shared")
        return obj, {str(k): BlockHeader.from_json(v) for k, v in blocks.items()}

    async def manifests(self) -> list[tuple[str, int]]:
        """``(name, size)`` of every manifest."""
        return [(path[len("manifests/"):-len(".json")], size) for path, size in await self.list_objects("manifests/")
                if path.endswith(".json")]


async def _cancel_all(timeout: float) -> None:
    """Cancel every other task of the running loop and wait (up to ``timeout``) until they have ended."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


def _discard(coro: Coroutine[Any, Any, Any]) -> None:
    """Close a coroutine whose task was cancelled before it ran (so it is not reported as never awaited)."""
    try:
        coro.close()
    except (RuntimeError, ValueError):  # it is running on the loop right now: it finishes by itself
        pass
