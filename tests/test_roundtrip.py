"""Every fixed-size dtype and any shape round-trips bit-exactly, through every codec."""

from __future__ import annotations

import math
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import tierstore
from tests.conftest import same_bits
from tierstore.tensors import _DTYPES

ALL_DTYPES = sorted(_DTYPES.values(), key=str)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    count = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> tierstore.TierStore:
    path: Path = tmp_path_factory.mktemp("rt") / "s"
    return tierstore.open(path, fsync=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(ALL_DTYPES),
       shape=st.lists(st.integers(0, 40), min_size=0, max_size=4).map(tuple),
       seed=st.integers(0, 2**31), transpose=st.booleans())
def test_any_dtype_any_shape(shared_db: tierstore.TierStore, dtype: torch.dtype, shape: tuple[int, ...],
                             seed: int, transpose: bool) -> None:
    value = random_tensor(dtype, shape, seed)
    if transpose and value.dim() >= 2:
        value = value.transpose(0, 1)  # non-contiguous input is stored contiguous
    shared_db.put("k", value)
    back = shared_db.get("k")
    assert back.is_contiguous() and same_bits(back, value.contiguous())


def test_special_float_values(shared_db: tierstore.TierStore) -> None:
    bits = torch.tensor([0x7FC00001, 0xFFC12345, 0x80000000], dtype=torch.int64)
    nan_payload = bits.to(torch.uint32).view(torch.float32)
    value = torch.cat([nan_payload, torch.tensor([-0.0, float("inf"), -float("inf")])])
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        shared_db.put("special", value.to(dtype) if dtype != torch.float32 else value)
        expected = value.to(dtype) if dtype != torch.float32 else value
        assert same_bits(shared_db.get("special"), expected)


def test_large_blocks_in_every_dtype(shared_db: tierstore.TierStore) -> None:
    for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.complex64, torch.bool):
        value = random_tensor(dtype, (300_001,), 7)
        shared_db.put("big", value)
        assert same_bits(shared_db.get("big"), value)


def test_zero_dim_and_views(shared_db: tierstore.TierStore) -> None:
    shared_db.put("scalar", torch.tensor(3.25))
    assert shared_db.get("scalar").shape == ()
    base = torch.arange(100.0)
    shared_db.put("strided", base[::3])
    assert same_bits(shared_db.get("strided"), base[::3].contiguous())
    shared_db.put("conj", torch.tensor([1 + 2j]).conj())
    assert torch.equal(shared_db.get("conj"), torch.tensor([1 - 2j]))
