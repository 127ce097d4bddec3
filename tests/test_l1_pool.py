"""DevicePool (L1) on the CPU device: a stateful model test, views, release callbacks, shrink, dtype policy,
OOM translation, the seed's adapter helpers, and the pool under a Residency."""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tierstore.compat.allocations import allocate_attention_weights, allocate_kv_cache
from tierstore.engine.residency import Residency
from tierstore.errors import ConfigError, DeviceMemoryError, StoreClosedError, TierFullError, UnsupportedTensorError
from tierstore.tiers import l1_cuda
from tierstore.tiers.l1_cuda import DevicePool, needs_cast
from tierstore.tiers.slab_allocator import Allocation

PAGE = 4096
CHUNK = 16 * PAGE
CAPACITY = 3 * CHUNK + 8 * PAGE  # three full chunks and a half one


@pytest.fixture
def pool() -> Iterator[DevicePool]:
    with DevicePool(CAPACITY, device="cpu", chunk_size=CHUNK) as p:
        yield p


def _alloc(pool: DevicePool, nbytes: int) -> Allocation:
    a = pool.alloc(nbytes)
    assert a is not None, f"pool unexpectedly full for {nbytes} bytes"
    return a


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (math.prod(shape) * dtype.itemsize,),
                        dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)  # random bits: NaN payloads and -0.0 included


def _read(pool: DevicePool, a: Allocation) -> bytes:
    out = np.empty(a.nbytes, dtype=np.uint8)
    pool.copy_out(a, out)
    return out.tobytes()


# -- the model test --------------------------------------------------------------------------------------

def _sizes() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, 300),  # slab classes
        st.builds(lambda k, d: max(0, k * PAGE + d), st.integers(1, 15), st.integers(-1, 1)),  # page runs
        st.integers(CHUNK + 1, 2 * CHUNK),  # bigger than a chunk: a chunk of its own
        st.integers(CAPACITY - PAGE, CAPACITY + PAGE),  # about everything, or too big
    )


class PoolMachine(RuleBasedStateMachine):
    """alloc/free/write/read/shrink against ``live: offset -> (Allocation, bytes)``."""

    def __init__(self) -> None:
        super().__init__()
        self.sut = DevicePool(CAPACITY, device="cpu", chunk_size=CHUNK)
        self.live: dict[int, tuple[Allocation, bytes]] = {}
        self.dead: list[Allocation] = []
        self.rng = np.random.default_rng(0)

    @rule(nbytes=_sizes())
    def alloc(self, nbytes: int) -> None:
        a = self.sut.alloc(nbytes)
        if nbytes > CAPACITY:
            assert a is None
        if a is None:
            return
        assert a.nbytes == nbytes and a.size >= nbytes and a.offset not in self.live
        assert a.offset % 256 == 0
        assert self.sut.as_tensor(a).numel() == nbytes  # inside one chunk: a slice past its end would be short
        self.live[a.offset] = (a, _read(self.sut, a))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), as_tensor=st.booleans())
    def write(self, data: st.DataObject, as_tensor: bool) -> None:
        a, _ = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        payload = self.rng.integers(0, 256, a.nbytes, dtype=np.uint8)
        self.sut.copy_in(a, torch.from_numpy(payload) if as_tensor else payload)
        self.live[a.offset] = (a, payload.tobytes())

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        a, expected = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        assert _read(self.sut, a) == expected
        assert _bytes_of(self.sut.view(a, torch.uint8, (a.nbytes,))) == expected

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_some(self, data: st.DataObject) -> None:
        for offset in data.draw(st.sets(st.sampled_from(sorted(self.live)), min_size=1, max_size=6)):
            a, _ = self.live.pop(offset)
            self.sut.free(a)
            self.dead.append(a)

    @rule()
    def shrink(self) -> None:
        before = self.sut.stats()
        released = self.sut.shrink()
        after = self.sut.stats()
        assert after.reserved == before.reserved - released and after.used == before.used
        assert self.sut.shrink() == 0  # nothing empty is left

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def double_free_is_refused(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.dead))
        if a.offset in self.live and self.live[a.offset][0] == a:
            return  # an identical allocation was handed out again: freeing it is legal
        with pytest.raises(ValueError):
            self.sut.free(a)

    @invariant()
    def no_overlap(self) -> None:
        end = 0
        for offset in sorted(self.live):
            assert offset >= end, f"{self.live[offset][0]} overlaps the allocation ending at {end}"
            end = offset + self.live[offset][0].size

    @invariant()
    def accounting_is_exact(self) -> None:
        s = self.sut.stats()
        assert s.used == sum(a.size for a, _ in self.live.values())
        assert s.requested == sum(a.nbytes for a, _ in self.live.values())
        assert s.free == CAPACITY - s.used and s.used <= s.reserved <= CAPACITY
        assert 0 <= s.largest_free_run <= s.free and 0.0 <= s.fragmentation <= 1.0
        assert all(c.slots_used <= c.slots_total for c in s.per_class)

    def teardown(self) -> None:
        for a, expected in self.live.values():
            assert _read(self.sut, a) == expected
            self.sut.free(a)
        s = self.sut.stats()
        assert (s.used, s.requested, s.free) == (0, 0, CAPACITY)
        assert self.sut.shrink() == s.reserved
        s = self.sut.stats()
        assert (s.reserved, s.chunks, s.largest_free_run) == (0, 0, CAPACITY)
        self.sut.close()


PoolMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase


# -- views ------------------------------------------------------------------------------------------------

def test_rare_dtypes_view_too(pool: DevicePool) -> None:
    for name in ("complex32", "float8_e8m0fnu", "float4_e2m1fn_x2"):
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            slot = _alloc(pool, 6 * dtype.itemsize)
            assert pool.view(slot, dtype, (2, 3)).shape == (2, 3)


def test_each_view_has_its_own_storage_and_release(pool: DevicePool) -> None:
    calls: list[str] = []
    slot = _alloc(pool, 32)
    first = pool.view(slot, torch.uint8, (32,), on_release=lambda: calls.append("first"))
    second = pool.view(slot, torch.int64, (4,), on_release=lambda: calls.append("second"))
    other = pool.view(_alloc(pool, 32), torch.uint8, (32,))
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    assert first.untyped_storage()._cdata != second.untyped_storage()._cdata != other.untyped_storage()._cdata
    del second
    gc.collect()
    assert calls == ["second"]
    del first
    gc.collect()
    assert calls == ["second", "first"]


def test_views_survive_close(pool: DevicePool) -> None:
    slot = _alloc(pool, 16)
    view = pool.view(slot, torch.int32, (4,))
    view.copy_(torch.arange(4, dtype=torch.int32))
    pool.close()
    gc.collect()
    assert view.tolist() == [0, 1, 2, 3]


# -- transfers --------------------------------------------------------------------------------------------

def test_copies_take_tensors_and_arrays_of_any_dtype(pool: DevicePool) -> None:
    src = _random_tensor(torch.bfloat16, (3, 5), 1)
    slot = _alloc(pool, src.nbytes)
    pool.copy_in(slot, src.t())  # non-contiguous: its values, in logical order
    assert _bytes_of(pool.view(slot, torch.bfloat16, (5, 3))) == _bytes_of(src.t().contiguous())
    pool.copy_in(slot, np.arange(15, dtype=np.int16))
    out = torch.empty(15, dtype=torch.int16)
    pool.copy_out(slot, out)
    assert out.tolist() == list(range(15))
    with pytest.raises(ValueError, match="do not fit"):
        pool.copy_in(slot, np.zeros(31, dtype=np.uint8))
    with pytest.raises(ValueError, match="only"):
        pool.copy_out(slot, np.zeros(31, dtype=np.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        pool.copy_out(slot, np.zeros((6, 6), dtype=np.uint8)[:, :2])
    pool.synchronize()
    assert pool.stats().inflight == 0


def test_cast_into_matches_torch_to(pool: DevicePool) -> None:
    src = _random_tensor(torch.bfloat16, (64, 33), 3)
    slot = _alloc(pool, src.numel() * 2)
    assert pool.cast_into(slot, src, torch.float16) is None
    got = pool.view(slot, torch.float16, src.shape)
    want = src.to(torch.float16)
    assert torch.equal(got.isnan(), want.isnan())
    assert _bytes_of(got[~got.isnan()]) == _bytes_of(want[~want.isnan()])
    with pytest.raises(ValueError, match="need"):
        pool.cast_into(_alloc(pool, 8), src, torch.float16)


# -- dtype policy -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("capability", "expected"), [((6, 1), torch.float16), ((7, 5), torch.float16),
                                                      ((8, 0), None), ((9, 0), None)])
