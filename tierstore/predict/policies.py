"""Eviction policies: which resident key a tier gives up next.

A policy only *orders* keys; it never holds bytes and never decides how much fits. The owner (a tier
of the store, or the trace simulator in ``tools/replay.py``) holds the capacity and drives the policy
through one fixed sequence per access, written out once in :func:`access`:

1. ``record_access(key, now)`` for **every** access, hit or miss, before anything else changes, so a
   policy that learns from the stream (:class:`tierstore.predict.predictor.PredictivePolicy`) sees misses too;
   for the classic policies it only refreshes a key that is already resident;
2. on a miss, ``admit(key, size)``: may the key be cached at all? (the classic policies always say
   yes; a predictive one may decline a key it expects back later than everything resident);
3. while ``used + size > capacity``: ``remove(victim())``;
4. ``insert(key, size, parent)``. ``parent`` names the key this one extends in a chain (a KV-cache
   prefix block): a chain-aware policy evicts tails before the prefixes they depend on.

Keys are any hashable value: ``str`` block keys in the store, dense ``int`` ids in the simulator.
Sizes default to 1, so a capacity counts entries; pass byte sizes and a byte capacity to budget bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Generic, Protocol, TypeVar

from ..errors import ConfigError, TierFullError

__all__ = ["Policy", "LRU", "FIFO", "LFU", "access", "make_policy", "POLICY_NAMES", "LEARNED_POLICIES"]

K = TypeVar("K", bound=Hashable)

POLICY_NAMES = ("lru", "fifo", "lfu", "predictive", "kv")
LEARNED_POLICIES = ("predictive", "kv")
"""The policies that size their shadow experts in entries (``make_policy`` needs a capacity)."""


class Policy(Protocol[K]):
    """What a tier needs from an eviction policy (see the module docstring for the call order)."""

    name: str

    @property
    def used(self) -> int:
        """Sum of the sizes of the resident keys."""

    def record_access(self, key: K, now: float) -> None:
        """Note an access to ``key`` at time ``now`` (seconds, or the access index in a simulation)."""

    def admit(self, key: K, size: int = 1) -> bool:
        """Whether a missed ``key`` should be cached at all."""

    def insert(self, key: K, size: int = 1, parent: K | None = None) -> None:
        """Make ``key`` resident (the caller has made room)."""

    def remove(self, key: K) -> None:
        """Forget a resident ``key`` (evicted or deleted); unknown keys are ignored."""

    def victim(self) -> K:
        """The resident key to evict next; raises ``TierFullError`` when nothing is resident."""

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...


def access(policy: Policy[K], key: K, now: float, capacity: int, size: int = 1,
           parent: K | None = None) -> bool:
    """Run one access through ``policy`` for a cache of ``capacity``; True on a hit.

    This is the reference driver of the protocol; the trace simulator uses it as is, and a tier
    follows the same steps with its byte moves in between.
    """
    hit = key in policy
    policy.record_access(key, now)
    if hit:
        return True
    if key in policy:  # brought in by the policy itself (a takeover, tierstore.predict.takeover): still a miss
        return False
    if size > capacity or not policy.admit(key, size):
        return False
    while policy.used + size > capacity:
        policy.remove(policy.victim())
    policy.insert(key, size, parent)
    return False


def _empty(name: str) -> TierFullError:
    return TierFullError(f"{name} policy has no resident key to evict; the block is larger than the "
                         "tier's free space or the tier is empty: raise the tier's capacity")


class _Sized(Generic[K]):
    """Size bookkeeping shared by the classic policies."""

    __slots__ = ("_sizes", "_used")

    def __init__(self) -> None:
        self._sizes: dict[K, int] = {}
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def admit(self, key: K, size: int = 1) -> bool:
        return True

    def _add(self, key: K, size: int) -> bool:
        """Record ``key`` as resident; False when it already was (a repeated insert is a refresh)."""
        old = self._sizes.get(key)
        self._sizes[key] = size
        self._used += size - (old or 0)
        return old is None

    def _drop(self, key: K) -> bool:
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self._used -= size
        return True


class _Ordered(_Sized[K]):
    """Keys in one order; the victim is the first. LRU and FIFO differ only in what moves a key."""

    __slots__ = ("_order",)
    name = "ordered"

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[K, None] = OrderedDict()

    def remove(self, key: K) -> None:
        if self._drop(key):
            del self._order[key]

    def victim(self) -> K:
        if not self._order:
            raise _empty(self.name)
        return next(iter(self._order))


class LRU(_Ordered[K]):
    """Least recently used first."""

    __slots__ = ()
    name = "lru"

    def record_access(self, key: K, now: float) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def insert(self, key: K, size: int = 1, parent: K | None = None) -> None:
        self._add(key, size)
        self._order[key] = None
        self._order.move_to_end(key)


class FIFO(_Ordered[K]):
    """First inserted first out; hits do not reorder."""

    __slots__ = ()
    name = "fifo"

    def record_access(self, key: K, now: float) -> None:
        pass  # FIFO ignores hits by definition

    def insert(self, key: K, size: int = 1, parent: K | None = None) -> None:
        if self._add(key, size):
            self._order[key] = None


class LFU(_Sized[K]):
    """Least frequently used first, least recently used among equals; O(1) per operation.

    Counts live only while a key is resident (a re-inserted key starts again at 1): the classic
    in-cache LFU. Keys sit in one insertion-ordered bucket per count, so the victim is the oldest
    entry of the lowest non-empty bucket, and a hit moves a key one bucket up.
    """

    __slots__ = ("_buckets", "_count", "_lowest")
    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._count: dict[K, int] = {}
        self._buckets: dict[int, OrderedDict[K, None]] = {}
        self._lowest = 0

    def _put(self, key: K, count: int) -> None:
        self._count[key] = count
        bucket = self._buckets.get(count)
        if bucket is None:
            bucket = self._buckets[count] = OrderedDict()
        bucket[key] = None

    def _take(self, key: K) -> int:
        count = self._count.pop(key)
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
        return count

    def record_access(self, key: K, now: float) -> None:
        if key in self._count:
            count = self._take(key)
            self._put(key, count + 1)
            if self._lowest == count and count not in self._buckets:
                self._lowest = count + 1

    def insert(self, key: K, size: int = 1, parent: K | None = None) -> None:
        if self._add(key, size):
            self._put(key, 1)
            self._lowest = 1

    def remove(self, key: K) -> None:
        if self._drop(key):
            count = self._take(key)
            if self._lowest == count and count not in self._buckets:
                self._lowest = min(self._buckets, default=0)  # few buckets: one per distinct count

    def victim(self) -> K:
        if not self._buckets:
            raise _empty(self.name)
        return next(iter(self._buckets[self._lowest]))


def make_policy(name: str, *, capacity: int | None = None, prediction_window: int = 200,
                prediction_threshold: float = 0.7, block_size: int = 1) -> Policy[Any]:
    """A fresh policy by its config name (``lru``, ``fifo``, ``lfu``, ``predictive`` or ``kv``).

    ``predictive`` and ``kv`` (:class:`tierstore.predict.kv_policy.KVPolicy`, the KV-cache-aware
    one) need ``capacity`` (in the unit of the sizes passed to ``insert``): they score their shadow
    experts at ``capacity // block_size`` entries.
    """
    key = name.lower()
    if key == "lru":
        return LRU()
    if key == "fifo":
        return FIFO()
    if key == "lfu":
        return LFU()
    if key in LEARNED_POLICIES:
        if capacity is None or capacity < 1:
            raise ConfigError(f"the {key} policy needs a capacity of at least 1 entry, got {capacity!r}")
        if key == "kv":
            from .kv_policy import KVPolicy  # imports the predictor, which imports this module; import late

            # no takeover: it loads keys into the tier on the policy's word, which a store's tier
            # (whose mover alone copies bytes) does not do; the trace simulator builds KVPolicy itself
            return KVPolicy(capacity, prediction_window=prediction_window,
                            prediction_threshold=prediction_threshold, block_size=block_size, takeover=None)
        from .predictor import PredictivePolicy  # predict imports this module's protocol; import late

        return PredictivePolicy(capacity, prediction_window=prediction_window,
                                prediction_threshold=prediction_threshold, block_size=block_size)
    raise ConfigError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
