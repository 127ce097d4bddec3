"""L1: a device buffer pool: a few large allocations carved up by a slab allocator (:mod:`.slab_allocator`).

The pool grows by chunks (``torch.empty(n, dtype=torch.uint8)`` on the device, ``chunk_size`` bytes,
up to ``capacity``) as allocations need them; once warm, the hot path never asks the device for memory.
A slot never straddles chunks: a bigger request gets a chunk of its own. ``shrink()`` hands empty
chunks back to PyTorch's caching allocator when ``pressure()``/``headroom_ok()`` say the model needs it.

``view()`` builds each tensor on its own storage, a slice of the chunk's ``UntypedStorage`` that keeps
the chunk alive. PyTorch keeps a storage's Python object as long as its C++ storage lives (every view,
slice or ``.numpy()`` of it), so a finalizer on that object fires once, after the last one, on any device.

``copy_in`` copies host bytes (the pinned L2 arena) on a side stream and returns an event for the
caller's stream to wait on; ``cast_into`` also converts on the device (bf16 -> fp16 where the GPU lacks
bf16 math, see :func:`needs_cast`); ``copy_out`` writes back synchronously. On a CPU device (CI) all
of them are a memcpy. Not thread-safe: the owner serialises calls; release callbacks may run anywhere.

Streams. Copies in run on the pool's side stream, so they overlap whatever the current stream is
computing. A freed slot is not reused at once: on CUDA ``free`` records an event on the current stream
(where the slot's readers queued their kernels) and the slot returns to its free list only once that
event has completed, as PyTorch's caching allocator does for ``record_stream``. A reader on another
stream must make the current stream wait for it (``wait_stream``) before dropping its tensor. The
event comes from one method, ``_fence`` (None on the CPU: slots are reused at once); tests substitute
fake events for it, so CI runs the CUDA reuse logic too. A new chunk may be memory PyTorch just took
back from the current stream's queued kernels, so the first copies into it wait for its birth event.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import TracebackType
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from ..config import parse_size
from ..errors import ConfigError, DeviceMemoryError, StoreClosedError, TierFullError, UnsupportedTensorError
from .l1_device import DeviceMemory, PoolStats, event_done, is_device_oom, needs_cast, new_event, new_stream
from .slab_allocator import Allocation, ClassStats, SlabAllocator, view_nbytes

__all__ = ["DeviceMemory", "DevicePool", "MemoryProbe", "PoolStats", "event_done", "is_device_oom", "needs_cast",
           "new_event"]

HostBytes: TypeAlias = "torch.Tensor | npt.NDArray[np.generic]"
Event: TypeAlias = "torch.cuda.Event"
MemoryProbe: TypeAlias = "Callable[[torch.device], tuple[int, int, int, int]]"
"""``device -> (free, total, torch reserved, torch allocated)`` bytes: how the pool sees memory pressure.
The default asks the driver and PyTorch's caching allocator; tests pass their own to simulate a model."""

_PAGE = 4096
_ALIGN = 256  # what cudaMalloc guarantees, and what some kernels quietly assume
_SLAB = 1 << 20
# Chunk k's allocator spans [0, (k << 40) + size) with [0, k << 40) taken at birth, so offsets are
# unique across chunks (owners key slots by offset) and ``offset >> 40`` finds the chunk.
_SPAN_BITS = 40
def _device_memory(device: torch.device) -> tuple[int, int, int, int]:
    """(free, total, torch reserved, torch allocated) bytes; PyTorch's counters are 0 on CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, total, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page, 0, 0


def _new_chunk_tensor(nbytes: int, device: torch.device) -> torch.Tensor:
    tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if device.type == "cpu":
        tensor.zero_()  # fault the pages in now: copies into fresh pages run at a fraction of memcpy speed
    return tensor


@contextmanager
def _oom_as_tier_full(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError, or the CPU allocator's RuntimeError
        if not is_device_oom(exc):
            raise
        raise DeviceMemoryError(f"{what}: the device is out of memory ({exc}); the block stays in L2 - "
                                "shrink L1 or free device memory, then retry", tier="L1") from exc


def _flat_bytes(data: HostBytes, *, out: bool = False) -> torch.Tensor:
    """A flat uint8 tensor over ``data``'s bytes; a destination (``out``) must be contiguous."""
    if isinstance(data, np.ndarray):
        if out and not (data.flags.c_contiguous and data.flags.writeable):
            raise ValueError("the destination array must be C-contiguous and writable")
        data = torch.from_numpy(data if out else np.ascontiguousarray(data))
    tensor = data.detach()
    if out and not tensor.is_contiguous():
        raise ValueError("the destination tensor must be contiguous")
    return tensor.contiguous().view(-1).view(torch.uint8)