def test_bf16_is_cast_below_ampere(capability: tuple[int, int], expected: torch.dtype | None) -> None:
    assert needs_cast(torch.bfloat16, "cuda", capability=capability) == expected
    assert needs_cast(torch.float16, "cuda", capability=capability) is None
    assert needs_cast(torch.float32, "cuda:0", capability=capability) is None
    if expected is not None:
        assert needs_cast(torch.bfloat16, "cuda", capability=capability, fallback=torch.float32) == torch.float32


def test_cpu_needs_no_cast(pool: DevicePool) -> None:
    assert needs_cast(torch.bfloat16, "cpu", capability=(6, 1)) is None
    assert pool.needs_cast(torch.bfloat16) is None
    s = pool.stats()
    assert s.bf16_native and s.capability is None and s.device == "cpu"


def test_forced_cast_runs_the_cast_path_on_the_cpu() -> None:
    assert needs_cast(torch.bfloat16, "cpu", force=True) == torch.float16
    assert needs_cast(torch.bfloat16, "cuda", capability=(6, 1), force=False) is None
    assert needs_cast(torch.float32, "cpu", force=True) is None  # only bf16 is ever cast
    assert needs_cast(torch.bfloat16, "cpu", force=True, fallback=torch.bfloat16) is None
    with DevicePool(CAPACITY, device="cpu", chunk_size=CHUNK, cast_bf16=True, bf16_fallback=torch.float32) as p:
        assert p.needs_cast(torch.bfloat16) == torch.float32 and not p.stats().bf16_native


# -- growth, shrink, pressure, OOM ------------------------------------------------------------------------

def test_grows_by_chunks_and_shrink_gives_back_only_empty_ones(pool: DevicePool) -> None:
    assert pool.stats().reserved == 0  # nothing taken before it is needed
    a = _alloc(pool, CHUNK)  # fills chunk 0
    b = _alloc(pool, 100)  # opens chunk 1
    s = pool.stats()
    assert (s.chunks, s.reserved) == (2, 2 * CHUNK)
    pool.free(b)
    assert pool.shrink() == CHUNK
    assert pool.stats().chunks == 1
    assert pool.shrink() == 0  # chunk 0 still holds `a`
    pool.free(a)
    assert pool.grow() == CAPACITY - CHUNK and pool.stats().reserved == CAPACITY
    assert pool.shrink(1) == 8 * PAGE  # the newest empty chunk (the half one) is enough
    assert pool.shrink() == 3 * CHUNK and pool.stats().chunks == 0


def test_a_block_bigger_than_a_chunk_trades_empty_chunks_for_its_own(pool: DevicePool) -> None:
    pool.grow()
    small = _alloc(pool, 64)
    big = _alloc(pool, 2 * CHUNK + 5)  # only fits once empty chunks are given back
    assert pool.as_tensor(big).numel() == 2 * CHUNK + 5
    assert pool.alloc(CAPACITY) is None  # `small` pins one chunk: no room for everything
    pool.free(big)
    pool.free(small)
    assert _alloc(pool, CAPACITY).nbytes == CAPACITY


def test_device_oom_is_no_room_for_alloc_and_tier_full_for_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(nbytes: int, device: torch.device) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 KiB")

    with DevicePool(CAPACITY, device="cpu", chunk_size=CHUNK) as pool:
        monkeypatch.setattr(l1_cuda, "_new_chunk_tensor", oom)
        assert pool.alloc(100) is None
        with pytest.raises(DeviceMemoryError, match="out of memory") as info:
            pool.grow()
        assert info.value.tier == "L1" and isinstance(info.value, TierFullError)
        assert pool.stats().oom_events == 2
        monkeypatch.undo()
        assert pool.alloc(100) is not None  # recoverable: the next try succeeds


