"""``CacheConfig``: every knob of the store, parsed and validated once.

Sizes accept ints (bytes) or strings such as ``"512MiB"``, ``"2 GB"`` or
``"1.5GiB"``. Every field of the original request's ``CacheConfig`` is here
under its original name; tierstore's own additions follow them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["CacheConfig", "SharedCredentials", "parse_size", "format_size", "EVICTION_POLICIES",
           "SHARED_PUBLISH_POLICIES"]

EVICTION_POLICIES = ("lru", "fifo", "lfu", "predictive", "kv")
SHARED_PUBLISH_POLICIES = ("explicit", "on-evict", "write-through")
_SECRET_FIELDS = frozenset({"shared_credentials"})
"""Fields never written anywhere (catalog, JSON, repr)."""


@dataclass(frozen=True, slots=True)
class SharedCredentials:
    """Explicit S3 credentials for the shared tier; never stored, logged or shown."""

    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)

    def __repr__(self) -> str:
        return "SharedCredentials(access_key_id='***', secret_access_key='***')"

    def secrets(self) -> tuple[str, ...]:
        """The values to scrub from any text shown to a user."""
        return tuple(v for v in (self.access_key_id, self.secret_access_key, self.session_token) if v)

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")
MAX_SIZE = (1 << 63) - 1
"""The largest size accepted: what an int64 (SQLite's integers, mmap's lengths) can hold."""
MAX_PREDICTION_WINDOW = 10_000_000
"""Longest ``prediction_window`` (accesses): a horizon beyond it labels every return a hit and no sample
ever expires, so the predictor learns nothing and its pending samples grow with the key count."""
MAX_FLUSH_INTERVAL = 3600.0
"""Longest ``history_flush_interval`` (seconds): access history reaches the catalog at least hourly (and a
longer wait than the thread library's timeout limit would stop the history thread)."""


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Return ``value`` in bytes; accepts ints and strings like ``"512MiB"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a size in bytes or a string like '512MiB', not {value!r}")
    if isinstance(value, int):
        return _checked_size(value, name)
    if isinstance(value, float) and value.is_integer():
        return _checked_size(int(value), name)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be an int or a string like '512MiB', not {type(value).__name__}")
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{name}={value!r} is not a size; write bytes as an int or a string such as "
            "'4096', '512MiB', '2GiB' or '1.5 GB'"
        )
    number = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(number):  # hundreds of digits overflow a float
        raise ConfigError(f"{name}={value!r:.40} is larger than any size tierstore can use (at most 2**63-1 bytes)")
    return _checked_size(int(number), name)


def _checked_size(value: int, name: str) -> int:
    if value < 0:
        raise ConfigError(f"{name} must be >= 0 bytes, got {value}")
    if value > MAX_SIZE:
        raise ConfigError(f"{name}={value} is larger than any size tierstore can use (at most 2**63-1 bytes); "
                          "give a size this machine can hold")
    return value


