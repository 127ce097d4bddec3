"""A tiny, randomly initialised Qwen3-VL built in-process: the demo's and the tests' model.

No model hub is needed: :func:`tiny_config` gives a real ``Qwen3VLConfig`` with a few text layers
(hidden 128) and a small vision tower, respecting the architecture's constraints (``mrope_section``
sums to ``head_dim / 2``, the vision ``out_hidden_size`` equals the text hidden size,
``num_position_embeddings`` is a perfect square). :func:`synthetic_inputs` makes an image + prompt
batch with the ``mm_token_type_ids`` transformers 5 wants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["IMAGE_TOKEN_ID", "tiny_config", "build_tiny_model", "save_tiny_checkpoint", "synthetic_image",
           "synthetic_inputs"]

IMAGE_TOKEN_ID = 500
VIDEO_TOKEN_ID = 501
VISION_START_ID = 502
VISION_END_ID = 503
PATCH = 16
TEMPORAL_PATCH = 2
MERGE = 2


def tiny_config(*, layers: int = 2, hidden: int = 128, intermediate: int = 256, vocab: int = 512,
                vision_depth: int = 2, tie_word_embeddings: bool = True, **text_overrides: Any) -> Any:
    """A ``Qwen3VLConfig`` small enough to build and run in well under a second on a CPU."""
    from transformers import Qwen3VLConfig

    heads, kv_heads = 4, 2
    head_dim = hidden // heads
    quarter = head_dim // 8  # mrope_section sums to head_dim / 2: [t, h, w] = [2q, q, q]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings,
                rope_scaling={"rope_type": "default", "mrope_section": [2 * quarter, quarter, quarter],
                              "mrope_interleaved": True})
    text.update(text_overrides)
    vision = dict(depth=vision_depth, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=hidden,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
                  num_position_embeddings=64, deepstack_visual_indexes=list(range(min(2, vision_depth))))
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                         video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                         vision_end_token_id=VISION_END_ID, tie_word_embeddings=tie_word_embeddings)


def build_tiny_model(config: Any | None = None, *, seed: int = 0) -> Any:
    """A ``Qwen3VLForConditionalGeneration`` with deterministic random weights, in eval mode."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model: Any = Qwen3VLForConditionalGeneration(config if config is not None else tiny_config())
    return model.eval()


def save_tiny_checkpoint(folder: str | Path, *, seed: int = 0, max_shard_size: str = "2MB",
                         config: Any | None = None) -> Path:
    """Write a tiny model as a Hugging Face checkpoint folder (sharded safetensors + config.json)."""
    folder = Path(folder)
    build_tiny_model(config, seed=seed).save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def synthetic_image(grid: tuple[int, int, int] = (1, 8, 8), *, seed: int = 0, patch: int = PATCH,
                    temporal_patch: int = TEMPORAL_PATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, image_grid_thw)`` of one deterministic image with ``t*h*w`` patches."""
    t, h, w = grid
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(t * h * w, 3 * temporal_patch * patch * patch, generator=gen)
    return pixels, torch.tensor([list(grid)])


def synthetic_inputs(prompt: list[int], *, image_seed: int | None = 0, grid: tuple[int, int, int] = (1, 8, 8),
                     suffix: list[int] | None = None, config: Any | None = None) -> dict[str, torch.Tensor]:
    """Model inputs: ``prompt`` tokens, then (unless ``image_seed`` is None) an image, then ``suffix``.

    Token ids and patch sizes are the tiny model's, or those of ``config`` (any ``Qwen3VLConfig``).
    """
    image_id, start_id, end_id = IMAGE_TOKEN_ID, VISION_START_ID, VISION_END_ID
    patch, temporal, merge = PATCH, TEMPORAL_PATCH, MERGE
    if config is not None:
        image_id, start_id, end_id = config.image_token_id, config.vision_start_token_id, config.vision_end_token_id
        vision = config.vision_config
        patch, temporal, merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
    ids = list(prompt)
    batch: dict[str, torch.Tensor] = {}
    if image_seed is not None:
        pixels, grid_thw = synthetic_image(grid, seed=image_seed, patch=patch, temporal_patch=temporal)
        n_tokens = grid[0] * grid[1] * grid[2] // (merge * merge)
        ids += [start_id, *([image_id] * n_tokens), end_id]
        batch.update(pixel_values=pixels, image_grid_thw=grid_thw)
    ids += list(suffix or [])
    input_ids = torch.tensor([ids])
    batch.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 mm_token_type_ids=(input_ids == image_id).long())
    return batch
