"""``Qwen3VLHierarchicalCacheAdapter``: the original request's adapter, drawing buffers from a store's tiers.

The request's third example::

    adapter = Qwen3VLHierarchicalCacheAdapter()
    attention_tensor = adapter.allocate_attention_weights(2, 8, 512, 64)   # (2, 8, 512, 512)
    kv_cache_tensor = adapter.allocate_kv_cache(1, 16, 1024, 128)           # (2, 1, 16, 1024, 128)

Buffers come from the L1 device pool when the store has one (``store.allocate(..., device=...)``),
else from the L2 host pool, else ordinary memory; each goes back to its pool when the tensor (and
every view of it) is garbage-collected. Shapes follow :mod:`tierstore.tiers.l1_cuda`: attention
weights hold one score per query/key pair, ``(batch, heads, seq, seq)``; a KV cache holds keys and
values in one block, ``(2, batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import torch

from ..config import CacheConfig
from ..engine.handle import TierStore
from .allocations import attention_weights, kv_cache
from .cache_manager import HierarchicalCacheManager

__all__ = ["Qwen3VLHierarchicalCacheAdapter"]


class Qwen3VLHierarchicalCacheAdapter:
    """Attention-weight and KV-cache buffers for Qwen3-VL, from the tiers of a store.

    ``store`` may be a :class:`TierStore` or a :class:`HierarchicalCacheManager`; without one the
    adapter makes a temporary manager from ``config`` (removed on :meth:`close`). ``device`` is
    where buffers go: by default the store's L1 device when it has an L1, else host memory (L2).
    """

    def __init__(self, store: TierStore | HierarchicalCacheManager | None = None, *,
                 config: CacheConfig | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float16) -> None:
        self._owned: HierarchicalCacheManager | None = None
        if store is None:
            self._owned = HierarchicalCacheManager(config)
            store = self._owned
        self.manager = store if isinstance(store, HierarchicalCacheManager) else None
        self.store: TierStore = store.store if isinstance(store, HierarchicalCacheManager) else store
        if device is None:
            l1 = self.store.stats().tiers.get("L1")
            device = l1["device"] if l1 is not None else None
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype

    def allocate_attention_weights(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int,
                                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised ``(batch_size, num_heads, seq_len, seq_len)`` buffer for softmax(Q K^T / sqrt(d)).

        ``head_dim`` is checked and kept for the request's signature; a score per query/key pair
        does not depend on it.
        """
        return attention_weights(self._allocate, batch_size, num_heads, seq_len, head_dim, dtype or self.dtype)

    def allocate_kv_cache(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised ``(2, batch_size, num_heads, seq_len, head_dim)`` KV cache: ``[0]`` keys, ``[1]`` values."""
        return kv_cache(self._allocate, batch_size, num_heads, seq_len, head_dim, dtype or self.dtype)

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.store.allocate(shape, dtype, self.device)

    def close(self) -> None:
        """Close the temporary manager, if the adapter made one."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> Qwen3VLHierarchicalCacheAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
