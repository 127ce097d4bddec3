"""Hostile and odd input: generated keys never reach outside the store, odd tensor layouts, wrong types, use
after close, and requests for more memory than the machine has (refused before allocating).
"""

from __future__ import annotations

import gc
import os
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierstore
from tests.conftest import same_bits

SMALL_L2 = "2MiB"


def tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (outside ``skip``) with its size and mtime: a snapshot to compare."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            path = here / name
            if path == skip:
                continue
            st_ = path.lstat()
            out[str(path.relative_to(root))] = (st_.st_size if not path.is_dir() else 0, st_.st_mtime_ns)
    return out


_pieces = st.sampled_from(["/", "\\", "..", ".", "../", "/..", "~", ":", "C:", "\x00", "\ud800", "\udfff",
                           "\u00e9", "e\u0301", "\ufb01", "\u212b", "A\u030a", "\U0001f600", "\u202e", " ", "\n",
                           "%2e%2e%2f", "l3", "blocks", "catalog.sqlite", "LOCK", "zarr.json", "0"])
KEYS = st.one_of(
    st.lists(_pieces | st.text(max_size=5), min_size=1, max_size=40).map("".join),
    st.text(min_size=1, max_size=300),
    st.integers(1015, 1030).flatmap(lambda n: st.sampled_from([
        "x" * n, "/" * n, "é" * (n // 2) + "x" * (n % 2), "\U0001f600" * (n // 4) + "." * (n % 4)])),
)


def _storable(key: str) -> bool:
    try:
        return "\x00" not in key and 0 < len(key.encode("utf-8")) <= 1024
    except UnicodeEncodeError:
        return False


def test_generated_keys_never_touch_files_outside_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path separators, '..', absolute paths, NUL, lone surrogates, normal forms, the 1024-byte edge."""
    parent = tmp_path / "parent"
    store = parent / "store"
    (parent / "sibling").mkdir(parents=True)
    (parent / "sibling" / "file").write_bytes(b"keep")
    monkeypatch.chdir(parent / "sibling")
    model: dict[str, int] = {}
    with tierstore.open(store, fsync=False, l2_cache_size=SMALL_L2) as db:
        before = tree(tmp_path, store)

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(key=KEYS, large=st.booleans())
        def check(key: str, large: bool) -> None:
            value = torch.full((70_000 if large else 5,), len(model), dtype=torch.int32)
            if not _storable(key):
                for call in (lambda: db.put(key, value), lambda: db.get(key), lambda: db.delete(key)):
                    with pytest.raises(tierstore.InvalidKeyError):
                        call()
                assert key not in db
                return
            db.put(key, value)
            model[key] = len(model)
            assert torch.equal(db.get(key), value)
            for form in ("NFC", "NFD"):  # normal forms are different keys, never folded together
                other = unicodedata.normalize(form, key)
                if other != key and _storable(other):
                    assert (other in db) == (other in model)

        check()
        assert sorted(db.keys()) == sorted(model)
        assert tree(tmp_path, store) == before, "something outside the store changed"
    with tierstore.open(store, readonly=True) as ro:
        assert len(ro) == len(model)
        for key, n in model.items():
            assert int(ro.get(key)[0]) == n
    assert (parent / "sibling" / "file").read_bytes() == b"keep"


def test_normal_forms_are_distinct_keys(tmp_path: Path) -> None:
    with tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2) as db:
        forms = {unicodedata.normalize(f, "\u00c5ngstr\u00f6m \ufb01") for f in ("NFC", "NFD", "NFKC", "NFKD")}
        assert len(forms) == 4
        for i, key in enumerate(sorted(forms)):
            db.put(key, torch.tensor([i]))
        for i, key in enumerate(sorted(forms)):
            assert int(db.get(key)[0]) == i
        assert len(db) == 4


def _odd_tensors() -> dict[str, torch.Tensor]:
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    z = torch.complex(torch.randn(6, 5), torch.randn(6, 5))
    return {
        "0-dim": torch.tensor(3.5),
        "empty-middle": torch.empty(3, 0, 1 << 40),
        "rank-25": torch.ones([1] * 25),
        "expanded": torch.arange(3).expand(4, 1000, 3),
        "transposed": base.transpose(1, 3),
        "stepped": base[:, ::2, 1:, ::3],
        "storage-offset": base.reshape(-1)[17:83],
        "channels-last": base.contiguous(memory_format=torch.channels_last),
        "conj-view": z.conj(),
        "neg-view": torch._neg_view(z),
        "requires-grad": torch.randn(8, requires_grad=True),
        "grad-result": torch.randn(8, requires_grad=True) * 2,
        "bool-strided": (torch.arange(40) % 3 == 0).reshape(5, 8)[:, ::2],
        "unaligned-bf16": torch.randn(1001, dtype=torch.bfloat16)[1:],
    }


def test_odd_layouts_round_trip(tmp_path: Path) -> None:
    values = _odd_tensors()
    with tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2) as db:
        for key, value in values.items():
            db.put(key, value)
        for key, value in values.items():
            back = db.get(key, copy=True)
            expected = value.detach().resolve_conj().resolve_neg().contiguous()
            assert back.shape == value.shape and same_bits(back, expected), key
    with tierstore.open(tmp_path / "store", readonly=True) as ro:
        for key, value in values.items():
            assert same_bits(ro.get(key), value.detach().resolve_conj().resolve_neg().contiguous()), key


def test_memory_requests_beyond_the_machine_are_refused_before_allocating(tmp_path: Path) -> None:
    with tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2) as db:
        for shape, dtype in [((1 << 40,), torch.float32), ((1 << 31, 1 << 31), torch.uint8),
                             ((1 << 62, 1 << 62), torch.float64)]:
            with pytest.raises(tierstore.TierFullError) as info:
                db.allocate(shape, dtype)
            assert isinstance(info.value, MemoryError)
        small = db.allocate((10, 10), torch.float16)
        assert small.shape == (10, 10) and small.dtype == torch.float16
        assert db.allocate((0, 1 << 40), torch.float32).numel() == 0


@pytest.mark.parametrize("shape, dtype", [((-1,), torch.float32), ((2.5,), torch.float32), (None, torch.float32),
                                          ((2,), "float32"), ((2,), None), ("abc", torch.float32)])
def test_allocate_with_wrong_types(tmp_path: Path, shape: object, dtype: object) -> None:
    with tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2) as db, \
            pytest.raises(tierstore.UnsupportedTensorError):
        db.allocate(shape, dtype)  # type: ignore[arg-type]


def test_wrong_argument_types(tmp_path: Path) -> None:
    with tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2) as db:
        db.put("k", torch.ones(3))
        for prefix in (3, b"k", ["k"]):
            with pytest.raises(tierstore.InvalidKeyError):
                list(db.keys(prefix=prefix))  # type: ignore[arg-type]
        assert torch.equal(db.get("k"), torch.ones(3)) and len(db) == 1


def test_tensors_outlive_their_store(tmp_path: Path) -> None:
    """Views from get() and allocate() stay usable after close(); the handle refuses everything else."""
    db = tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2)
    db.put("k", torch.arange(1000, dtype=torch.int64))
    view = db.get("k")
    scratch = db.allocate((1000,), torch.int64)
    scratch.fill_(7)
    db.close()
    scratch.add_(1)  # writable and mapped still
    assert int(scratch.sum()) == 8000 and torch.equal(view, torch.arange(1000, dtype=torch.int64))
    for call in (lambda: db.allocate((3,), torch.float32), lambda: db.get("k"), lambda: db.put("k", torch.ones(2))):
        with pytest.raises(tierstore.StoreClosedError):
            call()
    del view, scratch
    gc.collect()
    with tierstore.open(tmp_path / "store", l2_cache_size=SMALL_L2) as again:
        assert torch.equal(again.get("k"), torch.arange(1000, dtype=torch.int64))
