"""The placement planner: where each unit of a model lives and where it computes, and what that costs.

A model is its *units* (what :func:`~tierstore.integrations.streaming.load_streamed` streams one at
a time: decoder layers, a vision tower's blocks; :func:`model_units` reads their sizes from the
catalog) plus the *fixed* weights loaded once (embeddings, norms, ``lm_head``). For a
:class:`~tierstore.plan.machine.Machine` and a host memory budget, :func:`plan` gives each unit a tier
and a device per phase:

- ``L1``: resident in GPU memory, computed there;
- ``L2`` computed on the GPU: resident in pinned host memory, copied to the GPU for every token;
- ``L2`` computed on the CPU: resident in host memory, computed where it lies (llama.cpp's ``-ngl``);
- ``L3``: streamed from the compressed store for every pass, prefetched ahead of compute.

Prefill (``prefill_tokens`` tokens at once, compute-bound) and decode (one token, bandwidth-bound)
choose the device separately; the residency is shared. The KV cache (``context`` tokens) goes to
VRAM if it fits beside the activations, else to host memory; a vision cache budget is kept in host
memory when the model has a vision tower.

The cost model (every term is bytes over a bandwidth or FLOPs over a throughput):

- a unit on the GPU costs ``max(T * 2 * params / gpu_flops, bytes / vram_bandwidth)``, on the CPU
  ``max(T * 2 * params / cpu_flops, bytes / cpu_matvec)`` for ``T`` tokens (``cpu_matvec``: the
  measured rate a CPU matrix-vector product reads bf16 weights at, ``memcpy`` when not measured);
- a unit not in L1 that runs on the GPU crosses the link: ``bytes / h2d_pinned``;
- a unit in L3 is read (``stored_bytes / disk_read``) and decompressed (``bytes / decode``), and
  decompression uses the CPU that CPU-computed units need;
- units run one after another, while the prefetch thread reads, decodes and copies ahead, so a
  phase takes ``max(gpu + cpu compute, cpu compute + decode, disk, link)``: overlap is a max, not a sum.

The planner fills VRAM with decoder layers (they run for every token), then host memory up to the
budget less the fixed weights, the KV and vision caches and the streaming reserve (``prefetch + 1``
of the largest unit), vision blocks last; then it searches how many L2 units compute on the CPU and
where L3 units compute for the least decode time, and again for prefill. A budget below the
minimum is a :class:`~tierstore.errors.ConfigError` naming it. These are predictions of the model,
not measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..config import format_size
from ..errors import ConfigError, HardwareUnavailableError
from .machine import Machine

__all__ = ["Unit", "ModelUnits", "UnitPlan", "Prediction", "Plan", "Machine", "plan", "predict",
           "baselines", "physical_bound"]

MiB = 1 << 20
_HEADROOM = 256 * MiB
"""VRAM kept for activations and the CUDA context, beside an eighth of the free VRAM."""


@dataclass(frozen=True, slots=True)
class Unit:
    """One streamable unit: a decoder layer (runs every token) or a vision block (prefill only)."""

    name: str
    nbytes: int
    """Bytes as computed (after any cast)."""
    stored_bytes: int
    """Bytes in L3 (compressed): what a read from the disk costs."""
    params: int
    decoder: bool = True


@dataclass(frozen=True, slots=True)
class ModelUnits:
    """A model as the planner sees it."""

    units: tuple[Unit, ...]
    fixed_bytes: int
    head_bytes: int = 0
    """Fixed weights read for every generated token (``lm_head``, or the embeddings it is tied to)."""
    kv_bytes_per_token: int = 0


@dataclass(frozen=True, slots=True)
class UnitPlan:
    """Where one unit lives (``L1``/``L2``/``L3``) and computes per phase (``cuda``/``cpu``; ``-``: not run)."""

    name: str
    nbytes: int
    tier: str
    decode_on: str
    prefill_on: str

    @property
    def placement(self) -> str:
        """In words: ``L1``, ``L2->GPU``, ``CPU from L2``, ``L3 stream``."""
        if self.tier == "L1":
            return "L1"
        if self.tier == "L2":
            return "CPU from L2" if (self.decode_on if self.decode_on != "-" else self.prefill_on) == "cpu" \
                else "L2->GPU"
        return "L3 stream"


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the cost model predicts for one assignment."""

    ttft_s: float
    decode_s: float
    """Seconds per generated token."""
    disk_bytes_per_token: int
    link_bytes_per_token: int
    decode_limit: str
    """The resource that bounds decode: ``compute``, ``cpu+decode``, ``disk`` or ``link``."""

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput."""
        return 1.0 / self.decode_s if self.decode_s > 0 else float("inf")


@dataclass(frozen=True, slots=True)
class Plan:
    """Placements for every unit, the budgets, and the predictions."""

    machine: Machine
    memory: int
    minimum: int
    """The smallest host budget that runs the model on this plan's terms."""
    units: tuple[UnitPlan, ...]
    fixed_bytes: int
    working_bytes: int
    kv_bytes: int
    kv_tier: str
    vision_cache_bytes: int
    head_on: str
    prediction: Prediction

    def resident(self, tier: str) -> tuple[str, ...]:
        """Names of the units the plan keeps in ``tier`` (``L1`` or ``L2``) for good."""
        return tuple(u.name for u in self.units if u.tier == tier)

    @property
    def uses_gpu(self) -> bool:
        """Whether any weight is computed on the GPU."""
        return self.head_on == "cuda" or any("cuda" in (u.decode_on, u.prefill_on) for u in self.units)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``tierstore plan --json``)."""
        p = self.prediction
        return {"machine": self.machine.to_dict(), "memory": self.memory, "minimum": self.minimum,
                "fixed_bytes": self.fixed_bytes, "working_bytes": self.working_bytes, "kv_bytes": self.kv_bytes,
                "kv_tier": self.kv_tier, "vision_cache_bytes": self.vision_cache_bytes, "head_on": self.head_on,
                "units": [{"name": u.name, "nbytes": u.nbytes, "tier": u.tier, "placement": u.placement,
                           "decode_on": u.decode_on, "prefill_on": u.prefill_on} for u in self.units],
                "prediction": {"ttft_s": p.ttft_s, "decode_s": p.decode_s, "tokens_per_s": p.tokens_per_s,
                               "disk_bytes_per_token": p.disk_bytes_per_token,
                               "link_bytes_per_token": p.link_bytes_per_token, "decode_limit": p.decode_limit}}


# -- the cost model -----------------------------------------------------------------------------------


def _phase(machine: Machine, model: ModelUnits, units: Sequence[UnitPlan], tokens: int, head_on: str,
           *, decode: bool) -> tuple[float, int, int, str]:
    """Seconds, disk bytes and link bytes of one phase, and the resource that bounds it."""
    by_name = {u.name: u for u in model.units}
    gpu = cpu = unpack = disk = link = 0.0
    disk_bytes = link_bytes = 0
    for placed in units:
        where = placed.decode_on if decode else placed.prefill_on
        if where == "-":
            continue
        unit = by_name[placed.name]
        flops = tokens * 2.0 * unit.params
        if where == "cuda":
            if not (machine.gpu_flops and machine.vram_bandwidth and machine.h2d_pinned):
                raise HardwareUnavailableError(f"unit {placed.name} is placed on the GPU, but machine "
                                               f"{machine.name!r} has none; place it on the CPU or describe the GPU")
            gpu += max(flops / machine.gpu_flops, unit.nbytes / machine.vram_bandwidth)
            if placed.tier != "L1":
                link += unit.nbytes / machine.h2d_pinned
                link_bytes += unit.nbytes
        else:
            cpu += max(flops / machine.cpu_flops, unit.nbytes / machine.cpu_weight_read)
        if placed.tier == "L3":
            disk += unit.stored_bytes / machine.disk_read
            unpack += unit.nbytes / machine.decode
            disk_bytes += unit.stored_bytes
    head_flops = 2.0 * model.head_bytes / 2  # one token's logits; a 2-byte dtype
    if head_on == "cuda" and machine.gpu_flops and machine.vram_bandwidth:
        gpu += max(head_flops / machine.gpu_flops, model.head_bytes / machine.vram_bandwidth)
    else:
        cpu += max(head_flops / machine.cpu_flops, model.head_bytes / machine.cpu_weight_read)
    terms = {"compute": gpu + cpu, "cpu+decode": cpu + unpack, "disk": disk, "link": link}
    limit = max(terms, key=lambda k: terms[k])
    return terms[limit], disk_bytes, link_bytes, limit


def predict(machine: Machine, model: ModelUnits, units: Sequence[UnitPlan], *, head_on: str = "cpu",
            prefill_tokens: int = 512) -> Prediction:
    """TTFT and seconds per token of an assignment, by the cost model in the module doc."""
    ttft, _, _, _ = _phase(machine, model, units, prefill_tokens, head_on, decode=False)
    step, disk_bytes, link_bytes, limit = _phase(machine, model, units, 1, head_on, decode=True)
    return Prediction(ttft_s=ttft, decode_s=step, disk_bytes_per_token=disk_bytes, link_bytes_per_token=link_bytes,
                      decode_limit=limit)


# -- the planner --------------------------------------------------------------------------------------


def _fill(units: Sequence[Unit], capacity: int) -> list[Unit]:
    """The units taken in order while they fit in ``capacity``."""
    taken, used = [], 0
    for unit in units:
        if used + unit.nbytes <= capacity:
            taken.append(unit)
            used += unit.nbytes
    return taken


def _assign(model: ModelUnits, tiers: dict[str, str], on_cpu: set[str], l3_on: str, gpu: bool, *,
            decode: bool) -> dict[str, str]:
    """Device per unit for one phase: L1 on the GPU, L2 on the CPU if in ``on_cpu``, L3 on ``l3_on``."""
    out = {}
    for unit in model.units:
        if decode and not unit.decoder:
            out[unit.name] = "-"
        elif not gpu:
            out[unit.name] = "cpu"
        elif tiers[unit.name] == "L1":
            out[unit.name] = "cuda"
        elif tiers[unit.name] == "L2":
            out[unit.name] = "cpu" if unit.name in on_cpu else "cuda"
        else:
            out[unit.name] = l3_on
    return out


def _best_devices(machine: Machine, model: ModelUnits, tiers: dict[str, str], head_on: str, tokens: int, *,
                  decode: bool) -> dict[str, str]:
    """The device assignment of one phase with the least predicted time (a small exhaustive search)."""
    l2 = [u.name for u in model.units if tiers[u.name] == "L2" and (u.decoder or not decode)]
    if not machine.has_gpu:
        return _assign(model, tiers, set(), "cpu", False, decode=decode)
    best: tuple[float, dict[str, str]] | None = None
    for k in range(len(l2) + 1):
        for l3_on in ("cuda", "cpu"):
            devices = _assign(model, tiers, set(l2[len(l2) - k:]), l3_on, True, decode=decode)
            placed = [UnitPlan(u.name, u.nbytes, tiers[u.name], devices[u.name], devices[u.name]) for u in model.units]
            seconds = _phase(machine, model, placed, tokens, head_on, decode=decode)[0]
            if best is None or seconds < best[0] - 1e-12:
                best = (seconds, devices)
    assert best is not None
    return best[1]


def plan(model: ModelUnits, machine: Machine, *, memory: int | None = None, prefetch: int = 2,
         context: int = 4096, prefill_tokens: int = 512, vision_cache_bytes: int | None = None,
         allow_l1: bool = True) -> Plan:
    """The placement of ``model`` on ``machine`` within ``memory`` bytes of host memory (see the module doc).

    ``memory`` defaults to the machine's free RAM; ``context`` sizes the KV cache; ``vision_cache_bytes``
    defaults to 64 MiB for a model with a vision tower. ``allow_l1=False`` keeps every weight in host
    memory (the GPU still computes what is copied to it).
    """
    budget = machine.ram_free if memory is None else int(memory)
    if not model.units:
        raise ConfigError("plan: the model has no streamable units; import a decoder model first")
    has_vision = any(not u.decoder for u in model.units)
    vision_cache = (64 * MiB if has_vision else 0) if vision_cache_bytes is None else int(vision_cache_bytes)
    kv = model.kv_bytes_per_token * max(0, context)
    working = (max(0, prefetch) + 1) * max(u.nbytes for u in model.units)
    vram = 0
    if machine.has_gpu and allow_l1:
        vram = max(0, machine.vram_free - _HEADROOM - machine.vram_free // 8)
    kv_tier = "L1" if machine.has_gpu and kv <= vram else "L2"
    vram -= kv if kv_tier == "L1" else 0
    head_on = "cuda" if machine.has_gpu and model.fixed_bytes <= vram else "cpu"
    vram -= model.fixed_bytes if head_on == "cuda" else 0
    minimum = model.fixed_bytes + working + vision_cache + (kv if kv_tier == "L2" else 0)
    if budget < minimum:
        raise ConfigError(
            f"memory={format_size(budget)} is below the minimum of {format_size(minimum)} for this model: "
            f"{format_size(model.fixed_bytes)} of fixed weights, {format_size(working)} to stream "
            f"{max(0, prefetch) + 1} units, {format_size(vision_cache)} of vision cache"
            + (f", {format_size(kv)} of KV cache for {context} tokens" if kv_tier == "L2" else "")
            + f"; raise memory to at least {minimum} bytes, or lower prefetch or context")
    decoders = [u for u in model.units if u.decoder]
    l1 = _fill(decoders, vram) if machine.has_gpu else []
    tiers = {u.name: "L3" for u in model.units}
    tiers.update({u.name: "L1" for u in l1})
    rest = [u for u in decoders if tiers[u.name] == "L3"] + [u for u in model.units if not u.decoder]
    tiers.update({u.name: "L2" for u in _fill(rest, budget - minimum)})
    dec = _best_devices(machine, model, tiers, head_on, 1, decode=True)
    pre = _best_devices(machine, model, tiers, head_on, prefill_tokens, decode=False)
    placed = tuple(UnitPlan(u.name, u.nbytes, tiers[u.name], dec[u.name], pre[u.name]) for u in model.units)
    return Plan(machine=machine, memory=budget, minimum=minimum, units=placed, fixed_bytes=model.fixed_bytes,
                working_bytes=working, kv_bytes=kv, kv_tier=kv_tier, vision_cache_bytes=vision_cache,
                head_on=head_on, prediction=predict(machine, model, placed, head_on=head_on,
                                                    prefill_tokens=prefill_tokens))


# -- what the peers would do, by the same model ---------------------------------------------------------


def _accelerate(model: ModelUnits, machine: Machine, memory: int, prefill_tokens: int) -> Prediction:
    """accelerate ``device_map="auto"`` with the same ``max_memory``: GPU first, then CPU, then disk.

    Offloaded weights are copied to the GPU by a forward pre-hook on the spot (pageable memory;
    disk offload reads raw, uncompressed files), with no prefetch: the costs add up.
    """
    gpu = machine.has_gpu
    vram = max(0, machine.vram_free - _HEADROOM - machine.vram_free // 8 - model.fixed_bytes) if gpu else 0
    l1 = {u.name for u in _fill(model.units, vram)}
    l2 = {u.name for u in _fill([u for u in model.units if u.name not in l1], max(0, memory - model.fixed_bytes))}
    link = machine.h2d_pageable or machine.h2d_pinned or float("inf")

    def phase(tokens: int, decode: bool) -> tuple[float, int, int]:
        total, disk_bytes, link_bytes = 0.0, 0, 0
        for unit in model.units:
            if decode and not unit.decoder:
                continue
            flops = tokens * 2.0 * unit.params
            if gpu and machine.gpu_flops and machine.vram_bandwidth:
                total += max(flops / machine.gpu_flops, unit.nbytes / machine.vram_bandwidth)
            else:
                total += max(flops / machine.cpu_flops, unit.nbytes / machine.cpu_weight_read)
            if unit.name not in l1 and unit.name not in l2:
                total += unit.nbytes / machine.disk_read
                disk_bytes += unit.nbytes
            if gpu and unit.name not in l1:
                total += unit.nbytes / link
                link_bytes += unit.nbytes
        return total, disk_bytes, link_bytes

    ttft, _, _ = phase(prefill_tokens, False)
    step, disk_bytes, link_bytes = phase(1, True)
    return Prediction(ttft, step, disk_bytes, link_bytes, "sum (no overlap)")


def physical_bound(model: ModelUnits, machine: Machine, memory: int) -> float:
    """Seconds per token no placement beats: bytes per token over the fastest path each can take.

    Decoder bytes that fit in VRAM are read at the VRAM bandwidth, the rest at the faster of host
    memory and the link; those beyond VRAM and the host budget come from the disk (stored size),
    which overlaps the rest. Compute and decompression are taken as free.
    """
    decoders = sorted((u for u in model.units if u.decoder), key=lambda u: u.nbytes)
    vram = max(0, machine.vram_free - _HEADROOM) if machine.has_gpu else 0
    vram_names = {u.name for u in _fill(decoders, vram)}
    in_vram = sum(u.nbytes for u in decoders if u.name in vram_names)
    host_units = [u for u in decoders if u.name not in vram_names]
    host_names = {u.name for u in _fill(host_units, max(0, memory - model.fixed_bytes))}
    disk = sum(u.stored_bytes for u in host_units if u.name not in host_names)
    fast = max(machine.memcpy, machine.h2d_pinned or 0.0)
    memory_time = in_vram / (machine.vram_bandwidth or fast) + sum(u.nbytes for u in host_units) / fast
    return max(memory_time, disk / machine.disk_read)


def baselines(model: ModelUnits, machine: Machine, memory: int, *, prefill_tokens: int = 512,
              prefetch: int = 2) -> dict[str, Prediction]:
    """The planner's plan beside stream-everything, accelerate-style offload and CPU only, for one budget."""
    out = {"planner": plan(model, machine, memory=memory, prefill_tokens=prefill_tokens, prefetch=prefetch).prediction}
    streamed = [UnitPlan(u.name, u.nbytes, "L3", ("cuda" if machine.has_gpu else "cpu") if u.decoder else "-",
                         "cuda" if machine.has_gpu else "cpu") for u in model.units]
    out["stream everything"] = predict(machine, model, streamed, head_on="cuda" if machine.has_gpu else "cpu",
                                       prefill_tokens=prefill_tokens)
    out["accelerate offload"] = _accelerate(model, machine, memory, prefill_tokens)
    cpu_only = replace(machine, h2d_pinned=None, h2d_pageable=None, gpu_flops=None, vram_bandwidth=None, vram_free=0)
    out["CPU only"] = plan(model, cpu_only, memory=memory, prefill_tokens=prefill_tokens, prefetch=prefetch).prediction
    return out
