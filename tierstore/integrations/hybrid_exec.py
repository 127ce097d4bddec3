"""Execute a placement plan: each unit computes where the plan says, per phase, from the tier it names.

:func:`~.streaming.load_streamed` with ``plan=`` builds a :class:`HybridStreamer` instead of a plain
:class:`~.streaming.WeightStreamer`. For every unit (a decoder layer, a vision block) and phase
(*prefill*: the unit's input holds more than one token; *decode*: one token; a vision block is
always prefill) the plan's :class:`~tierstore.plan.placement.UnitPlan` says:

- the tier its weights come from: ``L1`` (``store.get(key, device=gpu)``: a slot of the device
  pool, held for good), ``L2`` (``store.get(key)``: a view of the host slab, held for good) or
  ``L3`` (read through L2 for every pass, prefetched by the streamer's thread);
- the device it computes on: ``cuda`` (the ``gpu`` device given to ``load_streamed``) or ``cpu``.

A weight that is not where (or in the dtype) its unit computes is copied there for that forward
only: an L2 unit on the GPU is copied host -> device for every token ("L2->GPU"), an L3 unit
likewise after its read. The compute dtype on the GPU is ``gpu_dtype``, by default the Pascal
policy of the L1 tier (:func:`~tierstore.tiers.l1_device.needs_cast`: bf16 becomes fp16 on a GPU
below compute capability 8.0, where it has no bf16 math); on the CPU it is the ``dtype`` given to
``load_streamed`` (None: as stored).

At the boundaries a forward pre-hook moves everything the unit's forward receives (hidden states,
position embeddings, the attention mask, ...) to its device, floating tensors to its dtype, and
moves the unit's own entry of a transformers KV cache (``past_key_values.layers[i]``) there too, so
a layer that prefilled on the GPU and decodes on the CPU finds its keys and values beside it. The
forward hook puts the output back on the device and dtype of the fixed weights (embeddings, final
norm, ``lm_head``), which is what the next unit, or the head, receives. With every dtype equal the
arithmetic is the in-memory model's, bit for bit; with a fp16/fp32 GPU dtype beside bf16 the
results differ by that dtype's rounding (tests/test_hybrid_exec.py bounds it).

In tests the "GPU" is the CPU device of an L1 pool opened with ``l1_device="cpu"``; the same code
drives CUDA (``tools/gpu_check.py`` runs a 2B plan there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import format_size
from ..engine.handle import TierStore
from ..errors import ConfigError, HardwareUnavailableError
from ..tiers.l1_device import needs_cast
from .decode_threads import tokens_of
from .streaming import StreamUnit, WeightStreamer, place_param

if TYPE_CHECKING:
    from ..plan.placement import Plan, UnitPlan

__all__ = ["HybridStreamer", "check_plan", "gpu_device", "gpu_compute_dtype"]


def gpu_device(gpu: str | torch.device | None) -> torch.device:
    """The device the plan's ``cuda`` units compute on; ``HardwareUnavailableError`` if this process lacks it."""
    device = torch.device(gpu) if gpu is not None else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HardwareUnavailableError(
            "the plan computes on a GPU, but this torch has no CUDA device (torch.cuda.is_available() is False); "
            "plan for this machine (tierstore plan STORE --hardware probe) or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise HardwareUnavailableError(f"the plan computes on {device}, but this process sees "
                                       f"{torch.cuda.device_count()} CUDA devices; pass gpu='cuda:0'")
    if device.type not in ("cuda", "cpu"):
        raise HardwareUnavailableError(f"gpu={str(device)!r}: a plan computes on 'cuda', 'cuda:N' or, in tests, "
                                       "'cpu' (an L1 opened with l1_device='cpu')")
    return device


