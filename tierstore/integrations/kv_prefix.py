"""Prefix keys and inputs for K/V prefix reuse: the hash chain over a prompt's token blocks, the
matching of a prompt against a stored span's block hashes, and the ``generate`` arguments for a
Qwen3-VL prompt whose first tokens are already in the cache."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["block_hashes", "prefix_inputs", "IMAGE", "VIDEO", "ROOT", "SpanMatch", "match_span",
           "span_chain_tensor"]

IMAGE, VIDEO = 1, 2
"""Token types (``mm_token_type_ids``) of image and video tokens."""
ROOT = "root"
"""What stands for "the hash before block 0" in a span's key."""
HASH_BYTES = 16


@dataclass(frozen=True, slots=True)
class SpanMatch:
    """Blocks ``[start, stop)`` of a prompt are the first blocks of the stored span ``base`` (keys ``base/<layer>``)."""

    base: str
    start: int
    stop: int
    whole: bool
    """The prompt matched every block of the span."""


def span_chain_tensor(hashes: Sequence[str]) -> torch.Tensor:
    """The block hashes of a span as a ``[blocks, 16]`` uint8 tensor (stored beside the span)."""
    raw = b"".join(bytes.fromhex(h) for h in hashes)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(len(hashes), HASH_BYTES)


def match_span(base: str, stored: torch.Tensor, chain: Sequence[str], start: int, limit: int) -> SpanMatch | None:
    """How far the prompt (its block hashes ``chain``) runs along a span stored from block ``start``.

    ``stored`` is the span's ``[blocks, 16]`` hash tensor; at most ``limit`` blocks of the prompt
    count. None when not even the first block matches (or the tensor is not a hash list).
    """
    if stored.dtype != torch.uint8 or stored.ndim != 2 or stored.shape[1] != HASH_BYTES:
        return None
    rows = stored.cpu().numpy()
    n = 0
    while n < len(rows) and start + n < min(limit, len(chain)) and rows[n].tobytes().hex() == chain[start + n]:
        n += 1
    return SpanMatch(base, start, start + n, n == len(rows)) if n else None


def block_hashes(input_ids: torch.Tensor, token_types: np.ndarray, block_tokens: int, *,
                 image_digests: Sequence[tuple[bytes, int]] = (), seed: bytes = b"") -> list[str]:
    """Hex hashes of the full blocks of one prompt, each chained on the one before.

    A block's hash covers the previous block's hash, its token ids, and for each image token
    the image's content hash and the token's index within that image; the chain stops before
    the first block holding a video token (videos are not keyed).
    """
    ids = input_ids.detach().cpu().numpy().astype(np.int64)
    n = ids.shape[0]
    image_of = np.full(n, -1, dtype=np.int64)
    index_in = np.zeros(n, dtype=np.int64)
    positions = np.flatnonzero(token_types == IMAGE)
    start = 0
    for k, (_digest, count) in enumerate(image_digests):
        where = positions[start:start + count]
        image_of[where] = k
        index_in[where] = np.arange(count)
        start += count
    videos = np.flatnonzero(token_types == VIDEO)
    limit = n // block_tokens if not videos.size else int(videos[0]) // block_tokens
    chain: list[str] = []
    previous = hashlib.blake2b(seed, digest_size=16).digest()
    for block in range(limit):
        span = slice(block * block_tokens, (block + 1) * block_tokens)
        h = hashlib.blake2b(previous, digest_size=16)
        h.update(ids[span].tobytes())
        h.update(image_of[span].tobytes())
        h.update(index_in[span].tobytes())
        for k in np.unique(image_of[span]):
            if k >= 0:
                h.update(image_digests[int(k)][0])
        previous = h.digest()
        chain.append(previous.hex())
    return chain


def prefix_inputs(model: Any, inputs: dict[str, Any], restored: int) -> dict[str, Any]:
    """``generate`` arguments for a Qwen3-VL prompt whose first ``restored`` tokens are in the cache.

    The 3D (mrope) positions are recomputed from the full prompt (the model's remembered
    ``rope_deltas`` belong to its previous request), and the image features of image tokens
    inside the restored prefix are left out: images wholly inside it are not encoded at all,
    and an image cut by the boundary passes only its remaining rows (as ``mm_encoder_outputs``).
    """
    kwargs = dict(inputs)
    inner = getattr(model, "model", model)
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
    if restored <= 0 or kwargs.get("pixel_values") is None:
        return kwargs
    input_ids = kwargs["input_ids"]
    types = kwargs.get("mm_token_type_ids")
    image_mask = (types == IMAGE) if types is not None else (input_ids == model.config.image_token_id)
    image_mask = image_mask[0]
    pixel_values = kwargs.pop("pixel_values")
    if not bool(image_mask[restored:].any()):
        return kwargs  # every image is inside the restored prefix
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    features = inner.get_image_features(pixel_values, kwargs.get("image_grid_thw"), return_dict=True)
    rows = (image_mask.cumsum(0) - 1)[restored:][image_mask[restored:]]
    embeds = torch.cat(list(features.pooler_output))[rows]
    deep = [[torch.cat(list(level))[rows]] for level in features.deepstack_features]
    kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithDeepstackFeatures(
        last_hidden_state=None, pooler_output=[embeds], deepstack_features=deep)}
    return kwargs
