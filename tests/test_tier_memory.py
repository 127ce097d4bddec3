"""The contract every tier's memory keeps (L2's HostArena, L1's DevicePool): one suite, every tier.

Views are zero-copy and bit-exact for every dtype and shape; a view's release callback fires
exactly once, after the last tensor derived from it is gone; held views never change while other
slots churn.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tierstore.tiers.l1_cuda import DevicePool
from tierstore.tiers.l2_slab import HostArena
from tierstore.tiers.slab_allocator import Allocation

DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 5), (1, 1, 1, 4)]

MEMORIES: dict[str, Callable[[Path, int], Any]] = {
    "L2-anonymous": lambda tmp, size: HostArena(size),
    "L2-file": lambda tmp, size: HostArena(size, path=tmp / "l2.arena"),
    "L1-cpu": lambda tmp, size: DevicePool(size, device="cpu", chunk_size=size // 4),
}


@pytest.fixture(params=list(MEMORIES))
def make_memory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[int], Any]]:
    opened: list[Any] = []

    def make(size: int) -> Any:
        memory = MEMORIES[request.param](tmp_path, size)
        opened.append(memory)
        return memory

    yield make
    for memory in opened:
        memory.close()


def alloc(memory: Any, nbytes: int) -> Allocation:
    a: Allocation | None = memory.alloc(nbytes)
    assert a is not None, f"{type(memory).__name__} unexpectedly full for {nbytes} bytes"
    return a


def write(memory: Any, a: Allocation, data: bytes) -> None:
    if data:
        memory.view(a, torch.uint8, (len(data),)).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def bytes_of(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (math.prod(shape) * dtype.itemsize,),
                        dtype=torch.uint8, generator=gen)  # bool: any byte but 0/1 is invalid
    return raw.view(dtype).reshape(shape)  # random bits: NaN payloads and -0.0 included


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_view_round_trips_bit_exactly(make_memory: Callable[[int], Any], dtype: torch.dtype) -> None:
    memory = make_memory(2 << 20)
    for seed, shape in enumerate(SHAPES):
        src = random_tensor(dtype, shape, seed)
        slot = alloc(memory, src.numel() * dtype.itemsize)
        write(memory, slot, bytes_of(src))
        view = memory.view(slot, dtype, shape)
        assert view.dtype == dtype and view.shape == src.shape
        assert bytes_of(view) == bytes_of(src)
        if src.numel():  # zero-copy: a write through one view shows in another
            view.reshape(-1).view(torch.uint8)[0] ^= 1
            assert int(memory.view(slot, torch.uint8, (1,))[0]) == bytes_of(src)[0] ^ 1
        del view
        memory.free(slot)


def test_held_views_never_change_under_churn(make_memory: Callable[[int], Any]) -> None:
    memory = make_memory(1 << 20)
    rng = np.random.default_rng(7)
    held = []
    for i, n in enumerate([0, 4, 60, 256, 1000, 4096, 20_000, 30_000]):
        view = memory.view(alloc(memory, n * 4), torch.int32, (n,))
        view.copy_(torch.arange(i * 100_000, i * 100_000 + n, dtype=torch.int32))
        held.append((view, view.clone()))
    others: list[Allocation] = []
    for _ in range(2000):
        if others and rng.random() < 0.45:
            memory.free(others.pop(int(rng.integers(len(others)))))
            continue
        n = int(rng.choice([0, 1, 64, 200, 4000, 9000, 50_000]))
        slot = memory.alloc(n)
        if slot is None:
            continue
        write(memory, slot, rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        others.append(slot)
    for view, expected in held:
        assert torch.equal(view, expected)


def test_on_release_fires_once_after_the_last_derived_tensor(make_memory: Callable[[int], Any]) -> None:
    memory = make_memory(1 << 20)
    calls: list[int] = []
    slot = alloc(memory, 64)
    view = memory.view(slot, torch.float32, (4, 4), on_release=lambda: calls.append(slot.offset))
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


def test_each_view_has_its_own_release(make_memory: Callable[[int], Any]) -> None:
    memory = make_memory(1 << 20)
    calls: list[str] = []
    slot = alloc(memory, 32)
    first = memory.view(slot, torch.uint8, (32,), on_release=lambda: calls.append("first"))
    second = memory.view(slot, torch.int64, (4,), on_release=lambda: calls.append("second"))
    del second
    gc.collect()
    assert calls == ["second"]
    del first
    gc.collect()
    assert calls == ["second", "first"]