def gpu_compute_dtype(store: TierStore, stored: torch.dtype, gpu: torch.device,
                      gpu_dtype: torch.dtype | None) -> torch.dtype | None:
    """``gpu_dtype`` if given, else what the store's L1 makes of weights stored as ``stored`` (None: keep).

    That is the Pascal policy (:func:`~tierstore.tiers.l1_device.needs_cast`): with ``l1_bf16_cast="auto"``
    bf16 becomes ``l1_bf16_fallback`` (fp16 or fp32) on a GPU below compute capability 8.0; ``"always"``
    casts on any device (how tests put a fp32 "GPU" on the CPU), ``"never"`` keeps bf16.
    """
    if gpu_dtype is not None:
        return gpu_dtype
    config = store.config
    force = {"always": True, "never": False}.get(config.l1_bf16_cast)
    fallback = getattr(torch, config.l1_bf16_fallback)
    return needs_cast(stored, gpu, fallback=fallback, force=force)


def check_plan(store: TierStore, units: list[StreamUnit], plan: Plan, *, prefetch: int, gpu: torch.device | None,
               gpu_dtype: torch.dtype | None, mapped: bool = True, home: torch.device | None = None) -> None:
    """``ConfigError`` unless ``plan`` is for these units and the store's tiers hold what it keeps.

    L1 must hold the plan's L1 units (at the GPU dtype), L2 its L2 units plus the streaming
    reserve of the L3 units that pass through it: ``prefetch + 1`` of the largest L3 unit that is
    not mapped (stored compressed, or ``mapped=False``, or computed away from a CPU ``home``; the
    mapped ones are pages beside L2). The message names the minimum size to open the tier with.
    Where the plan runs as planned (every unit it maps stored raw, ``mapped``, a CPU ``home``), an L2
    larger than the plan's budget leaves room for (``plan.memory`` less what the plan keeps beside
    L2) is a ``ConfigError`` too: the budget would not hold.
    """
    planned = {u.name for u in plan.units}
    if planned != {u.name for u in units}:
        raise ConfigError(f"the plan is for other units ({len(planned)} planned, {len(units)} streamed here); "
                          "plan this store's model: placement.plan(placement.model_units(store), machine)")
    by_name = {u.name: u for u in plan.units}
    tiers = store.stats().tiers
    l1_need = 0
    for unit in units:
        if by_name[unit.name].tier != "L1":
            continue
        for _, _, key, _ in unit.params:
            info = store.info(key)
            dtype = gpu_dtype if gpu_dtype is not None and info.dtype.is_floating_point else info.dtype
            l1_need += info.nbytes // max(1, info.dtype.itemsize) * dtype.itemsize
    if l1_need:
        l1 = tiers.get("L1")
        if l1 is None or gpu is None or torch.device(str(l1.get("device"))).type != gpu.type:
            raise ConfigError(f"the plan keeps {len(plan.resident('L1'))} units in L1 ({format_size(l1_need)}), "
                              f"but the store has no L1 on {gpu}; open it with l1_cache_size={l1_need} or more "
                              f"(and l1_device={str(gpu)!r})", tier="L1")
        if l1_need > int(l1["capacity"]):
            raise ConfigError(f"the plan keeps {format_size(l1_need)} of units in L1, which holds "
                              f"{format_size(int(l1['capacity']))}; open the store with l1_cache_size={l1_need} "
                              "or more", tier="L1")
    maps = mapped and (home is None or home.type == "cpu")
    raw = {u.name: all(store.info(key).codec == "raw" for _, _, key, _ in u.params) for u in units
           if by_name[u.name].tier == "L3"}
    through = [u.nbytes for u in units if u.name in raw and not (maps and raw[u.name])]
    as_planned = maps and all(raw[u.name] for u in plan.units if u.tier == "L3" and u.fetch == "map")
    reserve = (max(0, prefetch) + 1) * max(through, default=0)
    l2_need = sum(u.nbytes for u in units if by_name[u.name].tier == "L2") + reserve
    l2 = tiers.get("L2")
    capacity = int(l2["capacity"]) if l2 else 0
    if l2_need > capacity:
        raise ConfigError(f"the plan keeps {len(plan.resident('L2'))} units in L2, which with the streaming reserve "
                          f"needs {format_size(l2_need)}, but L2 holds {format_size(capacity)}; open the store "
                          f"with l2_cache_size={l2_need} or more", tier="L2")
    host = plan.host
    if host is not None and as_planned:  # (a plan whose raw units are not stored raw yet runs through L2)
        room = plan.memory - (host.total - host.l2_bytes)
        if capacity > max(room, host.l2_bytes):
            raise ConfigError(f"the store's L2 of {format_size(capacity)} with what the plan keeps beside it "
                              f"({format_size(host.total - host.l2_bytes)}: fixed weights, caches, mapped pages) "
                              f"exceeds memory={format_size(plan.memory)}; open the store with "
                              f"l2_cache_size={host.l2_bytes} (plan.l2_bytes)", tier="L2")


