"""Run a Qwen3-VL whose weights stream from the store, one decoder layer or vision block at a time.

:func:`load_streamed` builds ``Qwen3VLForConditionalGeneration`` from the config kept in the store
with every parameter on the ``meta`` device (no memory), makes the non-persistent buffers (the
rotary ``inv_freq``) real again, and loads what is small or shared once: embeddings, norms,
``lm_head`` (tied to the embeddings when the config says so, kept once), the vision patch
embedding, position embedding and mergers, plus as many whole layers as ``resident_bytes`` allows.

Each other text decoder layer and vision block is a *unit*. A forward pre-hook puts the unit's
weights in place (views of the store's L2 or L1 slots, from ``store.get``) just before it runs; a
forward hook puts the ``meta`` placeholders back right after, dropping the references, so the slots
can be evicted again. Meanwhile one background thread fetches the next ``prefetch`` units in
execution order (vision blocks, then text layers, then text layer 0 of the next token), so L3 -> L2
decompression overlaps compute. The arithmetic is that of the in-memory model on the same bytes:
logits and generated tokens are identical (``torch.equal``).

The model's ``weight_streamer`` attribute is the :class:`WeightStreamer`; its :meth:`stats` says how
many units were fetched on demand and how many prefetched blocks were then used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import parse_size
from ..engine.handle import TierStore
from ..errors import CheckpointError
from .checkpoint import read_json

__all__ = ["StreamStats", "WeightStreamer", "load_streamed", "streamed_unit_names"]


@dataclass(slots=True)
class _Unit:
    """A module whose weights are fetched before its forward and dropped after it."""

    name: str
    module: nn.Module
    params: list[tuple[nn.Module, str, str, nn.Parameter]]
    """(owner module, parameter name, store key, meta placeholder) per weight."""
    nbytes: int
    hooks: list[Any] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StreamStats:
    """What the streamer did since it was created (or since :meth:`WeightStreamer.reset_stats`)."""

    units: int
    """Units streamed (the rest of the model is resident)."""
    resident_bytes: int
    streamed_bytes: int
    loads: int
    """Unit forwards that needed their weights."""
    demand_fetches: int
    """Of those, how many had to fetch on the spot (no prefetch was ready or running)."""
    prefetched_blocks: int
    prefetch_used_blocks: int
    prefetch_wasted_blocks: int

    @property
    def prefetch_accuracy(self) -> float:
        """Prefetched blocks that were then used, over those whose fate is known (used or dropped)."""
        decided = self.prefetch_used_blocks + self.prefetch_wasted_blocks
        return self.prefetch_used_blocks / decided if decided else 0.0


class WeightStreamer:
    """Hooks that load each unit's weights from the store around its forward, with prefetching."""

    def __init__(self, store: TierStore, units: list[_Unit], *, device: torch.device, dtype: torch.dtype | None,
                 prefetch: int, resident_bytes: int) -> None:
        self.store = store
        self.units = units
        self.device = device
        self.dtype = dtype
        self.depth = max(0, prefetch)
        self._resident_bytes = resident_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-prefetch") if self.depth else None
        self._pending: dict[int, Future[list[torch.Tensor]]] = {}
        self._lock = threading.Lock()
        self._text0 = next((i for i, u in enumerate(units) if ".language_model." in f".{u.name}."), None)
        self.reset_stats()
        for index, unit in enumerate(units):
            unit.hooks = [unit.module.register_forward_pre_hook(self._pre_hook(index)),
                          unit.module.register_forward_hook(self._post_hook(index), always_call=True)]

    def reset_stats(self) -> None:
        """Start counting afresh (the demo does it per run)."""
        self._loads = self._demand = self._prefetched = self._used = self._wasted = 0

    def stats(self) -> StreamStats:
        """Counters since the last :meth:`reset_stats`."""
        return StreamStats(units=len(self.units), resident_bytes=self._resident_bytes,
                           streamed_bytes=sum(u.nbytes for u in self.units), loads=self._loads,
                           demand_fetches=self._demand, prefetched_blocks=self._prefetched,
                           prefetch_used_blocks=self._used, prefetch_wasted_blocks=self._wasted)

    # -- fetching -----------------------------------------------------------------------------------

    def _fetch(self, index: int) -> list[torch.Tensor]:
        """The unit's weights from the store: zero-copy slot views, cast only when ``dtype`` asks."""
        target = None if self.device.type == "cpu" else self.device
        out = []
        for _, _, key, _ in self.units[index].params:
            tensor = self.store.get(key, device=target)
            if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
                tensor = tensor.to(self.dtype)
            out.append(tensor)
        return out

    def _next(self, index: int) -> int | None:
        """The unit that runs after ``index``: the next one, or text layer 0 (the next token) after the last."""
        return index + 1 if index + 1 < len(self.units) else self._text0

    def _schedule(self, index: int) -> None:
        """Prefetch the ``depth`` units after ``index``; drop prefetches no longer expected."""
        if self._pool is None or not self.units:
            return
        wanted: list[int] = []
        nxt = self._next(index)
        while nxt is not None and len(wanted) < min(self.depth, len(self.units) - 1):
            wanted.append(nxt)
            nxt = self._next(nxt)
        with self._lock:
            for stale in [i for i in self._pending if i not in wanted]:
                self._drop(stale)
            for i in wanted:
                if i not in self._pending:
                    self._pending[i] = self._pool.submit(self._fetch, i)
                    self._prefetched += len(self.units[i].params)

    def _drop(self, index: int) -> None:
        future = self._pending.pop(index)
        future.cancel()
        self._wasted += len(self.units[index].params)

    def _take(self, index: int) -> list[torch.Tensor]:
        with self._lock:
            future = self._pending.pop(index, None)
        self._loads += 1
        if future is not None and not future.cancelled():
            self._used += len(self.units[index].params)
            return future.result()
        self._demand += 1
        return self._fetch(index)

    # -- hooks --------------------------------------------------------------------------------------

    def _pre_hook(self, index: int) -> Callable[..., None]:
        def load(module: nn.Module, args: Any) -> None:
            tensors = self._take(index)
            for (owner, name, _, _), tensor in zip(self.units[index].params, tensors, strict=True):
                owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
            self._schedule(index)
        return load

    def _post_hook(self, index: int) -> Callable[..., None]:
        def release(module: nn.Module, args: Any, output: Any) -> None:
            for owner, name, _, placeholder in self.units[index].params:
                owner._parameters[name] = placeholder
        return release

    def release(self) -> None:
        """Drop prefetched weights nobody asked for yet (they pin L2 slots until used)."""
        with self._lock:
            for index in list(self._pending):
                self._drop(index)

    def close(self) -> None:
        """Remove the hooks and stop the prefetch thread; the model cannot run afterwards."""
        self.release()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for unit in self.units:
            for hook in unit.hooks:
                hook.remove()


