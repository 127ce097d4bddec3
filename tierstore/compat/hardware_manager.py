"""The original request's hardware-optimised manager, built on :class:`HardwareOptimizer`.

::

    from tierstore import create_hardware_optimized_cache_manager

    hw_cache_manager = create_hardware_optimized_cache_manager()
    tensor, tier = hw_cache_manager.get_tensor((512, 512), torch.float16, "general")

The manager is a :class:`HierarchicalCacheManager` whose configuration is what
the optimizer recommends for this machine (on the request's i5-10210U laptop
with a Pascal SM61 GPU, :data:`tierstore.plan.hardware.SEED_MACHINE`), and which sets
torch's compute threads to the physical cores when asked to.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ..plan.hardware import HardwareFacts, HardwareOptimizer, Recommendation
from .cache_manager import HierarchicalCacheManager

__all__ = ["IntelNvidiaCacheManager", "create_hardware_optimized_cache_manager"]


class IntelNvidiaCacheManager(HierarchicalCacheManager):
    """A :class:`HierarchicalCacheManager` configured by :class:`HardwareOptimizer`.

    ``facts`` replaces detection (to size for another machine); ``overrides`` change single
    ``CacheConfig`` fields of the recommendation (``l2_cache_size="1GiB"``).
    """

    def __init__(self, path: str | Path | None = None, *, facts: HardwareFacts | None = None,
                 set_threads: bool = False, **overrides: Any) -> None:
        disk = path if path is not None else tempfile.gettempdir()  # where a temporary store goes
        self.optimizer = HardwareOptimizer(facts=facts, disk_path=disk)
        self.recommendation: Recommendation = self.optimizer.recommend()
        config = self.recommendation.config
        if overrides:
            config = config.replace(**overrides)
        if set_threads:
            torch.set_num_threads(self.recommendation.compute_threads)
        super().__init__(config, path)


def create_hardware_optimized_cache_manager(path: str | Path | None = None, *, facts: HardwareFacts | None = None,
                                            **overrides: Any) -> IntelNvidiaCacheManager:
    """A manager sized for this machine (a temporary store unless ``path`` is given)."""
    return IntelNvidiaCacheManager(path, facts=facts, **overrides)