def _after_birth(chunk: _Chunk, stream: torch.cuda.Stream) -> None:
    """Order ``stream`` after the work queued when ``chunk`` was allocated (until that has run)."""
    born = chunk.born
    if born is not None:
        if event_done(born):
            chunk.born = None
        else:
            stream.wait_event(born)


class _Chunk:
    """One device allocation and the allocator carving it."""

    __slots__ = ("alloc", "base", "born", "host", "id", "size", "storage", "tensor")

    def __init__(self, cid: int, tensor: torch.Tensor) -> None:
        self.id, self.base, self.size, self.tensor = cid, cid << _SPAN_BITS, tensor.numel(), tensor
        self.born: Event | None = None
        """CUDA: recorded on the allocating stream. PyTorch may hand out memory that stream's queued
        kernels still use (they run before anything queued later on it); side-stream copies wait on it."""
        self.storage = tensor.untyped_storage()
        self.host: npt.NDArray[np.uint8] | None = tensor.numpy() if tensor.device.type == "cpu" else None
        slab = max(_PAGE, min(_SLAB, self.size // 8 // _PAGE * _PAGE))
        self.alloc = SlabAllocator(self.base + self.size, page_size=_PAGE, slab_size=slab, min_align=_ALIGN)
        if self.base:
            self.alloc.alloc(self.base)  # the offsets of earlier chunks: one page run at 0, never freed

    def is_empty(self) -> bool:
        return self.alloc.stats().used == self.base


class DevicePool:
    """L1 device memory: chunks of ``chunk_size`` bytes, up to ``capacity``, carved into slots.

    Sizes take bytes or strings (``"1GiB"``). ``headroom`` is device memory the pool leaves to the
    model when it grows (default 256 MiB on CUDA, unchecked on CPU); ``bf16_fallback`` is what bf16
    becomes on GPUs without bf16 math, ``cast_bf16`` forces the cast on (True) or off (False) instead
    of asking the GPU. ``probe`` replaces the driver query behind ``pressure()``.
    ``close()`` is idempotent; use after it raises StoreClosedError.
    """

    def __init__(self, capacity: int | str, *, device: str | torch.device = "cuda", chunk_size: int | str = "256MiB",
                 headroom: int | str | None = None, bf16_fallback: torch.dtype = torch.float16,
                 cast_bf16: bool | None = None, probe: MemoryProbe | None = None) -> None:
        size = parse_size(capacity, name="L1 pool capacity")
        chunk = parse_size(chunk_size, name="L1 chunk_size")
        self._capacity, self._chunk_size = size - size % _PAGE, chunk - chunk % _PAGE
        if self._capacity <= 0 or self._chunk_size <= 0:
            raise ConfigError(f"L1 capacity ({capacity!r}) and chunk_size ({chunk_size!r}) must be at least one "
                              f"page ({_PAGE} bytes); raise them or disable the L1 tier", tier="L1")
        self._chunk_size = min(self._chunk_size, self._capacity, (1 << _SPAN_BITS) - _PAGE)
        dev = torch.device(device)
        self._capability: tuple[int, int] | None = None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"L1 device {dev} requested but torch.cuda.is_available() is False; "
                                  "use device='cpu' or disable the L1 tier", tier="L1")
            dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
            self._capability = torch.cuda.get_device_capability(dev)
        elif dev.type != "cpu":
            raise ConfigError(f"L1 supports 'cuda' and 'cpu' devices, not {dev.type!r}", tier="L1")
        self._device = dev
        default_headroom = "256MiB" if dev.type == "cuda" else 0
        self._headroom = parse_size(default_headroom if headroom is None else headroom, name="L1 headroom")
        self._fallback, self._cast_bf16 = bf16_fallback, cast_bf16
        self._probe: MemoryProbe = probe if probe is not None else _device_memory
        self._chunks: dict[int, _Chunk] = {}
        self._next_id = self._reserved = self._ooms = 0
        self._hot: _Chunk | None = None
        self._released: deque[Allocation] = deque()  # scratch slots whose tensors died; freed at next alloc
        self._cooling: deque[tuple[Event, Allocation]] = deque()  # freed on CUDA, until their readers ran
        self._spare: list[Event] = []  # completed events, recorded again by the next frees
        self._cooling_at: set[int] = set()
        # (event, what the copy reads, staging slot to free) until the event has completed
        self._inflight: deque[tuple[Event, torch.Tensor | None, Allocation | None]] = deque()
        self._stream: torch.cuda.Stream | None = None
        self._closed = False

    @property
    def capacity(self) -> int:
        """Most device bytes the pool may hold (rounded down to a page)."""
        return self._capacity

    @property
    def device(self) -> torch.device:
        """The pool's device (with its index on CUDA)."""
        return self._device

    @property
    def closed(self) -> bool:
        """Whether close() has run."""
        return self._closed

    @property
    def headroom(self) -> int:
        """Device bytes the pool leaves to the model when it grows."""
        return self._headroom

    @property
    def probe(self) -> MemoryProbe:
        """Where ``pressure()`` reads the device's memory; assign one to simulate a model's needs."""
        return self._probe

    @probe.setter
    def probe(self, probe: MemoryProbe | None) -> None:
        self._probe = probe if probe is not None else _device_memory

    # -- slots --------------------------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> Allocation | None:
        """A slot of at least ``nbytes`` bytes, growing by a chunk if needed; None when there is no room.

        A device out of memory (counted in ``stats().oom_events``) or short of headroom also means no
        room here; ``grow()`` raises TierFullError instead.
        """
        self._open()
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative size ({nbytes} bytes)")
        if self._released or self._inflight or self._cooling:
            self._drain()
        if (a := self._carve(nbytes)) is not None:
            return a
        try:
            self._hot = self._grow_for(nbytes)
        except TierFullError:
            if not self._cooling:
                return None
            self._cool(wait=True)  # out of room: wait for the readers of freed slots rather than fail
            return self._carve(nbytes)
        return self._hot.alloc.alloc(nbytes)

    def _carve(self, nbytes: int) -> Allocation | None:
        hot = self._hot
        if hot is not None and (a := hot.alloc.alloc(nbytes)) is not None:
            return a
        for chunk in self._chunks.values():
            if chunk is not hot and (a := chunk.alloc.alloc(nbytes)) is not None:
                self._hot = chunk
                return a
        return None

    def free(self, a: Allocation) -> None:
        """Return a slot; views over it must already be released (see ``view``).

        On CUDA the slot is reused only after the kernels queued so far on the current stream have
        run (they may still read it); until then it counts as used.
        """
        chunk = self._chunk_of(a, live=False)
        if not chunk.alloc.is_live(a) or a.offset in self._cooling_at:
            raise ValueError(f"{a!r} is not a live allocation of this L1 pool (freed twice?)")
        fence = self._fence()
        if fence is None:
            chunk.alloc.free(a)
        else:
            self._cooling.append((fence, a))
            self._cooling_at.add(a.offset)

    def _fence(self) -> Event | None:
        """An event marking the work queued so far on the current stream (None on the CPU: nothing queued)."""
        if self._device.type != "cuda":
            return None
        event = self._spare.pop() if self._spare else new_event()
        event.record(torch.cuda.current_stream(self._device))
        return event

    def as_tensor(self, a: Allocation) -> torch.Tensor:
        """A flat uint8 device tensor over the ``a.nbytes`` requested bytes of the slot (no release hook)."""
        chunk = self._chunk_of(a)
        start = a.offset - chunk.base
        return chunk.tensor[start : start + a.nbytes]

    def view(self, a: Allocation, dtype: torch.dtype, shape: tuple[int, ...],
             on_release: Callable[[], None] | None = None) -> torch.Tensor:
        """A zero-copy device tensor of ``dtype`` and ``shape`` over the start of the slot.

        ``on_release`` runs exactly once, when the last tensor sharing this view's storage (slices,
        reshapes, ``.view(dtype)``, ``.numpy()``) is collected, never at interpreter exit; the owner
        keeps the slot until then. ``record_stream`` does not cover pool memory: order other streams.
        """
        chunk = self._chunk_of(a)
        nbytes = view_nbytes(a, dtype, shape, "L1")
        start = a.offset - chunk.base
        storage: torch.UntypedStorage = chunk.storage[start : start + nbytes]  # a new storage holding the chunk
        raw = torch.empty(0, dtype=torch.uint8, device=self._device).set_(storage)
        try:
            tensor = raw.view(dtype).view(shape)
        except RuntimeError as exc:
            raise UnsupportedTensorError(f"cannot view slot bytes as {dtype}: {exc}", tier="L1") from exc
        if on_release is not None:
            weakref.finalize(storage, on_release).atexit = False
        return tensor

    def scratch(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        """An uninitialised tensor from the pool, its slot returned when it is collected; None if full."""
        a = self.alloc(math.prod(shape) * dtype.itemsize)
        if a is None:
            return None
        return self.view(a, dtype, shape, on_release=partial(self._released.append, a))

    # -- transfers ----------------------------------------------------------------------------------------

    def copy_in(self, dst: Allocation, src: HostBytes, *, stream: torch.cuda.Stream | None = None) -> Event | None:
        """Copy the bytes of host tensor or array ``src`` to the start of slot ``dst``.

        On CUDA the copy runs on ``stream`` (default: the pool's side stream) after the work queued on
        the current stream, asynchronously from pinned memory; the pool holds ``src`` until it has run.
        Make the consuming stream wait on the returned event (``current_stream().wait_event(ev)``).
        A tensor already on the device is copied on the current stream; a CPU pool memcpys; both -> None.
        """
        chunk = self._chunk_of(dst)
        start = dst.offset - chunk.base
        if chunk.host is not None:  # numpy's memcpy: several times faster than Tensor.copy_ below ~16 MiB
            array = np.ascontiguousarray(src).reshape(-1) if isinstance(src, np.ndarray) else _flat_bytes(src).numpy()
            if array.nbytes > dst.nbytes:
                raise ValueError(f"{array.nbytes} source bytes do not fit a slot of {dst.nbytes}")
            np.copyto(chunk.host[start : start + array.nbytes], array.view(np.uint8))
            return None
        data = _flat_bytes(src)
        n = data.numel()
        if n > dst.nbytes:
            raise ValueError(f"{n} source bytes do not fit a slot of {dst.nbytes}")
        out = chunk.tensor[start : start + n]
        if data.device == self._device:
            out.copy_(data)
            return None
        self._reap()
        side = stream if stream is not None else self._side_stream()
        # No wait on the current stream: a freed slot is reused only after its readers ran (see free),
        # so the copy may overlap the compute queued before it. Only a new chunk waits for its birth.
        _after_birth(chunk, side)
        with _oom_as_tier_full("copying into L1"):
            with torch.cuda.stream(side):
                out.copy_(data, non_blocking=True)
            event = new_event()
            event.record(side)
        self._inflight.append((event, data, None))
        return event

    def cast_into(self, dst: Allocation, src: torch.Tensor, dtype: torch.dtype, *,
                  stream: torch.cuda.Stream | None = None) -> Event | None:
        """Copy host tensor ``src`` into slot ``dst`` converted to ``dtype`` (bf16 -> fp16, say).

        On CUDA the ``src.dtype`` bytes cross the bus into a staging slot and are converted on the
        device, on the same stream; the event is as for ``copy_in``. TierFullError if no staging fits.
        """
        chunk = self._chunk_of(dst)
        need = src.numel() * dtype.itemsize
        if need > dst.nbytes:
            raise ValueError(f"{src.numel()} {dtype} values need {need} bytes; the slot holds {dst.nbytes}")
        start = dst.offset - chunk.base
        out = chunk.tensor[start : start + need].view(dtype)
        if chunk.host is not None or src.device == self._device or need == 0:
            out.copy_(src.detach().reshape(-1))
            return None
        staging = self.alloc(src.numel() * src.element_size())
        if staging is None:
            raise TierFullError(f"L1 has no room for a {src.nbytes}-byte staging slot to cast {src.dtype} to "
                                f"{dtype}; evict from L1 or raise its capacity", tier="L1")
        side = stream if stream is not None else self._side_stream()
        _after_birth(chunk, side)
        try:
            self.copy_in(staging, src, stream=side)
            with _oom_as_tier_full("casting into L1"), torch.cuda.stream(side):
                out.copy_(self.as_tensor(staging).view(src.dtype))
                event = new_event()
                event.record(side)
        except BaseException:
            side.synchronize()
            self.free(staging)
            raise
        self._inflight.append((event, None, staging))  # the staging slot is freed once the cast has run
        return event

    def copy_out(self, src: Allocation, dst: HostBytes) -> None:
        """Write the first ``dst.nbytes`` bytes of slot ``src`` into contiguous host ``dst``, synchronously,
        after the current stream's work and the pool's pending copies."""
        chunk = self._chunk_of(src)
        out = _flat_bytes(dst, out=True)
        n, start = out.numel(), src.offset - chunk.base
        if n > src.nbytes:
            raise ValueError(f"the destination holds {n} bytes; the slot only {src.nbytes}")
        if chunk.host is not None:
            np.copyto(out.numpy(), chunk.host[start : start + n])
            return
        if self._stream is not None:
            torch.cuda.current_stream(self._device).wait_stream(self._stream)
        with _oom_as_tier_full("copying out of L1"):
            out.copy_(chunk.tensor[start : start + n])

    def synchronize(self) -> None:
        """Wait for every pending copy and free the staging slots they used."""
        self._open()
        self._reap(wait=True)
        self._cool(wait=True)

    def needs_cast(self, dtype: torch.dtype) -> torch.dtype | None:
        """What ``dtype`` should become in this pool (see :func:`needs_cast`)."""
        return needs_cast(dtype, self._device, capability=self._capability, fallback=self._fallback,
                          force=self._cast_bf16)

    # -- memory pressure ----------------------------------------------------------------------------------

    def grow(self, nbytes: int | str | None = None) -> int:
        """Take ``nbytes`` more device memory now, by chunks (default: up to capacity); bytes added.

        TierFullError when the device is out of memory or short of headroom (chunks taken stay).
        """
        self._open()
        target = self._capacity if nbytes is None else min(self._capacity, self._reserved + parse_size(nbytes))
        before = self._reserved
        while self._reserved < target:
            self._grow_for(min(self._chunk_size, target - self._reserved))
        return self._reserved - before

    def shrink(self, nbytes: int | str | None = None, *, empty_cache: bool = False) -> int:
        """Give empty chunks back until ``nbytes`` are released (default: all empty ones); bytes released.

        They go to PyTorch's caching allocator, where the model's next allocations find them;
        ``empty_cache=True`` also hands PyTorch's unused cache back to the driver.
        """
        self._open()
        self._drain()
        self._cool(wait=True)
        want = math.inf if nbytes is None else parse_size(nbytes)
        released = 0
        for chunk in reversed(list(self._chunks.values())):
            if released >= want:
                break
            if chunk.is_empty():
                released += self._drop(chunk)
        if empty_cache and self._device.type == "cuda":
            torch.cuda.empty_cache()
        return released

    def reclaimable(self) -> int:
        """Bytes ``shrink()`` would hand back now: the chunks no live slot uses."""
        self._open()
        self._drain()
        return sum(c.size for c in self._chunks.values() if c.is_empty())

    def pressure(self) -> DeviceMemory:
        """The device's memory now, as the driver (or ``probe``), PyTorch and the pool see it."""
        self._open()
        free, total, reserved, allocated = self._probe(self._device)
        return DeviceMemory(str(self._device), free, total, reserved, allocated, self._reserved)

    def headroom_ok(self, headroom: int | str | None = None) -> bool:
        """Whether the model still has ``headroom`` bytes available (default: the pool's headroom)."""
        want = self._headroom if headroom is None else parse_size(headroom, name="headroom")
        return self.pressure().available >= want

    def stats(self) -> PoolStats:
        """A snapshot of usage, fragmentation and per-class occupancy over all chunks."""
        self._open()
        self._drain()
        used = requested = 0
        largest = self._capacity - self._reserved
        classes: dict[int, list[int]] = {}
        for chunk in self._chunks.values():
            st = chunk.alloc.stats()
            used, requested = used + st.used - chunk.base, requested + st.requested - chunk.base
            largest = max(largest, st.largest_free_run)
            for c in st.per_class:
                acc = classes.setdefault(c.size, [0, 0, 0])
                acc[0], acc[1], acc[2] = acc[0] + c.slabs, acc[1] + c.slots_used, acc[2] + c.slots_total
        free = self._capacity - used
        return PoolStats(
            capacity=self._capacity, reserved=self._reserved, used=used, requested=requested, free=free,
            largest_free_run=largest, fragmentation=1.0 - largest / free if free else 0.0,
            per_class=tuple(ClassStats(s, *classes[s]) for s in sorted(classes)), chunks=len(self._chunks),
            chunk_size=self._chunk_size, device=str(self._device), capability=self._capability,
            bf16_native=self.needs_cast(torch.bfloat16) is None, inflight=len(self._inflight) + len(self._cooling),
            oom_events=self._ooms)

    def close(self) -> None:
        """Wait for pending copies and drop every chunk. Live views keep their memory until they die."""
        if self._closed:
            return
        if self._stream is not None:
            self._stream.synchronize()
        self._closed = True
        self._inflight.clear()
        self._cooling.clear()
        self._cooling_at.clear()
        self._released.clear()
        self._chunks.clear()
        self._hot, self._reserved = None, 0

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._closed:
            raise StoreClosedError("the L1 pool is closed; open a new one", tier="L1")

    def _chunk_of(self, a: Allocation, *, live: bool = True) -> _Chunk:
        self._open()
        chunk = self._chunks.get(a.offset >> _SPAN_BITS)
        if chunk is None or (live and not chunk.alloc.is_live(a)):
            raise ValueError(f"{a!r} is not a live allocation of this L1 pool (freed, or from elsewhere)")
        return chunk

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = new_stream(self._device)
        return self._stream

    def _grow_for(self, nbytes: int) -> _Chunk:
        """A new chunk that can serve ``nbytes``, or TierFullError saying why not."""
        need = max(_PAGE, -(-nbytes // _PAGE) * _PAGE)
        room = self._capacity - self._reserved
        if room < need and self._chunk_size < need <= room + sum(c.size for c in self._chunks.values() if c.is_empty()):
            self.shrink(need - room)  # trade empty chunks for one chunk big enough
            room = self._capacity - self._reserved
        if need > room or need >= 1 << _SPAN_BITS:
            raise TierFullError(f"L1 has no room for {nbytes} bytes ({room} of {self._capacity} not yet "
                                "taken); evict from L1 or raise its capacity", tier="L1")
        size = min(room, max(self._chunk_size, need))
        if self._headroom and self.pressure().available - size < self._headroom:
            raise TierFullError(f"growing L1 by {size} bytes would leave the model less than {self._headroom} "
                                f"bytes on {self._device}; shrink L1 or lower its headroom", tier="L1")
        try:
            with _oom_as_tier_full(f"growing L1 by a {size}-byte chunk"):
                tensor = _new_chunk_tensor(size, self._device)
        except TierFullError:
            self._ooms += 1
            raise
        chunk = self._chunks[self._next_id] = _Chunk(self._next_id, tensor)
        if self._device.type == "cuda":
            chunk.born = new_event()
            chunk.born.record(torch.cuda.current_stream(self._device))
        self._next_id += 1
        self._reserved += size
        return chunk

    def _drop(self, chunk: _Chunk) -> int:
        if self._stream is not None:
            self._stream.synchronize()  # no copy may still target memory handed back
        del self._chunks[chunk.id]
        if self._hot is chunk:
            self._hot = None
        self._reserved -= chunk.size
        return chunk.size

    def _drain(self) -> None:
        while self._released:
            a = self._released.popleft()
            chunk = self._chunks.get(a.offset >> _SPAN_BITS)
            if chunk is not None and chunk.alloc.is_live(a):
                self.free(a)
        self._reap()
        self._cool()

    def _cool(self, *, wait: bool = False) -> None:
        """Return freed slots whose readers have run (all of them, waiting, with ``wait``)."""
        while self._cooling:
            event, a = self._cooling[0]
            if wait:
                event.synchronize()
            elif not event_done(event):
                break
            self._cooling.popleft()
            self._cooling_at.discard(a.offset)
            if len(self._spare) < 64:
                self._spare.append(event)
            chunk = self._chunks.get(a.offset >> _SPAN_BITS)
            if chunk is not None and chunk.alloc.is_live(a):
                chunk.alloc.free(a)

    def _reap(self, *, wait: bool = False) -> None:
        while self._inflight:
            event, _source, staging = self._inflight[0]
            if wait:
                event.synchronize()
            elif not event_done(event):
                break
            self._inflight.popleft()
            if staging is not None:
                self.free(staging)
