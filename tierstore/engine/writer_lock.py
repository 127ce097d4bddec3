"""The writer lock: one read-write handle per store, across processes and within one.

``flock`` locks belong to an open file description, so a second writer in the
same process is refused just like one in another process, and closing some
other descriptor of the file (as POSIX ``fcntl`` locks would) never drops it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import StoreLockedError, translate_os_error
from ..fsguard import open_nofollow

__all__ = ["WriterLock"]


class WriterLock:
    """An exclusive, non-blocking lock on ``<store>/LOCK``; the holder's pid is written in it."""

    def __init__(self, store_dir: Path) -> None:
        self.path = store_dir / "LOCK"
        try:  # a LOCK link would have the pid written into whatever it points at
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise translate_os_error(exc, what="take the writer lock", path=self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"store {store_dir} is already open for writing (process {holder}); close that handle "
                "first, or open this one with readonly=True", path=str(store_dir)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
