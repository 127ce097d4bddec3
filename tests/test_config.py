"""CacheConfig: every knob of the request, sizes as strings, clear errors."""

from __future__ import annotations

import math

import pytest

from tierstore import CacheConfig, ConfigError, parse_size
from tierstore.config import MAX_FLUSH_INTERVAL, MAX_PREDICTION_WINDOW, MAX_SIZE


def test_seed_knobs_exist_with_seed_values() -> None:
    config = CacheConfig(
        l1_cache_size=1024 * 1024 * 1024, l2_cache_size=2 * 1024 * 1024 * 1024,
        l3_cache_size=8 * 1024 * 1024 * 1024, l1_eviction_policy="lru", l2_eviction_policy="lru",
        l3_eviction_policy="fifo", l2_pin_memory=True, l3_compression=True, migration_threshold_high_freq=4,
        migration_threshold_medium_freq=2, migration_time_threshold=600.0, prediction_window=200,
        prediction_threshold=0.7)
    assert config.l3_compression == "auto" and config.l2_cache_size == 2 << 30


@pytest.mark.parametrize(("text", "value"), [("512MiB", 512 << 20), ("2 GB", 2_000_000_000), ("1.5GiB", 3 << 29),
                                             ("4096", 4096), (4096, 4096), ("1k", 1000)])
def test_sizes(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", [
    {"l2_cache_size": "lots"}, {"l2_cache_size": -1}, {"l2_cache_size": True},
    {"l1_eviction_policy": "random"}, {"l3_compression": "gzip"}, {"l3_compression": "blosc-lz4:3"},
    {"prediction_threshold": 1.5}, {"prediction_window": 0}, {"migration_time_threshold": 0},
    {"migration_threshold_high_freq": 1, "migration_threshold_medium_freq": 2}, {"l2_pin_memory": "yes"},
    # nan would make the history thread spin, inf would kill it; neither is a duration
    {"history_flush_interval": math.nan}, {"history_flush_interval": math.inf},
    {"history_flush_interval": MAX_FLUSH_INTERVAL + 1}, {"history_flush_interval": -math.inf},
    {"migration_time_threshold": math.nan}, {"migration_time_threshold": math.inf},
    {"prediction_window": 2**62}, {"prediction_window": MAX_PREDICTION_WINDOW + 1},
    {"l2_cache_size": 2**70}, {"l2_cache_size": MAX_SIZE + 1}, {"l3_cache_size": "9" * 400},
    {"l1_cache_size": -1.0}, {"l1_device": "nonsense"}, {"l1_device": "cuda:x"}, {"l1_device": "cpu\n"},
    {"l1_device": "xla:0"}, {"l1_device": 5},
], ids=repr)
def test_bad_values_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        CacheConfig(**bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_replace_rejects_unknown_fields() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        CacheConfig().replace(l4_cache_size=1)
    assert CacheConfig().replace(l3_compression="zstd:5").l3_compression == "zstd:5"


def test_bounds_are_inclusive() -> None:
    config = CacheConfig(prediction_window=MAX_PREDICTION_WINDOW, history_flush_interval=MAX_FLUSH_INTERVAL,
                         l3_cache_size=MAX_SIZE, l1_device="cuda:1", migration_time_threshold=1e9)
    assert config.prediction_window == MAX_PREDICTION_WINDOW and config.l3_cache_size == MAX_SIZE
    assert parse_size(4.0) == 4 and CacheConfig(l1_device="cpu").l1_device == "cpu"
