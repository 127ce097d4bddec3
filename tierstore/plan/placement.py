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
  ``max(T * 2 * params / cpu_flops, bytes / cpu_matvec)`` for ``T`` tokens, and for one token
  (decode) ``bytes / cpu_matvec`` where that rate was measured (``cpu_matvec``: the rate a CPU
  matrix-vector product reads bf16 weights at, measured at one token and the model's own shapes,
  so it is the kernel's speed whatever a bf16 GEMM's FLOP/s are; ``memcpy`` when not measured);
  the head (``lm_head``) at its own measured rate, ``head_matvec`` (one vocab-wide matrix runs
  3-4x faster per byte than a layer's projections on the bench VM);
- a unit not in L1 that runs on the GPU crosses the link: ``bytes / h2d_pinned`` (a mapped unit,
  not pinned: ``h2d_pageable``);
- a unit in L3 is *fetched* for every pass, one of three ways (:attr:`UnitPlan.fetch`): ``decode``
  (stored compressed: read ``stored_bytes``, decompress, check), ``read`` (stored raw: ``pread``
  into its L2 slot, check) or ``map`` (stored raw: the page cache's pages used in place, no copy).
  Its CPU cost is :meth:`Machine.fetch_seconds` (one thread's CPU-seconds: ``stored /
  page_cache_read + bytes / (decode / cores) + bytes / checksum`` for ``decode``, ``bytes /
  page_cache_read + bytes / checksum`` for ``read``, ``bytes / map_populate`` for ``map``, plus
  ``bytes / checksum`` when the store checks the map: every pass under ``verify_maps="always"``,
  under ``"disk"`` (the store's default ``l3_verify_maps``) every pass that reads from the disk,
  only the first when the files stay in the page cache; under ``"once"`` the first pass only);
- **the page cache**: the files of every L3 unit (``stored_bytes`` compressed, ``bytes`` raw) fit
  in the page cache when their sum is at most ``ram_free - memory - 1 GiB`` (free RAM outside the
  budget, less the process's own overhead); then every pass after the first reads them from memory
  and decode reads nothing from the disk. Else each pass reads them from the disk,
  ``file_bytes / disk_read`` (no CPU). TTFT is the first pass: always from the disk;
- **cores are shared**: compute keeps ``k = threads_computing`` of the ``c = cores`` busy for its
  ``cpu`` seconds; the fetch threads' ``F`` CPU-seconds fit beside it only on the spare cores, so
  the CPU side takes ``max(cpu, (k * cpu + F) / c)``: with ``k = c`` (torch's default, a bf16
  matvec on every core) fetching *adds* ``F / c`` to compute, with spare cores it overlaps
  (or, with :attr:`Machine.compute_share` measured, by the measured shares). That is a decode with
  ``load_streamed(decode_threads=None)``; by default (``"auto"``, :attr:`Machine.streams_on_spare_core`)
  a one-token forward of a streamed unit runs on ``c - 1`` threads while anything is fetched, the
  fetch thread on the core left: its products at :attr:`Machine.spare_core_matvec` and the CPU side
  ``max(cpu, F)`` (on the 2-core bench VM torch's threads spun on both cores and starved the fetch
  thread, see :mod:`tierstore.integrations.decode_threads`);
- units run one after another, while the prefetch threads read, decode and copy ahead, so a phase
  takes ``max(gpu + cpu compute, cpu side, disk, link)``: overlap is a max, not a sum.

The planner fills VRAM with decoder layers (they run for every token), then host memory up to the
budget less what streaming needs beside the held units (:class:`HostMemory`, :func:`host_memory`):
the fixed weights, the KV and vision caches, L2's working reserve of ``prefetch + 1`` of the
largest unit fetched through it (``decode``/``read``) with one such unit of slack and
:data:`SLAB_RESERVE`, and the pages of ``prefetch + 1`` of the largest *mapped* unit, which are
beside L2, not in it; held units count at their L2 slot sizes (the allocator's rounding,
:attr:`Unit.slot_bytes`). Vision blocks are held last. Then it searches how many L2 units compute
on the CPU and where L3 units compute for the least decode time, and again for prefill; how
streamed units are fetched is chosen the same way (``decode``, or ``read``/``map`` where the unit
is stored raw or the plan may ask for it to be, :attr:`Plan.raw_units`: a block that streams
every token is better raw when decoding it would be the bottleneck), each choice with the held
set its own reserves leave room for. :attr:`Plan.l2_bytes` is the L2 to open the store with. A
budget below the least that any choice needs is a :class:`~tierstore.errors.ConfigError` naming
it. These are predictions of the model, not measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..config import format_size
from ..errors import ConfigError, HardwareUnavailableError
from .machine import Machine
from .page_cache import cache_room

__all__ = ["Unit", "ModelUnits", "UnitPlan", "Prediction", "Plan", "HostMemory", "Machine", "plan", "predict",
           "baselines", "physical_bound", "host_memory", "FETCH_MODES", "SLAB_RESERVE"]

MiB = 1 << 20
_HEADROOM = 256 * MiB
"""VRAM kept for activations and the CUDA context, beside an eighth of the free VRAM."""
FETCH_MODES = ("decode", "read", "map")
"""How a streamed unit comes from L3: decompressed, ``pread`` raw into L2, or mapped from the page cache."""


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
    slot_bytes: int = 0
    """Bytes its tensors take in L2 once the allocator rounded each (page runs, size classes); 0: ``nbytes``."""

    @property
    def l2_bytes(self) -> int:
        """What holding it in L2 takes: :attr:`slot_bytes`, else ``nbytes``."""
        return max(self.slot_bytes, self.nbytes)

    @property
    def compressed(self) -> bool:
        """Whether L3 keeps it compressed (smaller than computed): ``decode`` is how it streams as stored."""
        return self.stored_bytes < self.nbytes

    def file_bytes(self, fetch: str) -> int:
        """Bytes of its L3 files when fetched by ``fetch``: ``stored_bytes`` to decode, else ``nbytes`` (raw)."""
        return self.stored_bytes if fetch == "decode" else self.nbytes


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
    fetch: str = "stored"
    """An L3 unit's fetch (:data:`FETCH_MODES`); ``stored``: as the store keeps it (``decode`` if compressed)."""

    def fetch_of(self, unit: Unit) -> str:
        """The fetch this plan makes of ``unit``: ``stored`` resolved, and a raw unit never ``decode``."""
        if self.fetch == "stored" or (self.fetch == "decode" and not unit.compressed):
            return "decode" if unit.compressed else "read"
        return self.fetch

    @property
    def placement(self) -> str:
        """In words: ``L1``, ``L2->GPU``, ``CPU from L2``, ``L3 stream``."""
        if self.tier == "L1":
            return "L1"
        if self.tier == "L2":
            return "CPU from L2" if (self.decode_on if self.decode_on != "-" else self.prefill_on) == "cpu" \
                else "L2->GPU"
        return {"read": "L3 read", "map": "L3 mapped"}.get(self.fetch, "L3 stream")


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the cost model predicts for one assignment."""

    ttft_s: float
    decode_s: float
    """Seconds per generated token."""
    disk_bytes_per_token: int
    link_bytes_per_token: int
    decode_limit: str
    """The resource that bounds decode: ``compute``, ``cpu+fetch``, ``disk`` or ``link``."""
    l3_bytes_per_token: int = 0
    """Bytes of weights fetched from L3 per token (as computed, whether from the disk or the page cache)."""
    page_cache: bool = False
    """Whether the model took the L3 files to be in the page cache after the first pass (see the module doc)."""

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput."""
        return 1.0 / self.decode_s if self.decode_s > 0 else float("inf")


SLAB_RESERVE = 2 * MiB
"""L2 kept beside the held units for the allocator's partly filled slabs (two 1 MiB slabs: the size classes
small tensors share, measured at 1/16 of the 2B's width; see ``stream_budget.mapped_slack``)."""


@dataclass(frozen=True, slots=True)
class HostMemory:
    """Where a plan's host budget goes, in bytes: what must fit in ``memory`` for the budget to hold.

    L2 is opened at :attr:`l2_bytes` (and prefaulted: all of it counts); mapped units' pages come
    beside it while they are viewed. Outside the budget, as for ``memory=`` (BENCHMARKS.md measures
    that overhead): the interpreter and libraries, activations, and the L3 reader's per-thread
    buffers (a compressed piece in flight and a decode scratch, at most ~3 MiB per read thread).
    """

    fixed: int
    """Weights loaded once (embeddings, norms, ``lm_head``) that stay in host memory."""
    caches: int
    """The KV cache (when it is in host memory) and the vision cache."""
    held: int
    """L2 slots of the units held resident (the allocator's rounding included)."""
    l2_working: int
    """L2 for the units streamed through it (compressed, or raw and copied): ``prefetch + 1`` of the largest."""
    l2_slack: int
    """L2 kept free so a streamed unit's tensors find contiguous room (one such unit), plus :data:`SLAB_RESERVE`
    (at most the largest unit: a small model's units leave less than that in partly filled slabs)."""
    mapped: int
    """Pages of the mapped units being viewed: ``prefetch + 1`` of the largest unit streamed as a map."""

    @property
    def l2_bytes(self) -> int:
        """The L2 capacity to open the store with: held + working + slack."""
        return self.held + self.l2_working + self.l2_slack

    @property
    def total(self) -> int:
        """All of it: what ``memory`` must cover."""
        return self.fixed + self.caches + self.l2_bytes + self.mapped

    def to_dict(self) -> dict[str, int]:
        """JSON-ready, with the totals."""
        return {"fixed": self.fixed, "caches": self.caches, "held": self.held, "l2_working": self.l2_working,
                "l2_slack": self.l2_slack, "mapped": self.mapped, "l2_bytes": self.l2_bytes, "total": self.total}


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
    raw_units: tuple[str, ...] = ()
    """Units stored compressed that the plan streams raw (``read``/``map``): what ``tierstore plan --apply``
    rewrites raw."""
    l3_file_bytes: int = 0
    """Bytes of the streamed units' L3 files, as the plan fetches them."""
    page_cache_room: int = 0
    """Free RAM outside the budget the model counts as page cache (``ram_free - memory - 1 GiB``)."""
    host: HostMemory | None = None
    """Where the budget goes (:class:`HostMemory`): ``host.l2_bytes`` is the L2 to open the store with."""

    @property
    def l2_bytes(self) -> int:
        """The L2 capacity this plan runs in (held units, the working reserve of units streamed through L2, slack).

        Open the store with ``l2_cache_size=plan.l2_bytes`` (after ``tierstore plan --apply`` when
        :attr:`raw_units` is not empty: the prediction and the budget assume them mapped).
        """
        return self.host.l2_bytes if self.host is not None else \
            sum(u.nbytes for u in self.units if u.tier == "L2") + self.working_bytes

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
                "raw_units": list(self.raw_units), "l3_file_bytes": self.l3_file_bytes,
                "page_cache_room": self.page_cache_room, "l2_bytes": self.l2_bytes,
                "host": self.host.to_dict() if self.host is not None else None,
                "units": [{"name": u.name, "nbytes": u.nbytes, "tier": u.tier, "placement": u.placement,
                           "decode_on": u.decode_on, "prefill_on": u.prefill_on, "fetch": u.fetch,
                           "storage": "raw" if u.name in self.raw_units else "as stored"} for u in self.units],
                "prediction": {"ttft_s": p.ttft_s, "decode_s": p.decode_s, "tokens_per_s": p.tokens_per_s,
                               "disk_bytes_per_token": p.disk_bytes_per_token,
                               "l3_bytes_per_token": p.l3_bytes_per_token, "page_cache": p.page_cache,
                               "link_bytes_per_token": p.link_bytes_per_token, "decode_limit": p.decode_limit}}


# -- the cost model -----------------------------------------------------------------------------------


def l3_file_bytes(model: ModelUnits, units: Sequence[UnitPlan]) -> int:
    """Bytes of the L3 files the streamed units of ``units`` are fetched from (compressed or raw)."""
    by_name = {u.name: u for u in model.units}
    return sum(by_name[p.name].file_bytes(p.fetch_of(by_name[p.name])) for p in units if p.tier == "L3")


def _cpu_seconds(machine: Machine, nbytes: int, params: int, tokens: int, rate: float) -> float:
    """One CPU product over ``nbytes`` of weights for ``tokens`` tokens.

    One token with a measured matvec rate is that rate (it was measured at one token: it is the
    kernel's speed, whatever the dtype's matmul FLOP/s; on a CPU without bf16 arithmetic a bf16
    GEMM's FLOP/s are below what the one-token kernel reaches); else the slower of the FLOPs and the bytes.
    """
    if tokens == 1 and machine.cpu_matvec is not None:
        return nbytes / rate
    return max(tokens * 2.0 * params / machine.cpu_flops, nbytes / rate)


def _cpu_side(machine: Machine, cpu: float, fetch: float) -> float:
    """Seconds of the host's compute (``cpu``, alone) and fetching (``fetch`` CPU-seconds, one thread) together.

    With spare cores, or without a measured :attr:`Machine.compute_share`: ``max(cpu, (k * cpu + fetch) / c)``
    (an even share of the cores). With compute on every core and the shares measured: while both run,
    compute advances at ``compute_share`` of its speed and fetching at ``fetch_share``; whichever is
    left then runs at full speed.
    """
    even = max(cpu, (machine.threads_computing * cpu + fetch) / machine.cores)
    share = machine.compute_share
    if share is None or fetch <= 0 or cpu <= 0 or machine.threads_computing < machine.cores:
        return even
    other = machine.fetch_share or 1.0
    both = min(cpu / share, fetch / other)
    return both + (cpu - share * both) + (fetch - other * both)


def _phase(machine: Machine, model: ModelUnits, units: Sequence[UnitPlan], tokens: int, head_on: str,
           *, decode: bool, cached: bool = False, verify_maps: str = "disk") -> tuple[float, int, int, str, int]:
    """Seconds, disk bytes, link bytes, the bounding resource and L3 bytes of one phase (the module doc's model).

    ``cached``: the L3 files are in the page cache (read from memory, no disk time). ``verify_maps``: the
    store's ``l3_verify_maps`` (``always``: every map is checksummed; ``disk``: those that read from the
    disk, every pass unless ``cached``; ``once``: only the first pass's).
    """
    checked = verify_maps == "always" or not decode or (verify_maps == "disk" and not cached)
    by_name = {u.name: u for u in model.units}
    # a one-token decode that streams on the CPU computes its units on cores - 1 threads, the prefetch
    # thread on the core left (load_streamed's decode_threads="auto"): priced so when anything is fetched
    spare = tokens == 1 and machine.streams_on_spare_core and any(
        p.tier == "L3" and p.decode_on == "cpu" for p in units)
    gpu = cpu = fetch = disk = link = 0.0
    disk_bytes = link_bytes = l3_bytes = 0
    for placed in units:
        where = placed.decode_on if decode else placed.prefill_on
        if where == "-":
            continue
        unit = by_name[placed.name]
        how = placed.fetch_of(unit) if placed.tier == "L3" else "-"
        flops = tokens * 2.0 * unit.params
        if where == "cuda":
            if not (machine.gpu_flops and machine.vram_bandwidth and machine.h2d_pinned):
                raise HardwareUnavailableError(f"unit {placed.name} is placed on the GPU, but machine "
                                               f"{machine.name!r} has none; place it on the CPU or describe the GPU")
            gpu += max(flops / machine.gpu_flops, unit.nbytes / machine.vram_bandwidth)
            if placed.tier != "L1":
                link += unit.nbytes / ((machine.h2d_pageable or machine.h2d_pinned) if how == "map"
                                       else machine.h2d_pinned)
                link_bytes += unit.nbytes
        else:
            cpu += _cpu_seconds(machine, unit.nbytes, unit.params, tokens,
                                machine.spare_core_read if spare else machine.cpu_weight_read)
        if tokens == 1:
            cpu += machine.unit_overhead or 0.0  # the framework's share of a layer, on the host
        if placed.tier == "L3":
            fetch += machine.fetch_seconds(unit.nbytes, unit.stored_bytes, how, checked=checked)
            l3_bytes += unit.nbytes
            if not cached:
                disk += unit.file_bytes(how) / machine.disk_read
                disk_bytes += unit.file_bytes(how)
    head_flops = 2.0 * model.head_bytes / 2  # one token's logits; a 2-byte dtype
    if head_on == "cuda" and machine.gpu_flops and machine.vram_bandwidth:
        gpu += max(head_flops / machine.gpu_flops, model.head_bytes / machine.vram_bandwidth)
    else:
        cpu += _cpu_seconds(machine, model.head_bytes, model.head_bytes // 2, 1, machine.head_weight_read)
    cpu_side = max(cpu, fetch) if spare else _cpu_side(machine, cpu, fetch)  # spare: fetching has its own core
    terms = {"compute": gpu + cpu, "cpu+fetch": cpu_side, "disk": disk, "link": link}
    limit = max(terms, key=lambda k: terms[k])
    return terms[limit], disk_bytes, link_bytes, limit, l3_bytes


def predict(machine: Machine, model: ModelUnits, units: Sequence[UnitPlan], *, head_on: str = "cpu",
            prefill_tokens: int = 512, memory: int | None = None, verify_maps: str = "disk") -> Prediction:
    """TTFT and seconds per token of an assignment, by the cost model in the module doc.

    ``memory``: the host budget, for the page cache (``None``: the L3 files are read from the disk on
    every pass). TTFT is priced cold (the first pass reads from the disk). ``verify_maps``: the store's
    ``l3_verify_maps``, what a mapped unit's checksum costs per pass.
    """
    cached = memory is not None and l3_file_bytes(model, units) <= cache_room(machine, memory)
    ttft = _phase(machine, model, units, prefill_tokens, head_on, decode=False)[0]
    step, disk_bytes, link_bytes, limit, l3 = _phase(machine, model, units, 1, head_on, decode=True, cached=cached,
                                                     verify_maps=verify_maps)
    return Prediction(ttft_s=ttft, decode_s=step, disk_bytes_per_token=disk_bytes, link_bytes_per_token=link_bytes,
                      decode_limit=limit, l3_bytes_per_token=l3, page_cache=cached)


# -- the planner --------------------------------------------------------------------------------------


def _fill(units: Sequence[Unit], capacity: int) -> list[Unit]:
    """The units taken in order while they fit in ``capacity``."""
    taken, used = [], 0
    for unit in units:
        if used + unit.l2_bytes <= capacity:
            taken.append(unit)
            used += unit.l2_bytes
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


def _placed(model: ModelUnits, tiers: dict[str, str], decode: dict[str, str], prefill: dict[str, str],
            fetch: dict[str, str]) -> list[UnitPlan]:
    return [UnitPlan(u.name, u.nbytes, tiers[u.name], decode[u.name], prefill[u.name], fetch.get(u.name, "-"))
            for u in model.units]


def _best_devices(machine: Machine, model: ModelUnits, tiers: dict[str, str], fetch: dict[str, str], head_on: str,
                  tokens: int, *, decode: bool, cached: bool,
                  verify_maps: str = "disk") -> tuple[float, dict[str, str]]:
    """The device assignment of one phase with the least predicted time (a small exhaustive search)."""
    l2 = [u.name for u in model.units if tiers[u.name] == "L2" and (u.decoder or not decode)]
    options = [(set(), "cpu", False)] if not machine.has_gpu else \
        [(set(l2[len(l2) - k:]), l3_on, True) for k in range(len(l2) + 1) for l3_on in ("cuda", "cpu")]
    best: tuple[float, dict[str, str]] | None = None
    for on_cpu, l3_on, gpu in options:
        devices = _assign(model, tiers, on_cpu, l3_on, gpu, decode=decode)
        seconds = _phase(machine, model, _placed(model, tiers, devices, devices, fetch), tokens, head_on,
                         decode=decode, cached=cached, verify_maps=verify_maps)[0]
        if best is None or seconds < best[0] - 1e-12:
            best = (seconds, devices)
    assert best is not None
    return best


def _fetch_rules(model: ModelUnits, tiers: dict[str, str], *, rewrite: bool, mapped: bool) -> list[dict[str, str]]:
    """Candidate fetches of every unit not in L1, were it streamed: as stored, or the last ``k`` decoder units raw.

    Decoder units are the candidates (they stream every token; a vision block runs once, in the
    cold first pass, where a raw file is only bigger), the last ones first: the held units are the
    first (see :func:`plan`), so the raw ones are those that stream. ``k`` takes every value up to
    16 units, else nine points from 0 to all: the cost is linear in ``k`` within each term of the max.
    When raw units are mapped, one more: every unit raw, vision blocks too (nothing then streams
    through L2, so L2 needs no working reserve and holds more).
    """
    streamable = [u for u in model.units if tiers[u.name] != "L1"]
    how = "map" if mapped else "read"
    base = {u.name: "decode" if u.compressed else how for u in streamable}
    switchable = [u for u in streamable if u.compressed and u.decoder] if rewrite else []
    n = len(switchable)
    points = range(1, n + 1) if n <= 16 else sorted({round(n * i / 8) for i in range(1, 9)})
    rules = [base] + [{**base, **{u.name: how for u in switchable[n - k:]}} for k in points]
    if rewrite and mapped and any(u.compressed and not u.decoder for u in streamable):
        # every unit raw: no unit streams through L2, whose working reserve then holds another decoder layer
        rules.append({u.name: how for u in streamable})
    return rules


def host_memory(model: ModelUnits, tiers: dict[str, str], fetch: dict[str, str], *, prefetch: int,
                caches: int) -> HostMemory:
    """Where the host budget goes for ``tiers`` when every unit not in L1 would be fetched as ``fetch`` says.

    The working reserves are sized over every unit that is not in L1, held or not (a held unit may
    have to stream while it is not yet in place, and the reserve does not move as the held set
    grows): ``prefetch + 1`` of the largest unit fetched through L2 (``decode``/``read``) in L2,
    with one such unit of slack, and ``prefetch + 1`` of the largest mapped unit as pages beside L2.
    """
    streamable = [u for u in model.units if tiers[u.name] != "L1"]
    through = max((u.nbytes for u in streamable if fetch.get(u.name) != "map"), default=0)
    maps = max((u.nbytes for u in streamable if fetch.get(u.name) == "map"), default=0)
    depth = max(0, prefetch) + 1
    slabs = min(SLAB_RESERVE, max((u.nbytes for u in streamable), default=0))
    return HostMemory(fixed=model.fixed_bytes, caches=caches,
                      held=sum(u.l2_bytes for u in model.units if tiers[u.name] == "L2"),
                      l2_working=depth * through, l2_slack=through + slabs, mapped=depth * maps)


def plan(model: ModelUnits, machine: Machine, *, memory: int | None = None, prefetch: int = 2,
         context: int = 4096, prefill_tokens: int = 512, vision_cache_bytes: int | None = None,
         allow_l1: bool = True, rewrite: bool = True, mapped: bool = True, verify_maps: str = "disk") -> Plan:
    """The placement of ``model`` on ``machine`` within ``memory`` bytes of host memory (see the module doc).

    ``memory`` defaults to the machine's free RAM; ``context`` sizes the KV cache; ``vision_cache_bytes``
    defaults to 64 MiB for a model with a vision tower. ``allow_l1=False`` keeps every weight in host
    memory (the GPU still computes what is copied to it). ``rewrite=False`` streams every unit as
    stored (no :attr:`Plan.raw_units`); raw units stream as page-cache views (``map``), as
    ``load_streamed`` fetches them by default; ``mapped=False`` prices them as copies into L2
    (``read``), as ``load_streamed(mapped=False)`` does. ``verify_maps`` is the store's
    ``l3_verify_maps`` (``disk``, the default: a map that reads from the disk is checksummed, priced per mapped byte;
    ``always``: every map; ``once``: the first).

    The whole of :class:`HostMemory` must fit in ``memory``: the fixed weights, the caches, L2 (held
    units with the allocator's rounding, the working reserve of units streamed through it, slack),
    and the mapped units' pages. A budget below the least of that over the
    fetch choices is a ``ConfigError`` naming it.
    """
    budget = machine.ram_free if memory is None else int(memory)
    if not model.units:
        raise ConfigError("plan: the model has no streamable units; import a decoder model first")
    if verify_maps not in ("always", "disk", "once"):
        raise ConfigError(f"plan: verify_maps must be 'always', 'disk' or 'once' (the store's l3_verify_maps), "
                          f"not {verify_maps!r}")
    has_vision = any(not u.decoder for u in model.units)
    vision_cache = (64 * MiB if has_vision else 0) if vision_cache_bytes is None else int(vision_cache_bytes)
    kv = model.kv_bytes_per_token * max(0, context)
    vram = 0
    if machine.has_gpu and allow_l1:
        vram = max(0, machine.vram_free - _HEADROOM - machine.vram_free // 8)
    kv_tier = "L1" if machine.has_gpu and kv <= vram else "L2"
    vram -= kv if kv_tier == "L1" else 0
    head_on = "cuda" if machine.has_gpu and model.fixed_bytes <= vram else "cpu"
    vram -= model.fixed_bytes if head_on == "cuda" else 0
    caches = vision_cache + (kv if kv_tier == "L2" else 0)
    decoders = [u for u in model.units if u.decoder]
    l1 = _fill(decoders, vram) if machine.has_gpu else []
    streamed = {u.name: "L3" for u in model.units}
    streamed.update({u.name: "L1" for u in l1})
    rest = [u for u in decoders if streamed[u.name] == "L3"] + [u for u in model.units if not u.decoder]
    room = cache_room(machine, budget)
    minimum: HostMemory | None = None
    best: tuple[float, tuple[int, int], dict[str, str], dict[str, str], dict[str, str], HostMemory] | None = None
    for rule in _fetch_rules(model, streamed, rewrite=rewrite, mapped=mapped):
        empty = host_memory(model, streamed, rule, prefetch=prefetch, caches=caches)
        if minimum is None or empty.total < minimum.total:
            minimum = empty
        if empty.total > budget:
            continue
        tiers = dict(streamed)
        tiers.update({u.name: "L2" for u in _fill(rest, budget - empty.total)})
        fetch = {name: how for name, how in rule.items() if tiers[name] == "L3"}
        files = sum(u.file_bytes(fetch[u.name]) for u in model.units if u.name in fetch)
        seconds, dec = _best_devices(machine, model, tiers, fetch, head_on, 1, decode=True, cached=files <= room,
                                     verify_maps=verify_maps)
        changed = sum(1 for u in model.units if u.name in fetch and u.compressed and fetch[u.name] != "decode")
        streams = sum(u.nbytes for u in model.units if u.name in fetch)
        # a tie holds more (fewer bytes streamed), then keeps fewer rewrites (less disk)
        if best is None or seconds < best[0] * (1 - 1e-9) or \
                (seconds <= best[0] * (1 + 1e-9) and (streams, changed) < best[1]):
            best = (seconds, (streams, changed), tiers, fetch, dec,
                    host_memory(model, tiers, rule, prefetch=prefetch, caches=caches))
    assert minimum is not None
    if best is None:
        m = minimum
        raise ConfigError(
            f"memory={format_size(budget)} is below the minimum of {format_size(m.total)} for this model: "
            f"{format_size(m.fixed)} of fixed weights, {format_size(m.l2_working + m.l2_slack + m.mapped)} to "
            f"stream {max(0, prefetch) + 1} units (L2 working reserve and slack, mapped pages), "
            f"{format_size(vision_cache)} of vision cache"
            + (f", {format_size(kv)} of KV cache for {context} tokens" if kv_tier == "L2" else "")
            + f"; raise memory to at least {m.total} bytes, "
            "or lower prefetch or context")
    _, _, tiers, fetch, dec, host = best
    pre = _best_devices(machine, model, tiers, fetch, head_on, prefill_tokens, decode=False, cached=False)[1]
    placed = tuple(_placed(model, tiers, dec, pre, fetch))
    raw = tuple(u.name for u in model.units if u.name in fetch and u.compressed and fetch[u.name] != "decode")
    return Plan(machine=machine, memory=budget, minimum=minimum.total, units=placed, fixed_bytes=model.fixed_bytes,
                working_bytes=host.l2_working + host.mapped, kv_bytes=kv, kv_tier=kv_tier,
                vision_cache_bytes=vision_cache, head_on=head_on,
                prediction=predict(machine, model, placed, head_on=head_on, prefill_tokens=prefill_tokens,
                                   memory=budget, verify_maps=verify_maps),
                raw_units=raw, l3_file_bytes=l3_file_bytes(model, placed), page_cache_room=room, host=host)


# -- what the peers would do, by the same model ---------------------------------------------------------


def _accelerate(model: ModelUnits, machine: Machine, memory: int, prefill_tokens: int) -> Prediction:
    """accelerate ``device_map="auto"`` with the same ``max_memory``: GPU first, then CPU, then disk.

    Offloaded weights are loaded by a forward pre-hook on the spot, with no prefetch: the costs add
    up. To the GPU they are copied from pageable memory. "Disk" offload of a safetensors checkpoint
    reads the checkpoint's own files: per weight, ``safe_open`` maps the file ``MAP_PRIVATE`` and
    ``get_tensor`` returns a view of the weight's range in that map (safetensors 0.8: no copy), so
    a CPU product faults the pages in itself and the map goes when the hook drops the weight after
    the forward. After the first pass the files are in the page cache when they fit in it (as
    :mod:`tierstore.plan.page_cache` counts it): an offloaded unit's decode is ``bytes /
    mapped_matvec`` (that product over fresh maps, measured), or without the measurement its product
    plus a copy at ``page_cache_read``; else they are read from the disk (``bytes / disk_read``).
    TTFT is the cold first pass.
    """
    gpu = machine.has_gpu
    vram = max(0, machine.vram_free - _HEADROOM - machine.vram_free // 8 - model.fixed_bytes) if gpu else 0
    l1 = {u.name for u in _fill(model.units, vram)}
    l2 = {u.name for u in _fill([u for u in model.units if u.name not in l1], max(0, memory - model.fixed_bytes))}
    link = machine.h2d_pageable or machine.h2d_pinned or float("inf")
    offloaded = sum(u.nbytes for u in model.units if u.name not in l1 and u.name not in l2)
    cached = offloaded <= cache_room(machine, memory)

    def phase(tokens: int, decode: bool) -> tuple[float, int, int]:
        total, disk_bytes, link_bytes = 0.0, 0, 0
        for unit in model.units:
            if decode and not unit.decoder:
                continue
            flops = tokens * 2.0 * unit.params
            offloaded = unit.name not in l1 and unit.name not in l2
            # a CPU product over a fresh map of the cached file faults its pages in itself: one measured rate
            mapped_rate = machine.mapped_matvec if not gpu and offloaded and decode and cached else None
            if gpu and machine.gpu_flops and machine.vram_bandwidth:
                total += max(flops / machine.gpu_flops, unit.nbytes / machine.vram_bandwidth)
            elif mapped_rate is not None:
                total += unit.nbytes / mapped_rate
            else:
                total += _cpu_seconds(machine, unit.nbytes, unit.params, tokens, machine.cpu_weight_read)
            if tokens == 1:
                total += machine.unit_overhead or 0.0
            if offloaded and mapped_rate is None:
                if decode and cached:
                    total += unit.nbytes / (machine.page_cache_read or machine.memcpy)
                else:
                    total += unit.nbytes / machine.disk_read
                    disk_bytes += unit.nbytes
            if gpu and unit.name not in l1:
                total += unit.nbytes / link
                link_bytes += unit.nbytes
        if decode:  # one token's logits
            if gpu and machine.gpu_flops and machine.vram_bandwidth:
                total += model.head_bytes / machine.vram_bandwidth
            else:
                total += _cpu_seconds(machine, model.head_bytes, model.head_bytes // 2, 1, machine.head_weight_read)
        return total, disk_bytes, link_bytes

    ttft, _, _ = phase(prefill_tokens, False)
    step, disk_bytes, link_bytes = phase(1, True)
    return Prediction(ttft, step, disk_bytes, link_bytes, "sum (no overlap)", page_cache=cached)


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
                                       prefill_tokens=prefill_tokens, memory=memory)
    out["accelerate offload"] = _accelerate(model, machine, memory, prefill_tokens)
    cpu_only = replace(machine, h2d_pinned=None, h2d_pageable=None, gpu_flops=None, vram_bandwidth=None, vram_free=0)
    out["CPU only"] = plan(model, cpu_only, memory=memory, prefill_tokens=prefill_tokens, prefetch=prefetch).prediction
    return out
