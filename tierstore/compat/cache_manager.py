"""``HierarchicalCacheManager``: the original request's interface, backed by a real store.

The request's first example puts tensors by key and then asks for "a tensor
of this shape and dtype" — a buffer-pool style lookup::

    manager = HierarchicalCacheManager(CacheConfig(l2_cache_size="1GiB"))
    manager.put_tensor(torch.randn(100, 100, dtype=torch.float16), "example_tensor")
    tensor, level = manager.get_tensor((100, 100), torch.float16)

``get_tensor`` returns the newest stored block of that shape and dtype with
the tier it came from, or, when none matches, a fresh zeroed tensor drawn
from the L2 pool (returned to it when garbage-collected) and ``"new"``.
Without a path the manager keeps its store in a temporary folder that is
removed on ``close()``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import CacheConfig
from ..engine.handle import TierStore
from ..errors import StoreFullError, TierFullError
from ..tensors import dtype_name

__all__ = ["HierarchicalCacheManager"]


class HierarchicalCacheManager:
    """Seed-compatible coordinator over a :class:`TierStore`."""

    def __init__(self, config: CacheConfig | None = None, path: str | Path | None = None) -> None:
        self._tmp: str | None = None
        if path is None:
            self._tmp = tempfile.mkdtemp(prefix="tierstore-")
            path = self._tmp
        self.config = config or CacheConfig()
        self.store = TierStore(path, self.config)

    def put_tensor(self, tensor: torch.Tensor, key: str, *, durable: bool = True) -> bool:
        """Store ``tensor`` under ``key``; False when no tier has room (bad input still raises)."""
        try:
            self.store.put(key, tensor, durable=durable)
        except (StoreFullError, TierFullError):
            return False
        return True

    def get_tensor(self, shape: Sequence[int], dtype: torch.dtype,
                   tensor_type: str = "general") -> tuple[torch.Tensor, str]:
        """The newest stored tensor of ``shape`` and ``dtype`` and its tier, or a new one and ``"new"``.

        ``tensor_type`` is accepted for the request's hardware-optimised example and recorded
        nowhere: every type draws from the same tiers.
        """
        shape = tuple(int(s) for s in shape)
        keys = self.store.catalog.find_by_type(dtype_name(dtype), shape)
        if keys:
            info = self.store.info(keys[0])
            return self.store.get(keys[0]), info.tiers[0] if info.tiers else "L3"
        fresh = self.store.allocate(shape, dtype)
        fresh.zero_()
        return fresh, "new"

    def get_tensor_by_key(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``."""
        return self.store.get(key)

    def remove_tensor(self, key: str) -> None:
        """Delete ``key``."""
        self.store.delete(key)

    def get_stats(self) -> dict[str, object]:
        """The store's statistics as a dict."""
        stats = self.store.stats()
        return {name: getattr(stats, name) for name in stats.__slots__}

    def close(self) -> None:
        """Close the store (and remove it if it was temporary)."""
        self.store.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> HierarchicalCacheManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
