"""SlabAllocator: a stateful model test against a dict of live allocations, plus unit cases."""

from __future__ import annotations

import dataclasses
import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tierstore.errors import ConfigError
from tierstore.tiers.slab_allocator import Allocation, SlabAllocator

PAGE = 4096
CAPACITY = 32 * PAGE  # small enough that random runs fill it and hit every fallback
SLAB = PAGE  # one-page slabs: eight classes, 8..64 slots each, so slabs fill up and empty often
_PROBE = SlabAllocator(CAPACITY, page_size=PAGE, slab_size=SLAB)
CLASSES = _PROBE.class_sizes


def _sizes() -> st.SearchStrategy[int]:
    tiny = st.integers(0, 200)
    near_class = st.builds(lambda c, d: max(0, c + d), st.sampled_from(CLASSES), st.integers(-1, 1))
    pages = st.builds(lambda k, d: max(0, k * PAGE + d), st.integers(1, 12), st.integers(-1, 1))
    odd_large = st.integers(CLASSES[-1] + 1, 10 * PAGE)
    too_big = st.integers(CAPACITY - PAGE, CAPACITY + 3 * PAGE)
    return st.one_of(tiny, near_class, pages, odd_large, too_big)


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free against the plain model ``live: offset -> Allocation``."""

    def __init__(self) -> None:
        super().__init__()
        self.sut = SlabAllocator(CAPACITY, page_size=PAGE, slab_size=SLAB)
        self.live: dict[int, Allocation] = {}
        self.dead: list[Allocation] = []

    @rule(nbytes=_sizes())
    def alloc(self, nbytes: int) -> None:
        self._alloc(nbytes)

    @rule(nbytes=st.sampled_from(CLASSES), count=st.integers(1, 40))
    def alloc_burst(self, nbytes: int, count: int) -> None:
        for _ in range(count):  # enough of one class to fill slabs and spill into new ones
            self._alloc(nbytes)

    def _alloc(self, nbytes: int) -> None:
        # can_fit() gives idle slabs back first; ask it only for even sizes so that alloc()
        # has to do that itself for the odd ones.
        expected = self.sut.can_fit(nbytes) if nbytes % 2 == 0 else None
        a = self.sut.alloc(nbytes)
        if expected is not None:
            assert (a is not None) == expected, (nbytes, a, self.sut.stats())
        elif a is None:
            assert not self.sut.can_fit(nbytes), (nbytes, self.sut.stats())
        if nbytes > CAPACITY:
            assert a is None
        if a is not None:
            assert a.offset not in self.live
            assert a.nbytes == nbytes
            self.live[a.offset] = a

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_some(self, data: st.DataObject) -> None:
        self._free_some(data, max_size=30)

    def _free_some(self, data: st.DataObject, max_size: int) -> None:
        offsets = data.draw(st.sets(st.sampled_from(sorted(self.live)), min_size=1, max_size=max_size))
        for offset in offsets:
            a = self.live.pop(offset)
            self.sut.free(a)
            self.dead.append(a)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), sizes=st.lists(_sizes(), min_size=1, max_size=4))
    def free_then_alloc(self, data: st.DataObject, sizes: list[int]) -> None:
        # Invariants call stats(), which gives idle slabs back; within one rule they stay
        # idle, so alloc() must reclaim them itself when pages run short.
        self._free_some(data, max_size=3)
        for nbytes in sizes:
            self._alloc(nbytes)

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def double_free_is_refused(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.dead))
        if self.live.get(a.offset) == a:
            return  # an identical allocation was handed out again: freeing it is legal
        with pytest.raises(ValueError):
            self.sut.free(a)

    @invariant()
    def no_overlap_and_aligned(self) -> None:
        end = 0
        for offset in sorted(self.live):
            a = self.live[offset]
            assert offset >= end, f"{a} overlaps the allocation ending at {end}"
            assert a.size >= a.nbytes and a.size > 0
            assert offset % 64 == 0
            if a.size > CLASSES[-1]:
                assert offset % PAGE == 0 and a.size % PAGE == 0
            end = offset + a.size
        assert end <= CAPACITY

    @invariant()
    def stats_match_model(self) -> None:
        s = self.sut.stats()
        assert s.used == sum(a.size for a in self.live.values())
        assert s.requested == sum(a.nbytes for a in self.live.values())
        assert s.free == CAPACITY - s.used
        assert 0 <= s.largest_free_run <= s.free
        assert 0.0 <= s.fragmentation <= 1.0
        assert sum(c.slots_used for c in s.per_class) == sum(1 for a in self.live.values() if a.slab >= 0)
        assert all(c.slots_used <= c.slots_total for c in s.per_class)

    def teardown(self) -> None:
        for a in self.live.values():
            self.sut.free(a)
        s = self.sut.stats()
        assert (s.used, s.requested, s.free) == (0, 0, CAPACITY)
        assert s.largest_free_run == CAPACITY
        assert all(c.slabs == 0 and c.slots_total == 0 for c in s.per_class)


AllocatorMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase


def test_class_sizes_step_four_times_per_power_of_two() -> None:
    a = SlabAllocator(1 << 30)
    sizes = a.class_sizes
    assert sizes[:8] == (64, 128, 192, 256, 320, 384, 448, 512)
    assert sizes[-1] == (1 << 20) // 8
    assert all(s % 64 == 0 for s in sizes)
    assert all(s < b <= s * 1.25 for s, b in itertools.pairwise(sizes[3:]))  # 256 on: <= 25% waste
    for n in range(sizes[-1] + 1):
        i = a.class_index(n)
        assert sizes[i] >= max(n, 1) and (i == 0 or sizes[i - 1] < n), n
    assert a.class_index(sizes[-1] + 1) == -1


def test_small_slots_share_a_slab_and_large_take_pages() -> None:
    a = SlabAllocator(1 << 24)
    x, y = a.alloc(100), a.alloc(100)
    assert x is not None and y is not None
    assert x.size == y.size == 128 and x.slab == y.slab and abs(x.offset - y.offset) == 128
    big = a.alloc(300_000)
    assert big is not None and big.offset % 4096 == 0 and big.size == 303_104
    per = {c.size: c for c in a.stats().per_class}
    assert per[128].slabs == 1 and per[128].slots_used == 2 and per[128].slots_total == (1 << 20) // 128


def test_freed_neighbours_coalesce_into_one_run() -> None:
    a = SlabAllocator(16 * PAGE, slab_size=PAGE)
    runs = [a.alloc(4 * PAGE) for _ in range(4)]
    assert all(r is not None for r in runs) and a.alloc(PAGE) is None
    first, second, third, fourth = runs
    assert first is not None and second is not None and third is not None and fourth is not None
    for r in (second, first, third):  # middle first, so both merge directions are exercised
        a.free(r)
    merged = a.alloc(12 * PAGE)
    assert merged is not None and merged.offset == min(first.offset, second.offset, third.offset)
    assert a.stats().largest_free_run == 0


def test_idle_slab_is_given_back_when_pages_run_out() -> None:
    a = SlabAllocator(16 * PAGE, slab_size=2 * PAGE)
    small = a.alloc(64)
    assert small is not None
    a.free(small)  # its slab stays with the class for the next small alloc...
    whole = a.alloc(16 * PAGE)  # ...until a request needs the pages
    assert whole is not None and whole.offset == 0


def test_small_request_falls_back_to_pages_when_no_slab_fits() -> None:
    a = SlabAllocator(16 * PAGE, slab_size=2 * PAGE)
    pages = [a.alloc(PAGE) for _ in range(16)]
    for p in pages[::2]:  # eight one-page holes, no room for a two-page slab
        assert p is not None
        a.free(p)
    tiny = a.alloc(10)
    assert tiny is not None and tiny.slab == -1 and tiny.size == PAGE
    a.free(tiny)
    assert a.stats().used == 8 * PAGE


def test_zero_bytes_costs_one_minimum_slot() -> None:
    a = SlabAllocator(1 << 20)
    z1, z2 = a.alloc(0), a.alloc(0)
    assert z1 is not None and z2 is not None
    assert (z1.size, z1.nbytes) == (64, 0) and z1.offset != z2.offset
    assert a.stats().requested == 0 and a.stats().used == 128


def test_double_free_foreign_and_stale_allocations_raise() -> None:
    a, b = SlabAllocator(1 << 20), SlabAllocator(1 << 20)
    x = a.alloc(1000)
    y = b.alloc(1000)
    assert x is not None and y is not None
    with pytest.raises(ValueError, match="not a live allocation"):
        a.free(y)
    assert a.is_live(x) and not a.is_live(y)
    a.free(dataclasses.replace(x))  # an equal value (say, rebuilt from a record) is the same slot
    assert not a.is_live(x)
    with pytest.raises(ValueError, match="double free"):
        a.free(x)
    z = a.alloc(1000)
    assert z is not None
    a.reset()
    with pytest.raises(ValueError):
        a.free(z)


def test_too_large_or_negative() -> None:
    a = SlabAllocator(10 * PAGE + 123)  # rounded down to whole pages
    assert a.capacity == 10 * PAGE
    assert a.alloc(10 * PAGE + 1) is None and not a.can_fit(10 * PAGE + 1)
    assert a.can_fit(10 * PAGE)
    with pytest.raises(ValueError):
        a.alloc(-1)
    assert SlabAllocator(0).alloc(1) is None


@pytest.mark.parametrize("kwargs", [
    {"page_size": 3000}, {"min_align": 48}, {"min_align": 8192}, {"slab_size": 5000}, {"slab_size": 0},
])
def test_bad_geometry_is_a_config_error(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        SlabAllocator(1 << 20, **kwargs)
    with pytest.raises(ConfigError):
        SlabAllocator(-1)


def test_restore_recreates_allocations_of_the_same_geometry() -> None:
    import random

    from tierstore.tiers.slab_allocator import SlabAllocator

    rng = random.Random(5)
    first = SlabAllocator(512 << 20)
    live = []
    for _ in range(400):
        a = first.alloc(rng.choice([100, 3000, 70_000, 300_000, 2_000_000]))
        assert a is not None
        live.append(a)
    for a in live[::3]:
        first.free(a)
    kept = [a for i, a in enumerate(live) if i % 3]
    second = SlabAllocator(512 << 20)
    restored = second.restore([(a.offset, a.nbytes, a.slab) for a in kept])
    assert [(r.offset, r.size) for r in restored if r is not None] == [(a.offset, a.size) for a in kept]
    assert second.stats().used == first.stats().used
    assert second.restore([(kept[0].offset, kept[0].nbytes, kept[0].slab)]) == [None]  # already live
    fresh = [second.alloc(rng.choice([100, 70_000, 1_000_000])) for _ in range(50)]
    spans = sorted((a.offset, a.offset + a.size) for a in [*restored, *fresh] if a is not None)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))  # no overlap
    for a in [*restored, *fresh]:
        if a is not None:
            second.free(a)
    assert second.stats().used == 0