def test_cpu_allocator_failure_is_tier_full_and_other_errors_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    def cpu_oom(nbytes: int, device: torch.device) -> torch.Tensor:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 65536 bytes")

    def broken(nbytes: int, device: torch.device) -> torch.Tensor:
        raise RuntimeError("some other failure")

    with DevicePool(CAPACITY, device="cpu", chunk_size=CHUNK) as pool:
        monkeypatch.setattr(l1_cuda, "_new_chunk_tensor", cpu_oom)
        with pytest.raises(TierFullError):
            pool.grow()
        monkeypatch.setattr(l1_cuda, "_new_chunk_tensor", broken)
        with pytest.raises(RuntimeError, match="some other failure"):
            pool.alloc(10)


def test_headroom_limits_growth_and_reports_pressure(monkeypatch: pytest.MonkeyPatch) -> None:
    free = [10 * CHUNK]
    monkeypatch.setattr(l1_cuda, "_device_memory", lambda device: (free[0], 100 * CHUNK, 3 * PAGE, PAGE))
    with DevicePool(CAPACITY, device="cpu", chunk_size=CHUNK, headroom=8 * CHUNK) as pool:
        m = pool.pressure()
        assert (m.free, m.total, m.available, m.pool_reserved) == (10 * CHUNK, 100 * CHUNK, 10 * CHUNK + 2 * PAGE, 0)
        assert pool.headroom_ok() and not pool.headroom_ok(11 * CHUNK)
        assert pool.alloc(CHUNK) is not None  # 10 chunks free: one more leaves 9 >= 8
        free[0] = 8 * CHUNK
        assert pool.alloc(CHUNK) is None  # would leave 7
        with pytest.raises(TierFullError, match="headroom"):
            pool.grow()
        assert pool.stats().oom_events == 0


def test_an_injected_probe_drives_pressure_and_growth() -> None:
    model = [0]

    def probe(device: torch.device) -> tuple[int, int, int, int]:
        held = model[0] + pool.stats().reserved
        return 8 * CHUNK - held, 8 * CHUNK, held, held

    with DevicePool(CAPACITY, device="cpu", chunk_size=CHUNK, headroom=2 * CHUNK, probe=probe) as pool:
        a = _alloc(pool, CHUNK)
        b = _alloc(pool, 10)
        m = pool.pressure()
        assert m.pool_reserved == 2 * CHUNK and m.available == 6 * CHUNK and m.model_allocated == 0
        model[0] = 5 * CHUNK
        assert pool.alloc(CHUNK) is None  # growing would leave the model less than its headroom
        assert pool.reclaimable() == 0
        pool.free(b)
        assert pool.reclaimable() == CHUNK and pool.shrink(1) == CHUNK
        assert pool.pressure().available == 2 * CHUNK
        pool.probe = None  # back to the real query
        assert pool.pressure().total > 0
        pool.free(a)


class FakeEvent:
    """Stands in for a CUDA event: completes when the test says so (or when waited on)."""

    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


