"""Run any transformers decoder model whose weights stream from the store, one decoder layer at a time.

:func:`load_streamed` builds the model class named by the config kept in the store (Llama, Qwen2,
Qwen3, Mistral, Gemma, Qwen3-VL, ...) with every parameter on the ``meta`` device (no memory) and its
buffers computed as the in-memory model computes them (:func:`~.hf_model.build_empty_model`), and
loads what is small or shared once: embeddings, norms, ``lm_head`` (tied to the embeddings when the
config says so, kept once), a vision tower's patch embedding and mergers, plus as many whole units
as ``resident_bytes`` allows.

The *units* come from the model's own structure (:func:`~.hf_model.unit_groups`): each entry of a
``ModuleList`` of the classes in its ``_no_split_modules`` (the decoder layers; a vision tower's
blocks). A forward pre-hook puts the unit's weights in place (views of the store's L2 or L1 slots,
from ``store.get``) just before it runs; a forward hook puts the ``meta`` placeholders back right
after, dropping the references, so the slots can be evicted again. Meanwhile one background thread
fetches the next ``prefetch`` units in execution order (a vision tower's blocks, then the decoder
layers, then decoder layer 0 of the next token), so L3 -> L2 decompression overlaps compute. The
arithmetic is that of the in-memory model on the same bytes: logits and generated tokens are
identical (``torch.equal``).

The model's ``weight_streamer`` attribute is the :class:`WeightStreamer`; its :meth:`stats` says how
many units were fetched on demand and how many prefetched blocks were then used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import format_size, parse_size
from ..engine.handle import TierStore
from ..errors import CheckpointError, ConfigError
from .decode_threads import DecodeThreads, choose, tokens_of
from .hf_model import build_empty_model, stored_config, tied_weights, unit_groups
from .linear_fold import fold_linear_inputs
from .stream_budget import hold_reserve, mapped_slack, memory_split, raw_units

if TYPE_CHECKING:
    from ..plan.placement import Plan

__all__ = ["StreamStats", "StreamUnit", "WeightStreamer", "load_streamed", "place_param", "streamed_unit_names"]


@dataclass(slots=True)
class StreamUnit:
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
    held_units: int = 0
    """Streamed units whose tier slots the streamer keeps (held resident in L2/L1, never read again)."""
    held_bytes: int = 0
    mapped_blocks: int = 0
    """Weights of streamed units served as zero-copy maps of their raw L3 bytes (:meth:`TierStore.map`): no
    copy into L2, no L2 slot."""

    @property
    def prefetch_accuracy(self) -> float:
        """Prefetched blocks that were then used, over those whose fate is known (used or dropped)."""
        decided = self.prefetch_used_blocks + self.prefetch_wasted_blocks
        return self.prefetch_used_blocks / decided if decided else 0.0


class WeightStreamer:
    """Hooks that load each unit's weights from the store around its forward, with prefetching."""

    def __init__(self, store: TierStore, units: list[StreamUnit], *, device: torch.device, dtype: torch.dtype | None,
                 prefetch: int, resident_bytes: int, repeat_from: int | None = None, hold_bytes: int = 0,
                 hold_names: set[str] | None = None, mapped: bool = True,
                 decode_threads: int | str | None = None) -> None:
        """``repeat_from`` is the unit that runs after the last one (decoder layer 0: the next token).

        ``hold_bytes`` is how much of the tier serving the units (L1 for a CUDA device with an L1,
        else L2) the streamer may keep: units chosen up to it (decoder layers first) stay viewed
        once fetched, so their slots cannot be evicted and every later pass finds them there, while
        the others stream through the rest of the tier (see :mod:`.stream_budget`). ``hold_names``
        names the units to hold instead (a placement plan's resident set).

        ``mapped``: the weights of units that are not held, computed on the CPU, are views of their
        raw L3 bytes where they are stored raw (:meth:`TierStore.map
        <tierstore.engine.handle.TierStore.map>`, made and checked by the prefetch thread) instead
        of copies in L2 slots; the others are read as usual.

        ``decode_threads``: torch's threads for a one-token forward of a unit (see :mod:`.decode_threads`:
        ``"auto"`` leaves a core to the prefetch thread where it would otherwise compete with compute
        on every core; None leaves torch's count; a number sets it). The caller's count is restored
        after each such forward.
        """
        self.store = store
        self.units = units
        self.device = device
        self.dtype = dtype
        self.depth = max(0, prefetch)
        self._resident_bytes = resident_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-prefetch") if self.depth else None
        self._pending: dict[int, Future[list[torch.Tensor]]] = {}
        self._lock = threading.Lock()
        self._repeat = repeat_from if units and repeat_from is not None and 0 <= repeat_from < len(units) else None
        self._tier = "L1" if device.type != "cpu" else "L2"
        self._holdable = self._choose_held(hold_bytes) if hold_names is None else {
            i for i, unit in enumerate(units) if unit.name in hold_names}
        self._held: dict[int, list[torch.Tensor]] = {}
        self._copied: set[int] = set()
        """Units whose fetch cast (copied) a weight: their tensors are not the tier's slots."""
        self._maps = mapped and device.type == "cpu"
        decoding = range(self._repeat if self._repeat is not None else 0, len(units))  # the units a token runs
        self.threads = DecodeThreads(choose(decode_threads, device=device, prefetch=self.depth,
                                            streams=any(i not in self._holdable for i in decoding)))
        """What one-token forwards of the units run on (``threads.threads``: None, torch's own count)."""
        self.reset_stats()
        for index, unit in enumerate(units):
            unit.hooks = [unit.module.register_forward_pre_hook(self._pre_hook(index)),
                          unit.module.register_forward_hook(self._post_hook(index), always_call=True)]

    def _choose_held(self, hold_bytes: int) -> set[int]:
        """Units to hold, up to ``hold_bytes``: the decoder's first (they run for every token), then the rest."""
        start = self._repeat if self._repeat is not None else 0
        order = [*range(start, len(self.units)), *range(start)]
        chosen, kept = set[int](), 0
        for index in order:
            if kept + self.units[index].nbytes <= hold_bytes:
                chosen.add(index)
                kept += self.units[index].nbytes
        return chosen

    def reset_stats(self) -> None:
        """Start counting afresh (the demo does it per run)."""
        self._loads = self._demand = self._prefetched = self._used = self._wasted = self._mapped = 0

    def stats(self) -> StreamStats:
        """Counters since the last :meth:`reset_stats`."""
        return StreamStats(units=len(self.units), resident_bytes=self._resident_bytes,
                           streamed_bytes=sum(u.nbytes for u in self.units), loads=self._loads,
                           demand_fetches=self._demand, prefetched_blocks=self._prefetched,
                           prefetch_used_blocks=self._used, prefetch_wasted_blocks=self._wasted,
                           held_units=len(self._held), held_bytes=sum(self.units[i].nbytes for i in self._held),
                           mapped_blocks=self._mapped)

    # -- fetching -----------------------------------------------------------------------------------

    def _fetch(self, index: int) -> list[torch.Tensor]:
        """The unit's weights from the store: zero-copy slot views, cast only when ``dtype`` asks."""
        target = None if self.device.type == "cpu" else self.device
        maps = self._maps and index not in self._holdable  # a held unit's slots are what it keeps
        out = []
        for tensor in self._get_unit([key for _, _, key, _ in self.units[index].params], target, maps):
            if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
                tensor = tensor.to(self.dtype)
                self._copied.add(index)
            out.append(tensor)
        return out

    def _get_unit(self, keys: list[str], device: torch.device | None, maps: bool) -> list[torch.Tensor]:
        """A unit's tensors, in ``keys``' order: maps as :meth:`_get` makes them, the rest by one ``get_many``.

        ``get_many`` reads the unit's blocks that are in no faster tier together, in the order they
        lie on disk, so the disk reads the next weight while the one before decodes.
        """
        found: dict[str, torch.Tensor] = {}
        if maps:
            for key in keys:
                tensor = self.store.map(key)
                if tensor is not None:
                    found[key] = tensor
            if found:
                with self._lock:  # the prefetch thread and the model's thread both count
                    self._mapped += len(found)
        rest = [key for key in keys if key not in found]
        if rest:
            found.update(self.store.get_many(rest, device=device))
        return [found[key] for key in keys]

    def _get(self, key: str, device: torch.device | None, maps: bool) -> torch.Tensor:
        """``key``'s tensor: a map of its raw L3 bytes when ``maps`` and the store can, else a get on ``device``."""
        if maps:
            tensor = self.store.map(key)
            if tensor is not None:
                with self._lock:  # the prefetch thread and the model's thread both count
                    self._mapped += 1
                return tensor
        return self.store.get(key, device=device)

    def _next(self, index: int) -> int | None:
        """The unit that runs after ``index``: the next one, or, after the last, decoder layer 0 (the next token)."""
        return index + 1 if index + 1 < len(self.units) else self._repeat

    def _schedule(self, index: int) -> None:
        """Prefetch the ``depth`` units after ``index``; drop prefetches no longer expected."""
        if self._pool is None or not self.units:
            return
        wanted: list[int] = []
        nxt, steps = self._next(index), 0
        # Held units are already in their tier: look past them, so the reader stays ahead of the
        # units that must come from L3.
        while nxt is not None and nxt != index and steps < len(self.units) and len(wanted) < self.depth:
            if nxt not in self._held:
                wanted.append(nxt)
            nxt, steps = self._next(nxt), steps + 1
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
        if index not in self._held:
            self._demand += 1
        return self._fetch(index)

    def _keep(self, index: int, tensors: list[torch.Tensor]) -> None:
        """Hold a chosen unit's views; a unit whose weights are not zero-copy views of its tier is streamed.

        A unit whose fetch cast a weight (a copy) can never be a view: it is no longer held. One whose
        fetch found no room in the tier this time is streamed this pass and tried again on the next.
        """
        if index not in self._holdable:
            return
        if index not in self._held:
            if index in self._copied:  # a cast copy outside the tier: holding it costs memory
                self._holdable.discard(index)
                return
            unit = self.units[index]
            if not all(self._tier in self.store.tiers_of(key) for _, _, key, _ in unit.params):
                return  # this fetch bypassed the tier: the next pass tries again
        self._held[index] = tensors

    # -- hooks --------------------------------------------------------------------------------------

    def _pre_hook(self, index: int) -> Callable[..., None]:
        def load(module: nn.Module, args: Any) -> None:
            self.threads.enter(tokens_of(args, {}))
            tensors = self._take(index)
            self._keep(index, tensors)
            for (owner, name, _, _), tensor in zip(self.units[index].params, tensors, strict=True):
                place_param(owner, name, nn.Parameter(tensor, requires_grad=False))
            self._schedule(index)
        return load

    def _post_hook(self, index: int) -> Callable[..., None]:
        def release(module: nn.Module, args: Any, output: Any) -> None:
            for owner, name, _, placeholder in self.units[index].params:
                place_param(owner, name, placeholder)
            self.threads.leave()
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
        self._held.clear()  # their slots can be evicted again
        self._holdable.clear()
        for unit in self.units:
            for hook in unit.hooks:
                hook.remove()


