"""Qwen3-VL on tierstore: the public facade of the integration.

Everything a user of the original request's Qwen3-VL names needs, under one import path::

    from tierstore.integrations.qwen3_vl import (
        import_checkpoint, export_safetensors, export_hf, load_streamed,
        Qwen3VLHierarchicalCacheAdapter, create_hardware_optimized_cache_manager)

    with tierstore.open("qwen.ts", l2_cache_size="4GiB") as db:
        import_checkpoint("Qwen3-VL-2B-Instruct/", db, progress=True)   # once
        model = load_streamed(db, device="cuda", dtype=torch.float16)   # layers stream from the tiers
        out = model.generate(**inputs, max_new_tokens=32)

The code lives in modules named for their job: :mod:`.checkpoint` (safetensors in and out),
:mod:`.hf_export` (a model folder ``from_pretrained`` loads), :mod:`.streaming` (layer-by-layer weight
streaming of any transformers decoder model), :mod:`.kv_cache` (the tiered KV cache with
prefix reuse), :mod:`.vision_cache` (vision-tower outputs by image content), :mod:`.adapter` (the
request's adapter).
"""

from __future__ import annotations

from ..compat.hardware_manager import create_hardware_optimized_cache_manager
from ..compat.qwen_adapter import Qwen3VLHierarchicalCacheAdapter
from .checkpoint import export_safetensors, import_checkpoint, read_json
from .hf_export import export_hf
from .kv_cache import TieredCache
from .streaming import StreamStats, WeightStreamer, load_streamed
from .vision_cache import VisionFeatureCache

__all__ = ["import_checkpoint", "export_safetensors", "export", "export_hf", "read_json", "load_streamed",
           "WeightStreamer", "StreamStats", "TieredCache", "VisionFeatureCache", "Qwen3VLHierarchicalCacheAdapter",
           "create_hardware_optimized_cache_manager"]

export = export_safetensors
"""Alias: ``export(store, "out.safetensors", prefix=...)``."""
