"""HostArena (L2) on the CPU: bytes, zero-copy views, release callbacks, close, full disks."""

from __future__ import annotations

import gc
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tierstore.alloc import Allocation
from tierstore.errors import ConfigError, StoreClosedError, StoreFullError, UnsupportedTensorError
from tierstore.tiers import l2_slab
from tierstore.tiers.l2_slab import HostArena

MiB = 1 << 20

DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 5), (1, 1, 1, 4)]


@pytest.fixture(params=["anonymous", "file"])
def arena(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HostArena]:
    path = tmp_path / "l2.arena" if request.param == "file" else None
    with HostArena("2MiB", path=path) as a:
        yield a


def _alloc(arena: HostArena, nbytes: int) -> Allocation:
    a = arena.alloc(nbytes)
    assert a is not None, f"arena unexpectedly full for {nbytes} bytes"
    return a


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    numel = int(np.prod(shape, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (numel * dtype.itemsize,),
                        dtype=torch.uint8, generator=gen)  # bool: any byte but 0/1 is invalid
    return raw.view(dtype).reshape(shape)  # random bits: NaN payloads and -0.0 included


def test_buffer_bytes_read_back(arena: HostArena) -> None:
    slots = [_alloc(arena, n) for n in (1, 63, 64, 4096, 5000, 300_000)]
    for i, s in enumerate(slots):
        buf = arena.buffer(s)
        assert len(buf) == s.nbytes and not buf.readonly
        buf[:] = bytes([i + 1]) * s.nbytes
        buf.release()
    for i, s in enumerate(slots):
        assert arena.as_numpy(s).tobytes() == bytes([i + 1]) * s.nbytes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_view_round_trips_bit_exactly(arena: HostArena, dtype: torch.dtype) -> None:
    for seed, shape in enumerate(SHAPES):
        src = _random_tensor(dtype, shape, seed)
        slot = _alloc(arena, src.numel() * dtype.itemsize)
        arena.as_numpy(slot)[:] = np.frombuffer(_as_bytes(src), dtype=np.uint8)
        view = arena.view(slot, dtype, shape)
        assert view.dtype == dtype and view.shape == src.shape
        assert _as_bytes(view) == _as_bytes(src)
        if src.numel():  # zero-copy: a write through the view is a write to the slot
            view.reshape(-1).view(torch.uint8)[0] ^= 1
            assert arena.as_numpy(slot)[0] == np.frombuffer(_as_bytes(src), dtype=np.uint8)[0] ^ 1
        del view
        arena.free(slot)


def test_held_views_never_change_under_churn() -> None:
    rng = np.random.default_rng(7)
    with HostArena("1MiB") as arena:
        held = []
        for i, n in enumerate([0, 4, 60, 256, 1000, 4096, 20_000, 70_000]):
            slot = _alloc(arena, n * 4)
            view = arena.view(slot, torch.int32, (n,))
            view.copy_(torch.arange(i * 100_000, i * 100_000 + n, dtype=torch.int32))
            held.append((view, view.clone()))
        others: list[Allocation] = []
        for _ in range(3000):
            if others and rng.random() < 0.45:
                arena.free(others.pop(int(rng.integers(len(others)))))
                continue
            n = int(rng.choice([0, 1, 64, 200, 4000, 9000, 50_000]))
            slot = arena.alloc(n)
            if slot is None:
                continue
            arena.as_numpy(slot)[:] = rng.integers(0, 256, n, dtype=np.uint8)
            others.append(slot)
        for view, expected in held:
            assert torch.equal(view, expected)


def test_on_release_fires_once_after_the_last_derived_tensor(arena: HostArena) -> None:
    calls: list[int] = []
    slot = _alloc(arena, 64)
    view = arena.view(slot, torch.float32, (4, 4), on_release=lambda: calls.append(slot.offset))
    copy = view.clone()  # a copy does not hold the slot
    derived = [view[1:], view.view(torch.int32), view.reshape(16), view.t(), view[0].numpy()]
    del view
    gc.collect()
    while derived:
        assert calls == []
        derived.pop()
        gc.collect()
    assert calls == [slot.offset]
    gc.collect()
    assert calls == [slot.offset] and copy.shape == (4, 4)


def test_each_view_has_its_own_release(arena: HostArena) -> None:
    calls: list[str] = []
    slot = _alloc(arena, 32)
    first = arena.view(slot, torch.uint8, (32,), on_release=lambda: calls.append("first"))
    second = arena.view(slot, torch.int64, (4,), on_release=lambda: calls.append("second"))
    del second
    gc.collect()
    assert calls == ["second"]
    del first
    gc.collect()
    assert calls == ["second", "first"]


def test_close_with_live_views_keeps_them_readable(tmp_path: Path) -> None:
    for path in (None, tmp_path / "closing.arena"):
        arena = HostArena("1MiB", path=path)
        slot = _alloc(arena, 4000)
        view = arena.view(slot, torch.float64, (500,))
        view.copy_(torch.linspace(0, 1, 500, dtype=torch.float64))
        buf = arena.buffer(slot)
        arena.close()
        arena.close()  # idempotent
        assert arena.closed
        assert torch.equal(view, torch.linspace(0, 1, 500, dtype=torch.float64))
        assert bytes(buf[:8]) == view[:1].numpy().tobytes()
        with pytest.raises(StoreClosedError):
            arena.alloc(10)
        del view, buf
        gc.collect()  # the mapping goes with its last view; nothing may crash here


def test_file_is_reserved_kept_and_never_truncated(tmp_path: Path) -> None:
    path = tmp_path / "l2.arena"
    with HostArena(MiB, path=path) as arena:
        st = os.stat(path)
        assert st.st_size == MiB and st.st_blocks * 512 >= MiB  # real blocks, not a sparse hole
        slot = _alloc(arena, 5000)
        arena.as_numpy(slot)[:] = 0xAB
    with HostArena(MiB, path=path) as again:  # a fresh allocator hands out the same first slot
        assert again.as_numpy(_alloc(again, 5000)).tobytes() == b"\xab" * 5000
    with open(path, "r+b") as f:
        f.truncate(3 * MiB)
    with HostArena(MiB, path=path):
        assert os.stat(path).st_size == 3 * MiB


def test_full_disk_is_a_clean_store_full_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.strip()}")
    try:
        with pytest.raises(StoreFullError) as info:
            HostArena(4 * MiB, path=mnt / "l2.arena")
        assert "no space" in str(info.value)
        assert not (mnt / "l2.arena").exists()  # a file we created is not left half-reserved
        with HostArena(512 * 1024, path=mnt / "small.arena") as arena:
            slot = _alloc(arena, 400_000)
            arena.as_numpy(slot)[:] = 7  # every byte is backed: no SIGBUS
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_stats_report_unpinned_on_cpu_with_a_reason() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the unpinned path is for CPU-only machines")
    with HostArena("1MiB") as arena:
        s = arena.stats()
        assert not arena.pinned and not s.pinned
        assert "CUDA" in arena.pin_reason and s.pin_reason == arena.pin_reason
        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        assert s.memlock_limit == (None if soft == resource.RLIM_INFINITY else soft)
        assert s.prefaulted and s.path is None and s.capacity == MiB
        assert s.allocator.capacity == MiB and s.allocator.used == 0
    with HostArena("1MiB", pin=False, prefault=False) as arena:
        s = arena.stats()
        assert "pin=False" in s.pin_reason and not s.locked and not s.prefaulted


