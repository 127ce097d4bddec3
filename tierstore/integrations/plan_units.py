"""The units of a stored model as the placement planner sees them (sizes from the catalog)."""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

from ..plan.placement import ModelUnits, Unit
from ..tiers.slab_allocator import SlabAllocator
from .hf_model import build_empty_model, stored_config, unit_groups
from .stream_budget import unit_sizes

if TYPE_CHECKING:
    import torch

    from ..engine.handle import TierStore

__all__ = ["decode_shapes", "model_units", "slot_bytes"]


def model_units(store: TierStore, *, prefix: str = "", dtype: torch.dtype | None = None) -> ModelUnits:
    """The units :func:`~tierstore.integrations.streaming.load_streamed` would stream, sized from the catalog.

    Found as the streamer finds them (:func:`~tierstore.integrations.hf_model.unit_groups`; the
    last group is the decoder); builds the model on the ``meta`` device only, reads no weights.
    """
    config = stored_config(store, prefix)
    model = build_empty_model(config)
    groups = unit_groups(model)
    sizes, fixed = unit_sizes(store, prefix=prefix, dtype=dtype)
    rounding = SlabAllocator(1 << 30, page_size=mmap.PAGESIZE)
    units = []
    for group_index, group in enumerate(groups):
        for name in group:
            infos = [store.info(prefix + f"{name}.{n}") for n, _ in model.get_submodule(name).named_parameters()]
            params = sum(i.nbytes // max(1, i.dtype.itemsize) for i in infos)
            scale = sizes[name] / max(1, sum(i.nbytes for i in infos))  # a cast changes every tensor alike
            units.append(Unit(name, sizes[name], sum(i.stored_bytes for i in infos), params,
                              decoder=group_index == len(groups) - 1,
                              slot_bytes=sum(slot_bytes(rounding, int(i.nbytes * scale)) for i in infos)))
    head = model.get_output_embeddings()
    head_bytes = int(head.weight.numel()) * (dtype.itemsize if dtype is not None else 2) if head is not None else 0
    text = getattr(config, "text_config", None) or config
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // heads)
    itemsize = dtype.itemsize if dtype is not None else 2
    return ModelUnits(tuple(units), fixed, head_bytes, 2 * layers * kv_heads * head_dim * itemsize)


def slot_bytes(allocator: SlabAllocator, nbytes: int) -> int:
    """Bytes L2's allocator reserves for a tensor of ``nbytes``: its size class, or whole pages."""
    index = allocator.class_index(nbytes)
    if index >= 0:
        return allocator.class_sizes[index]
    page = allocator.page_size
    return -(-nbytes // page) * page


def decode_shapes(store: TierStore, *, prefix: str = "") -> tuple[tuple[tuple[int, int], ...], tuple[int, int] | None]:
    """``(out, in)`` of the first decoder unit's matrices and of the head, from the catalog (what decode multiplies).

    For :func:`~tierstore.plan.machine.measure_matvec` at the model's own shapes (a 2B's layer and its
    151936-row head run at different rates). The head is ``lm_head``, or the embeddings it is tied to.
    """
    model = build_empty_model(stored_config(store, prefix))
    decoder = unit_groups(model)[-1][0]
    shapes = []
    for name, _ in model.get_submodule(decoder).named_parameters():
        info = store.info(prefix + f"{decoder}.{name}")
        if len(info.shape) == 2:
            shapes.append((int(info.shape[0]), int(info.shape[1])))
    head = model.get_output_embeddings()
    head_shape = (int(head.weight.shape[0]), int(head.weight.shape[1])) if head is not None else None
    return tuple(shapes), head_shape
