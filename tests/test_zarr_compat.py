"""L3 is a plain Zarr v3 hierarchy: zarr-python and tensorstore open every array and read the same bytes.

Each block is found through the catalog's documented columns only (README: ``l3_array``,
``l3_chunk``, ``l3_inner``), so these tests read the store the way another program would. A store
written by layout 1 (``tests/data/layout1_store``, made by the code before layout 2) must open,
read and take new writes, and its arrays become readable by both libraries.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

import tierstore
from tests.conftest import same_bits
from tests.data.layout1_tensors import tensors as layout1_tensors
from tierstore.catalog import Catalog
from tierstore.tiers.l3_zarr import ZarrL3
from tierstore.upkeep.verify import verify

ts = pytest.importorskip("tensorstore")  # the dev extra installs it


SPEC_CODECS = {"sharding_indexed", "transpose", "bytes", "zstd", "blosc", "crc32c", "gzip"}
LAYOUT1 = Path(__file__).parent / "data" / "layout1_store"


def _rows(store: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{store / 'catalog.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM blocks ORDER BY key")]
    finally:
        conn.close()


def _arrays(store: Path) -> list[Path]:
    found = []
    for meta in sorted((store / "l3").rglob("zarr.json")):
        if json.loads(meta.read_text())["node_type"] == "array":
            found.append(meta.parent)
    return found


def _read_zarr(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(path), mode="r")[...])


def _read_ts(path: Path) -> np.ndarray:
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, read=True).result()
    return np.asarray(arr.read().result())


def _codec_names(doc: dict[str, Any]) -> set[str]:
    names = set()
    for codec in doc["codecs"]:
        names.add(codec["name"])
        config = codec.get("configuration", {})
        for inner in config.get("codecs", []) + config.get("index_codecs", []):
            names.add(inner["name"])
    return names


def _block_bytes(whole: np.ndarray, row: dict[str, Any]) -> bytes:
    """A block's bytes out of its array, addressed by the catalog's columns as the README says."""
    size = whole.shape[1]
    start = row["l3_chunk"] * row["l3_inner"] // size
    return whole[start:start + row["nbytes"] // size].tobytes()


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check_readable(store: Path, expected: dict[str, torch.Tensor]) -> None:
    """Every array opens in zarr-python and tensorstore, with the same contents; every block reads back."""
    arrays = _arrays(store)
    assert arrays
    contents: dict[str, np.ndarray] = {}
    for path in arrays:
        doc = json.loads((path / "zarr.json").read_text())
        assert "dimension_names" not in doc or doc["dimension_names"] is not None
        assert _codec_names(doc) <= SPEC_CODECS, doc["codecs"]
        assert doc["attributes"]["tierstore"]["kind"] in ("pack", "block", "run")
        via_zarr, via_ts = _read_zarr(path), _read_ts(path)
        assert via_zarr.shape == via_ts.shape and via_zarr.tobytes() == via_ts.tobytes()
        assert zarr.open_array(str(path), mode="r").nchunks_initialized >= 1
        contents[str(path.relative_to(store / "l3"))] = via_zarr
    seen = set()
    for row in _rows(store):
        if row["key"] not in expected:
            continue
        seen.add(row["key"])
        want = _raw(expected[row["key"]])
        if row["l3_array"] is None:
            assert want == b""
            continue
        assert _block_bytes(contents[row["l3_array"]], row) == want, row["key"]
        if row["l3_array"].startswith("blocks/"):
            attrs = json.loads((store / "l3" / row["l3_array"] / "zarr.json").read_text())["attributes"]["tierstore"]
            if attrs["kind"] == "run":  # the large blocks of one commit: listed by their first chunk
                attrs = next(b for b in attrs["blocks"] if b["chunk"] == row["l3_chunk"] and b["key"] == row["key"])
            assert attrs["key"] == row["key"] and attrs["dtype"] == row["dtype"]
            assert attrs["shape"] == json.loads(row["shape"])
    assert seen == set(expected)


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "small/bf16": torch.randn(300, generator=g).to(torch.bfloat16),
        "small/fp16": torch.randn(5000, generator=g).to(torch.float16),
        "small/fp32": torch.randn(2000, generator=g),
        "small/int8": torch.arange(999).remainder(5).to(torch.int8),
        "small/c64": torch.randn(40, generator=g, dtype=torch.complex64),
        "small/empty": torch.empty(3, 0),
        "large/bf16": torch.randn(300, 1000, generator=g).to(torch.bfloat16),
        "large/fp32": torch.randn(100_000, generator=g),
        "large/int64": torch.arange(70_000),
    }


@pytest.mark.parametrize("compression", ["auto", "zstd", "blosc-lz4", "off"])
def test_every_array_reads_the_same_in_zarr_and_tensorstore(tmp_path: Path, compression: str) -> None:
    store = tmp_path / "s"
    data = _mixed()
    with tierstore.open(store, l3_compression=compression, l2_cache_size=0) as db:
        for key, value in data.items():
            db.put(key, value)
        for i in range(70):  # past one pack shard (64 granules): the pack's shape grows with it
            data[f"many/{i}"] = torch.full((900,), float(i), dtype=torch.float32)
            db.put(f"many/{i}", data[f"many/{i}"])
    check_readable(store, data)
    pack = next(p for p in _arrays(store) if p.parent.name == "packs" and (p / "1.0").exists())
    doc = json.loads((pack / "zarr.json").read_text())
    rows_per_shard = doc["chunk_grid"]["configuration"]["chunk_shape"][0]
    assert doc["shape"][0] == 2 * rows_per_shard  # exactly the shards there are, not 2^50 bytes


def test_chunks_stay_addressable_after_compaction(tmp_path: Path) -> None:
    store = tmp_path / "s"
    data = {f"k{i}": torch.full((1000,), i, dtype=torch.int32) * torch.arange(1000, dtype=torch.int32)
            for i in range(40)}
    with tierstore.open(store, l2_cache_size=0) as db:
        for key, value in data.items():
            db.put(key, value)
        for i in range(0, 40, 3):
            db.delete(f"k{i}")
            del data[f"k{i}"]
    with tierstore.open(store, l2_cache_size=0) as db:  # a new session: the old shard is no longer active
        assert db.compact(min_fill=1.0).blocks_moved == len(data)
    check_readable(store, data)


def _old_store(tmp_path: Path) -> Path:
    store = tmp_path / "old"
    shutil.copytree(LAYOUT1, store)
    return store


def test_a_layout1_store_opens_reads_upgrades_and_takes_new_writes(tmp_path: Path) -> None:
    store = _old_store(tmp_path)
    expected = layout1_tensors()
    with tierstore.open(store, l2_cache_size=0) as db:
        for key, value in expected.items():
            assert same_bits(db.get(key), value), key
        assert "w/deleted" not in db
        db.put("new/bf16", torch.arange(50, dtype=torch.bfloat16))
        expected["new/bf16"] = torch.arange(50, dtype=torch.bfloat16)
    catalog = Catalog(store / "catalog.sqlite", readonly=True)
    try:
        assert catalog.l3_layout() == 2
    finally:
        catalog.close()
    rows = {r["key"]: r for r in _rows(store)}
    # The block after the deleted one starts at a granule the deleted block's bytes pushed along: its
    # chunk comes from the shard index, not from its byte offset.
    assert rows["w/after-gap"]["l3_chunk"] == 2 and rows["w/after-gap"]["l3_offset"] != 2 * 4096
    assert not list((store / "l3").rglob("[0-9]")), "layout-1 shard names are gone"
    check_readable(store, expected)
    with tierstore.open(store, readonly=True) as reader:
        for key, value in expected.items():
            assert same_bits(reader.get(key), value), key


@pytest.mark.parametrize("step", ["commit_l3_layout", "drop_layout1_names"])
def test_an_upgrade_cut_short_is_finished_by_the_next_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           step: str) -> None:
    store = _old_store(tmp_path)
    owner = Catalog if step == "commit_l3_layout" else ZarrL3

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed mid-upgrade")

    with monkeypatch.context() as patch:
        patch.setattr(owner, step, crash)
        with pytest.raises(KeyboardInterrupt):
            tierstore.open(store, l2_cache_size=0)
    expected = layout1_tensors()
    with tierstore.open(store, l2_cache_size=0) as db:
        for key, value in expected.items():
            assert same_bits(db.get(key), value), key
    assert not list((store / "l3").rglob("[0-9]"))
    check_readable(store, expected)
    assert verify(store).ok


def test_a_rewritten_shard_index_puts_each_chunk_where_its_l3_chunk_says(tmp_path: Path) -> None:
    """verify --fix writes a wiped pack index again; a block after a deleted one keeps its slot for zarr readers."""
    store = tmp_path / "s"
    data = {"a": torch.full((1000,), 1.0), "c": torch.full((1000,), 3.0)}
    with tierstore.open(store, l2_cache_size=0, l3_compression="off") as db:
        db.put("a", data["a"])
        db.put("b", torch.full((1000,), 2.0))  # slot 1, then dead space once deleted
        db.put("c", data["c"])  # slot 2
        db.delete("b")
    row = {r["key"]: r for r in _rows(store)}["c"]
    assert row["l3_chunk"] == 2
    shard = store / "l3" / row["l3_array"] / f"{row['l3_shard']}.0"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:  # the index a zarr reader uses, wiped
        fh.seek(size - (64 * 16 + 4))
        fh.write(bytes(64 * 16 + 4))
    assert [p.kind for p in verify(store).problems] == ["index"]
    assert verify(store, fix=True).ok and verify(store).ok
    check_readable(store, data)
