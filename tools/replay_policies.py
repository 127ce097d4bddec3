"""Reference cache policies for trace replay: LRU, FIFO, LFU, ARC, S3-FIFO, W-TinyLFU, Belady's OPT.

Each simulator takes dense keys (ints in ``0..unique-1``, see ``np.unique(..., return_inverse=True)``),
a capacity in entries (unit-size objects) and a progress callback, and returns one byte per access:
1 for a hit, 0 for a miss (cold misses included). Per-access results, not just a count, let the
caller score prefix-aware hit rates afterwards.

They are written independently of ``tierstore.predict.policies`` on purpose: they are the yardstick the
store's own policies are measured against, and they are tuned for speed (flat lists indexed by the
dense key instead of dicts, loops in chunks so progress reporting costs nothing per access).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

__all__ = ["SIMULATORS", "Progress", "next_use", "lru", "fifo", "lfu", "arc", "s3fifo", "wtinylfu", "opt"]

Progress = Callable[[int], None]
Simulator = Callable[[list[int], int, int, Progress], bytearray]
CHUNK = 1 << 16


def lru(keys: list[int], unique: int, capacity: int, progress: Progress) -> bytearray:
    hits = bytearray(len(keys))
    cache: OrderedDict[int, None] = OrderedDict()
    move, pop = cache.move_to_end, cache.popitem
    i = 0
    for start in range(0, len(keys), CHUNK):
        for k in keys[start:start + CHUNK]:
            if k in cache:
                move(k)
                hits[i] = 1
            else:
                if len(cache) >= capacity:
                    pop(False)
                cache[k] = None
            i += 1
        progress(i)
    return hits


def fifo(keys: list[int], unique: int, capacity: int, progress: Progress) -> bytearray:
    hits = bytearray(len(keys))
    resident = bytearray(unique)
    queue: deque[int] = deque()
    i = 0
    for start in range(0, len(keys), CHUNK):
        for k in keys[start:start + CHUNK]:
            if resident[k]:
                hits[i] = 1
            else:
                if len(queue) >= capacity:
                    resident[queue.popleft()] = 0
                queue.append(k)
                resident[k] = 1
            i += 1
        progress(i)
    return hits


def lfu(keys: list[int], unique: int, capacity: int, progress: Progress) -> bytearray:
    """In-cache LFU (counts start at 1 on insertion), least recently used first among equal counts."""
    hits = bytearray(len(keys))
    count = [0] * unique
    buckets: dict[int, OrderedDict[int, None]] = {}
    size = lowest = 0
    i = 0
    for start in range(0, len(keys), CHUNK):
        for k in keys[start:start + CHUNK]:
            c = count[k]
            if c:
                hits[i] = 1
                bucket = buckets[c]
                del bucket[k]
                if not bucket:
                    del buckets[c]
                    if lowest == c:
                        lowest = c + 1
                count[k] = c + 1
                nxt = buckets.get(c + 1)
                if nxt is None:
                    nxt = buckets[c + 1] = OrderedDict()
                nxt[k] = None
            else:
                if size >= capacity:
                    bucket = buckets[lowest]
                    gone, _ = bucket.popitem(False)
                    if not bucket:
                        del buckets[lowest]
                    count[gone] = 0
                    size -= 1
                count[k] = 1
                ones = buckets.get(1)
                if ones is None:
                    ones = buckets[1] = OrderedDict()
                ones[k] = None
                lowest = 1
                size += 1
            i += 1
        progress(i)
    return hits


def arc(keys: list[int], unique: int, capacity: int, progress: Progress) -> bytearray:
    """ARC (Megiddo and Modha, FAST'03), as in the paper's pseudo-code."""
    hits = bytearray(len(keys))
    t1: OrderedDict[int, None] = OrderedDict()
    t2: OrderedDict[int, None] = OrderedDict()
    b1: OrderedDict[int, None] = OrderedDict()
    b2: OrderedDict[int, None] = OrderedDict()
    where = bytearray(unique)  # 0 absent, 1 T1, 2 T2, 3 B1, 4 B2
    c = capacity
    p = 0.0

    def replace(in_b2: bool) -> None:
        if t1 and (len(t1) > p or (in_b2 and len(t1) == p)):
            y, _ = t1.popitem(False)
            b1[y] = None
            where[y] = 3
        else:
            y, _ = t2.popitem(False)
            b2[y] = None
            where[y] = 4

    i = 0
    for start in range(0, len(keys), CHUNK):
        for x in keys[start:start + CHUNK]:
            w = where[x]
            if w == 1:
                del t1[x]
                t2[x] = None
                where[x] = 2
                hits[i] = 1
            elif w == 2:
                t2.move_to_end(x)
                hits[i] = 1
            elif w == 3:
                p = min(float(c), p + max(len(b2) / len(b1), 1.0))
                replace(False)
                del b1[x]
                t2[x] = None
                where[x] = 2
            elif w == 4:
                p = max(0.0, p - max(len(b1) / len(b2), 1.0))
                replace(True)
                del b2[x]
                t2[x] = None
                where[x] = 2
            else:
                l1 = len(t1) + len(b1)
                if l1 >= c:
                    if len(t1) < c:
                        y, _ = b1.popitem(False)
                        where[y] = 0
                        replace(False)
                    else:
                        y, _ = t1.popitem(False)
                        where[y] = 0
                elif l1 + len(t2) + len(b2) >= c:
                    if l1 + len(t2) + len(b2) >= 2 * c:
                        y, _ = b2.popitem(False)
                        where[y] = 0
                    replace(False)
                t1[x] = None
                where[x] = 1
            i += 1
        progress(i)
    return hits


def s3fifo(keys: list[int], unique: int, capacity: int, progress: Progress) -> bytearray:
    """S3-FIFO (Yang et al., SOSP'23): 10% small FIFO, 90% main FIFO with 2-bit clock, ghost FIFO."""
    hits = bytearray(len(keys))
    small_cap = max(1, capacity // 10)
    main_cap = max(1, capacity - small_cap)
    small: deque[int] = deque()
    main: deque[int] = deque()
    ghost: OrderedDict[int, None] = OrderedDict()
    where = bytearray(unique)  # 0 absent, 1 small, 2 main
    freq = bytearray(unique)

    def evict_main() -> None:
        while main:
            t = main.popleft()
            if freq[t]:
                freq[t] -= 1
                main.append(t)
            else:
                where[t] = 0
                return

    def evict() -> None:
        if small and (len(small) >= small_cap or not main):
            while small:
                t = small.popleft()
                if freq[t]:  # touched while in the small queue: earns a place in main
                    freq[t] = 0
                    main.append(t)
                    where[t] = 2
                    if len(main) > main_cap:
                        evict_main()
                        return
                else:
                    where[t] = 0
                    ghost[t] = None
                    if len(ghost) > main_cap:
                        ghost.popitem(False)
                    return
        evict_main()

    i = 0
    for start in range(0, len(keys), CHUNK):
        for x in keys[start:start + CHUNK]:
            if where[x]:
                hits[i] = 1
                if freq[x] < 3:
                    freq[x] += 1
            else:
                while len(small) + len(main) >= capacity:
                    evict()
                freq[x] = 0
                if x in ghost:
                    del ghost[x]
                    main.append(x)
                    where[x] = 2
                else:
                    small.append(x)
                    where[x] = 1
            i += 1
        progress(i)
    return hits


def wtinylfu(keys: list[int], unique: int, capacity: int, progress: Progress) -> bytearray:
    """W-TinyLFU (Einziger et al.; Caffeine): 1% LRU window, SLRU main (20% probation), TinyLFU admission.

    The frequency sketch is idealised as exact 4-bit counters halved every ``10 * capacity`` accesses
    (no count-min collisions), which flatters W-TinyLFU slightly.
    """
    hits = bytearray(len(keys))
    window_cap = max(1, capacity // 100)
    main_cap = max(1, capacity - window_cap)
    protected_cap = max(1, int(main_cap * 0.8))
    window: OrderedDict[int, None] = OrderedDict()
    probation: OrderedDict[int, None] = OrderedDict()
    protected: OrderedDict[int, None] = OrderedDict()
    where = bytearray(unique)  # 0 absent, 1 window, 2 probation, 3 protected
    freq = [0] * unique
    sample_size = 10 * capacity
    seen = 0
    i = 0
    for start in range(0, len(keys), CHUNK):
        for x in keys[start:start + CHUNK]:
            if freq[x] < 15:
                freq[x] += 1
            seen += 1
            if seen >= sample_size:
                freq = [f >> 1 for f in freq]
                seen //= 2
            w = where[x]
            if w:
                hits[i] = 1
                if w == 1:
                    window.move_to_end(x)
                elif w == 3:
                    protected.move_to_end(x)
                else:
                    del probation[x]
                    protected[x] = None
                    where[x] = 3
                    if len(protected) > protected_cap:
                        y, _ = protected.popitem(False)
                        probation[y] = None
                        where[y] = 2
            else:
                window[x] = None
                where[x] = 1
                if len(window) > window_cap:
                    cand, _ = window.popitem(False)
                    if len(probation) + len(protected) < main_cap:
                        probation[cand] = None
                        where[cand] = 2
                    else:
                        queue = probation if probation else protected
                        victim = next(iter(queue))
                        if freq[cand] > freq[victim]:
                            del queue[victim]
                            where[victim] = 0
                            probation[cand] = None
                            where[cand] = 2
                        else:
                            where[cand] = 0
            i += 1
        progress(i)
    return hits


def next_use(dense: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """For each access, the index of the next access to the same key (``len(dense)`` if none)."""
    n = len(dense)
    order = np.argsort(dense, kind="stable")
    result = np.full(n, n, dtype=np.int64)
    same = dense[order[1:]] == dense[order[:-1]]
    result[order[:-1][same]] = order[1:][same]
    return result


def opt(keys: list[int], unique: int, capacity: int, progress: Progress) -> bytearray:
    """Belady's MIN with bypass: evict (or never admit) the key whose next use is furthest away.

    Heap entries are single ints ``-(next_use * unique + key)`` (no tuples: a 5M-access trace would
    otherwise hold hundreds of MB of them); stale ones are skipped lazily and the heap is rebuilt
    from the live entries when it grows past a few times the capacity.
    """
    n = len(keys)
    nexts = next_use(np.asarray(keys, dtype=np.int64)).tolist()
    hits = bytearray(n)
    cache: dict[int, int] = {}
    heap: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    i = 0
    for start in range(0, n, CHUNK):
        for k in keys[start:start + CHUNK]:
            nu = nexts[i]
            if k in cache:
                hits[i] = 1
                cache[k] = nu
                push(heap, -(nu * unique + k))
            elif nu < n:
                if len(cache) >= capacity:
                    while True:
                        top = -heap[0]
                        far, victim = divmod(top, unique)
                        if cache.get(victim) == far:
                            break
                        pop(heap)
                    if far <= nu:  # everything resident returns sooner: bypass the newcomer
                        i += 1
                        continue
                    pop(heap)
                    del cache[victim]
                cache[k] = nu
                push(heap, -(nu * unique + k))
            if len(heap) > 4 * capacity + 1024:
                heap = [-(v * unique + key) for key, v in cache.items()]
                heapq.heapify(heap)
            i += 1
        progress(i)
    return hits


SIMULATORS: dict[str, Simulator] = {
    "lru": lru,
    "fifo": fifo,
    "lfu": lfu,
    "arc": arc,
    "s3fifo": s3fifo,
    "wtinylfu": wtinylfu,
    "opt": opt,
}
