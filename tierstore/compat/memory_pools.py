"""``HierarchicalCacheIntegration``: the L1 pool living beside PyTorch's own allocator.

The original request names this class as the bridge "with existing memory pools". On a GPU the
existing pool is PyTorch's caching allocator, which holds everything the model allocates. The L1
pool takes its chunks from that same allocator (so a chunk L1 gives back is at once reusable by the
model, with no ``cudaFree``/``cudaMalloc``), and this class keeps the two from fighting:

- ``memory()`` reads the device as the driver, PyTorch's caching allocator and the pool see it
  (``torch.cuda.mem_get_info``, ``memory_reserved``, ``memory_allocated``); ``l1_budget()`` is what
  L1 may hold now without leaving the model less than ``headroom``;
- ``relieve()`` shrinks L1 when the model needs the memory: blocks are evicted by
  ``l1_eviction_policy``, those whose only copy is in L1 written back to L2/L3 first, and whole
  chunks handed back to PyTorch; nothing stored is lost;
- ``call(fn, ...)`` runs model code and, if it hits a device out-of-memory error, shrinks L1 and
  runs it once more instead of failing;
- ``allocate_attention_weights``/``allocate_kv_cache`` (the seed adapter's names) draw from L1.

The device query is injectable (``probe``): a test on the CPU says "the model now needs X bytes"
and checks that L1 shrinks. A separate ``torch.cuda.MemPool`` for L1 was not chosen: chunks freed
into it would reach the model only after ``torch.cuda.empty_cache()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from ..config import parse_size
from ..engine.handle import TierStore
from ..errors import DeviceMemoryError
from ..tiers.l1_cuda import DeviceMemory, MemoryProbe, is_device_oom
from .allocations import attention_weights, kv_cache
from .cache_manager import HierarchicalCacheManager

__all__ = ["HierarchicalCacheIntegration"]

T = TypeVar("T")


class HierarchicalCacheIntegration:
    """Keeps a store's L1 pool within what the model leaves free, and draws seed-style buffers from it.

    ``target`` is a :class:`~tierstore.TierStore` or a :class:`~tierstore.HierarchicalCacheManager`.
    ``headroom`` is the device memory to keep available for the model (default: the pool's,
    ``l1_headroom``: 256 MiB on CUDA, 0 on the CPU). ``probe`` replaces the driver query
    (``device -> (free, total, torch reserved, torch allocated)``); it is installed on the pool,
    so the pool's own growth checks see the same numbers. Without an L1 tier every method is a
    no-op that reports nothing to do, and the allocators hand out ordinary tensors.
    """

    def __init__(self, target: TierStore | HierarchicalCacheManager, *, headroom: int | str | None = None,
                 probe: MemoryProbe | None = None) -> None:
        self.store = target.store if isinstance(target, HierarchicalCacheManager) else target
        pool = self.store.l1_pool
        if pool is not None and probe is not None:
            pool.probe = probe
        default = pool.headroom if pool is not None else 0
        self.headroom = default if headroom is None else parse_size(headroom, name="headroom")
        self.relieved_bytes = 0
        """Bytes of L1 given back to the model so far."""
        self.oom_retries = 0
        """Device out-of-memory errors in :meth:`call` answered by shrinking L1 and retrying."""

    @property
    def device(self) -> torch.device:
        """The L1 device, or the CPU when L1 is off."""
        pool = self.store.l1_pool
        return pool.device if pool is not None else torch.device("cpu")

    def memory(self) -> DeviceMemory | None:
        """The device's memory now (driver, PyTorch and pool), or None without an L1 tier."""
        pool = self.store.l1_pool
        return pool.pressure() if pool is not None else None

    def l1_budget(self) -> int:
        """Bytes L1 may hold now: its capacity, less what the model needs beyond ``headroom``."""
        pool, mem = self.store.l1_pool, self.memory()
        if pool is None or mem is None:
            return 0
        return max(0, min(pool.capacity, mem.pool_reserved + mem.available - self.headroom))

    def relieve(self, need: int | str | None = None) -> int:
        """Make sure the model can get ``need`` more bytes (default: ``headroom``); bytes L1 gave back.

        Shrinks L1 only by the shortfall (rounded up to whole chunks); blocks still held by a
        caller stay, so the result may fall short of the need.
        """
        mem = self.memory()
        if mem is None:
            return 0
        want = self.headroom if need is None else parse_size(need, name="need")
        short = want - mem.available
        if short <= 0:
            return 0
        # The chunks go to PyTorch's cache, no empty_cache(): an allocation the cache cannot serve
        # makes PyTorch release cached segments to the driver and retry before it reports OOM.
        released = self.store.shrink_l1(short)
        self.relieved_bytes += released
        return released

    @contextmanager
    def room_for(self, nbytes: int | str) -> Iterator[int]:
        """``with integration.room_for("1GiB"):`` runs the block once L1 has made that room.

        Yields the bytes L1 gave back.
        """
        yield self.relieve(parse_size(nbytes, name="nbytes"))

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``; on a device out-of-memory error, shrink L1 fully and run it once more.

        A second out-of-memory error is raised as :class:`~tierstore.DeviceMemoryError`.
        """
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, DeviceMemoryError) as exc:
            if not (isinstance(exc, DeviceMemoryError) or is_device_oom(exc)) or self.store.l1_pool is None:
                raise
        self.oom_retries += 1
        self.relieved_bytes += self.store.shrink_l1()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            if not is_device_oom(exc):
                raise
            raise DeviceMemoryError(f"out of device memory even after L1 gave back all it could ({exc})",
                                    tier="L1") from exc

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """An uninitialised tensor on the L1 device, from the L1 pool when it has (or can make) room."""
        return self.store.allocate(shape, dtype, device=self.device)

    def allocate_attention_weights(self, batch: int, heads: int, seq: int, head_dim: int,
                                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """An uninitialised ``(batch, heads, seq, seq)`` attention-score tensor (``head_dim`` is checked only)."""
        return attention_weights(self.allocate, batch, heads, seq, head_dim, dtype)

    def allocate_kv_cache(self, batch: int, heads: int, seq: int, head_dim: int,
                          dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """An uninitialised ``(2, batch, heads, seq, head_dim)`` KV cache: ``[0]`` keys, ``[1]`` values."""
        return kv_cache(self.allocate, batch, heads, seq, head_dim, dtype)

    def stats(self) -> dict[str, Any]:
        """The device's memory, L1's budget and what was given back so far."""
        mem = self.memory()
        return {"device": str(self.device), "headroom": self.headroom, "l1_budget": self.l1_budget(),
                "available": mem.available if mem else None,
                "model_allocated": mem.model_allocated if mem else None,
                "l1_reserved": mem.pool_reserved if mem else 0, "relieved_bytes": self.relieved_bytes,
                "oom_retries": self.oom_retries}