def place_param(owner: nn.Module, name: str, param: nn.Parameter) -> None:
    """Set parameter ``name`` of ``owner`` without ``register_parameter``.

    accelerate's ``init_empty_weights`` (building a model in another thread) swaps
    ``register_parameter`` for one that moves every parameter to ``meta``; writing the parameter
    table directly keeps a streamed weight real whatever is patched meanwhile, and skips the checks
    ``register_parameter`` repeats for a name that is already a parameter.
    """
    owner._parameters[name] = param


def streamed_unit_names(model: nn.Module) -> list[str]:
    """Module names of the units of ``model``, in execution order (a vision tower's blocks, decoder layers)."""
    return [name for group in unit_groups(model) for name in group]


def _place_buffers(model: nn.Module, store: TierStore, prefix: str, present: set[str], device: torch.device,
                   dtype: torch.dtype | None) -> None:
    """Move the buffers to ``device``, cast to ``dtype`` as ``model.to(dtype)`` would.

    A persistent buffer the store holds is loaded from it, as ``from_pretrained`` loads it from the
    checkpoint; the others (rotary frequencies, ...) keep the values computed when the model was built.
    """
    persistent = set(model.state_dict(keep_vars=True))
    for module_name, module in model.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            value = store.get(prefix + full, copy=True) if full in persistent and prefix + full in present else buffer
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            setattr(module, name, value.to(device))  # keeps the buffer's persistence


