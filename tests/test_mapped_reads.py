"""Zero-copy maps of raw L3 blocks (``db.map(key)``, ``db.get(key, mapped=True)``).

A raw block is viewed straight from its shard file (``MAP_PRIVATE``), checked against the catalog's
checksum; it never changes under its holder whatever the store does next (L3 never rewrites
committed bytes in place: replaced, deleted and compacted blocks' files are unlinked, and their
pages live on while mapped), and writes into it never reach the file.
"""

from __future__ import annotations

import gc
import os
import random
import threading
from pathlib import Path

import pytest
import torch

import tierstore
from tierstore import CorruptBlockError, InvalidArgumentError, InvalidKeyError
from tierstore.tiers.l3_zarr.mapped import can_see_page_cache

RAW = {"l3_compression": "off"}


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        "small": torch.randn(10, generator=gen),  # packed: one granule
        "packed": torch.randn(3, 5000, generator=gen),  # packed: several granules, a padded tail
        "large": torch.randn(700, 1001, generator=gen),  # its own array: ~1 MiB chunks, a padded tail
        "bf16": torch.randn(513, 1027, generator=gen).to(torch.bfloat16),
        "ints": torch.arange(-5000, 5000, dtype=torch.int64).reshape(100, 100),
        "odd": torch.randn(4097, generator=gen).to(torch.float16),
    }


