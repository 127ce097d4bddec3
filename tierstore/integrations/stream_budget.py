"""How a memory budget splits between the weights a streamed model always holds and the store's L2.

A model streamed by :func:`~.streaming.load_streamed` holds two kinds of host memory for its weights:
the *fixed* weights loaded once (embeddings, norms, ``lm_head``, a vision tower's patch embedding
and mergers) and the store's L2 arena, which serves the streamed units (decoder layers, vision
blocks) as zero-copy views. Inside L2 the streamer keeps a fixed set of units resident for good
(*held*) and streams the others through a *working* reserve: the unit running and the ``prefetch`` units
fetched ahead (a unit's slots are free again once its forward returned). LRU over the
cyclic layer scan would keep nothing; a fixed held set reads only the units outside it from L3,
which is the optimum for a cycle (every policy must read ``units - capacity`` of them per pass).

:func:`memory_split` computes the split for a budget: ``l2_bytes = memory - fixed_bytes`` and
``hold_bytes = l2_bytes - working_bytes - slack_bytes`` (one unit of slack, see :func:`hold_reserve`).
A budget below ``fixed_bytes + working_bytes`` cannot run the model and is a
:class:`~tierstore.errors.ConfigError` naming that minimum.

When every streamed unit is stored raw in L3 (``tierstore import-hf --l3-compression off``) the
streamer maps the units it does not hold (:meth:`~tierstore.engine.handle.TierStore.map`: views of
the shard files' pages, no copy, no L2 slot), so L2 serves only the held units: ``l2_bytes = memory -
fixed_bytes - working_bytes`` (the mapped working units' pages count in the process's memory while
they are viewed) and ``hold_bytes = l2_bytes - slack_bytes``, with a slack for the allocator's rounding
(:func:`mapped_slack`: held units are placed once, in an empty L2, so they do not fragment it). The budget covers
weights; the interpreter, torch, activations and the KV cache come on top (see BENCHMARKS.md for
what that overhead measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import format_size, parse_size
from ..engine.handle import TierStore
from ..errors import ConfigError
from .hf_model import build_empty_model, stored_config, tied_weights, unit_groups

__all__ = ["MemorySplit", "hold_reserve", "mapped_slack", "memory_split", "raw_units", "unit_sizes"]


def hold_reserve(largest_unit: int, prefetch: int) -> int:
    """L2 kept free of held units: the working reserve (``prefetch + 1`` units) plus one unit of slack.

    The slack is for the allocator: a unit's tensors each need a contiguous range, and the cyclic
    fetch leaves the free part of the tier in pieces, so a working region of exactly
    ``prefetch + 1`` units sends some fetches past L2 (a private copy outside the budget, read
    again next pass). Measured at 1/16 of Qwen3-VL-2B (tests/test_stream_budget.py): about one
    fetch in four bypassed L2 with no slack, none with one unit.
    """
    return (max(0, prefetch) + 2) * largest_unit


_SLABS = 2 << 20
"""Two of L2's 1 MiB slabs: what small tensors (norms, narrow projections) leave unused in partly filled slabs."""


def mapped_slack(l2_bytes: int) -> int:
    """L2 kept free beside the held units when the streamed ones are mapped: 1/128 of L2 plus two slabs.

    Only the held units live in L2 then, placed once into an empty tier; what they lose to the
    allocator is its rounding: pages for large tensors, and the unused part of the slab each size class
    of small tensors fills (measured: 1.5 MiB of 20 MiB at 1/16 of the 2B's width, whose k/v projections
    and norms are all slab-sized; a few MiB at the real 2B, whose projections take page runs). A slab
    is at most 1/8 of a small L2 (the allocator's clamp), where a unit of small tensors can leave a
    slab per size class nearly empty: there the slack grows to half of L2 (measured at the benchmark's
    tiny Qwen3-VL, 600 KiB of L2: a quarter still sent a vision block past L2 every pass).
    """
    return l2_bytes // 128 + min(_SLABS, l2_bytes // 2)