def _owned(store: TierStore, key: str, target: torch.device, mapped: bool) -> torch.Tensor:
    """A weight of the model's own, outside the tiers that serve the streamed units.

    ``get(copy=True)`` puts a host copy in free L2 memory when there is room (scratch, held for as
    long as the tensor lives): a weight loaded for good would then take L2 the budget gave to the
    streamed units (:mod:`.stream_budget` counts these weights outside L2). A clone of the view is
    ordinary memory, and the block's slot can be evicted again. With ``mapped``, a weight stored raw
    is kept as its map (:meth:`TierStore.map <tierstore.engine.handle.TierStore.map>`: private pages
    of the file, no copy and no L2 slot on the way).
    """
    if target.type != "cpu":
        return store.get(key, device=target, copy=True)
    view = store.map(key) if mapped else None
    if view is not None:
        return view
    if store.info(key).nbytes > _tier_capacity(store, target):
        # larger than L2 (a plan's L2 can be smaller than a small model's embeddings): the read passes L2 by
        # anyway; copy=True keeps that one private copy instead of cloning it into a second
        return store.get(key, copy=True)
    return store.get(key).clone()


def _budget(resident_bytes: int | str) -> int:
    return parse_size(resident_bytes) if isinstance(resident_bytes, str) else int(resident_bytes)


