"""Shadow caches: keys-only replicas of eviction policies, run beside a tier to score them.

:class:`tierstore.predict.predictor.PredictivePolicy` feeds every access to a small panel of these, counts the
hits each would have had at the tier's capacity, and makes the real tier follow the current best.
A shadow cache holds keys and a few counters, never bytes, so a panel costs a few dict operations
per access and memory proportional to the capacity in entries.

Each shadow implements one published policy faithfully (the same decisions, access for access, as
the reference simulators in ``tools/replay_policies.py``, which the tests check; LIRS, which has no
reference there, is checked against worked examples), and reports the one resident key an access
pushed out, if any; that is all the panel needs to follow it.

The algorithm lives once, in each shadow's :meth:`run`, which processes a batch of accesses in one
tight loop (the trace simulator replays whole epochs through it); :meth:`access`, the per-access
call the store makes, is ``run`` on a batch of one.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

__all__ = ["ShadowCache", "ShadowLRU", "ShadowARC", "ShadowS3FIFO", "ShadowWTinyLFU", "ShadowLIRS", "Evictions"]

K = TypeVar("K", bound=Hashable)

Evictions = list[tuple[int, K]]
"""What a batch reports: ``(i, key)`` for each access ``i`` of the batch that pushed ``key`` out.
``key`` equal to the accessed key itself means the shadow declined to hold it (an admission filter)."""


def _single(shadow: ShadowCache[K], key: K) -> K | None:
    """:meth:`ShadowCache.access` through the batch method: the key it evicted, if any."""
    out: Evictions[K] = []
    shadow.run((key,), out)
    if not out or out[0][1] == key:
        return None
    return out[0][1]


class ShadowCache(Protocol[K]):
    """A keys-only cache of fixed capacity (in entries)."""

    name: str

    def access(self, key: K) -> K | None:
        """Process one access (hit or miss); return the resident key it evicted, if any."""

    def run(self, keys: Sequence[K], evicted: Evictions[K] | None = None) -> int:
        """Process ``keys`` in order; return how many were hits; report evictions into ``evicted``."""

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[K]: ...


class ShadowLRU(Generic[K]):
    """Least recently used."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._order: OrderedDict[K, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __iter__(self) -> Iterator[K]:
        return iter(self._order)

    def access(self, key: K) -> K | None:
        return _single(self, key)

    def run(self, keys: Sequence[K], evicted: Evictions[K] | None = None) -> int:
        order, capacity, hits = self._order, self.capacity, 0
        touch, pop = order.move_to_end, order.popitem
        for i, key in enumerate(keys):
            if key in order:
                touch(key)
                hits += 1
                continue
            if len(order) >= capacity:
                gone = pop(False)[0]
                if evicted is not None:
                    evicted.append((i, gone))
            order[key] = None
        return hits


