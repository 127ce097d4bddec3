"""tierstore: a tiered tensor store for running large models on small machines.

Open a store like a database and keep tensors in it::

    import torch, tierstore

    with tierstore.open("weights.ts", l3_compression="shuffle-zstd") as db:
        db.put("layer0.weight", torch.randn(4096, 4096, dtype=torch.bfloat16))
        with db.transaction():                      # all or nothing, durable at exit
            db.put("layer1.weight", torch.randn(4096, 4096, dtype=torch.bfloat16))
            db.delete("layer0.weight")
        w = db.get("layer1.weight")
        layer = db.get_many(["layer1.weight"])           # {key: tensor}, L3 misses read together
        print(db.info("layer1.weight"), db.stats())

Blocks live durably in a compressed Zarr v3 tier (L3) on disk, indexed by an
SQLite catalog; host (L2) and device (L1) tiers cache them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._version import __version__
from .compat.cache_manager import HierarchicalCacheManager
from .compat.hardware_manager import IntelNvidiaCacheManager, create_hardware_optimized_cache_manager
from .config import CacheConfig, SharedCredentials, format_size, parse_size
from .engine import upkeep_steps as _upkeep_steps
from .engine.handle import BlockInfo, StoreStats, TierStore
from .errors import (
    BlockNotFoundError,
    BlockUnavailableError,
    CatalogError,
    CheckpointError,
    ConfigError,
    CorruptBlockError,
    DeviceMemoryError,
    InvalidArgumentError,
    InvalidKeyError,
    ReadOnlyError,
    SchemaVersionError,
    SharedTierError,
    SharedTierUnavailableError,
    StoreClosedError,
    StoreFullError,
    StoreLockedError,
    StoreNotFoundError,
    TierFullError,
    TierStoreError,
    TransactionError,
    UnsafePathError,
    UnsupportedTensorError,
)
from .plan.hardware import HardwareFacts, HardwareOptimizer, Recommendation
from .upkeep import handle_steps as _handle_steps
from .upkeep.compaction import MaintenanceReport
from .upkeep.verify import VerifyReport, verify

# The composition root: the engine runs upkeep (recovery, warm restart, compaction) without importing it.
_upkeep_steps.install(_handle_steps())

__all__ = [
    "__version__",
    "open",
    "TierStore",
    "BlockInfo",
    "StoreStats",
    "CacheConfig",
    "SharedCredentials",
    "HierarchicalCacheManager",
    "HardwareOptimizer",
    "HardwareFacts",
    "Recommendation",
    "IntelNvidiaCacheManager",
    "create_hardware_optimized_cache_manager",
    "verify",
    "VerifyReport",
    "MaintenanceReport",
    "parse_size",
    "format_size",
    "TierStoreError",
    "BlockNotFoundError",
    "CatalogError",
    "CheckpointError",
    "ConfigError",
    "CorruptBlockError",
    "DeviceMemoryError",
    "InvalidKeyError",
    "InvalidArgumentError",
    "ReadOnlyError",
    "SchemaVersionError",
    "StoreClosedError",
    "StoreFullError",
    "StoreLockedError",
    "StoreNotFoundError",
    "TierFullError",
    "TransactionError",
    "UnsupportedTensorError",
    "UnsafePathError",
    "SharedTierError",
    "SharedTierUnavailableError",
    "BlockUnavailableError",
]


def open(path: str | Path, config: CacheConfig | None = None, *, readonly: bool = False,
         remember_config: bool = True, **overrides: Any) -> TierStore:
    """Open the store at ``path``, creating it unless ``readonly``.

    ``config`` (a :class:`CacheConfig`) sets sizes, policies and codecs; keyword ``overrides``
    change single fields (``tierstore.open(p, l2_cache_size="1GiB")``). With neither, the
    configuration of the last successful read-write open is used (a failed open is not
    remembered). Only one handle at a time may write to a store (a second gets
    ``StoreLockedError`` at once); ``readonly=True`` handles, in any process, see the last
    committed state. A read-only handle builds only the caches it can use: an L1 pool only when
    ``l1_device`` or ``l1_cache_size`` is given, and, unless ``l2_cache_size`` is given, an L2 no
    larger than the store's data at open and a quarter of the machine's memory (none if even
    that cannot be had), so a config remembered on a bigger machine never stops a reader.
    ``remember_config=False`` keeps the remembered configuration (a one-off open with, say, L2 off
    for maintenance, which must not leave the store without its L2 size).
    """
    return TierStore(path, config, readonly=readonly, remember_config=remember_config, **overrides)