def streamed_unit_names(config: Any) -> list[str]:
    """Module names of the units of a Qwen3-VL config, in execution order (vision blocks, text layers)."""
    vision = [f"model.visual.blocks.{i}" for i in range(config.vision_config.depth)]
    text = [f"model.language_model.layers.{i}" for i in range(config.text_config.num_hidden_layers)]
    return vision + text


def _build_config(store: TierStore, prefix: str) -> Any:
    from transformers import AutoConfig

    data = read_json(store, "config.json", prefix=prefix)
    if data is None:
        raise CheckpointError(f"no model config under prefix {prefix!r} in {store.path}; import the model with "
                              "import_checkpoint (or 'tierstore import-hf') first", path=str(store.path))
    model_type = data.pop("model_type", None)
    if model_type != "qwen3_vl":
        raise CheckpointError(f"the stored model is {model_type!r}, not qwen3_vl", path=str(store.path))
    return AutoConfig.for_model(model_type, **data)


def _realize_buffers(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Rebuild (on the CPU, as the in-memory model does) every module whose buffers are still meta."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if any(True for _ in module.parameters(recurse=False)) or not hasattr(module, "config"):
            raise CheckpointError(f"cannot rebuild the buffers of {name} ({type(module).__name__}) off the meta device")
        fresh = type(module)(module.config)
        fresh = fresh.to(device=device, dtype=dtype) if dtype is not None else fresh.to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def load_streamed(store: TierStore, *, prefix: str = "", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, resident_bytes: int | str = 0, prefetch: int = 2) -> Any:
    """A ``Qwen3VLForConditionalGeneration`` whose layers stream from ``store`` (see the module doc).

    ``device`` is where it computes (None: the CPU); ``dtype`` casts the weights (say
    ``torch.float16`` on GPUs without bf16, ``torch.cuda.get_device_capability() < (8, 0)``);
    ``resident_bytes`` keeps the units that fit in it (text layers first: they run for every
    token) loaded for good; ``prefetch`` is how
    many units ahead the background thread fetches (0: none). The model is in eval mode; its
    ``weight_streamer`` attribute holds the :class:`WeightStreamer` (``close()`` it when done).
    """
    from transformers import Qwen3VLForConditionalGeneration

    target = torch.device(device) if device is not None else torch.device("cpu")
    config = _build_config(store, prefix)
    with torch.device("meta"):
        model: Any = Qwen3VLForConditionalGeneration(config)
    model.eval()
    _realize_buffers(model, target, dtype)
    present = set(store.keys(prefix=prefix or None))
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items()
            if prefix + t not in present and s in params}
    missing = sorted(n for n in params if prefix + n not in present and n not in tied)
    if missing:
        raise CheckpointError(f"the store lacks {len(missing)} weights of the model under prefix {prefix!r}: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}", path=str(store.path))
    budget = parse_size(resident_bytes) if isinstance(resident_bytes, str) else int(resident_bytes)
    kept, resident = 0, set[str]()
    order = streamed_unit_names(config)
    for unit_name in sorted(order, key=lambda n: ".visual." in n):  # text layers run every token: first
        names = [f"{unit_name}.{n}" for n, _ in model.get_submodule(unit_name).named_parameters()]
        nbytes = sum(store.info(prefix + n).nbytes for n in names)
        if kept + nbytes <= budget:
            kept += nbytes
            resident.add(unit_name)
    units: list[_Unit] = []
    for unit_name in order:
        if unit_name in resident:
            continue
        module = model.get_submodule(unit_name)
        nbytes = sum(store.info(prefix + f"{unit_name}.{n}").nbytes for n, _ in module.named_parameters())
        entries = []
        for n, p in module.named_parameters():
            owner_name, _, pname = n.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            entries.append((owner, pname, prefix + f"{unit_name}.{n}", p))
        units.append(_Unit(unit_name, module, entries, nbytes))
    streamed = {key[len(prefix):] for u in units for _, _, key, _ in u.params}
    for name in params:
        if name in streamed or name in tied:
            continue
        tensor = store.get(prefix + name, device=None if target.type == "cpu" else target, copy=True)
        if not any(name.startswith(unit + ".") for unit in resident):
            kept += tensor.nbytes  # as stored, like the units' sizes
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        owner_name, _, pname = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._parameters[pname] = nn.Parameter(tensor.to(target), requires_grad=False)
    for target_name, source in tied.items():  # tied weights: one tensor, two names
        owner_name, _, pname = target_name.rpartition(".")
        model.get_submodule(owner_name)._parameters[pname] = model.get_parameter(source)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"buffers {left[:5]} are not in the store and cannot be rebuilt", path=str(store.path))
    model.weight_streamer = WeightStreamer(store, units, device=target, dtype=dtype, prefetch=prefetch,
                                           resident_bytes=kept)
    return model