_CACHE_KWARGS = ("cache", "past_key_values")
"""What a layer's forward calls its KV cache (transformers 5 says ``cache``; 4.x ``past_key_values``)."""


def _convert(value: Any, device: torch.device, dtype: torch.dtype | None, *, non_blocking: bool = True,
             only: torch.dtype | None = None) -> Any:
    """``value`` with every tensor in it on ``device`` (floating ones in ``dtype``); containers rebuilt.

    ``only``: cast just the floating tensors of that dtype (a unit's inputs: the activations, in the
    home dtype), and move the others as they are: Qwen3-VL's vision blocks get their rotary
    ``position_embeddings`` in float32, which the in-memory model keeps (cast to bf16, the 2B's
    vision tower drifted and its 5th greedy token differed). Copies to a CUDA device are
    asynchronous unless ``non_blocking=False`` (a source that may die, and free its pinned slot,
    before the copy ran); copies to the CPU always wait.
    """
    asynchronous = non_blocking and device.type == "cuda"
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and dtype is not None and value.dtype != dtype and \
                (only is None or value.dtype == only):
            return value.to(device=device, dtype=dtype, non_blocking=asynchronous)
        return value.to(device, non_blocking=asynchronous) if value.device != device else value
    if isinstance(value, tuple):
        return tuple(_convert(v, device, dtype, non_blocking=non_blocking, only=only) for v in value)
    if isinstance(value, list):
        return [_convert(v, device, dtype, non_blocking=non_blocking, only=only) for v in value]
    if isinstance(value, dict):
        return {k: _convert(v, device, dtype, non_blocking=non_blocking, only=only) for k, v in value.items()}
    return value