def format_size(nbytes: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_L1_DEVICE_RE = re.compile(r"(cpu|cuda)(:[0-9]{1,4})?")
"""The devices the L1 pool runs on (see ``tierstore.tiers.l1_cuda.DevicePool``)."""
_CODEC_RE = re.compile(r"^(off|none|raw|auto|zstd|shuffle-zstd|bytegroup-zstd|blosc-lz4)(?::(-?[0-9]+))?$")


def normalize_compression(value: bool | str) -> str:
    """The canonical codec setting for ``value`` (``l3_compression``'s forms); ``ConfigError`` if it is none."""
    return _normalize_compression(value)


def _normalize_compression(value: bool | str) -> str:
    if value is True:
        return "auto"
    if value is False or value is None:
        return "off"
    if not isinstance(value, str):
        raise ConfigError(f"l3_compression must be a bool or a codec name, not {type(value).__name__}")
    text = value.strip().lower()
    match = _CODEC_RE.match(text)
    if match is None:
        raise ConfigError(
            f"l3_compression={value!r} is not a codec; use True/'auto', False/'off', 'zstd[:LEVEL]', "
            "'shuffle-zstd[:LEVEL]' (byte-grouped), or 'blosc-lz4'"
        )
    name, level = match.group(1), match.group(2)
    name = {"none": "off", "raw": "off", "bytegroup-zstd": "shuffle-zstd"}.get(name, name)
    if level is not None:
        if name not in ("zstd", "shuffle-zstd"):
            raise ConfigError(f"l3_compression={value!r}: only zstd codecs take a level")
        if not -7 <= int(level) <= 22:
            raise ConfigError(f"l3_compression={value!r}: zstd level must be in -7..22")
        return f"{name}:{int(level)}"
    return name


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Sizes, policies and thresholds for a store.

    The first group of fields is the original request's ``CacheConfig``,
    under the same names; sizes may be given as ``"512MiB"``-style strings.
    ``l1_cache_size=None`` means "decide from the hardware" (off without a
    GPU); ``l3_cache_size=None`` means "bounded only by the disk".
    """

    l1_cache_size: int | None = None
    l2_cache_size: int = 256 << 20
    l3_cache_size: int | None = None

    l1_eviction_policy: str = "lru"
    l2_eviction_policy: str = "lru"
    l3_eviction_policy: str = "fifo"

    l2_pin_memory: bool = True
    l3_compression: bool | str = True

    migration_threshold_high_freq: int = 4
    migration_threshold_medium_freq: int = 2
    migration_time_threshold: float = 600.0
    """Seconds a block may stay idle before it is demoted (finite, > 0)."""

    prediction_window: int = 200
    """Accesses the predictor looks ahead (1 to ``MAX_PREDICTION_WINDOW``, ten million)."""
    prediction_threshold: float = 0.7
    l3_admission: str = "all"
    """Which cache-only blocks leaving L2 are written to L3: ``all``, or ``reused`` (only those read
    since their put; the others are dropped, sparing the SSD writes of blocks never reused)."""

    # tierstore's own knobs
    l3_verify_maps: str = "disk"
    """When a zero-copy map of a raw L3 block (``TierStore.map``, weight streaming) is checked against
    its checksum. ``"disk"`` (the default): whenever the map reads any of its pages from the disk,
    and on each block version's first map in this handle; a map of pages the page cache already
    holds, checked before and alone in their file (so only reads of that block, each checked, can
    have brought them in: ``cachestat(2)``, Linux 6.5+; elsewhere every map is checked) is trusted.
    What it cannot see: another program reading the file after the kernel evicted its pages, and a
    page evicted and re-read in the instant between the check and the map. ``"always"``: every map.
    ``"once"``: the first map of each version only, even when the kernel re-reads the pages from
    the disk later. A check is a pass over the bytes: on a model streamed from the page cache every
    token (the 4B at 3 GiB here, 5.5 GiB a token), ``"always"`` spends ~0.4 s of a core per token
    that ``"disk"`` spends once; where the pages do not stay cached (the model bigger than RAM),
    ``"disk"`` checks every map, as ``"always"`` does. accelerate and safetensors never check."""
    l1_device: str | None = None
    """Device of the L1 pool (``"cuda"``, ``"cuda:1"``, or ``"cpu"`` for tests); None: first GPU."""
    l2_file_backed: bool = False
    """Back L2 with ``<store>/l2.slab`` so a restarted process starts warm."""
    fsync: bool = True
    """fsync data and directories before commits. Turn off only for throwaway stores."""
    history_max_rows: int = 1_000_000
    """Cap on rows kept in the catalog's access log (oldest dropped first)."""
    history_flush_interval: float = 1.0
    """Seconds between background writes of the in-memory access record (finite, > 0, at most an hour)."""
    l1_bf16_cast: str = "auto"
    """bf16 blocks entering L1: ``"auto"`` casts them to ``l1_bf16_fallback`` on GPUs without bf16
    math (compute capability < 8.0), ``"always"`` casts on any device (CPU too), ``"never"`` keeps bf16."""
    l1_bf16_fallback: str = "float16"
    """What bf16 becomes in L1 when cast: ``"float16"`` or ``"float32"``."""
    l1_headroom: int | None = None
    """Device bytes L1 leaves free for the model when it grows (None: 256 MiB on CUDA, 0 on CPU)."""
    shared_url: str | None = None
    """Shared tier on S3-compatible storage, ``"s3://bucket/prefix"``; None: no shared tier."""
    shared_endpoint: str | None = None
    """S3 endpoint (``http://127.0.0.1:7480``); None: ``AWS_ENDPOINT_URL`` or AWS itself."""
    shared_region: str | None = None
    """S3 region; None: ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``~/.aws/config``, else us-east-1."""
    shared_credentials: SharedCredentials | None = dataclasses.field(default=None, repr=False, compare=False)
    """Explicit credentials; None: AWS env vars or ``~/.aws/credentials``. Never stored in the catalog."""
    shared_timeout: float = 10.0
    """Seconds any one shared-tier call may take before it fails (the store never hangs past it)."""
    shared_publish: str = "explicit"
    """When blocks reach the shared tier: ``explicit`` (``db.publish``), ``on-evict`` (cache-only
    blocks spilled from L2), ``write-through`` (every durable put too, after commit)."""
    shared_concurrency: int = 16
    """Requests in flight at once to the shared tier."""
    shared_compression: bool | str | None = None
    """Codec of objects in the shared tier, as ``l3_compression``; None: the same as ``l3_compression``."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.l1_cache_size is not None:
            set_(self, "l1_cache_size", parse_size(self.l1_cache_size, name="l1_cache_size"))
        set_(self, "l2_cache_size", parse_size(self.l2_cache_size, name="l2_cache_size"))
        if self.l3_cache_size is not None:
            set_(self, "l3_cache_size", parse_size(self.l3_cache_size, name="l3_cache_size"))
        for name in ("l1_eviction_policy", "l2_eviction_policy", "l3_eviction_policy"):
            value = getattr(self, name)
            if not isinstance(value, str) or value.lower() not in EVICTION_POLICIES:
                raise ConfigError(f"{name}={value!r}; choose one of {', '.join(EVICTION_POLICIES)}")
            set_(self, name, value.lower())
        for name in ("l2_pin_memory", "l2_file_backed", "fsync"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, not {getattr(self, name)!r}")
        set_(self, "l3_compression", _normalize_compression(self.l3_compression))
        for name in ("migration_threshold_high_freq", "migration_threshold_medium_freq",
                     "prediction_window", "history_max_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.prediction_window > MAX_PREDICTION_WINDOW:
            raise ConfigError(f"prediction_window={self.prediction_window} is past the longest useful horizon "
                              f"({MAX_PREDICTION_WINDOW} accesses); give a number of accesses up to that")
        if self.migration_threshold_medium_freq > self.migration_threshold_high_freq:
            raise ConfigError(
                "migration_threshold_medium_freq must not exceed migration_threshold_high_freq "
                f"({self.migration_threshold_medium_freq} > {self.migration_threshold_high_freq})"
            )
        for name in ("migration_time_threshold", "history_flush_interval"):
            value = getattr(self, name)
            # nan passes every comparison's "else" branch: refuse it (and inf) before comparing
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"{name} must be a finite number of seconds > 0, got {value!r}")
            set_(self, name, float(value))
        if self.history_flush_interval > MAX_FLUSH_INTERVAL:
            raise ConfigError(f"history_flush_interval={self.history_flush_interval:g} s is longer than "
                              f"{MAX_FLUSH_INTERVAL:g} s; access history must reach the catalog at least hourly")
        value = self.prediction_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"prediction_threshold must be a probability in [0, 1], got {value!r}")
        set_(self, "prediction_threshold", float(value))
        if self.l1_bf16_cast not in ("auto", "always", "never"):
            raise ConfigError(f"l1_bf16_cast={self.l1_bf16_cast!r}; choose 'auto', 'always' or 'never'")
        if self.l1_bf16_fallback not in ("float16", "float32"):
            raise ConfigError(f"l1_bf16_fallback={self.l1_bf16_fallback!r}; choose 'float16' or 'float32'")
        if self.l1_headroom is not None:
            set_(self, "l1_headroom", parse_size(self.l1_headroom, name="l1_headroom"))
        if self.l3_verify_maps not in ("always", "disk", "once"):
            raise ConfigError(f"l3_verify_maps={self.l3_verify_maps!r}; choose 'always', 'disk' or 'once'")
        if self.l3_admission not in ("all", "reused"):
            raise ConfigError(f"l3_admission={self.l3_admission!r}; choose 'all' or 'reused'")
        if self.l1_device is not None and (not isinstance(self.l1_device, str)
                                           or not _L1_DEVICE_RE.fullmatch(self.l1_device)):
            raise ConfigError(f"l1_device={self.l1_device!r} is not an L1 device; write 'cuda', 'cuda:N' or 'cpu' "
                              "(or None for the first GPU)")
        if self.shared_compression is not None:
            set_(self, "shared_compression", _normalize_compression(self.shared_compression))
        self._check_shared()

    def _check_shared(self) -> None:
        url = self.shared_url
        if isinstance(url, str) and "@" not in url and (bucket := re.match(r"^s3://([^/]*)", url)) \
                and 0 < len(bucket.group(1)) < 3 and re.fullmatch(r"[a-z0-9.\-]*", bucket.group(1)):
            raise ConfigError(f"shared_url={url!r}: the bucket name {bucket.group(1)!r} is too short; S3 bucket "
                              "names are 3 to 63 characters (lower-case letters, digits, '.', '-')")
        if url is not None and (not isinstance(url, str) or not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,62}(/.*)?$", url)
                                or "@" in url):
            raise ConfigError(f"shared_url={url!r} is not an S3 URL; write 's3://bucket/prefix' "
                              "(credentials go in AWS_* variables, ~/.aws/credentials or shared_credentials)")
        for name in ("shared_endpoint", "shared_region"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or "@" in value):
                raise ConfigError(f"{name} must be a string without credentials, got a {type(value).__name__}")
        if self.shared_credentials is not None and not isinstance(self.shared_credentials, SharedCredentials):
            raise ConfigError("shared_credentials must be a tierstore.SharedCredentials")
        if self.shared_publish not in SHARED_PUBLISH_POLICIES:
            raise ConfigError(f"shared_publish={self.shared_publish!r}; choose one of "
                              f"{', '.join(SHARED_PUBLISH_POLICIES)}")
        timeout = self.shared_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"shared_timeout must be a number of seconds > 0, got {timeout!r}")
        object.__setattr__(self, "shared_timeout", float(timeout))
        value = self.shared_concurrency
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
            raise ConfigError(f"shared_concurrency must be a whole number in 1..256, got {value!r}")

    def replace(self, **changes: Any) -> CacheConfig:
        """A copy with ``changes`` applied (and validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(
                f"unknown CacheConfig field(s): {', '.join(sorted(unknown))}; "
                f"known: {', '.join(f.name for f in dataclasses.fields(self))}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able values (credentials left out: they are never stored)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _SECRET_FIELDS}