@pytest.fixture()
def raw_store(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    values = _tensors()
    with tierstore.open(tmp_path / "s", **RAW) as db:
        for key, value in values.items():
            db.put(key, value)
    return tmp_path / "s", values


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _block_file(store: Path, db: tierstore.TierStore, key: str) -> Path:
    return store / "l3" / "blocks" / f"{db.info(key).block_id:016x}" / "0.0"


def test_a_mapped_get_is_bit_identical_and_takes_no_l2(raw_store: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, values = raw_store
    with tierstore.open(path, readonly=True) as db:
        for key, value in values.items():
            mapped = db.map(key)
            assert mapped is not None, key
            assert mapped.dtype == value.dtype and mapped.shape == value.shape
            assert _bits(mapped) == _bits(value), key
            assert _bits(db.get(key, mapped=True)) == _bits(value)
            assert "L2" not in db.tiers_of(key)  # nothing was copied into a slot
        stats = db.stats()
        assert stats.mapped == 2 * len(values) and stats.hits["L3"] == 2 * len(values)
        assert stats.hit_bytes["L3"] == 2 * sum(v.nbytes for v in values.values())
        assert stats.tiers["L2"]["used"] == 0


def test_the_view_outlives_the_handle_and_writes_stay_private(raw_store: tuple[Path, dict[str, torch.Tensor]]
                                                              ) -> None:
    path, values = raw_store
    with tierstore.open(path, readonly=True) as db:
        mapped = db.map("large")
    assert mapped is not None
    mapped[0, :10] = 42.0  # copy-on-write: this process's page, never the file
    assert torch.equal(mapped[1:], values["large"][1:])
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        assert torch.equal(db.get("large"), values["large"])
        again = db.map("large")
        assert again is not None and torch.equal(again, values["large"])


def test_compressed_pending_and_cache_only_blocks_are_not_mapped(tmp_path: Path) -> None:
    value = torch.zeros(200_000)
    with tierstore.open(tmp_path / "s", l3_compression="zstd", l2_cache_size=0) as db:
        db.put("zeros", value)  # compresses: stored with zstd
        assert db.info("zeros").codec != "raw"
        assert db.map("zeros") is None
        assert torch.equal(db.get("zeros", mapped=True), value)
        db.put("cached", value, durable=False)  # cache-only: its only copy is in memory
        assert db.map("cached") is None
        assert db.map("missing") is None
        assert db.stats().mapped == 0
    with tierstore.open(tmp_path / "r", l2_cache_size=0, **RAW) as db:
        db.put("a", torch.ones(1000))
        with db.transaction():
            db.put("a", torch.full((1000,), 2.0))
            assert db.map("a") is None  # this transaction's pending bytes, not the committed ones
            assert torch.equal(db.get("a", mapped=True), torch.full((1000,), 2.0))
        mapped = db.map("a")
        assert mapped is not None and torch.equal(mapped, torch.full((1000,), 2.0))
        db.put("empty", torch.empty(0, 3))
        assert db.map("empty") is None and db.get("empty", mapped=True).shape == (0, 3)


def test_a_block_in_l2_is_served_from_l2(tmp_path: Path) -> None:
    with tierstore.open(tmp_path / "s", **RAW) as db:
        db.put("a", torch.ones(1000))  # a put admits the new version to L2
        assert "L2" in db.tiers_of("a")
        assert db.map("a") is None
        assert torch.equal(db.get("a", mapped=True), torch.ones(1000))


def test_bad_arguments_are_typed_errors(raw_store: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = raw_store
    with tierstore.open(path, readonly=True) as db:
        with pytest.raises(InvalidKeyError):
            db.map(123)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            db.map("")
        with pytest.raises(InvalidArgumentError):
            db.get("large", mapped="yes")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            db.get("large", mapped=True, copy=True)
    with pytest.raises(tierstore.StoreClosedError):
        db.map("large")


def test_a_damaged_chunk_raises_corrupt_block_error_naming_the_key(
        raw_store: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = raw_store
    with tierstore.open(path, readonly=True) as db:
        shard = _block_file(path, db, "large")
    with open(shard, "r+b") as f:
        f.seek(123_457)
        byte = f.read(1)
        f.seek(123_457)
        f.write(bytes([byte[0] ^ 0x10]))
    with tierstore.open(path, readonly=True) as db:
        with pytest.raises(CorruptBlockError) as caught:
            db.map("large")
        assert caught.value.key == "large" and "checksum" in str(caught.value)
        with pytest.raises(CorruptBlockError):
            db.get("large", mapped=True)


def test_a_truncated_file_is_an_error_not_a_sigbus(raw_store: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = raw_store
    with tierstore.open(path, readonly=True) as db:
        shard = _block_file(path, db, "large")
    with open(shard, "r+b") as f:
        f.truncate(100_000)
    with tierstore.open(path, readonly=True) as db, pytest.raises(CorruptBlockError) as caught:
        db.map("large")
    assert caught.value.key == "large"


def test_put_delete_compaction_and_rollback_never_change_a_mapped_tensor(tmp_path: Path) -> None:
    """Every way L3 frees or cuts bytes, while mapped views of them live."""
    path = tmp_path / "s"
    gen = torch.Generator().manual_seed(3)
    values = {f"p{i}": torch.randn(2000, generator=gen) for i in range(40)}  # packed, several per shard
    values["big"] = torch.randn(600, 600, generator=gen)
    with tierstore.open(path, l2_cache_size=0, **RAW) as db:
        for key, value in values.items():
            db.put(key, value)
        views = {key: db.map(key) for key in values}
        assert all(v is not None for v in views.values())
        old_files = {p for p in (path / "l3").rglob("*") if p.is_file() and p.name != "zarr.json"}
        db.put("big", torch.zeros(600, 600))  # replaced: its old file is deleted
        for i in range(0, 40, 2):
            db.delete(f"p{i}")
        for i in range(1, 40, 4):
            db.put(f"p{i}", torch.full((2000,), -1.0))
        with pytest.raises(RuntimeError), db.transaction():  # appended, then cut back by the rollback
            db.put("extra", torch.randn(50_000))
            db.put("p3", torch.zeros(2000))
            raise RuntimeError("roll back")
        report = db.compact(min_fill=1.0)
        db.gc()
        assert report.blocks_moved > 0
        gone = {p for p in old_files if not p.exists()}
        assert gone, "compaction and the replacement deleted files the views map"
        for key, value in values.items():
            view = views[key]
            assert view is not None and torch.equal(view, value), key
        assert torch.equal(db.get("p1"), torch.full((2000,), -1.0))
        fresh = db.map("p5")
        assert fresh is not None and torch.equal(fresh, torch.full((2000,), -1.0))  # found where compaction put it
    for key, value in values.items():  # and after the handle closed
        view = views[key]
        assert view is not None and torch.equal(view, value), key


def test_threads_mapping_while_a_writer_replaces_deletes_and_compacts(tmp_path: Path) -> None:
    """Readers map keys while a writer churns them: every view is a whole committed version, forever."""
    path = tmp_path / "s"
    keys = [f"k{i}" for i in range(12)]
    shapes = {key: (300 + 700 * (i % 3),) for i, key in enumerate(keys)}  # packed and large blocks

    def value(key: str, version: int) -> torch.Tensor:
        return torch.full(shapes[key], float(version))

    with tierstore.open(path, l2_cache_size=0, **RAW) as db:
        for key in keys:
            db.put(key, value(key, 0))
        stop = threading.Event()
        errors: list[BaseException] = []
        seen: list[tuple[str, torch.Tensor, float]] = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while not stop.is_set():
                    key = rng.choice(keys)
                    try:
                        tensor = db.get(key, mapped=True)
                    except KeyError:
                        continue  # deleted meanwhile
                    first = float(tensor[0])
                    assert bool((tensor == first).all()), (key, "a torn or changing view")
                    seen.append((key, tensor, first))
                    if len(seen) > 400:
                        del seen[:200]
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        rng = random.Random(0)
        try:
            for version in range(1, 40):
                key = rng.choice(keys)
                if version % 7 == 0:
                    db.delete(key)
                else:
                    db.put(key, value(key, version))
                if version % 10 == 0:
                    db.compact(min_fill=1.0)
                    db.gc()
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors
        assert db.stats().mapped > 0
        for key, tensor, first in seen:  # still what it was when mapped
            assert bool((tensor == first).all()), key
            assert tensor.shape == shapes[key]


def _mapping_of(address: int) -> str | None:
    """The file mapped at ``address`` in this process (``/proc/self/maps``), None if anonymous or unmapped."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5].strip() if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_the_view_is_the_shard_file_mapped_not_a_copy(raw_store: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, values = raw_store
    with tierstore.open(path, readonly=True) as db:
        view = db.map("large")
        shard = _block_file(path, db, "large")
        packed = db.map("packed")
    assert view is not None and packed is not None
    assert _mapping_of(view.data_ptr()) == str(shard.resolve())
    mapped_pack = _mapping_of(packed.data_ptr())
    assert mapped_pack is not None and "/l3/packs/" in mapped_pack
    address = view.data_ptr()
    del view
    import gc

    gc.collect()
    assert _mapping_of(address) != str(shard.resolve())  # unmapped with its last tensor
    assert torch.equal(packed, values["packed"])


def _evict(path: Path) -> None:
    """Drop a file's pages from the page cache (they are clean after the fsync): the next map reads the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _flip(path: Path, at: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.parametrize("verify", ["always", "once"])
def test_verify_maps_always_checks_every_map_once_only_the_first(
        raw_store: tuple[Path, dict[str, torch.Tensor]], verify: str) -> None:
    """``l3_verify_maps``: damage after a first, verified map is caught by the next map with
    ``"always"``; ``"once"`` trusts the version it checked (the documented trade), a new handle checks again."""
    path, values = raw_store
    with tierstore.open(path, readonly=True, l3_verify_maps=verify) as db:
        first = db.map("large")
        assert first is not None and _bits(first) == _bits(values["large"])
        del first
        _flip(_block_file(path, db, "large"))
        if verify == "always":
            with pytest.raises(CorruptBlockError):
                db.map("large")
        else:
            again = db.map("large")
            assert again is not None and _bits(again) != _bits(values["large"])
    with tierstore.open(path, readonly=True, l3_verify_maps=verify) as db, pytest.raises(CorruptBlockError):
        db.map("large")


def test_a_bad_verify_maps_setting_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(tierstore.ConfigError):
        tierstore.open(tmp_path / "s", l3_verify_maps="sometimes")


needs_cachestat = pytest.mark.skipif(not can_see_page_cache(), reason="needs cachestat(2) (Linux 6.5+)")


@needs_cachestat
@pytest.mark.parametrize("verify", ["disk", "once"])
def test_verify_maps_disk_checks_a_map_that_reads_from_the_disk(
        raw_store: tuple[Path, dict[str, torch.Tensor]], verify: str) -> None:
    """``"disk"``: pages damaged while cached after a checked map are trusted (as ``"once"``), but once the
    kernel has dropped them, the map that reads them back from the disk checks them; ``"once"`` never does."""
    path, values = raw_store
    with tierstore.open(path, readonly=True, l3_verify_maps=verify) as db:
        shard = _block_file(path, db, "large")
        first = db.map("large")
        assert first is not None and _bits(first) == _bits(values["large"])
        del first
        _flip(shard)  # the page cache holds the damaged page: no disk read follows
        again = db.map("large")
        assert again is not None and _bits(again) != _bits(values["large"])
        del again
        gc.collect()
        _evict(shard)
        if verify == "disk":
            with pytest.raises(CorruptBlockError):
                db.map("large")
        else:
            trusted = db.map("large")
            assert trusted is not None and _bits(trusted) != _bits(values["large"])


@needs_cachestat
def test_verify_maps_disk_checks_every_map_of_a_block_that_shares_its_file(
        raw_store: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """A block in a pack shard can be read in by reads of its neighbours (read-ahead): every map is checked."""
    path, values = raw_store
    with tierstore.open(path, readonly=True, l3_verify_maps="disk") as db:
        packed = db.map("packed")
        assert packed is not None and torch.equal(packed, values["packed"])
        where = _mapping_of(packed.data_ptr())
        del packed
        assert where is not None and "/l3/packs/" in where
        pack = Path(where)
        offset = pack.read_bytes().find(_bits(values["packed"]))
        assert offset >= 0
        _flip(pack, offset + 100)  # the damaged page cached, as a neighbour's read-ahead would leave it
        with pytest.raises(CorruptBlockError):
            db.map("packed")


@needs_cachestat
def test_maps_under_disk_verification_in_threads_never_trust_pages_another_thread_reads_in(
        raw_store: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Four threads map one block at once, rounds apart: between rounds (the threads paused, holding no
    view) its file is damaged or mended on the disk and dropped from the page cache. While the disk holds
    damage no map may return it: the first map reads it in, and one that finds the pages cached a moment
    later must not trust them (the version was forgotten before the read, not after its check failed)."""
    path, values = raw_store
    good = _bits(values["large"])
    with tierstore.open(path, readonly=True, l3_verify_maps="disk") as db:
        shard = _block_file(path, db, "large")
        state = {"damaged": False, "stop": False}
        wrong: list[str] = []
        counts = {"ok": 0, "corrupt": 0}
        lock = threading.Lock()
        start, done = threading.Barrier(5), threading.Barrier(5)

        def mapper() -> None:
            while True:
                start.wait()
                if state["stop"]:
                    return
                for _ in range(20):
                    try:
                        view = db.map("large")
                    except CorruptBlockError:
                        with lock:
                            counts["corrupt"] += 1
                        continue
                    assert view is not None
                    same = _bits(view) == good
                    del view
                    with lock:
                        counts["ok"] += 1
                        if not same and state["damaged"]:
                            wrong.append("a map returned damaged bytes the disk had just given it")
                done.wait()

        threads = [threading.Thread(target=mapper) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for round_no in range(12):
                gc.collect()
                state["damaged"] = round_no % 2 == 0
                _flip(shard)  # damaged in even rounds, mended in odd ones
                _evict(shard)
                start.wait()
                done.wait()
        finally:
            state["stop"] = True
            start.wait()
            for t in threads:
                t.join()
    assert not wrong, wrong[:3]
    assert counts["ok"] > 0 and counts["corrupt"] > 0
