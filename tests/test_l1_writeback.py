"""L1 on the CPU device: cache-only blocks that live only in L1, their write-back to L2/L3, shrinking
under (simulated) memory pressure, device out-of-memory during promotion, the bf16 cast knob, and
buffers drawn from L1. CI has no GPU; the same store code serves CUDA."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import pytest
import torch

import tierstore
from tests.conftest import same_bits
from tierstore.compat.memory_pools import HierarchicalCacheIntegration
from tierstore.errors import ConfigError, DeviceMemoryError, TierFullError
from tierstore.tiers.l1_cuda import DevicePool

KIB = 1 << 10
MIB = 1 << 20
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.complex64, torch.bool)


def l1_store(path: Path, **config: object) -> tierstore.TierStore:
    settings: dict[str, object] = dict(l1_device="cpu", l1_cache_size="2MiB", l2_cache_size="4MiB", fsync=False)
    settings.update(config)
    return tierstore.open(path, **settings)  # type: ignore[arg-type]


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (math.prod(shape) * dtype.itemsize,),
                        dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)  # NaN payloads and -0.0 included


def blocks(count: int, nbytes: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(count):
        dtype = DTYPES[i % len(DTYPES)]
        out[f"kv/{i:03d}"] = random_bits(dtype, (nbytes // dtype.itemsize,), i)
    return out


# -- cache-only device puts live only in L1 ----------------------------------------------------------------

def test_cache_only_device_put_lives_only_in_l1(store_path: Path) -> None:
    with l1_store(store_path) as db:
        value = random_bits(torch.bfloat16, (64, 33), 1)
        db.put("kv", value, durable=False)
        value.fill_(0)  # the store took a snapshot
        want = random_bits(torch.bfloat16, (64, 33), 1)
        assert db.info("kv").tiers == ("L1",)
        assert "kv" in db and len(db) == 1 and list(db.keys()) == ["kv"]
        assert db.stats().tiers["L2"]["blocks"] == 0 and db.stats().tiers["L1"]["volatile"] == 1
        assert not db.catalog.has_block("kv")  # nothing written to disk
        on_device = db.get("kv", device="cpu")
        assert same_bits(on_device, want) and db.stats().hits["L1"] == 1
        assert same_bits(db.get("kv"), want)  # a host get copies it out of L1
        assert db.get("kv", device="cpu").data_ptr() == on_device.data_ptr()


def test_durable_puts_of_device_tensors_still_reach_disk(store_path: Path) -> None:
    with l1_store(store_path) as db:
        db.put("w", torch.ones(100))
        assert "L3" in db.info("w").tiers and "L1" not in db.info("w").tiers


def test_evicted_l1_only_blocks_are_written_back_bit_exact(store_path: Path) -> None:
    data = blocks(28, 256 * KIB)  # 7 MiB of cache-only blocks through 2 MiB of L1 and 4 MiB of L2
    with l1_store(store_path) as db:
        for key, value in data.items():
            db.put(key, value, durable=False)
        l1, l2 = db.stats().tiers["L1"], db.stats().tiers["L2"]
        assert l1["spills"] > 0 and l2["spills"] > 0  # L1 -> L2, and L2 -> L3 in turn
        assert l1["used"] <= l1["capacity"] and len(db) == len(data)
        tiers = {key: db.info(key).tiers for key in data}
        assert {t for ts in tiers.values() for t in ts} == {"L1", "L2", "L3"}
        for key, value in data.items():
            assert same_bits(db.get(key), value), key
            assert same_bits(db.get(key, device="cpu"), value), key
        assert sorted(db.keys(prefix="kv/")) == sorted(data)


def test_write_back_goes_to_l3_without_l2(store_path: Path) -> None:
    data = blocks(12, 256 * KIB)
    with l1_store(store_path, l2_cache_size=0) as db:
        for key, value in data.items():
            db.put(key, value, durable=False)
        assert db.stats().tiers["L1"]["spills"] > 0
        assert any(db.info(key).tiers == ("L3",) for key in data)
        for key, value in data.items():
            assert same_bits(db.get(key), value), key


def test_held_l1_only_block_is_not_evicted_and_write_back_failure_keeps_it(store_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with l1_store(store_path, l2_cache_size=0) as db:
        first = random_bits(torch.float32, (64 * KIB,), 0)  # 256 KiB
        db.put("held", first, durable=False)
        held = db.get("held", device="cpu")
        monkeypatch.setattr(db.migrator, "write_back", lambda entry, data: False)  # the disk refuses
        for i in range(12):
            db.put(f"kv/{i}", random_bits(torch.float32, (64 * KIB,), i + 1), durable=False)
        # L1 could not make room without losing blocks: the puts that found none went to L3 directly
        assert same_bits(held, first) and same_bits(db.get("held"), first)
        for i in range(12):
            assert same_bits(db.get(f"kv/{i}"), random_bits(torch.float32, (64 * KIB,), i + 1))


def test_l1_only_puts_follow_transactions(store_path: Path) -> None:
    with l1_store(store_path) as db:
        with pytest.raises(RuntimeError, match="boom"), db.transaction():
            db.put("a", torch.arange(1000), durable=False)
            assert same_bits(db.get("a"), torch.arange(1000))  # the pending version, from L1
            raise RuntimeError("boom")
        assert "a" not in db and db.stats().tiers["L1"]["used"] == 0
        with db.transaction():
            db.put("a", torch.arange(10), durable=False)
            db.put("a", torch.arange(20), durable=False)  # supersedes the first: its slot is given back
        assert same_bits(db.get("a", device="cpu"), torch.arange(20))
        assert db.stats().tiers["L1"]["blocks"] == 1


def test_replace_and_delete_of_an_l1_only_block(store_path: Path) -> None:
    with l1_store(store_path) as db:
        db.put("k", torch.full((100,), 1.0), durable=False)
        held = db.get("k", device="cpu")
        db.put("k", torch.full((100,), 2.0))  # durable now: to disk, out of L1
        assert "L3" in db.info("k").tiers and bool((held == 1.0).all())
        assert same_bits(db.get("k", device="cpu"), torch.full((100,), 2.0))
        db.put("k", torch.full((100,), 3.0), durable=False)
        assert db.info("k").tiers == ("L1",) and not db.catalog.has_block("k")
        db.delete("k")
        assert "k" not in db and len(db) == 0
        with pytest.raises(KeyError):
            db.get("k")


def test_info_hashes_an_l1_only_block(store_path: Path) -> None:
    import crc32c

    with l1_store(store_path) as db:
        value = torch.arange(300, dtype=torch.int32)
        db.put("k", value, durable=False)
        assert db.info("k").checksum == crc32c.crc32c(value.numpy().tobytes())


def test_cache_only_blocks_are_gone_after_reopen(store_path: Path) -> None:
    with l1_store(store_path) as db:
        db.put("k", torch.ones(10), durable=False)
    with l1_store(store_path) as db:
        assert "k" not in db and len(db) == 0


# -- memory pressure ---------------------------------------------------------------------------------------

class FakeDevice:
    """A device of ``total`` bytes on which a model holds ``model`` bytes beside the L1 pool."""

    def __init__(self, db: tierstore.TierStore, total: int) -> None:
        self.db, self.total, self.model = db, total, 0

    def __call__(self, device: torch.device) -> tuple[int, int, int, int]:
        pool = self.db.l1_pool
        assert pool is not None
        held = self.model + pool.stats().reserved  # both live in PyTorch's caching allocator on a GPU
        return self.total - held, self.total, held, held


def test_l1_shrinks_when_the_model_needs_memory_and_nothing_is_lost(store_path: Path) -> None:
    data = blocks(8, 256 * KIB)  # fills the 2 MiB of L1
    with l1_store(store_path, l2_cache_size="8MiB", l1_headroom="512KiB") as db:
        device = FakeDevice(db, total=4 * MIB)
        bridge = HierarchicalCacheIntegration(db, probe=device)
        durable = torch.randn(64 * KIB)
        db.put("durable", durable)
        for key, value in data.items():
            db.put(key, value, durable=False)
        reserved = db.stats().tiers["L1"]["reserved"]
        assert reserved == 2 * MIB and bridge.relieve() == 0  # 2 MiB left for the model: enough
        device.model = 3 * MIB  # the model now needs 3 of the 4 MiB
        assert bridge.memory().available < bridge.headroom  # type: ignore[union-attr]
        released = bridge.relieve()
        assert released >= 512 * KIB + MIB
        assert bridge.memory().available >= bridge.headroom  # type: ignore[union-attr]
        assert db.stats().tiers["L1"]["reserved"] == reserved - released
        assert bridge.l1_budget() == 4 * MIB - 3 * MIB - 512 * KIB  # what is left after the model and headroom
        for key, value in data.items():
            assert same_bits(db.get(key), value), key
        assert same_bits(db.get("durable"), durable)
        device.model = 4 * MIB - 128 * KIB  # the pool may not grow past the headroom now
        before = db.stats().tiers["L1"]["reserved"]
        assert same_bits(db.get("durable", device="cpu"), durable)  # served, but L1 did not grow for it
        assert db.stats().tiers["L1"]["reserved"] <= before and "L1" not in db.info("durable").tiers


def test_held_l1_views_survive_a_full_shrink(store_path: Path) -> None:
    with l1_store(store_path) as db:
        db.put("a", torch.full((1000,), 7.0), durable=False)
        db.put("b", torch.full((1000,), 8.0))
        held = db.get("a", device="cpu")
        db.get("b", device="cpu")
        db.shrink_l1()
        assert bool((held == 7.0).all()) and "L1" in db.info("a").tiers and "L1" not in db.info("b").tiers
        del held
        gc.collect()
        db.shrink_l1()
        assert db.stats().tiers["L1"]["reserved"] == 0 and db.info("a").tiers == ("L2",)
        assert same_bits(db.get("a", device="cpu"), torch.full((1000,), 7.0))


def test_call_retries_model_code_once_after_shrinking_l1(store_path: Path) -> None:
    with l1_store(store_path) as db:
        db.put("a", torch.ones(1000), durable=False)
        db.get("a", device="cpu")
        bridge = HierarchicalCacheIntegration(db)
        calls = []

        def model_step() -> str:
            calls.append(db.stats().tiers["L1"]["reserved"])
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
            return "done"

        assert bridge.call(model_step) == "done"
        assert calls[0] > 0 and calls[1] == 0 and bridge.oom_retries == 1
        assert same_bits(db.get("a"), torch.ones(1000))
        with pytest.raises(DeviceMemoryError):
            bridge.call(lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
        with pytest.raises(RuntimeError, match="unrelated"):
            bridge.call(lambda: (_ for _ in ()).throw(RuntimeError("unrelated")))


# -- device out-of-memory during promotion ----------------------------------------------------------------

def test_device_oom_during_promotion_shrinks_l1_and_retries(store_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with l1_store(store_path) as db:
        db.put("w", torch.arange(5000.0))
        db.put("cache", torch.full((100,), 3.0), durable=False)
        failures = [1]
        real = DevicePool.copy_in

        def flaky(self: DevicePool, *args: object, **kwargs: object) -> object:
            if failures:
                failures.pop()
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 KiB")
            return real(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(DevicePool, "copy_in", flaky)
        got = db.get("w", device="cpu")
        assert same_bits(got, torch.arange(5000.0)) and "L1" in db.info("w").tiers
        assert db.info("cache").tiers == ("L2",)  # written back by the shrink, not lost
        assert same_bits(db.get("cache"), torch.full((100,), 3.0))


def test_persistent_device_oom_is_a_typed_error_and_the_block_stays_in_l2(store_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with l1_store(store_path) as db:
        db.put("w", torch.arange(5000.0))

        def oom(self: DevicePool, *args: object, **kwargs: object) -> object:
            raise torch.OutOfMemoryError("CUDA out of memory")

        monkeypatch.setattr(DevicePool, "copy_in", oom)
        with pytest.raises(DeviceMemoryError) as info:
            db.get("w", device="cpu")
        assert isinstance(info.value, TierFullError) and info.value.tier == "L1"
        assert "L2" in db.info("w").tiers and "L1" not in db.info("w").tiers
        assert same_bits(db.get("w"), torch.arange(5000.0))  # the host copy is still served
        assert db.stats().tiers["L1"]["used"] == 0  # the slot reserved for it was given back
        monkeypatch.undo()
        assert same_bits(db.get("w", device="cpu"), torch.arange(5000.0))


# -- dtype policy and pool buffers -------------------------------------------------------------------------

@pytest.mark.parametrize(("cast", "fallback", "expected"), [
    ("always", "float16", torch.float16), ("always", "float32", torch.float32), ("auto", "float16", torch.bfloat16),
    ("never", "float16", torch.bfloat16)])
def test_bf16_cast_knob(store_path: Path, cast: str, fallback: str, expected: torch.dtype) -> None:
    value = random_bits(torch.bfloat16, (4096,), 3)
    value = torch.where(value.isfinite(), value, torch.zeros_like(value))
    with l1_store(store_path, l1_bf16_cast=cast, l1_bf16_fallback=fallback) as db:
        db.put("w", value)
        got = db.get("w", device="cpu")
        assert got.dtype == expected and torch.equal(got, value.to(expected))
        assert db.get("w", device="cpu").data_ptr() == got.data_ptr()  # the cast block is what L1 holds
        assert same_bits(db.get("w"), value)  # the stored block is untouched
        assert db.stats().tiers["L1"]["bf16_native"] is (expected == torch.bfloat16)


@pytest.mark.parametrize("bad", [dict(l1_bf16_cast="sometimes"), dict(l1_bf16_fallback="int8"),
                                 dict(l1_headroom="lots")])
def test_bad_l1_knobs_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        tierstore.CacheConfig(**bad)  # type: ignore[arg-type]


def test_adapter_buffers_come_from_l1_and_go_back(store_path: Path) -> None:
    with l1_store(store_path) as db:
        bridge = HierarchicalCacheIntegration(db)
        attn = bridge.allocate_attention_weights(2, 4, 32, 16)
        kv = bridge.allocate_kv_cache(1, 4, 64, 16, dtype=torch.bfloat16)
        assert attn.shape == (2, 4, 32, 32) and attn.dtype == torch.float16
        assert kv.shape == (2, 1, 4, 64, 16) and kv.dtype == torch.bfloat16
        used = db.stats().tiers["L1"]["used"]
        assert used >= attn.nbytes + kv.nbytes
        kv[1].fill_(1.0)  # usable as ordinary tensors
        del attn, kv
        gc.collect()
        assert db.allocate((10,), torch.float32, device="cpu").shape == (10,)
        gc.collect()
        assert db.stats().tiers["L1"]["used"] < used
        too_big = db.allocate((4 * MIB,), torch.uint8, device="cpu")  # bigger than L1: ordinary memory
        assert too_big.shape == (4 * MIB,)
        with pytest.raises(ValueError):
            bridge.allocate_kv_cache(1, -1, 8, 8)


def test_integration_without_l1_is_inert(store_path: Path) -> None:
    with tierstore.open(store_path, fsync=False) as db:
        bridge = HierarchicalCacheIntegration(tierstore.HierarchicalCacheManager(path=store_path / "m"))
        bridge.store.close()
        bridge = HierarchicalCacheIntegration(db)
        assert bridge.memory() is None and bridge.relieve() == 0 and bridge.l1_budget() == 0
        assert db.shrink_l1() == 0
        assert bridge.allocate_kv_cache(1, 2, 3, 4).device.type == "cpu"
        with pytest.raises(torch.OutOfMemoryError):
            bridge.call(lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
