"""VisionFeatureCache: a repeated image skips the vision tower; features are the same bits whatever the batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import tierstore
from tierstore.errors import CacheUsageError
from tierstore.integrations.kv_cache import TieredCache
from tierstore.integrations.tiny_model import build_tiny_model, synthetic_image, synthetic_inputs
from tierstore.integrations.vision_cache import VisionFeatureCache, tensor_digest

GEN: dict[str, Any] = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
TEXT = list(range(1, 12))


@pytest.fixture(scope="module")
def model() -> Any:
    return build_tiny_model(seed=5)


@pytest.fixture
def tower_calls(model: Any) -> Iterator[list[int]]:
    """Patch rows each vision-tower forward ran on."""
    calls: list[int] = []
    handle = model.model.visual.register_forward_pre_hook(lambda _m, args: calls.append(int(args[0].shape[0])))
    yield calls
    handle.remove()


Features = tuple[list[torch.Tensor], list[list[torch.Tensor]]]


def features(model: Any, pixels: torch.Tensor, grid: torch.Tensor) -> Features:
    out = model.model.get_image_features(pixels, grid, return_dict=True)
    return list(out.pooler_output), [list(level) for level in out.deepstack_features]


def test_repeated_image_skips_the_tower(model: Any, db: tierstore.TierStore, tower_calls: list[int]) -> None:
    inputs = synthetic_inputs(TEXT, image_seed=1, suffix=[40, 41])
    ref = model.generate(**inputs, **GEN)
    tower_calls.clear()
    with VisionFeatureCache(db).attach(model) as vision:
        first = model.generate(**inputs, **GEN)
        assert len(tower_calls) == 1 and vision.stats.misses == 1
        tower_calls.clear()
        second = model.generate(**inputs, **GEN)
        assert tower_calls == [] and vision.stats.hits == 1
    for out in (first, second):
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.logits, ref.logits, strict=True):
            assert torch.equal(a, b)
    other = synthetic_inputs(TEXT, image_seed=2, suffix=[40, 41])
    with VisionFeatureCache(db).attach(model) as vision:
        model.generate(**other, **GEN)
        assert vision.stats.misses == 1 and len(tower_calls) == 1  # another image is no hit


def test_batch_or_alone_gives_the_same_bits(model: Any, tmp_path: Path, tower_calls: list[int]) -> None:
    (pa, ga), (pb, gb) = synthetic_image((1, 8, 8), seed=1), synthetic_image((1, 4, 12), seed=2)
    with tierstore.open(tmp_path / "batch") as db, VisionFeatureCache(db).attach(model):
        batch_embeds, batch_deep = features(model, torch.cat([pa, pb]), torch.cat([ga, gb]))
        assert tower_calls == [64, 48]  # one image at a time
    with tierstore.open(tmp_path / "alone") as db, VisionFeatureCache(db).attach(model):
        alone = [features(model, pa, ga), features(model, pb, gb)]
    for i in range(2):
        assert torch.equal(batch_embeds[i], alone[i][0][0])
        for level in range(len(batch_deep)):
            assert torch.equal(batch_deep[level][i], alone[i][1][level][0])
    assert batch_embeds[0].shape == (16, model.config.text_config.hidden_size)
    assert len(batch_deep) == len(model.config.vision_config.deepstack_visual_indexes)


def test_features_survive_a_reopen(model: Any, store_path: Path, tower_calls: list[int]) -> None:
    pixels, grid = synthetic_image(seed=7)
    with tierstore.open(store_path) as db, VisionFeatureCache(db).attach(model):
        before = features(model, pixels, grid)
    tower_calls.clear()
    with tierstore.open(store_path, readonly=True) as db, VisionFeatureCache(db).attach(model) as vision:
        after = features(model, pixels, grid)
        assert tower_calls == [] and vision.stats.hits == 1
    assert torch.equal(before[0][0], after[0][0])


def test_detach_restores_the_model(model: Any, db: tierstore.TierStore, tower_calls: list[int]) -> None:
    pixels, grid = synthetic_image(seed=3)
    vision = VisionFeatureCache(db).attach(model)
    assert vision.attached and "get_image_features" in vars(model.model)
    features(model, pixels, grid)
    with pytest.raises(CacheUsageError):
        vision.attach(model)
    vision.detach()
    assert "get_image_features" not in vars(model.model) and not vision.attached
    tower_calls.clear()
    features(model, pixels, grid)
    assert len(tower_calls) == 1  # the model's own encoder again
    vision.detach()  # twice is fine


def test_digest_covers_bytes_dtype_and_shape() -> None:
    x = torch.arange(12, dtype=torch.float32)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(x.reshape(3, 4))
    assert tensor_digest(x) != tensor_digest(x.view(torch.int32))
    y = x.clone()
    y[5] += 1
    assert tensor_digest(x) != tensor_digest(y)
    assert tensor_digest(x.reshape(3, 4).t()) == tensor_digest(x.reshape(3, 4).t().contiguous())


def test_bad_inputs_raise_typed_errors(model: Any, db: tierstore.TierStore) -> None:
    pixels, grid = synthetic_image(seed=1)
    with VisionFeatureCache(db).attach(model):
        with pytest.raises(CacheUsageError):
            model.model.get_image_features(pixels[:-1], grid)
        with pytest.raises(CacheUsageError):
            model.model.get_image_features(pixels, None)
    assert len(db) == 0
    with pytest.raises(CacheUsageError):
        VisionFeatureCache(db).attach(torch.nn.Linear(2, 2))


def test_with_prefix_reuse(model: Any, db: tierstore.TierStore, tower_calls: list[int]) -> None:
    """Both caches together: the second request restores the K/V prefix and never runs the tower."""
    inputs = synthetic_inputs(list(range(1, 21)), image_seed=4, suffix=list(range(100, 111)))
    with VisionFeatureCache(db).attach(model):
        TieredCache(db, config=model.config, persist=True).generate(model, **inputs, **GEN)
        tower_calls.clear()
        second = synthetic_inputs(list(range(1, 21)), image_seed=4, suffix=list(range(200, 215)))
        cache = TieredCache(db, config=model.config, persist=True)
        out = cache.generate(model, **second, **GEN)
        assert cache.stats.restored_tokens == 32 and tower_calls == []
    assert torch.equal(out.sequences, model.generate(**second, **GEN).sequences)
