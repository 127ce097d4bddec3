"""The threads that encode and decode L3 chunks, shared by every tier of the process.

zstd (numcodecs) and the numpy unshuffle release the GIL, so chunks of one block decode on
several cores. A forked child gets a fresh pool: threads do not survive a fork.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["codec_pool"]

_POOL: ThreadPoolExecutor | None = None
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


def _forget_after_fork() -> None:
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