def _tier_capacity(store: TierStore, device: torch.device) -> int:
    """Capacity of the tier that serves ``store.get`` for ``device`` (L1 for a CUDA device with an L1)."""
    tiers = store.stats().tiers
    tier = tiers.get("L1") if device.type != "cpu" else tiers.get("L2")
    return int(tier["capacity"]) if tier else 0


def _hold(store: TierStore, target: torch.device, units: list[StreamUnit], *, prefix: str, prefetch: int,
          dtype: torch.dtype | None, memory: int | str | None, resident_bytes: int, hold_bytes: int | str | None,
          mapped: bool) -> int:
    """Bytes of streamed units to hold in their tier: from ``memory``, or ``hold_bytes``, or what the tier has.

    When every streamed unit will be mapped (``mapped``, a CPU target, all stored raw), the tier keeps
    no working reserve: it holds units up to its capacity less :func:`~.stream_budget.mapped_slack`.
    """
    capacity = _tier_capacity(store, target)
    largest = max((u.nbytes for u in units), default=0)
    names = {u.name for u in units}
    maps = mapped and target.type == "cpu" and bool(units) and all(
        raw for name, raw in raw_units(store, prefix=prefix).items() if name in names)
    working = mapped_slack(capacity) if maps else hold_reserve(largest, prefetch)
    if memory is not None:
        if resident_bytes:
            raise ConfigError("load_streamed: give memory= or resident_bytes=, not both; memory= chooses the "
                              "resident set itself")
        split = memory_split(store, memory, prefix=prefix, prefetch=prefetch, dtype=dtype, mapped=mapped)
        if target.type == "cpu" and capacity > split.l2_bytes:
            raise ConfigError(
                f"the store's L2 of {format_size(capacity)} with the {format_size(split.fixed_bytes)} of weights "
                f"always loaded exceeds memory={format_size(split.memory)}; open the store with "
                f"l2_cache_size={split.l2_bytes} (memory_split(store, memory).l2_bytes)")
        capacity = min(capacity, split.l2_bytes) if target.type == "cpu" else capacity
        if maps:
            working = mapped_slack(capacity)
    if hold_bytes is not None:
        return min(_budget(hold_bytes), max(0, capacity - working))
    return max(0, capacity - working)


