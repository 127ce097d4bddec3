"""A Hugging Face model as the store knows it: its config, an empty instance, and its decoder layers.

:func:`stored_config` rebuilds the ``PretrainedConfig`` that :func:`~.checkpoint.import_checkpoint`
kept under ``prefix + "__hf__/config.json"``. :func:`build_empty_model` instantiates the model class
the config names (its ``architectures``, else the causal-LM / image-text-to-text class transformers
maps its type to) with every parameter on the ``meta`` device, taking no memory, while the buffers
(rotary frequencies, embedding scales) are computed for real, as the in-memory model computes them:
they are not in checkpoints, so they cannot come from the store. :func:`unit_groups` finds the units a
streamer loads one at a time from the model's own structure: every ``ModuleList`` whose entries are
of a class the model lists in ``_no_split_modules`` (the decoder layers, a vision tower's blocks).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..engine.handle import TierStore
from ..errors import CheckpointError
from .checkpoint import read_json

__all__ = ["stored_config", "model_class", "build_empty_model", "unit_groups", "tied_weights"]


def stored_config(store: TierStore, prefix: str = "") -> Any:
    """The ``PretrainedConfig`` of the model imported under ``prefix``; ``CheckpointError`` if there is none."""
    from transformers import AutoConfig

    data = read_json(store, "config.json", prefix=prefix)
    if data is None:
        raise CheckpointError(f"no model config under prefix {prefix!r} in {store.path}; import the model with "
                              "import_checkpoint (or 'tierstore import-hf') first", path=str(store.path))
    model_type = data.pop("model_type", None) if isinstance(data, dict) else None
    if not isinstance(model_type, str):
        raise CheckpointError(f"the config under prefix {prefix!r} names no model_type", path=str(store.path))
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise CheckpointError(f"transformers does not know the stored model type {model_type!r} ({exc}); "
                              "upgrade transformers", path=str(store.path)) from None


def model_class(config: Any) -> type[Any]:
    """The class ``from_pretrained`` would build for ``config``: its first ``architectures`` entry, if any."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    for mapping in (transformers.MODEL_FOR_CAUSAL_LM_MAPPING, transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING):
        if type(config) in mapping:
            found: type[Any] = mapping[type(config)]
            return found
    raise CheckpointError(f"no transformers model class for a {type(config).__name__} "
                          f"(architectures {getattr(config, 'architectures', None)!r}): not a decoder model")


def build_empty_model(config: Any) -> Any:
    """``model_class(config)(config)`` in eval mode, parameters on ``meta``, buffers real (on the CPU).

    accelerate's ``init_empty_weights`` swaps ``nn.Module.register_parameter`` process-wide while the
    model is built, so no other thread should build modules meanwhile (as with ``from_pretrained``).
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_class(config)(config)
    return model.eval()


def tied_weights(model: Any) -> dict[str, str]:
    """Parameter names the model ties to another (``lm_head.weight`` -> ``model.embed_tokens.weight``)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {str(target): str(source) for target, source in tied.items()}


def _no_split_classes(model: nn.Module) -> set[str]:
    # A composite model lists its own classes; its sub-models (a vision tower, a language model) may list more.
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def unit_groups(model: nn.Module) -> list[list[str]]:
    """Module names of the streamable units, grouped by the ``ModuleList`` holding them, in build order.

    Build order is execution order for the models transformers ships (a vision tower is built before
    the language model it feeds, layers in the order they run); the last group is the decoder, which
    runs again for every generated token. Raises ``CheckpointError`` when the model has no such list.
    """
    classes = _no_split_classes(model)
    groups: list[list[str]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(unit + ".") for group in groups for unit in group):
            continue  # a list inside a unit (experts of a layer) streams with its unit
        if all(type(child).__name__ in classes for child in module):
            groups.append([f"{name}.{i}" for i in range(len(module))])
    if not groups:
        raise CheckpointError(f"cannot find the decoder layers of {type(model).__name__}: no ModuleList holds "
                              f"the classes of its _no_split_modules ({sorted(classes)})")
    return groups