def test_freed_slots_wait_for_their_readers_before_reuse(pool: DevicePool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA rule, run with fake events: a freed slot returns to its free list only once the work
    queued before the free has run; out of room, the pool waits for it rather than fail."""
    fences: list[FakeEvent] = []

    def fence() -> FakeEvent:
        fences.append(FakeEvent())
        return fences[-1]

    monkeypatch.setattr(pool, "_fence", fence)
    a = _alloc(pool, 5000)
    pool.free(a)
    assert pool.stats().used > 0 and pool.stats().inflight == 1  # still cooling
    b = _alloc(pool, 5000)
    assert b.offset != a.offset  # not reused while a reader may still use it
    fences[0].done = True
    c = _alloc(pool, 5000)
    assert c.offset == a.offset and pool.stats().inflight == 0
    pool.free(c)
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(c)
    pool.free(b)
    assert [f.waited for f in fences] == [0, 0, 0]
    big = [_alloc(pool, CHUNK) for _ in range(3)]  # the third fits only in chunk 0, once b and c are back
    assert [f.waited for f in fences] == [0, 1, 1] and pool.stats().inflight == 0
    for x in big:
        pool.free(x)


# -- the seed's adapter helpers ---------------------------------------------------------------------------

def test_adapter_helpers_have_the_seed_shapes_and_give_their_slots_back() -> None:
    with DevicePool("64MiB", device="cpu", chunk_size="16MiB") as pool:
        attn = allocate_attention_weights(pool, 2, 8, 512, 64)
        kv = allocate_kv_cache(pool, 1, 16, 1024, 128)
        assert attn.shape == (2, 8, 512, 512) and attn.dtype == torch.float16
        assert kv.shape == (2, 1, 16, 1024, 128) and kv.dtype == torch.float16
        keys, values = kv[0], kv[1]
        keys.fill_(1)
        values.fill_(2)
        assert float(kv.sum(dtype=torch.float32)) == 3 * keys.numel()
        assert pool.stats().requested == attn.nbytes + kv.nbytes
        del attn, kv
        gc.collect()
        assert pool.stats().requested == keys.nbytes * 2  # `keys`/`values` still hold the KV slot
        del keys, values
        gc.collect()
        assert pool.stats().used == 0
        assert allocate_kv_cache(pool, 1, 2, 3, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
        with pytest.raises(TierFullError, match="no room"):
            allocate_kv_cache(pool, 8, 32, 4096, 128)
        with pytest.raises(ValueError):
            allocate_attention_weights(pool, 1, 1, 1, 0)
        with pytest.raises(ValueError):
            allocate_kv_cache(pool, -1, 1, 1, 1)


# -- the pool under a Residency (the L1 tier's owner) -----------------------------------------------------

def test_residency_tracks_views_of_pool_slots(pool: DevicePool) -> None:
    res = Residency("L1", pool)  # type: ignore[arg-type]  # the protocol still names as_numpy (L2 only)
    slot = res.reserve(64)
    assert slot is not None
    pool.copy_in(slot, torch.arange(16, dtype=torch.float32))
    entry = res.admit("k", 1, slot, torch.float32, (16,), checksum=0)
    assert entry is not None and entry.evictable
    held = res.view(entry)[4:]
    assert not entry.evictable  # a derived tensor holds the slot
    res.discard("k")
    assert pool.stats().used > 0  # replaced, but still viewed: the slot stays
    assert held[0].item() == 4.0
    del held
    gc.collect()
    res.stats()  # applies queued releases
    assert pool.stats().used == 0


# -- misuse -----------------------------------------------------------------------------------------------

def test_misuse_raises_clear_errors(pool: DevicePool) -> None:
    slot = _alloc(pool, 16)
    with pytest.raises(ValueError, match="needs 32 bytes"):
        pool.view(slot, torch.float64, (4,))
    with pytest.raises(ValueError, match="negative"):
        pool.view(slot, torch.uint8, (-1,))
    with pytest.raises(UnsupportedTensorError):
        pool.view(slot, torch.qint8, (4,))
    with pytest.raises(ValueError, match="negative size"):
        pool.alloc(-1)
    pool.free(slot)
    for misuse in (lambda: pool.free(slot), lambda: pool.view(slot, torch.uint8, (1,)),
                   lambda: pool.as_tensor(slot), lambda: pool.copy_in(slot, np.zeros(1, dtype=np.uint8))):
        with pytest.raises(ValueError, match="not a live allocation"):
            misuse()
    with DevicePool(CAPACITY, device="cpu", chunk_size=CHUNK) as other:
        foreign = _alloc(other, 16)
        with pytest.raises(ValueError):
            pool.free(foreign)
    pool.close()
    pool.close()  # idempotent
    assert pool.closed
    for after_close in (lambda: pool.alloc(1), pool.stats, pool.shrink, pool.grow, pool.pressure):
        with pytest.raises(StoreClosedError):
            after_close()


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"capacity": 100}, {"capacity": "1MiB", "chunk_size": 10},
                                    {"capacity": "1MiB", "device": "meta"}, {"capacity": "lots"}])
def test_bad_configuration_is_a_config_error(kwargs: dict[str, object]) -> None:
    kwargs.setdefault("device", "cpu")
    with pytest.raises(ConfigError):
        DevicePool(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="is_available"):
        DevicePool("1MiB", device="cuda")
