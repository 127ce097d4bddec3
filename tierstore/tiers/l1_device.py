"""What the L1 tier knows of its device: which dtypes it casts, its memory, its out-of-memory errors.

Facts and values only (no pool state): :mod:`tierstore.tiers.l1_cuda` and the memory-pool bridge of
:mod:`tierstore.compat` read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .slab_allocator import ClassStats

__all__ = ["DeviceMemory", "PoolStats", "event_done", "is_device_oom", "needs_cast", "new_event", "new_stream"]

# Compute capability from which a GPU does native math in the dtype; below it, cast on the way in.
_NATIVE_FROM: dict[torch.dtype, tuple[int, int]] = {torch.bfloat16: (8, 0)}


def needs_cast(dtype: torch.dtype, device: str | torch.device, *, capability: tuple[int, int] | None = None,
               fallback: torch.dtype = torch.float16, force: bool | None = None) -> torch.dtype | None:
    """The dtype ``dtype`` should become in L1 on ``device``, or None to keep it.

    bf16 on a GPU below compute capability 8.0 (Pascal to Turing) becomes ``fallback``; values beyond
    its range (65504 for fp16) become inf. ``capability`` overrides the device query. ``force=True``
    casts bf16 on any device (the CPU included, which is how CI covers the path); ``False`` never does.
    """
    if dtype not in _NATIVE_FROM or force is False or fallback == dtype:
        return None
    if force:
        return fallback
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    cap = capability if capability is not None else torch.cuda.get_device_capability(dev)
    return fallback if tuple(cap) < _NATIVE_FROM[dtype] else None


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a :class:`DevicePool`: ``reserved`` is device memory held (chunks), ``used`` and
    ``requested`` the bytes of live slots with and without rounding, ``free = capacity - used``;
    ``largest_free_run`` counts room the pool may still grow into."""

    capacity: int
    reserved: int
    used: int
    requested: int
    free: int
    largest_free_run: int
    fragmentation: float
    per_class: tuple[ClassStats, ...]
    chunks: int
    chunk_size: int
    device: str
    capability: tuple[int, int] | None
    bf16_native: bool
    inflight: int
    oom_events: int


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """The device's memory as the driver (the OS on CPU), PyTorch's caching allocator and the pool see it."""

    device: str
    free: int
    total: int
    torch_reserved: int
    torch_allocated: int
    pool_reserved: int

    @property
    def available(self) -> int:
        """Bytes a new PyTorch allocation can get without the pool shrinking (driver free + torch's cache)."""
        return self.free + self.torch_reserved - self.torch_allocated

    @property
    def model_allocated(self) -> int:
        """Bytes PyTorch has handed out to everything but the pool (the model, its activations)."""
        return max(0, self.torch_allocated - self.pool_reserved)


def is_device_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the device (or the CPU allocator) running out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


# torch.cuda.Event's and Stream's constructors and Event.query() carry no annotations: the wrappers
# below give them the signatures torch documents (looked up at each call, as a direct call would).
def new_stream(device: torch.device) -> torch.cuda.Stream:
    """A new CUDA stream on ``device`` (a CUDA device)."""
    make: Callable[[torch.device], torch.cuda.Stream] = torch.cuda.Stream
    return make(device)


def new_event() -> torch.cuda.Event:
    """A fresh CUDA event (not yet recorded)."""
    make: Callable[[], torch.cuda.Event] = torch.cuda.Event
    return make()


def event_done(event: torch.cuda.Event) -> bool:
    """Whether the work ``event`` marks has finished (never blocks)."""
    query: Callable[[], bool] = event.query  # the event's own method (tests pass stand-ins)
    return bool(query())