class ShadowARC(Generic[K]):
    """ARC (Megiddo and Modha, FAST'03): recency and frequency lists sized by ghost hits."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._t1: OrderedDict[K, None] = OrderedDict()
        self._t2: OrderedDict[K, None] = OrderedDict()
        self._b1: OrderedDict[K, None] = OrderedDict()
        self._b2: OrderedDict[K, None] = OrderedDict()
        self._where: dict[K, int] = {}  # 1 T1, 2 T2, 3 B1, 4 B2
        self._p = 0.0

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def __iter__(self) -> Iterator[K]:
        yield from self._t1
        yield from self._t2

    def _replace(self, in_b2: bool, p: float) -> K:
        t1 = self._t1
        if t1 and (len(t1) > p or (in_b2 and len(t1) == p)):
            gone = t1.popitem(False)[0]
            self._b1[gone] = None
            self._where[gone] = 3
        else:
            gone = self._t2.popitem(False)[0]
            self._b2[gone] = None
            self._where[gone] = 4
        return gone

    def access(self, key: K) -> K | None:
        return _single(self, key)

    def run(self, keys: Sequence[K], evicted: Evictions[K] | None = None) -> int:
        where, c, p, hits = self._where, self.capacity, self._p, 0
        t1, t2, b1, b2 = self._t1, self._t2, self._b1, self._b2
        replace, touch = self._replace, t2.move_to_end
        for i, key in enumerate(keys):
            w = where.get(key, 0)
            gone: K | None = None
            if w == 2:
                touch(key)
                hits += 1
                continue
            if w == 1:
                del t1[key]
                hits += 1
            elif w == 3:
                p = min(float(c), p + max(len(b2) / len(b1), 1.0))
                gone = replace(False, p)
                del b1[key]
            elif w == 4:
                p = max(0.0, p - max(len(b1) / len(b2), 1.0))
                gone = replace(True, p)
                del b2[key]
            else:
                l1 = len(t1) + len(b1)
                if l1 >= c:
                    if len(t1) < c:
                        del where[b1.popitem(False)[0]]
                        gone = replace(False, p)
                    else:
                        gone = t1.popitem(False)[0]
                        del where[gone]
                elif l1 + len(t2) + len(b2) >= c:
                    if l1 + len(t2) + len(b2) >= 2 * c:
                        del where[b2.popitem(False)[0]]
                    gone = replace(False, p)
                t1[key] = None
                where[key] = 1
                if gone is not None and evicted is not None:
                    evicted.append((i, gone))
                continue
            t2[key] = None
            where[key] = 2
            if gone is not None and evicted is not None:
                evicted.append((i, gone))
        self._p = p
        return hits


class ShadowS3FIFO(Generic[K]):
    """S3-FIFO (Yang et al., SOSP'23): a 10% probation FIFO, a main FIFO with a 2-bit clock, a ghost."""

    name = "s3fifo"

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._small_cap = max(1, self.capacity // 10)
        self._main_cap = max(1, self.capacity - self._small_cap)
        self._small: deque[K] = deque()
        self._main: deque[K] = deque()
        self._ghost: OrderedDict[K, None] = OrderedDict()
        self._freq: dict[K, int] = {}  # resident keys only

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def __iter__(self) -> Iterator[K]:
        return iter(self._freq)

    def _evict_main(self) -> K | None:
        main, freq = self._main, self._freq
        while main:
            key = main.popleft()
            if freq[key]:
                freq[key] -= 1
                main.append(key)
            else:
                del freq[key]
                return key
        return None

    def _evict(self) -> K | None:
        small, freq = self._small, self._freq
        if small and (len(small) >= self._small_cap or not self._main):
            while small:
                key = small.popleft()
                if freq[key]:  # touched while on probation: earns a place in main
                    freq[key] = 0
                    self._main.append(key)
                    if len(self._main) > self._main_cap:
                        return self._evict_main()
                else:
                    del freq[key]
                    self._ghost[key] = None
                    if len(self._ghost) > self._main_cap:
                        self._ghost.popitem(False)
                    return key
        return self._evict_main()

    def access(self, key: K) -> K | None:
        return _single(self, key)

    def run(self, keys: Sequence[K], evicted: Evictions[K] | None = None) -> int:
        freq, ghost, capacity, hits = self._freq, self._ghost, self.capacity, 0
        evict, probation, main = self._evict, self._small.append, self._main.append
        for i, key in enumerate(keys):
            count = freq.get(key)
            if count is not None:
                if count < 3:
                    freq[key] = count + 1
                hits += 1
                continue
            if len(freq) >= capacity:
                gone = evict()
                if gone is not None and evicted is not None:
                    evicted.append((i, gone))
            freq[key] = 0
            if key in ghost:
                del ghost[key]
                main(key)
            else:
                probation(key)
        return hits


class ShadowWTinyLFU(Generic[K]):
    """W-TinyLFU (Einziger et al.; Caffeine): 1% LRU window, segmented-LRU main, frequency admission.

    Frequencies are exact 4-bit counters halved every ``10 * capacity`` accesses: the count-min
    sketch of the paper without its collisions.
    """

    name = "wtinylfu"

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._window_cap = max(1, self.capacity // 100)
        self._main_cap = max(1, self.capacity - self._window_cap)
        self._protected_cap = max(1, int(self._main_cap * 0.8))
        self._window: OrderedDict[K, None] = OrderedDict()
        self._probation: OrderedDict[K, None] = OrderedDict()
        self._protected: OrderedDict[K, None] = OrderedDict()
        self._where: dict[K, int] = {}  # 1 window, 2 probation, 3 protected
        self._freq: dict[K, int] = {}
        self._sample = 10 * self.capacity
        self._seen = 0

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[K]:
        return iter(self._where)

    def access(self, key: K) -> K | None:
        return _single(self, key)

    def run(self, keys: Sequence[K], evicted: Evictions[K] | None = None) -> int:
        freq, where, seen, sample, hits = self._freq, self._where, self._seen, self._sample, 0
        window, probation, protected = self._window, self._probation, self._protected
        window_cap, main_cap, protected_cap = self._window_cap, self._main_cap, self._protected_cap
        for i, key in enumerate(keys):
            count = freq.get(key, 0)
            if count < 15:
                freq[key] = count + 1
            seen += 1
            if seen >= sample:  # age the counts so yesterday's favourites can leave
                self._freq = freq = {k: v >> 1 for k, v in freq.items() if v > 1}
                seen //= 2
            w = where.get(key, 0)
            if w == 1:
                window.move_to_end(key)
                hits += 1
                continue
            if w == 3:
                protected.move_to_end(key)
                hits += 1
                continue
            if w == 2:
                hits += 1
                del probation[key]
                protected[key] = None
                where[key] = 3
                if len(protected) > protected_cap:
                    demoted = protected.popitem(False)[0]
                    probation[demoted] = None
                    where[demoted] = 2
                continue
            window[key] = None
            where[key] = 1
            if len(window) <= window_cap:
                continue
            candidate = window.popitem(False)[0]
            if len(probation) + len(protected) < main_cap:
                probation[candidate] = None
                where[candidate] = 2
                continue
            queue = probation if probation else protected
            victim = next(iter(queue))
            if freq.get(candidate, 0) > freq.get(victim, 0):
                del queue[victim]
                del where[victim]
                probation[candidate] = None
                where[candidate] = 2
                gone = victim
            else:
                del where[candidate]
                gone = candidate
            if evicted is not None:
                evicted.append((i, gone))
        self._seen = seen
        return hits


class ShadowLIRS(Generic[K]):
    """LIRS (Jiang and Zhang, SIGMETRICS'02): keep the keys with the lowest inter-reference recency.

    99% of the capacity holds LIR keys (re-referenced within the recency of the stack's bottom
    LIR key); 1% holds resident HIR keys in a FIFO queue, from whose front eviction takes. The
    stack also remembers non-resident HIR keys, so a key that comes back soon after leaving becomes
    LIR; that memory is capped at twice the capacity (the oldest go first). Strong on loops longer
    than the cache and on mixes of loops and scans (the LIRS paper's multi/2_pools traces).
    """

    name = "lirs"

    def __init__(self, capacity: int) -> None:
        self.capacity = max(2, capacity)
        self._hir_cap = max(1, self.capacity // 100)
        self._lir_cap = self.capacity - self._hir_cap
        self._stack: OrderedDict[K, None] = OrderedDict()  # bottom (oldest) first
        self._queue: OrderedDict[K, None] = OrderedDict()  # resident HIR keys, evicted from the front
        self._state: dict[K, int] = {}  # 1 LIR, 2 resident HIR, 3 non-resident HIR (in the stack only)
        self._lirs = 0
        self._ghosts = 0

    def __contains__(self, key: object) -> bool:
        return self._state.get(key, 0) in (1, 2)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[K]:
        return (key for key, state in self._state.items() if state != 3)

    def _prune(self) -> None:
        """Drop HIR keys from the stack's bottom so that it ends on a LIR key."""
        stack, state = self._stack, self._state
        while stack:
            key = next(iter(stack))
            if state[key] == 1:
                return
            del stack[key]
            if state[key] == 3:
                del state[key]
                self._ghosts -= 1

    def _demote_bottom(self) -> None:
        """The bottom LIR key becomes a resident HIR key (a newly promoted key took its place)."""
        key = next(iter(self._stack))
        del self._stack[key]
        self._state[key] = 2
        self._queue[key] = None
        self._lirs -= 1
        self._prune()

    def _promote(self, key: K) -> None:
        self._stack[key] = None
        self._stack.move_to_end(key)
        self._state[key] = 1
        self._lirs += 1
        self._demote_bottom()

    def access(self, key: K) -> K | None:
        return _single(self, key)

    def run(self, keys: Sequence[K], evicted: Evictions[K] | None = None) -> int:
        stack, queue, state, hits = self._stack, self._queue, self._state, 0
        capacity, lir_cap = self.capacity, self._lir_cap
        for i, key in enumerate(keys):
            was = state.get(key, 0)
            if was == 1:
                hits += 1
                bottom = next(iter(stack)) == key
                stack.move_to_end(key)
                if bottom:
                    self._prune()
                continue
            if was == 2:
                hits += 1
                del queue[key]
                if key in stack:  # its reuse is recent enough: it becomes LIR
                    self._promote(key)
                else:
                    stack[key] = None
                    queue[key] = None
                continue
            if self._lirs < lir_cap and not queue:  # filling up: the first keys are LIR
                if was == 3:
                    self._ghosts -= 1
                stack[key] = None
                stack.move_to_end(key)
                state[key] = 1
                self._lirs += 1
                continue
            if self._lirs + len(queue) >= capacity:
                gone = queue.popitem(False)[0]
                if gone in stack:
                    state[gone] = 3
                    self._ghosts += 1
                else:
                    del state[gone]
                if evicted is not None:
                    evicted.append((i, gone))
            if was == 3:  # back while still remembered: its reuse distance beats the bottom LIR key's
                self._ghosts -= 1
                self._promote(key)
            else:
                stack[key] = None
                queue[key] = None
                state[key] = 2
            if self._ghosts > 2 * capacity:
                self._forget_ghosts()
        return hits

    def _forget_ghosts(self) -> None:
        """Drop the oldest non-resident keys until the stack remembers only ``capacity`` of them."""
        stack, state = self._stack, self._state
        for key in [k for k in stack if state[k] == 3][: self._ghosts - self.capacity]:
            del stack[key]
            del state[key]
            self._ghosts -= 1
        self._prune()