@dataclass(frozen=True, slots=True)
class MemorySplit:
    """Where a budget's bytes go (all sizes in bytes)."""

    memory: int
    fixed_bytes: int
    """Weights loaded once and kept outside L2 (embeddings, norms, lm_head, ...)."""
    unit_bytes: tuple[int, ...]
    """Each streamed unit's weights, in execution order."""
    working_bytes: int
    """L2 the streaming needs beside the held units: ``prefetch + 1`` of the largest unit."""
    l2_bytes: int
    """The L2 capacity to open the store with: ``memory - fixed_bytes`` (less ``working_bytes`` when ``mapped``)."""
    mapped: bool = False
    """Every streamed unit is stored raw in L3 and streams as maps of it: the working units are mapped
    pages beside L2, and L2 holds only held units."""

    @property
    def minimum(self) -> int:
        """The smallest budget that runs the model: fixed weights plus the working reserve."""
        return self.fixed_bytes + self.working_bytes

    @property
    def slack_bytes(self) -> int:
        """L2 kept free beside the working reserve: room to place a unit's tensors (see :func:`hold_reserve`,
        and :func:`mapped_slack` when ``mapped``)."""
        if self.mapped:
            return mapped_slack(self.l2_bytes)
        return max(self.unit_bytes, default=0)

    @property
    def hold_bytes(self) -> int:
        """L2 left for units held resident for good: less the working reserve (outside L2 when ``mapped``) and
        the slack."""
        working = 0 if self.mapped else self.working_bytes
        return max(0, self.l2_bytes - working - self.slack_bytes)

    @property
    def streamed_bytes(self) -> int:
        """All units' weights (held or streamed)."""
        return sum(self.unit_bytes)


def _cast_nbytes(store: TierStore, key: str, dtype: torch.dtype | None) -> int:
    info = store.info(key)
    if dtype is None or not info.dtype.is_floating_point:
        return info.nbytes
    return info.nbytes // info.dtype.itemsize * dtype.itemsize


def unit_sizes(store: TierStore, *, prefix: str = "", dtype: torch.dtype | None = None
               ) -> tuple[dict[str, int], int]:
    """``({unit name: bytes}, fixed bytes)`` of the model under ``prefix``, units in execution order.

    Sizes are as the model will hold them: cast to ``dtype`` where it is given. Builds the model
    on the ``meta`` device only (no weights are read).
    """
    model = build_empty_model(stored_config(store, prefix))
    present = set(store.keys(prefix=prefix or None))
    tied = set(tied_weights(model))
    units: dict[str, int] = {}
    for unit in (n for group in unit_groups(model) for n in group):
        units[unit] = sum(_cast_nbytes(store, prefix + f"{unit}.{n}", dtype)
                          for n, _ in model.get_submodule(unit).named_parameters())
    fixed = 0
    for name, _ in model.named_parameters():  # duplicates removed: a tied weight is held once
        if name in tied and prefix + name not in present:
            continue
        if not any(name.startswith(unit + ".") for unit in units) and prefix + name in present:
            fixed += _cast_nbytes(store, prefix + name, dtype)
    return units, fixed


def raw_units(store: TierStore, *, prefix: str = "") -> dict[str, bool]:
    """``{unit name: whether every weight of it is stored raw in L3}`` (mappable), units in execution order."""
    model = build_empty_model(stored_config(store, prefix))
    return {unit: all(store.info(prefix + f"{unit}.{n}").codec == "raw"
                      for n, _ in model.get_submodule(unit).named_parameters())
            for unit in (n for group in unit_groups(model) for n in group)}


def memory_split(store: TierStore, memory: int | str, *, prefix: str = "", prefetch: int = 2,
                 dtype: torch.dtype | None = None, mapped: bool = True) -> MemorySplit:
    """The split of ``memory`` for the model under ``prefix`` (see the module doc).

    ``mapped`` (as :func:`~.streaming.load_streamed`'s): streamed units stored raw are mapped, so
    when all of them are, L2 holds only held units (:attr:`MemorySplit.mapped`). ``store`` may be
    opened read-only without L2: only the catalog is read. Raises ``ConfigError`` when ``memory``
    is below :attr:`MemorySplit.minimum`.
    """
    budget = parse_size(memory, name="memory")
    units, fixed = unit_sizes(store, prefix=prefix, dtype=dtype)
    working = (max(0, prefetch) + 1) * max(units.values(), default=0)
    maps = bool(mapped and units and all(raw_units(store, prefix=prefix).values()))
    split = MemorySplit(memory=budget, fixed_bytes=fixed, unit_bytes=tuple(units.values()), working_bytes=working,
                        l2_bytes=max(0, budget - fixed - (working if maps else 0)), mapped=maps)
    if budget < split.minimum:
        raise ConfigError(
            f"memory={format_size(budget)} is below the minimum of {format_size(split.minimum)} for the model "
            f"under prefix {prefix!r}: {format_size(fixed)} of weights always loaded plus "
            f"{format_size(working)} to stream {max(0, prefetch) + 1} units of up to "
            f"{format_size(max(units.values(), default=0))}; raise memory to at least {split.minimum} bytes "
            "or lower prefetch")
    return split
