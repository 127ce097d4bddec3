"""The original request's ``allocate_attention_weights`` / ``allocate_kv_cache``: one implementation.

Each takes the allocator to draw from (``(shape, dtype) -> tensor``): the adapter and the memory-pool
bridge pass their store's :meth:`~tierstore.TierStore.allocate` (L1 on a GPU, else L2), and the
functions of the same names below draw from an L1 :class:`~tierstore.tiers.l1_cuda.DevicePool` directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError, TierFullError
from ..tiers.l1_cuda import DevicePool

__all__ = ["attention_weights", "kv_cache", "allocate_attention_weights", "allocate_kv_cache"]

Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def _dims(what: str, **dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{what}: {name} must be a non-negative int, got {value!r}")


def attention_weights(allocate: Allocate, batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype,
                      *, what: str = "allocate_attention_weights") -> torch.Tensor:
    """An uninitialised ``(batch, heads, seq, seq)`` tensor for ``softmax(Q K^T / sqrt(head_dim))``.

    One score per query/key pair, so ``head_dim`` (checked, kept for the request's signature) is not
    in the shape.
    """
    _dims(what, batch=batch, heads=heads, seq=seq, head_dim=head_dim)
    if head_dim == 0:
        raise ConfigError(f"{what}: head_dim must be positive")
    return allocate((batch, heads, seq, seq), dtype)


def kv_cache(allocate: Allocate, batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype,
             *, what: str = "allocate_kv_cache") -> torch.Tensor:
    """An uninitialised ``(2, batch, heads, seq, head_dim)`` KV cache: ``[0]`` keys, ``[1]`` values.

    One slot holds both, so a layer's cache moves between tiers as one block.
    """
    _dims(what, batch=batch, heads=heads, seq=seq, head_dim=head_dim)
    return allocate((2, batch, heads, seq, head_dim), dtype)


def _from_pool(pool: DevicePool, what: str) -> Allocate:
    def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = pool.scratch(dtype, shape)
        if tensor is None:
            raise TierFullError(f"L1 has no room for {what} of shape {shape} {dtype}; "
                                "free L1 tensors or raise l1_cache_size", tier="L1")
        return tensor
    return allocate


def allocate_attention_weights(pool: DevicePool, batch: int, heads: int, seq: int, head_dim: int,
                               dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """:func:`attention_weights` from L1 pool ``pool``; the slot returns when the tensor and its views are gone."""
    return attention_weights(_from_pool(pool, "attention weights"), batch, heads, seq, head_dim, dtype)


def allocate_kv_cache(pool: DevicePool, batch: int, heads: int, seq: int, head_dim: int,
                      dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """:func:`kv_cache` from L1 pool ``pool``; the slot returns when the tensor and its views are gone."""
    return kv_cache(_from_pool(pool, "a KV cache"), batch, heads, seq, head_dim, dtype)
