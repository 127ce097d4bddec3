"""``put(compression=)``: a block's own codec, now and when a cache-only block is spilled later."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import tierstore
from tierstore.errors import InvalidArgumentError


def _compressible(n: int = 64 * 1024, fill: float = 1.0) -> torch.Tensor:
    return torch.full((n,), fill, dtype=torch.bfloat16)


def test_a_durable_put_uses_its_own_codec(store_path: Path) -> None:
    with tierstore.open(store_path, fsync=False) as db:
        db.put("default", _compressible())
        db.put("raw", _compressible(), compression="off")
        db.put("zstd", _compressible(), compression="zstd:3")
        assert db.info("default").codec != "raw" and db.info("default").stored_bytes < db.info("default").nbytes
        assert db.info("raw").codec == "raw" and db.info("raw").stored_bytes == db.info("raw").nbytes
        assert db.info("zstd").codec.startswith("zstd")
    with tierstore.open(store_path, readonly=True, l2_cache_size=0) as db:  # read back from L3
        for key in ("default", "raw", "zstd"):
            assert torch.equal(db.get(key), _compressible())


def test_a_spilled_cache_only_block_keeps_the_codec_its_put_asked_for(store_path: Path) -> None:
    with tierstore.open(store_path, fsync=False, l2_cache_size="1MiB") as db:
        for i in range(6):  # 6 x 512 KiB through a 1 MiB L2: the first ones spill
            db.put(f"kv/{i}", _compressible(256 * 1024, float(i)), durable=False, compression="off")
        db.put("kv/zstd", _compressible(256 * 1024), durable=False)
        for i in range(6):
            db.put(f"more/{i}", _compressible(256 * 1024, 7.0), durable=False)
        spilled = [k for k in db.keys("kv/") if "L3" in db.info(k).tiers]
        assert spilled, "nothing was spilled"
        for key in spilled:
            assert (db.info(key).codec == "raw") == (key != "kv/zstd"), key
        for i in range(6):
            assert torch.equal(db.get(f"kv/{i}"), _compressible(256 * 1024, float(i)))


@pytest.mark.parametrize("bad", ["lz77", "zstd:99", 3, b"off", "blosc-lz4:2"])
def test_a_bad_setting_is_a_typed_error_and_stores_nothing(store_path: Path, bad: object) -> None:
    with tierstore.open(store_path, fsync=False) as db:
        db.put("k", _compressible(1024, 2.0))
        with pytest.raises(InvalidArgumentError):
            db.put("k", _compressible(1024, 3.0), compression=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            db.put("new", _compressible(1024), compression=bad)  # type: ignore[arg-type]
        assert torch.equal(db.get("k"), _compressible(1024, 2.0))
        assert "new" not in db


def test_threads_spilling_blocks_of_both_codecs(store_path: Path) -> None:
    """Writers with their own codecs against an L2 that spills all the time: every block reads back
    bit-exactly and every spilled one has the codec its writer asked for."""
    errors: list[BaseException] = []
    with tierstore.open(store_path, fsync=False, l2_cache_size="2MiB") as db:
        def writer(name: str, compression: str | None) -> None:
            try:
                for i in range(20):
                    db.put(f"{name}/{i}", _compressible(64 * 1024, float(i)), durable=False, compression=compression)
                    assert torch.equal(db.get(f"{name}/{i // 2}"), _compressible(64 * 1024, float(i // 2)))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(f"w{n}", "off" if n % 2 else None)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        raw_writers = {"w1", "w3"}
        spilled = 0
        for key in list(db):
            info = db.info(key)
            if "L3" in info.tiers:
                spilled += 1
                assert (info.codec == "raw") == (key.split("/")[0] in raw_writers), (key, info.codec)
            assert torch.equal(db.get(key), _compressible(64 * 1024, float(key.split("/")[1])))
        assert spilled
