"""The checkpoint reader accepts exactly what safetensors accepts, and reads every dtype it reads.

Each malformed file is built by hand, then given both to ``safetensors.safe_open`` (the verdict to
match) and to ``import_checkpoint``: where safetensors refuses, tierstore raises ``CheckpointError``
and the store keeps only what it had; where safetensors accepts, tierstore imports the same tensors.
"""

from __future__ import annotations

import json
import struct
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import tierstore
from tierstore import CheckpointError
from tierstore.integrations import checkpoint
from tierstore.integrations.checkpoint import export_safetensors, import_checkpoint, read_header


def _f32(begin: int, end: int) -> str:
    """A header entry for a float32 tensor of 4 elements at ``[begin, end)``."""
    return '{"dtype":"F32","shape":[4],"data_offsets":[' + f"{begin},{end}]}}"


def _obj(*pairs: tuple[str, str]) -> str:
    """A JSON object from raw (key, value) texts, keeping repeated keys (json.dumps cannot)."""
    return "{" + ",".join(f'"{key}":{value}' for key, value in pairs) + "}"


def _write(path: Path, header: str, data: bytes) -> Path:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


MALFORMED = {
    # name: (header, data bytes)
    "aliased": (_obj(("a", _f32(0, 16)), ("b", _f32(0, 16))), 16),
    "overlapping": (_obj(("a", _f32(0, 16)), ("b", _f32(8, 24))), 24),
    "hole": (_obj(("a", _f32(0, 16)), ("b", _f32(20, 36))), 36),
    "trailing-bytes": (_obj(("a", _f32(0, 16))), 20),
    "duplicate-key": (_obj(("a", _f32(0, 16)), ("a", _f32(16, 32))), 32),
    "true-dimension": ('{"a":{"dtype":"F32","shape":[true,4],"data_offsets":[0,16]}}', 16),
    "float-dimension": ('{"a":{"dtype":"F32","shape":[4.0],"data_offsets":[0,16]}}', 16),
    "negative-dimension": ('{"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}', 16),
    "reversed-offsets": ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}}', 16),
    "short-data": (_obj(("a", _f32(0, 16))), 12),
    "metadata-not-strings": (_obj(("__metadata__", '{"n":1}'), ("a", _f32(0, 16))), 16),
    "unknown-dtype": ('{"a":{"dtype":"Q99","shape":[4],"data_offsets":[0,16]}}', 16),
    "f4-odd-elements": ('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_what_safetensors_refuses_is_refused_and_nothing_is_imported(tmp_path: Path, case: str) -> None:
    header, size = MALFORMED[case]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"good": torch.ones(3)}, folder / "a.safetensors")  # a good shard first: it must not land either
    bad = _write(folder / "b.safetensors", header, bytes(range(size)))
    with pytest.raises(SafetensorError):
        safe_open(bad, "pt")
    with pytest.raises(CheckpointError, match=r"b\.safetensors"):
        read_header(bad)
    with tierstore.open(tmp_path / "s") as db:
        db.put("keep", torch.arange(4))
        with pytest.raises(CheckpointError):
            import_checkpoint(folder, db)
        assert list(db.keys()) == ["keep"]


def test_what_safetensors_accepts_is_imported_as_it_reads_it(tmp_path: Path) -> None:
    # A key repeated with the same entry leaves no hole: safetensors accepts the file (one tensor "a").
    path = _write(tmp_path / "dup.safetensors", _obj(("a", _f32(0, 16)), ("a", _f32(0, 16))),
                  struct.pack("<4f", 1, 2, 3, 4))
    with safe_open(path, "pt") as f:
        expected = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    with tierstore.open(tmp_path / "s") as db:
        assert import_checkpoint(path, db) == len(expected) == 1
        assert torch.equal(db.get("a"), expected["a"])


NEW_DTYPES = ["float8_e4m3fnuz", "float8_e5m2fnuz", "float4_e2m1fn_x2"]


@pytest.mark.parametrize("name", NEW_DTYPES)
def test_dtypes_safetensors_reads_import_and_export_bit_exactly(tmp_path: Path, name: str) -> None:
    if not hasattr(torch, name):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    dtype = getattr(torch, name)
    raw = torch.arange(24, dtype=torch.uint8).reshape(4, 6)
    source = tmp_path / "in.safetensors"
    save_file({"w": raw.view(dtype), "bias": torch.ones(2)}, source, metadata={"format": "pt"})
    with safe_open(source, "pt") as f:
        want = f.get_tensor("w")
    with tierstore.open(tmp_path / "s") as db:
        assert import_checkpoint(source, db) == 2
        got = db.get("w")
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), raw)
        export_safetensors(db, tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == source.read_bytes()


def test_a_dtype_this_torch_lacks_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "f4.safetensors"
    save_file({"w": torch.zeros(2, 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, source)
    lacking = {k: v for k, v in checkpoint._TO_TORCH.items() if k != "F4"}  # as on a torch without float4
    monkeypatch.setattr(checkpoint, "_TO_TORCH", lacking)
    with tierstore.open(tmp_path / "s") as db:
        with pytest.raises(CheckpointError, match=r"'w' is F4, which needs torch\.float4_e2m1fn_x2") as err:
            import_checkpoint(source, db)
        assert err.value.key == "w" and len(db) == 0


def test_import_hands_the_store_one_tensor_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(64, 256, generator=gen) for i in range(16)}, tmp_path / "m.safetensors")
    with tierstore.open(tmp_path / "s", l2_cache_size=0) as db:
        given: list[weakref.ref[torch.Tensor]] = []
        most_alive = 0
        put = db.put

        def tracking_put(key: str, tensor: torch.Tensor, **kwargs: Any) -> None:
            nonlocal most_alive
            given.append(weakref.ref(tensor))
            most_alive = max(most_alive, sum(r() is not None for r in given))
            put(key, tensor, **kwargs)

        monkeypatch.setattr(db, "put", tracking_put)
        assert import_checkpoint(tmp_path / "m.safetensors", db) == 16
        assert len(given) == 17  # 16 tensors and the metadata block
        assert most_alive == 1  # each tensor was dropped before the next was read


def test_metadata_keeps_the_files_order(tmp_path: Path) -> None:
    header = _obj(("__metadata__", '{"z":"1","format":"pt","a":"2"}'), ("x", _f32(0, 16)))
    path = _write(tmp_path / "m.safetensors", header, bytes(16))
    _, metadata = read_header(path)
    assert list(metadata) == ["z", "format", "a"]
    assert json.loads(json.dumps(metadata)) == {"z": "1", "format": "pt", "a": "2"}