class HybridStreamer(WeightStreamer):
    """A :class:`WeightStreamer` that computes each unit on the device and from the tier its plan names."""

    def __init__(self, store: TierStore, units: list[StreamUnit], plan: Plan, *, home: torch.device,
                 home_dtype: torch.dtype | None, gpu: torch.device | None, gpu_dtype: torch.dtype | None,
                 cpu_dtype: torch.dtype | None, prefetch: int, resident_bytes: int,
                 repeat_from: int | None = None, mapped: bool = True,
                 decode_threads: int | str | None = None) -> None:
        """``home``/``home_dtype``: where the fixed weights compute (what a unit's output goes back to);
        ``gpu``/``gpu_dtype``: the plan's ``cuda``; ``cpu_dtype``: CPU-computed units (None: as stored);
        ``mapped``: the plan's L3 units stored raw are mapped, not copied into L2 (see :class:`WeightStreamer`)."""
        self.plan_units: dict[str, UnitPlan] = {u.name: u for u in plan.units}
        self.home, self.home_dtype = home, home_dtype
        self.gpu, self.gpu_dtype, self.cpu_dtype = gpu, gpu_dtype, cpu_dtype
        self.executed: dict[tuple[str, str], tuple[str, torch.dtype | None, str]] = {}
        """``(unit, phase) -> (plan device: cuda/cpu, compute dtype, weights' tier)`` of its last forward."""
        held = {u.name for u in plan.units if u.tier in ("L1", "L2")}
        super().__init__(store, units, device=home, dtype=cpu_dtype, prefetch=prefetch,
                         resident_bytes=resident_bytes, repeat_from=repeat_from, hold_names=held, mapped=mapped,
                         decode_threads=decode_threads)
        for index, unit in enumerate(units):  # the kwargs-aware hooks replace the plain ones
            for hook in unit.hooks:
                hook.remove()
            unit.hooks = [unit.module.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True),
                          unit.module.register_forward_hook(self._post_hook(index), always_call=True)]

    # -- where a unit runs --------------------------------------------------------------------------

    def _where(self, index: int, prefill: bool) -> str:
        placed = self.plan_units[self.units[index].name]
        return placed.prefill_on if prefill or placed.decode_on == "-" else placed.decode_on

    def placement(self, index: int, prefill: bool) -> tuple[torch.device, torch.dtype | None]:
        """Device and compute dtype of unit ``index`` in one phase."""
        placed = self.plan_units[self.units[index].name]
        if self._where(index, prefill) == "cuda":
            if self.gpu is None:
                raise HardwareUnavailableError(f"unit {placed.name} is planned on the GPU, but no gpu device was "
                                               "given to load_streamed")
            return self.gpu, self.gpu_dtype
        return torch.device("cpu"), self.cpu_dtype

    def _fetch(self, index: int) -> list[torch.Tensor]:
        """The unit's weights as its tier holds them: L1 slots on the GPU device, L2 views, or maps of raw L3."""
        tier = self.plan_units[self.units[index].name].tier
        device = self.gpu if tier == "L1" else None
        maps = self._maps and tier == "L3"  # streamed units: a map of raw L3 bytes, no L2 slot
        return self._get_unit([key for _, _, key, _ in self.units[index].params], device, maps)

    def _keep(self, index: int, tensors: list[torch.Tensor]) -> None:
        """Hold the views of an L1 or L2 unit (its slots stay put); an L3 unit streams.

        A fetch that found no room in the unit's tier this time is streamed this pass and held on a
        later one (as :meth:`WeightStreamer._keep`): dropping it for good left the held set short.
        """
        if index not in self._holdable:
            return
        if index not in self._held:
            tier = self.plan_units[self.units[index].name].tier
            if not all(tier in self.store.tiers_of(key) for _, _, key, _ in self.units[index].params):
                return  # this fetch bypassed the tier: the next pass tries again
        self._held[index] = tensors

    # -- hooks --------------------------------------------------------------------------------------

    def _pre_hook(self, index: int) -> Callable[..., Any]:
        def load(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            tokens = tokens_of(args, kwargs)
            prefill = tokens > 1
            device, dtype = self.placement(index, prefill)
            if device.type == "cpu":
                self.threads.enter(tokens)
            tensors = self._take(index)
            self._keep(index, tensors)
            # A held unit's views outlive any copy from them; a streamed unit's L2 slots may be reused
            # once its views die after this forward, so its host-to-device copies complete first.
            held = index in self._held
            for (owner, name, _, _), tensor in zip(self.units[index].params, tensors, strict=True):
                weight = _convert(tensor, device, dtype, non_blocking=held)
                place_param(owner, name, nn.Parameter(weight, requires_grad=False))
            self._schedule(index)
            for name in _CACHE_KWARGS:
                if kwargs.get(name) is not None:
                    _move_cache_layer(kwargs[name], module, device, dtype)
            placed = self.plan_units[self.units[index].name]
            self.executed[(placed.name, "prefill" if prefill else "decode")] = (
                self._where(index, prefill), dtype or (tensors[0].dtype if tensors else None), placed.tier)
            home = self.home_dtype  # the activations' dtype: only they are cast (not float32 rotary tables)
            return _convert(args, device, dtype, only=home), {
                k: v if k in _CACHE_KWARGS else _convert(v, device, dtype, only=home) for k, v in kwargs.items()}
        return load

    def _post_hook(self, index: int) -> Callable[..., Any]:
        def release(module: nn.Module, args: Any, output: Any) -> Any:
            for owner, name, _, placeholder in self.units[index].params:
                place_param(owner, name, placeholder)
            self.threads.leave()
            return _convert(output, self.home, self.home_dtype)
        return release


def _move_cache_layer(cache: Any, module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Move this layer's keys and values of a transformers ``Cache`` to where the layer computes now."""
    layers = getattr(cache, "layers", None)
    attn = getattr(module, "self_attn", None)
    index = getattr(attn, "layer_idx", None)
    if not isinstance(layers, list) or not isinstance(index, int) or not 0 <= index < len(layers):
        return
    layer = layers[index]
    for name in ("keys", "values"):
        value = getattr(layer, name, None)
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            setattr(layer, name, _convert(value, device, dtype))
