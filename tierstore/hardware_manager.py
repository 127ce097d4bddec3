"""The original request's hardware-optimised manager, built on :class:`HardwareOptimizer`.

::

    from tierstore import create_hardware_optimized_cache_manager

    hw_cache_manager = create_hardware_optimized_cache_manager()
    tensor, tier = hw_cache_manager.get_tensor((512, 512), torch.float16, "general")

The manager is a :class:`HierarchicalCacheManager` whose configuration is what
the optimizer recommends for this machine (on the request's i5-10210U laptop
with a Pascal SM61 GPU, :data:`tierstore.hardware.SEED_MACHINE`), and which sets
torch's compute threads to the physical cores when asked to.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import format_size, parse_size
from .hardware import HardwareFacts, HardwareOptimizer, Recommendation
from .manager import HierarchicalCacheManager

__all__ = ["IntelNvidiaCacheManager", "create_hardware_optimized_cache_manager"]

logger = logging.getLogger("tierstore")
_ANNOUNCE = 1 << 30
"""L2 sizes from which opening is announced."""
_PREFAULT_SPEED = 0.35 * (1 << 30)
"""Bytes per second faulting in an anonymous arena ran at here (11.75 GiB in 37 s)."""


class IntelNvidiaCacheManager(HierarchicalCacheManager):
    """A :class:`HierarchicalCacheManager` configured by :class:`HardwareOptimizer`.

    ``facts`` replaces detection (to size for another machine); ``overrides`` change single
    ``CacheConfig`` fields of the recommendation (``l2_cache_size="1GiB"``).
    """

    def __init__(self, path: str | Path | None = None, *, facts: HardwareFacts | None = None,
                 set_threads: bool = False, memory: int | str | None = None, **overrides: Any) -> None:
        disk = path if path is not None else tempfile.gettempdir()  # where a temporary store goes
        self.optimizer = HardwareOptimizer(facts=facts, disk_path=disk)
        budget = parse_size(memory, name="memory") if memory is not None else None
        self.recommendation: Recommendation = self.optimizer.recommend(memory=budget)
        config = self.recommendation.config
        if overrides:
            config = config.replace(**overrides)
        if set_threads:
            torch.set_num_threads(self.recommendation.compute_threads)
        if config.l2_cache_size >= _ANNOUNCE:  # mapping and prefaulting it takes seconds and the RAM it names
            logger.warning("tierstore: reserving a %s L2 arena in host memory and faulting it in (about %.0f s); "
                           "pass memory='3GiB' or l2_cache_size= to create_hardware_optimized_cache_manager() to "
                           "size it", format_size(config.l2_cache_size), config.l2_cache_size / _PREFAULT_SPEED)
        super().__init__(config, path)


def create_hardware_optimized_cache_manager(path: str | Path | None = None, *, facts: HardwareFacts | None = None,
                                            memory: int | str | None = None,
                                            **overrides: Any) -> IntelNvidiaCacheManager:
    """A manager sized for this machine (a temporary store unless ``path`` is given).

    ``memory`` ("3GiB") bounds the host memory L2 takes; without it L2 is what the machine can spare
    (up to half its RAM), and an L2 of a GiB or more is announced with a logged warning before it is
    faulted in.
    """
    return IntelNvidiaCacheManager(path, facts=facts, memory=memory, **overrides)
