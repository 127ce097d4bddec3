"""The errors tierstore raises.

Every error derives from :class:`TierStoreError`. Where a builtin exception
means the same thing, the tierstore error inherits it too, so
``except KeyError`` keeps working for a missing key and ``except
PermissionError`` for a write to a read-only store. Each error carries the
facts as fields (``key``, ``path``, ``tier``) and its message says what went
wrong, the value involved and what to do about it.

Driver errors (sqlite3, zarr, numcodecs, the OS) are translated into these at
one choke point per driver; nothing else leaks through the public surface.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "TierStoreError",
    "ConfigError",
    "InvalidKeyError",
    "InvalidArgumentError",
    "BlockNotFoundError",
    "UnsupportedTensorError",
    "CorruptBlockError",
    "CatalogError",
    "SchemaVersionError",
    "StoreLockedError",
    "StoreNotFoundError",
    "ReadOnlyError",
    "StoreClosedError",
    "StoreFullError",
    "TierFullError",
    "DeviceMemoryError",
    "TransactionError",
    "SharedTierError",
    "SharedTierUnavailableError",
    "BlockUnavailableError",
    "CheckpointError",
    "CacheUsageError",
    "UnsafePathError",
    "translate_os_error",
    "traceback_for_log",
]


class TierStoreError(Exception):
    """Root of every error raised by tierstore."""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        path: str | None = None,
        tier: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.path = path
        self.tier = tier

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


class ConfigError(TierStoreError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


class InvalidKeyError(TierStoreError, ValueError):
    """A key is empty, not a str, holds a NUL or is longer than 1024 UTF-8 bytes."""


class InvalidArgumentError(TierStoreError, ValueError):
    """An argument other than a key or a tensor is of the wrong type or names nothing (a device, a flag)."""


class BlockNotFoundError(TierStoreError, KeyError):
    """No block is stored under the key."""


class UnsupportedTensorError(TierStoreError, TypeError):
    """The value is not a dense, fixed-size torch tensor the store can keep."""


class CorruptBlockError(TierStoreError, OSError):
    """Stored bytes failed their checksum or could not be decoded."""


class CatalogError(TierStoreError, OSError):
    """The SQLite catalog is damaged or could not be read or written."""


class SchemaVersionError(TierStoreError, RuntimeError):
    """The catalog was written by a newer tierstore than this one."""


class StoreLockedError(TierStoreError, BlockingIOError):
    """Another handle already has the store open for writing."""


class StoreNotFoundError(TierStoreError, FileNotFoundError):
    """There is no store at the path (and the open was not allowed to create one)."""


class ReadOnlyError(TierStoreError, PermissionError):
    """A write was attempted through a read-only handle."""


class StoreClosedError(TierStoreError, ValueError):
    """The handle was used after ``close()``."""


class StoreFullError(TierStoreError, OSError):
    """The disk (or a configured tier capacity) has no room for the write."""


class TierFullError(TierStoreError, MemoryError):
    """A volatile tier has no room for a block, even after eviction."""


class DeviceMemoryError(TierFullError):
    """The L1 device ran out of memory (a CUDA out-of-memory error, say) while taking a block in.

    Recoverable: nothing stored is lost (the block is still in L2/L3). Free device memory (drop
    tensors, shrink L1 with ``TierStore.shrink_l1``) and retry.
    """


class TransactionError(TierStoreError, RuntimeError):
    """A transaction was used wrongly (for example, left from another thread)."""


class SharedTierError(TierStoreError, OSError):
    """The shared (S3) tier refused a request or holds something unexpected (never a credential)."""


class SharedTierUnavailableError(SharedTierError, ConnectionError):
    """The shared tier could not be reached in time; local tiers keep working, retried with backoff."""


class BlockUnavailableError(BlockNotFoundError, SharedTierUnavailableError):
    """Not in the local tiers, and the shared tier could not be asked: a ``KeyError`` and a ``ConnectionError``."""


class CheckpointError(TierStoreError, ValueError):
    """A model checkpoint (safetensors file or folder) is missing, malformed or inconsistent."""


class CacheUsageError(TierStoreError, ValueError):
    """A model cache (KV or vision features) was given inputs or a state it cannot handle."""


class UnsafePathError(TierStoreError, PermissionError):
    """An entry of a store is a symbolic link (or leads outside the store): tierstore never follows one.

    Stores come in tarballs and from other users; a link could make a write, truncate or delete
    land on a file outside the store. Replace the link with the real file, or remove it
    (``tierstore verify --fix`` removes links inside L3, never what they point at).
    """


_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def translate_os_error(exc: OSError, *, what: str, path: str | os.PathLike[str] | None = None,
                       key: str | None = None) -> TierStoreError:
    """Turn an ``OSError`` from the file system into the matching tierstore error."""
    where = os.fspath(path) if path is not None else (exc.filename or "")
    if exc.errno in _FULL:
        return StoreFullError(
            f"{what}: no space left ({os.strerror(exc.errno or 0)}) at {where!s}; "
            "free disk space or delete blocks, then retry (nothing committed was lost)",
            key=key, path=str(where),
        )
    if exc.errno == errno.ELOOP:  # what O_NOFOLLOW answers for a link
        return UnsafePathError(
            f"{what}: {where!s} is a symbolic link, and tierstore never follows links inside a store; "
            "replace it with the real file or remove it", key=key, path=str(where))
    return TierStoreError(f"{what}: {exc.strerror or exc} at {where!s}", key=key, path=str(where))


def traceback_for_log(exc: BaseException) -> BaseException | None:
    """What to pass as a log call's ``exc_info``: a tierstore error's message says it all, anything else
    is a bug or a driver surprise whose traceback is worth having."""
    return None if isinstance(exc, TierStoreError) else exc
