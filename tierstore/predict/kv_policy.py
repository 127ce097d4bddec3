"""A KV-cache-aware policy: decayed reuse counts over prefix chains, with the half-life learned online.

KV-cache blocks are not independent keys. A block of a prompt prefix is reused by every later
request that shares the prefix (a system prompt by many requests, a conversation's history by its
next turn), always together with every block before it; a block's worth is how many requests are
likely to come back through it, soon. On the Mooncake traces (``/work/shared/traces``, BENCHMARKS.md)
recency alone (LRU, ARC, S3-FIFO) keeps the latest conversation turns, which mostly never return,
and plain frequency (LFU) keeps yesterday's popular prefixes too long.

:class:`ShadowLRFU` keeps each key's *decayed reuse count*: every access adds 1 and the sum halves
every ``half_life`` accesses (LRFU, Lee et al., IEEE ToC 2001; ``half_life`` -> 0 is LRU, -> inf is
LFU). A shared prefix block, reached by many requests, carries a large count; a conversation's
new blocks start at 1 and decay unless the conversation returns. The count of a block is never
below the count of its extensions (every request that reaches an extension reaches the block
first), so evicting the lowest count evicts chain tails before the prefixes they need, which is
what prefix-aware scoring rewards. The count is remembered after eviction (the state of a ghost),
so a block that comes back resumes its count. Comparing ``log2(count) + t / half_life`` at the
last access ``t`` orders keys exactly as their counts *now* (the decay is common to all), so the
order is fixed between accesses and a lazy heap finds the victim in O(log n).

Which half-life is right depends on how far apart a workload's reuses are relative to the cache:
measured on the synthetic Mooncake trace, 16x the capacity at 1% of its blocks, 8x at 5% and 2x at
10% and 25%. So :class:`AdaptiveLRFU` learns it online: a panel of :class:`ShadowLRFU` at half-lives
of 1-32 capacities scores hits on the recent stream, and the cache adopts the best one's half-life
by re-ranking (no key moves, so no switch cost). :class:`KVPolicy` is the predictive policy
(:class:`tierstore.predict.predictor.PredictivePolicy`, chain tails first there too) with the
adaptive LRFU leading its panel and the classic and learned experts behind it, for streams that are
not KV traffic, under a dearer switch rule (4 misses per key the tier lacks), and, in the
simulator and when asked (``takeover=``), a takeover (:mod:`tierstore.predict.takeover`): when
another expert clearly and steadily beats the one the tier follows, the tier becomes its copy at
once. Measured on every trace in BENCHMARKS.md (issue 18 sections): above every classic policy
on the synthetic Mooncake trace with prefix-aware scoring, below S3-FIFO on some block-I/O and
object traces; not a default.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from .predictor import PredictivePolicy
from .shadow_caches import Evictions, ShadowCache

__all__ = ["ShadowLRFU", "AdaptiveLRFU", "KVPolicy", "HALF_LIVES", "TAKEOVER"]

K = TypeVar("K", bound=Hashable)

HALF_LIVES = (16, 8, 2, 4, 1, 32)
"""The adaptive LRFU's half-lives, in capacities (it ranks by the first until the panel's scores say
otherwise; 16 first: the best single one at 1% of the synthetic Mooncake trace)."""


TAKEOVER: tuple[float, int] | tuple[float, int, float] | None = (0.0, 8, 5.0)
"""The ``kv`` policy's takeover rule, (margin, epochs, noise) (:mod:`tierstore.predict.takeover`): an
expert that tops the panel, ahead of the followed one by 5 standard deviations of a Poisson count,
for 8 epochs in a row. Chosen by ``tools/kv_takeover_sweep.py`` on Mooncake and the cuts of eight
object traces (BENCHMARKS.md, "The kv policy takes over its leading expert"): of the 19 rules of
the final sweep it was the one that gained most without any cell falling further below the best classic policy than
without a takeover and without moving Mooncake at 1% and 5%; smaller bounds took over on Mooncake
at 1% on chance leads and lost there. Not the default (``KVPolicy(takeover=TAKEOVER)`` turns it
on): a takeover loads the expert's keys into the tier without a demand miss, a prefetch that the
hit rate does not charge, so with it the policy is no longer scored like the demand-paging classic
policies and OPT it is compared with; it gained one cell of the 44 (30 against 29)."""


class ShadowLRFU(Generic[K]):
    """Keys-only LRFU: evict the key with the lowest reuse count decayed by ``half_life`` accesses."""

    def __init__(self, capacity: int, half_life: float) -> None:
        self.capacity = max(1, capacity)
        self.half_life = max(1.0, float(half_life))
        self.name = f"lrfu{half_life / self.capacity:g}"
        self._rate = 1.0 / self.half_life
        self._count: dict[K, tuple[float, int]] = {}  # every key seen: (count at its last access, that tick)
        self._version: dict[K, int] = {}  # resident keys -> the serial of their live heap entry
        self._heap: list[tuple[float, int, K]] = []  # (log2 count + tick / half-life, serial, key)
        self._serial = 0
        self._tick = 0

    def __contains__(self, key: object) -> bool:
        return key in self._version

    def __iter__(self) -> Iterator[K]:
        return iter(self._version)

    def access(self, key: K) -> K | None:
        out: Evictions[K] = []
        self.run((key,), out)
        return out[0][1] if out else None

    def rerank(self, half_life: float) -> None:
        """Rank by another half-life from now on (each key's remembered count carries over)."""
        self.half_life = max(1.0, float(half_life))
        rate = self._rate = 1.0 / self.half_life
        count, log2 = self._count, math.log2
        self._heap = [(log2(count[k][0]) + count[k][1] * rate, s, k) for k, s in self._version.items()]
        heapq.heapify(self._heap)

    def run(self, keys: Sequence[K], evicted: Evictions[K] | None = None) -> int:
        count, version, heap, rate, capacity = self._count, self._version, self._heap, self._rate, self.capacity
        tick, serial, hits = self._tick, self._serial, 0
        log2, push, pop = math.log2, heapq.heappush, heapq.heappop
        for i, key in enumerate(keys):
            tick += 1
            seen = count.get(key)
            value = 1.0 if seen is None else seen[0] * 2.0 ** ((seen[1] - tick) * rate) + 1.0
            count[key] = (value, tick)
            if key in version:
                hits += 1
            elif len(version) >= capacity:
                while version.get(heap[0][2]) != heap[0][1]:
                    pop(heap)
                gone = pop(heap)[2]
                del version[gone]
                if evicted is not None:
                    evicted.append((i, gone))
            serial += 1
            version[key] = serial
            push(heap, (log2(value) + tick * rate, serial, key))
            if len(heap) > 4 * capacity + 64:  # drop stale entries now and then
                self._heap = heap = [e for e in heap if version.get(e[2]) == e[1]]
                heapq.heapify(heap)
        self._tick, self._serial = tick, serial
        return hits


class AdaptiveLRFU(Generic[K]):
    """LRFU whose half-life is learned online: it ranks by the half-life that would have hit most.

    A panel of :class:`ShadowLRFU` at ``half_lives`` (in capacities) runs beside it; every
    ``epoch`` accesses their hits decay into scores (a memory of about ``window`` accesses) and
    this cache adopts the best scorer's half-life. Adopting one moves no key: it only re-ranks the
    resident keys (one heapify), so unlike following another expert's contents it costs no misses,
    and the contents drift towards what the better half-life keeps.
    """

    name = "lrfu"

    def __init__(self, capacity: int, half_lives: Sequence[float] = HALF_LIVES, *, epoch: int | None = None,
                 window: int | None = None, lrfu: type[ShadowLRFU[K]] | None = None) -> None:
        self.capacity = max(1, capacity)
        self.half_lives = tuple(half_lives)
        self._window = window
        make = lrfu or ShadowLRFU
        self.dense = lrfu is not None  # compiled LRFUs take int64 slices (the batch replay passes them)
        self.panel = [make(self.capacity, h * self.capacity) for h in half_lives]
        self.epoch = epoch or max(64, self.capacity // 8)
        self.decay = 1.0 - self.epoch / max(window or max(8192, 16 * self.capacity), 2 * self.epoch)
        self.scores = [0.0] * len(self.panel)
        self.tier = make(self.capacity, self.panel[0].half_life)
        if lrfu is not None:  # compiled: the panel counts what a switch to it costs over arrays
            self.missing_from: Callable[[Any], int] = self.tier.missing_from  # type: ignore[union-attr]
        self._chosen = 0
        self._countdown = self.epoch

    def compiled(self) -> AdaptiveLRFU[K]:
        """A fresh twin of this (fresh) cache on compiled LRFUs (:mod:`tierstore.predict.compiled_shadows`)."""
        from .compiled_shadows import CompiledLRFU

        return AdaptiveLRFU(self.capacity, self.half_lives, epoch=self.epoch, window=self._window,
                            lrfu=CompiledLRFU)  # type: ignore[arg-type]

    @property
    def half_life(self) -> float:
        """The half-life (in accesses) the cache ranks by now."""
        return self.tier.half_life

    def __contains__(self, key: object) -> bool:
        return key in self.tier

    def __iter__(self) -> Iterator[K]:
        return iter(self.tier)

    def access(self, key: K) -> K | None:
        out: Evictions[K] = []
        self.run((key,), out)
        return out[0][1] if out else None

    def run(self, keys: Sequence[K], evicted: Evictions[K] | None = None) -> int:
        hits, start, n = 0, 0, len(keys)
        while start < n:
            stop = min(n, start + self._countdown)
            chunk = keys[start:stop]
            for j, shadow in enumerate(self.panel):
                self.scores[j] += shadow.run(chunk)
            if evicted is None:
                hits += self.tier.run(chunk)
            else:
                out: Evictions[K] = []
                hits += self.tier.run(chunk, out)
                evicted.extend((start + i, key) for i, key in out)
            self._countdown -= stop - start
            if not self._countdown:
                self._end_epoch()
            start = stop
        return hits

    def _end_epoch(self) -> None:
        self._countdown = self.epoch
        scores = self.scores
        best = max(range(len(scores)), key=scores.__getitem__)  # the first of equals
        if scores[best] > scores[self._chosen]:
            self._chosen = best
            self.tier.rerank(self.panel[best].half_life)
        for j in range(len(scores)):
            scores[j] *= self.decay


class KVPolicy(PredictivePolicy[K]):
    """The predictive policy with the adaptive LRFU expert leading its panel: the KV-aware policy (``kv``).

    Same protocol, knobs and chain handling as :class:`tierstore.predict.predictor.PredictivePolicy`
    (whose panel, after the LRFU expert, is ``experts``); ``half_lives`` are in capacities;
    ``takeover``: None (the default) follows the leading expert's decisions only; :data:`TAKEOVER`
    lets the tier become it (loading keys no caller inserted: the trace simulator only, and not
    demand paging; the store's ``make_policy`` never passes it).
    ``switch_cost`` defaults to 4 misses per key the tier lacks, not 1: on the synthetic Mooncake
    trace the panel otherwise leaves the LRFU expert for ARC or S3-FIFO on a few epochs' lead and
    loses more than it gains (1%: 11 switches, 0.038 against 0.044 with a cost of 4; 5%: 0.161
    against 0.170).
    """

    name = "kv"

    def __init__(self, capacity: int, *, half_lives: Sequence[float] = HALF_LIVES,
                 experts: tuple[str, ...] = ("s3fifo", "arc", "wtinylfu", "predicted", "lru", "lirs"),
                 switch_cost: float = 4.0, takeover: tuple[float, int] | tuple[float, int, float] | None = None,
                 **options: Any) -> None:
        entries = max(1, capacity // int(options.get("block_size", 1)))
        lrfu: ShadowCache[K] = AdaptiveLRFU(entries, half_lives)
        super().__init__(capacity, experts=experts, shadows=(lrfu,), switch_cost=switch_cost, takeover=takeover,
                         **options)
