"""Vision-tower outputs of Qwen3-VL cached in a tierstore by the content hash of each image.

:class:`VisionFeatureCache` replaces the model's ``get_image_features`` (on the
``Qwen3VLModel`` inside a ``Qwen3VLForConditionalGeneration``) while attached. Each image of a
batch is looked up under the BLAKE2b hash of its ``pixel_values`` rows (bytes, dtype, shape)
and its ``image_grid_thw`` row; a hit skips the vision tower, a miss runs the tower on that
image alone (so an image's features are the same bits whatever batch it came in) and stores
the merged embeddings and the deepstack features as one durable block: a later process that
opens the same store hits too.

    with tierstore.open("cache.ts") as db:
        vision = VisionFeatureCache(db).attach(model)
        model.generate(**inputs)           # the tower runs once per new image
        vision.detach()
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.handle import TierStore
from ..errors import BlockNotFoundError, CacheUsageError

__all__ = ["VisionFeatureCache", "VisionCacheStats", "tensor_digest", "config_fingerprint"]

PREFIX = "vision"


def tensor_digest(tensor: torch.Tensor, *extra: bytes, digest_size: int = 16) -> bytes:
    """BLAKE2b of a tensor's bytes, dtype and shape (plus ``extra`` byte strings); no per-element loop."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    h = hashlib.blake2b(digest_size=digest_size)
    h.update(f"{tensor.dtype!s}|{tuple(tensor.shape)}|".encode())
    for part in extra:
        h.update(part)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().data)
    return h.digest()


def config_fingerprint(config: Any, namespace: str = "") -> str:
    """A short hex digest of a model configuration (``to_dict()``, private and version keys left out).

    Two checkpoints with the same configuration but different weights share a fingerprint:
    pass a ``namespace`` (the checkpoint's name or hash) to keep their cached results apart.
    """
    data: Any = config.to_dict() if hasattr(config, "to_dict") else config

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()
                    if not str(k).startswith("_") and k not in ("transformers_version", "architectures")}
        return value

    text = json.dumps(clean(data), sort_keys=True, default=str)
    return hashlib.blake2b(f"{namespace}\x00{text}".encode(), digest_size=8).hexdigest()


@dataclass
class VisionCacheStats:
    """What the cache did since it was created."""

    hits: int = 0
    """Images whose features came from the store."""
    misses: int = 0
    """Images that ran through the vision tower."""


class VisionFeatureCache:
    """Caches Qwen3-VL vision-tower outputs in ``store``, keyed by the content hash of each image.

    ``namespace`` separates models whose configurations are equal but whose weights differ
    (default: none; the key always includes a fingerprint of the vision configuration).
    The features returned for a hit are read-only views of the store's memory (do not modify
    them in place). ``last_hidden_state`` of the returned output is ``None``: the model reads
    only the merged embeddings (``pooler_output``) and ``deepstack_features``.
    """

    def __init__(self, store: TierStore, *, namespace: str = "") -> None:
        self.store = store
        self.namespace = namespace
        self.stats = VisionCacheStats()
        self._base: Any = None
        self._original: Callable[..., Any] | None = None
        self._had_attribute = False
        self._previous: Any = None
        self._prefix = ""
        self._device = torch.device("cpu")

    # -- attaching ----------------------------------------------------------------------------------

    def attach(self, model: Any) -> VisionFeatureCache:
        """Route ``model``'s image encoding through this cache; returns ``self``.

        ``model`` is a ``Qwen3VLForConditionalGeneration`` or its inner ``Qwen3VLModel``
        (anything with ``get_image_features`` and a ``visual`` tower).
        """
        if self._base is not None:
            raise CacheUsageError("this VisionFeatureCache is already attached; detach() it first")
        base = model.model if hasattr(getattr(model, "model", None), "get_image_features") else model
        if not hasattr(base, "get_image_features") or not hasattr(base, "visual"):
            raise CacheUsageError(f"{type(model).__name__} has no get_image_features/visual tower to cache")
        self._had_attribute = "get_image_features" in vars(base)
        self._previous = vars(base).get("get_image_features")
        self._original = base.get_image_features
        self._prefix = f"{PREFIX}/{config_fingerprint(base.config.vision_config, self.namespace)}/"
        params = list(base.visual.parameters())
        self._device = params[0].device if params else torch.device("cpu")
        base.get_image_features = self.image_features
        self._base = base
        return self

    def detach(self) -> None:
        """Give the model its own ``get_image_features`` back (a no-op when not attached)."""
        base = self._base
        if base is None:
            return
        if self._had_attribute:
            base.get_image_features = self._previous
        else:
            del base.get_image_features
        self._base = self._original = None

    def __enter__(self) -> VisionFeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        """Whether a model's image encoding goes through this cache now."""
        return self._base is not None

    # -- encoding -----------------------------------------------------------------------------------

    def key_of(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> str:
        """The store key of one image (its ``pixel_values`` rows and its ``(t, h, w)`` grid row)."""
        if not self._prefix:
            raise CacheUsageError("attach() the cache to a model first")
        grid = grid_thw.detach().to("cpu", torch.int64).reshape(-1)
        return self._prefix + tensor_digest(pixel_values, tensor_digest(grid)).hex()

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       **kwargs: Any) -> Any:
        """Drop-in for ``Qwen3VLModel.get_image_features``: features per image, from the store when known."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        original = self._original
        if original is None:
            raise CacheUsageError("attach() the cache to a model first")
        if image_grid_thw is None:
            raise CacheUsageError("image_grid_thw is needed to split pixel_values into images")
        return_dict = kwargs.pop("return_dict", True)
        grids = image_grid_thw.reshape(-1, 3)
        sizes = grids.prod(-1).tolist()
        if sum(sizes) != pixel_values.shape[0]:
            raise CacheUsageError(f"image_grid_thw covers {sum(sizes)} patch rows but pixel_values has "
                                  f"{pixel_values.shape[0]}")
        embeds: list[torch.Tensor] = []
        deep: list[list[torch.Tensor]] = []
        for pixels, grid in zip(torch.split(pixel_values, sizes), grids, strict=True):
            stacked = self._one(original, pixels, grid, kwargs)
            embeds.append(stacked[0])
            deep.append(list(stacked[1:]))
        levels = [tuple(per_image[i] for per_image in deep) for i in range(len(deep[0]))] if deep else []
        out = BaseModelOutputWithDeepstackFeatures(last_hidden_state=None, pooler_output=tuple(embeds),
                                                   deepstack_features=levels)
        return out if return_dict else out.to_tuple()

    def _one(self, original: Callable[..., Any], pixels: torch.Tensor, grid: torch.Tensor,
             kwargs: dict[str, Any]) -> torch.Tensor:
        """``[1 + deepstack levels, tokens, hidden]`` for one image: from the store, or encoded and stored."""
        key = self.key_of(pixels, grid)
        try:
            stacked = self.store.get(key, device=self._device)  # on a GPU: through the L1 pool
        except BlockNotFoundError:
            pass
        else:
            self.stats.hits += 1
            return stacked
        self.stats.misses += 1
        out = original(pixels, grid.reshape(1, 3), return_dict=True, **kwargs)
        stacked = torch.stack([out.pooler_output[0], *(level[0] for level in out.deepstack_features)])
        if not self.store.readonly:
            self.store.put(key, stacked.detach())
        return stacked