def test_prefault_without_madvise_touches_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(l2_slab, "_MADV_POPULATE_WRITE", None)  # as on a kernel before 5.14
    with HostArena("1MiB") as arena:
        assert arena.stats().prefaulted
        slot = _alloc(arena, 300_000)
        assert not arena.as_numpy(slot).any()  # touching left the (zero) contents alone


def test_capacity_parsing_and_limits() -> None:
    with HostArena(5000, prefault=False) as arena:
        assert arena.capacity == 4096  # whole pages only
    with pytest.raises(ConfigError):
        HostArena(100)
    with pytest.raises(ConfigError):
        HostArena("lots")


def test_misuse_raises_clear_errors(arena: HostArena) -> None:
    slot = _alloc(arena, 64)
    with pytest.raises(ValueError, match="needs 128 bytes"):
        arena.view(slot, torch.float64, (16,))
    with pytest.raises(ValueError, match="negative"):
        arena.view(slot, torch.float32, (-1,))
    with pytest.raises(UnsupportedTensorError):
        arena.view(slot, torch.qint8, (4,))
    with HostArena("1MiB", prefault=False) as other:
        foreign = _alloc(other, 64)  # same offset and size as `slot`, but another owner
        assert (foreign.offset, foreign.size) == (slot.offset, slot.size)
        with pytest.raises(ValueError, match="not a live allocation"):
            arena.buffer(foreign)
    arena.free(slot)
    with pytest.raises(ValueError, match="not a live allocation"):
        arena.view(slot, torch.uint8, (64,))
    with pytest.raises(ValueError):
        arena.free(slot)
