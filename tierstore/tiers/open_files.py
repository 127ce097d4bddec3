"""A bounded set of read-only file descriptors shared by every thread of one L3 tier.

Reads are ``pread``s, which carry their own offset, so threads can share one
descriptor per file. What makes sharing delicate is closing: a descriptor
closed while another thread is between ``acquire`` and its ``pread`` would let
the OS hand the same number to the next ``open`` of some other file, and the
read would return that file's bytes. So each entry counts its readers, and a
descriptor is closed only by the last one out: eviction (least recently used
first) skips entries in use, and :meth:`OpenFiles.discard` (the file was
deleted) closes at once or marks the entry for its last reader to close.

At most ``capacity`` descriptors are open plus, briefly, one per reader still
holding an evicted or discarded file: the bound the process's open-file limit
needs, and a deleted file's disk space comes back as soon as no read is using it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

__all__ = ["OpenFiles"]


class _Entry:
    __slots__ = ("doomed", "fd", "readers")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.readers = 0
        self.doomed = False


class OpenFiles:
    """Descriptors of files by path, least recently used closed first; thread-safe."""

    def __init__(self, capacity: int, opener: Callable[[str], int]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._opener = opener
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lent: dict[int, _Entry] = {}
        """Entries out of ``_entries`` (evicted, discarded) that readers still hold, by descriptor."""
        self._lock = threading.Lock()

    def acquire(self, path: str) -> int:
        """A descriptor of ``path`` that stays open until the matching :meth:`release`.

        Raises what the opener raises (``FileNotFoundError`` for a file that is gone).
        """
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                # Opened under the lock: two threads missing at once must not both open the file.
                entry = self._entries[path] = _Entry(self._opener(path))
                self._evict()
            else:
                self._entries.move_to_end(path)
            entry.readers += 1
            return entry.fd

    def release(self, path: str, fd: int) -> None:
        """Done with the descriptor :meth:`acquire` returned for ``path``."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None or entry.fd != fd:
                entry = self._lent[fd]
            entry.readers -= 1
            if entry.doomed and entry.readers == 0:
                del self._lent[fd]
                os.close(fd)

    def discard(self, paths: Iterable[str]) -> None:
        """The files at ``paths`` were deleted: close their descriptors (now, or at their last release)."""
        with self._lock:
            for path in paths:
                entry = self._entries.pop(path, None)
                if entry is not None:
                    self._retire(entry)

    def close(self) -> None:
        """Close every descriptor (those still in use at their last release)."""
        with self._lock:
            while self._entries:
                self._retire(self._entries.popitem(last=False)[1])

    def __len__(self) -> int:
        """Descriptors open now, including those readers still hold after eviction."""
        with self._lock:
            return len(self._entries) + len(self._lent)

    def _evict(self) -> None:
        if len(self._entries) <= self.capacity:
            return
        for path in [p for p, e in self._entries.items() if e.readers == 0][:len(self._entries) - self.capacity]:
            os.close(self._entries.pop(path).fd)

    def _retire(self, entry: _Entry) -> None:
        if entry.readers == 0:
            os.close(entry.fd)
        else:
            entry.doomed = True
            self._lent[entry.fd] = entry
