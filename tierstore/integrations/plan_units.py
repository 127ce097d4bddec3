"""The units of a stored model as the placement planner sees them (sizes from the catalog)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan.placement import ModelUnits, Unit
from .hf_model import build_empty_model, stored_config, unit_groups
from .stream_budget import unit_sizes

if TYPE_CHECKING:
    import torch

    from ..engine.handle import TierStore

__all__ = ["model_units"]


def model_units(store: TierStore, *, prefix: str = "", dtype: torch.dtype | None = None) -> ModelUnits:
    """The units :func:`~tierstore.integrations.streaming.load_streamed` would stream, sized from the catalog.

    Found as the streamer finds them (:func:`~tierstore.integrations.hf_model.unit_groups`; the
    last group is the decoder); builds the model on the ``meta`` device only, reads no weights.
    """
    config = stored_config(store, prefix)
    model = build_empty_model(config)
    groups = unit_groups(model)
    sizes, fixed = unit_sizes(store, prefix=prefix, dtype=dtype)
    units = []
    for group_index, group in enumerate(groups):
        for name in group:
            infos = [store.info(prefix + f"{name}.{n}") for n, _ in model.get_submodule(name).named_parameters()]
            params = sum(i.nbytes // max(1, i.dtype.itemsize) for i in infos)
            units.append(Unit(name, sizes[name], sum(i.stored_bytes for i in infos), params,
                              decoder=group_index == len(groups) - 1))
    head = model.get_output_embeddings()
    head_bytes = int(head.weight.numel()) * (dtype.itemsize if dtype is not None else 2) if head is not None else 0
    text = getattr(config, "text_config", None) or config
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // heads)
    itemsize = dtype.itemsize if dtype is not None else 2
    return ModelUnits(tuple(units), fixed, head_bytes, 2 * layers * kv_heads * head_dim * itemsize)
