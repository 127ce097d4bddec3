"""The store's side of the shared tier: publish, pull, verify, and reading through on a local miss.

:class:`SharedAccess` is a part of :class:`tierstore.engine.handle.TierStore` (the handle delegates these
methods to it); :mod:`tierstore.engine.shared_coordinator` does the work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..catalog import Catalog
from ..errors import BlockNotFoundError, ConfigError, StoreClosedError
from ..tensors import dtype_from_name, tensor_bytes, tensor_from_bytes
from ..tiers.shared_s3 import BlockHeader
from .handle_reads import Reads
from .shared_coordinator import LocalBlock, Progress, PublishReport, PullReport, SharedCoordinator, SharedVerifyReport

__all__ = ["SharedAccess"]


class SharedAccess:
    """The shared tier (``shared_url``) of a :class:`~tierstore.engine.handle.TierStore`: the handle delegates here.

    Blocks are looked up and read as the handle reads them (``reads``); blocks fetched from the
    shared tier are stored with the handle's ``put`` inside its ``transaction``.
    """

    def __init__(self, *, path: Path, readonly: bool, catalog: Catalog, shared: SharedCoordinator | None,
                 reads: Reads, check_open: Callable[[], None], check_writable: Callable[[], None],
                 put: Callable[..., None], transaction: Callable[[], AbstractContextManager[Any]],
                 keys: Callable[[str | None], Iterator[str]]) -> None:
        self.path = path
        self.readonly = readonly
        self._catalog = catalog
        self._shared = shared
        self._reads = reads
        self._check_open = check_open
        self._check_writable = check_writable
        self.put = put
        self.transaction = transaction
        self.keys = keys
        self._local = threading.local()

    def require(self) -> SharedCoordinator:
        self._check_open()
        if self._shared is None:
            raise ConfigError(f"store {self.path} has no shared tier; open it with shared_url='s3://bucket/prefix'")
        return self._shared

    def landing(self) -> bool:
        return bool(getattr(self._local, "landing", False))

    def get_shared(self, key: str, device: str | torch.device | None, copy: bool) -> tuple[torch.Tensor, str]:
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
            tensor = self._reads.get_local(key, device, copy)[0]
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

    def block(self, key: str) -> LocalBlock | None:
        """The committed bytes of ``key`` for publishing (None if it is gone)."""
        try:
            row = self._reads.lookup(key)
            tensor = self._reads.read(key, False)[0]
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
        shared = self.require()
        selected = list(keys) if keys is not None else list(self.keys(prefix))
        info = {"prefix": prefix, "store_id": self._catalog.meta("store_id")}
        return shared.publish(selected, name=name, info=info, progress=progress)

    def pull(self, name: str, *, progress: Progress | None = None) -> PullReport:
        """Fetch every block of the manifest ``name`` that this store lacks (checked by content hash)."""
        self._check_writable()
        return self.require().pull(name, have=self._holds, land=self._land, progress=progress)

    def verify_shared(self, names: Iterable[str] | None = None, *, deep: bool = True,
                      progress: Progress | None = None) -> SharedVerifyReport:
        """Check the shared tier: every block each manifest lists exists (``deep``: and matches its hash)."""
        return self.require().verify(names, deep=deep, progress=progress)

    def wait_published(self, timeout: float | None = None) -> bool:
        """Wait for background publishing (write-through, on-evict); False if ``timeout`` ran out."""
        return self.require().wait_published(timeout)
