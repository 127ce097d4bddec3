"""Inputs of a model's linear layers laid out so torch multiplies them as one matrix, never copying the weight.

``F.linear`` without a bias is ``matmul(x, weight.t())``. For a 3-D ``x`` torch folds ``x`` into a
matrix (one ``mm`` against the weight as it is) when the weight requires grad, or else only when
``x``'s leading strides are exactly those of a contiguous tensor (``stride[i] == stride[i + 1] *
size[i + 1]``, size-1 dimensions included). Otherwise it calls ``bmm`` on the weight expanded to a
batch, which copies the whole weight and runs a slow kernel. transformers computes the logits of
the last position from ``hidden_states[:, -1:, :]`` (``logits_to_keep``): contiguous by
``is_contiguous()``, but its batch stride is the whole sequence's, so the fold check fails. A model
loaded with ``from_pretrained`` never sees this (its weights require grad); a streamed one does,
because its weights are views of the store's tiers made with ``requires_grad=False``. Measured on
Qwen3-VL-2B's tied ``lm_head`` (151936 x 2048 bf16): the prefill's logits took 11-28 s and a 593
MiB copy of the weight, where the folded product takes ~0.2 s and no copy.

:func:`fold_linear_inputs` gives every ``nn.Linear`` of a model a forward pre-hook that hands it
``x.contiguous().view(x.shape)`` for inputs of 3 or more dimensions: the same tensor with
canonical strides (no copy when ``x`` is contiguous, as the slice is), so the fold always applies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["fold_linear_inputs", "foldable"]


def foldable(x: torch.Tensor) -> bool:
    """Whether torch folds ``x``'s leading dimensions into one without a copy (its ``should_fold`` test)."""
    shape, strides = x.shape, x.stride()
    return all(strides[i] == strides[i + 1] * shape[i + 1] for i in range(x.dim() - 2))


def _fold_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 3 or foldable(args[0]):
        return None
    x = args[0]
    return (x.contiguous().view(x.shape), *args[1:])


def fold_linear_inputs(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook every ``nn.Linear`` of ``model`` so its input is foldable (see the module doc); the hooks' handles."""
    return [module.register_forward_pre_hook(_fold_input) for module in model.modules()
            if isinstance(module, nn.Linear)]
