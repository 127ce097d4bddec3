"""The threads that encode and read L3 chunks, shared by every tier of the process.

zstd (numcodecs), ``pread`` and the numpy unshuffle release the GIL, so chunks of one block
encode and decode on several cores. Encoding is CPU work: one thread per core. Reading waits on
the disk between decodes: twice as many threads, so that some read while others decode. A
forked child gets fresh pools: threads do not survive a fork.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["codec_pool", "read_pool"]

_POOL: ThreadPoolExecutor | None = None
_READ_POOL: tuple[ThreadPoolExecutor, int] | None = None
_POOL_LOCK = threading.Lock()


def codec_pool() -> ThreadPoolExecutor:
    """The process's codec thread pool (started on first use, at least two threads)."""
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                           thread_name_prefix="tierstore-codec")
    return _POOL


def read_pool() -> tuple[ThreadPoolExecutor, int]:
    """The process's read pool and its thread count (started on first use, at least four threads)."""
    global _READ_POOL
    if _READ_POOL is None:
        with _POOL_LOCK:
            if _READ_POOL is None:
                threads = max(4, 2 * (os.cpu_count() or 2))
                _READ_POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tierstore-read"), threads
    return _READ_POOL


def _forget_after_fork() -> None:
    global _POOL, _READ_POOL, _POOL_LOCK
    _POOL, _READ_POOL, _POOL_LOCK = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
