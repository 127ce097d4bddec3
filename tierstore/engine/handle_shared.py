"""The store's side of the shared tier: publish, pull, verify, and reading through on a local miss.

:class:`SharedTier` is a mixin of :class:`tierstore.engine.handle.TierStore`; :mod:`tierstore.engine.shared_coordinator`
does the work (the attributes and methods declared below are the store's).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..catalog import BlockRow, Catalog
from ..errors import BlockNotFoundError, ConfigError, StoreClosedError
from ..tensors import dtype_from_name, tensor_bytes, tensor_from_bytes
from ..tiers.shared_s3 import BlockHeader
from .shared_coordinator import LocalBlock, Progress, PublishReport, PullReport, SharedCoordinator, SharedVerifyReport

__all__ = ["SharedTier"]


class SharedTier:
    """The shared tier (``shared_url``) of a :class:`~tierstore.engine.handle.TierStore` (mixin)."""

    path: Path
    readonly: bool
    _catalog: Catalog
    _local: threading.local
    _shared: SharedCoordinator | None

    if TYPE_CHECKING:
        def _check_open(self) -> None: ...
        def _check_writable(self) -> None: ...
        def _lookup(self, key: str) -> BlockRow: ...
        def _get(self, key: str, copy: bool) -> tuple[torch.Tensor, str]: ...
        def _get_local(self, key: str, device: str | torch.device | None,
                       copy: bool) -> tuple[torch.Tensor, str]: ...
        def put(self, key: str, tensor: torch.Tensor, *, durable: bool = True,
                parent: str | None = None) -> None: ...
        def transaction(self) -> AbstractContextManager[Any]: ...
        def keys(self, prefix: str | None = None) -> Iterator[str]: ...

    @property
    def shared(self) -> SharedCoordinator | None:
        """The shared tier of this store (``shared_url``), or None."""
        return self._shared

    def _require_shared(self) -> SharedCoordinator:
        self._check_open()
        if self._shared is None:
            raise ConfigError(f"store {self.path} has no shared tier; open it with shared_url='s3://bucket/prefix'")
        return self._shared

    def _landing(self) -> bool:
        return bool(getattr(self._local, "landing", False))

    def _get_shared(self, key: str, device: str | torch.device | None, copy: bool) -> tuple[torch.Tensor, str]:
        """A local miss: fetch ``key`` from the shared tier; a writer keeps it locally (read-through)."""
        assert self._shared is not None
        found = self._shared.fetch(key)
        if found is None:
            raise BlockNotFoundError(f"no block {key!r} in {self.path} nor in the shared tier {self._shared.tier.url}",
                                     key=key)
        header, data = found
        tensor = tensor_from_bytes(data, dtype_from_name(header.dtype), header.shape)
        if not self.readonly:
            self._land([(key, header, data)])
            tensor = self._get_local(key, device, copy)[0]
        elif device is not None:
            tensor = tensor.to(device)
        return tensor, "shared"

    def _land(self, batch: list[tuple[str, BlockHeader, np.ndarray]]) -> None:
        """Store blocks fetched from the shared tier, in one transaction (never re-published)."""
        self._local.landing = True
        try:
            with self.transaction():
                for key, header, data in batch:
                    self.put(key, tensor_from_bytes(data, dtype_from_name(header.dtype), header.shape),
                             durable=header.durable)
        finally:
            self._local.landing = False

    def _shared_block(self, key: str) -> LocalBlock | None:
        """The committed bytes of ``key`` for publishing (None if it is gone)."""
        try:
            row = self._lookup(key)
            tensor = self._get(key, False)[0]
        except (BlockNotFoundError, StoreClosedError):
            return None
        return LocalBlock(key, tensor_bytes(tensor), row.dtype, tuple(row.shape), row.checksum, row.durable,
                          tensor.element_size())

    def _holds(self, key: str, header: BlockHeader) -> bool:
        row = self._catalog.get_block(key)
        return (row is not None and row.checksum == header.crc32c and row.dtype == header.dtype
                and tuple(row.shape) == header.shape)

    def publish(self, prefix: str | None = None, *, keys: Iterable[str] | None = None, name: str | None = None,
                progress: Progress | None = None) -> PublishReport:
        """Upload blocks (``keys``, or all under ``prefix``) to the shared tier; blocks already there are skipped.

        With ``name``, a manifest listing them is written last, for ``pull(name)`` on other machines.
        Every published key can also be read by other machines' ``get`` (fallthrough).
        """
        shared = self._require_shared()
        selected = list(keys) if keys is not None else list(self.keys(prefix))
        info = {"prefix": prefix, "store_id": self._catalog.meta("store_id")}
        return shared.publish(selected, name=name, info=info, progress=progress)

    def pull(self, name: str, *, progress: Progress | None = None) -> PullReport:
        """Fetch every block of the manifest ``name`` that this store lacks (checked by content hash)."""
        self._check_writable()
        return self._require_shared().pull(name, have=self._holds, land=self._land, progress=progress)

    def verify_shared(self, names: Iterable[str] | None = None, *, deep: bool = True,
                      progress: Progress | None = None) -> SharedVerifyReport:
        """Check the shared tier: every block each manifest lists exists (``deep``: and matches its hash)."""
        return self._require_shared().verify(names, deep=deep, progress=progress)

    def wait_published(self, timeout: float | None = None) -> bool:
        """Wait for background publishing (write-through, on-evict); False if ``timeout`` ran out."""
        return self._require_shared().wait_published(timeout)