def load_streamed(store: TierStore, *, prefix: str = "", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, resident_bytes: int | str = 0, prefetch: int = 2,
                  memory: int | str | None = None, hold_bytes: int | str | None = None, plan: Plan | None = None,
                  gpu: str | torch.device | None = None, gpu_dtype: torch.dtype | None = None,
                  mapped: bool = True, decode_threads: int | str | None = "auto") -> Any:
    """The model imported under ``prefix``, its decoder layers streaming from ``store`` (see the module doc).

    The class is the one the stored config names (``LlamaForCausalLM``,
    ``Qwen3VLForConditionalGeneration``, ...). ``device`` is where it computes (None: the CPU);
    ``dtype`` casts the weights (say ``torch.float16`` on GPUs without bf16,
    ``torch.cuda.get_device_capability() < (8, 0)``); ``resident_bytes`` keeps the units that fit
    in it (decoder layers first: they run for every token) loaded for good; ``prefetch`` is how
    many units ahead the background thread fetches (0: none). The model is in eval mode; its
    ``weight_streamer`` attribute holds the :class:`WeightStreamer` (``close()`` it when done).

    Streamed units up to the serving tier's capacity, less a working reserve of ``prefetch + 1``
    units and one unit of slack (:func:`~.stream_budget.hold_reserve`), are held there once
    fetched (``hold_bytes`` lowers that; 0 holds none): a cyclic scan then reads only the others
    from L3. ``memory`` (bytes or ``"3GiB"``) is a budget for all the weights in host memory: the
    store's L2 must be at most ``memory_split(store, memory).l2_bytes`` (else ``ConfigError`` saying
    the size to open it with), and a budget below the model's minimum is a ``ConfigError`` naming
    the minimum. The weights loaded for good are copies outside L2, or maps of raw L3 (:func:`_owned`). Every
    ``nn.Linear`` gets a pre-hook that lays out 3-D inputs so torch multiplies them as one matrix
    (:mod:`.linear_fold`): with weights that do not require grad, the logits' last-position slice
    would otherwise copy the whole ``lm_head`` each prefill.

    ``plan`` (a :class:`~tierstore.plan.placement.Plan` for this model) is executed as
    :mod:`.hybrid_exec` says: each unit's weights come from the tier the plan names and it computes,
    per phase, on the CPU or on ``gpu`` (the plan's ``cuda``; default ``"cuda"``, ``"cpu"`` with an
    ``l1_device="cpu"`` store in tests) in ``gpu_dtype`` (default: the L1 tier's Pascal policy). The
    fixed weights go to ``device``, by default the GPU when the plan puts the head there. A plan
    needing a GPU this process lacks is a ``HardwareUnavailableError``; tiers smaller than it
    keeps, a ``ConfigError`` naming the size to open them with.

    ``mapped`` (on a CPU device): streamed units that are not held and are stored raw in L3 are
    mapped (:meth:`TierStore.map <tierstore.engine.handle.TierStore.map>`: views of the files' pages,
    checked, made by the prefetch thread) rather than copied into L2; when all of them are, L2
    keeps no working reserve and holds units up to its capacity (see :mod:`.stream_budget`), and
    ``memory`` counts the mapped working units beside it. False copies every unit through L2.

    ``decode_threads`` (default ``"auto"``): torch's threads while a streamed unit computes one token
    (:mod:`.decode_threads`: on a CPU device with a prefetch thread, ``cores - 1``, leaving it a core;
    None keeps torch's count; a number sets it); the caller's count is back after each such forward.
    """
    if not isinstance(mapped, bool):
        raise ConfigError(f"load_streamed: mapped must be True or False, not {mapped!r}")
    gpu_target = None
    if plan is not None:
        if memory is not None or hold_bytes is not None or resident_bytes:
            raise ConfigError("load_streamed: plan= decides what is resident; give it without memory=, hold_bytes= "
                              "or resident_bytes=")
        from .hybrid_exec import gpu_device  # hybrid_exec builds on this module

        if plan.uses_gpu or plan.resident("L1") or gpu is not None:
            gpu_target = gpu_device(gpu)
        if device is None and plan.head_on == "cuda" and gpu_target is not None:
            device = gpu_target
    target = torch.device(device) if device is not None else torch.device("cpu")
    model: Any = build_empty_model(stored_config(store, prefix))
    present = set(store.keys(prefix=prefix or None))
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {t: s for t, s in tied_weights(model).items() if prefix + t not in present and s in params}
    missing = sorted(n for n in params if prefix + n not in present and n not in tied)
    if missing:
        raise CheckpointError(f"the store lacks {len(missing)} weights of the model under prefix {prefix!r}: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}", path=str(store.path))
    _place_buffers(model, store, prefix, present, target, dtype)
    groups = unit_groups(model)
    budget, kept, resident = _budget(resident_bytes), 0, set[str]()
    for unit_name in [n for group in reversed(groups) for n in group]:  # the decoder runs every token: first
        nbytes = sum(store.info(prefix + f"{unit_name}.{n}").nbytes
                     for n, _ in model.get_submodule(unit_name).named_parameters())
        if kept + nbytes <= budget:
            kept += nbytes
            resident.add(unit_name)
    units: list[StreamUnit] = []
    repeat_from = None
    for unit_name in (n for group in groups for n in group):
        if unit_name in resident:
            continue
        if repeat_from is None and unit_name in groups[-1]:
            repeat_from = len(units)
        module = model.get_submodule(unit_name)
        nbytes = sum(store.info(prefix + f"{unit_name}.{n}").nbytes for n, _ in module.named_parameters())
        entries = []
        for n, p in module.named_parameters():
            owner_name, _, pname = n.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            entries.append((owner, pname, prefix + f"{unit_name}.{n}", p))
        units.append(StreamUnit(unit_name, module, entries, nbytes))
    streamed = {key[len(prefix):] for u in units for _, _, key, _ in u.params}
    for name in params:
        if name in streamed or name in tied:
            continue
        tensor = _owned(store, prefix + name, target, mapped)
        if not any(name.startswith(unit + ".") for unit in resident):
            kept += tensor.nbytes  # as stored, like the units' sizes
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        owner_name, _, pname = name.rpartition(".")
        place_param(model.get_submodule(owner_name) if owner_name else model, pname,
               nn.Parameter(tensor.to(target), requires_grad=False))
    for target_name, source in tied.items():  # tied weights: one tensor, two names
        owner_name, _, pname = target_name.rpartition(".")
        place_param(model.get_submodule(owner_name), pname, model.get_parameter(source))
    fold_linear_inputs(model)  # its weights do not require grad: see linear_fold (a copy of lm_head per prefill)
    hold = _hold(store, target, units, prefix=prefix, prefetch=prefetch, dtype=dtype, memory=memory,
                 resident_bytes=budget, hold_bytes=hold_bytes, mapped=mapped)
    if plan is not None:
        model.weight_streamer = _hybrid(store, units, plan, target=target, dtype=dtype, gpu=gpu_target,
                                        gpu_dtype=gpu_dtype, prefetch=prefetch, kept=kept, repeat_from=repeat_from,
                                        mapped=mapped, decode_threads=decode_threads)
        return model
    model.weight_streamer = WeightStreamer(store, units, device=target, dtype=dtype, prefetch=prefetch,
                                           resident_bytes=kept, repeat_from=repeat_from, hold_bytes=hold,
                                           mapped=mapped, decode_threads=decode_threads)
    return model


def _hybrid(store: TierStore, units: list[StreamUnit], plan: Plan, *, target: torch.device, dtype: torch.dtype | None,
            gpu: torch.device | None, gpu_dtype: torch.dtype | None, prefetch: int, kept: int,
            repeat_from: int | None, mapped: bool, decode_threads: int | str | None) -> WeightStreamer:
    """The :class:`~.hybrid_exec.HybridStreamer` executing ``plan``, once the tiers are checked against it."""
    from .hybrid_exec import HybridStreamer, check_plan, gpu_compute_dtype

    stored = next((store.info(key).dtype for u in units for _, _, key, _ in u.params), torch.float32)
    compute = gpu_compute_dtype(store, stored, gpu, gpu_dtype) if gpu is not None else None
    check_plan(store, units, plan, prefetch=prefetch, gpu=gpu, gpu_dtype=compute, mapped=mapped, home=target)
    return HybridStreamer(store, units, plan, home=target, home_dtype=dtype or stored, gpu=gpu, gpu_dtype=compute,
                          cpu_dtype=dtype or stored, prefetch=prefetch, resident_bytes=kept, repeat_from=repeat_from,
                          mapped=mapped, decode_threads=decode_threads)
