"""L3's read path: pieces read ahead on the read pool, decoded into the output, checksummed on the way.

Blocks go through :class:`ZarrL3` directly (write, prepare, commit, read back), so every codec,
dtype and size is checked against the source bytes and their crc32c; ``read_many`` reports each
request's own error and releases every descriptor; threads and a forked child read at once; and
multi-piece arrays written now stay readable by zarr-python and tensorstore.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierstore
from tests.test_zarr_compat import check_readable
from tierstore.errors import CorruptBlockError
from tierstore.tiers.codecs import RAW, Codec, choose_codec
from tierstore.tiers.l3_zarr import Location, ZarrL3
from tierstore.tiers.l3_zarr import reader as l3_reader

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int64,
          torch.complex64]
SETTINGS = ["auto", "zstd", "blosc-lz4", "off"]
_IDS = itertools.count(1 << 20)
"""Block ids for the hypothesis test (its examples share one tier)."""


def weights(nbytes: int, dtype: torch.dtype, seed: int) -> np.ndarray:
    """``nbytes`` (rounded down to whole elements) of normal-ish values of ``dtype``, as flat uint8."""
    size = torch.empty(0, dtype=dtype).element_size()
    count = nbytes // size
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(count, generator=g, dtype=torch.float32 if not dtype.is_complex else torch.complex64).to(dtype)
    else:
        t = torch.randint(-3, 4, (count,), generator=g).to(dtype) if dtype != torch.uint8 else \
            torch.randint(0, 256, (count,), generator=g).to(dtype)
    return t.reshape(-1).view(torch.uint8).numpy().copy()


@pytest.fixture
def l3(tmp_path: Path) -> Iterator[ZarrL3]:
    tier = ZarrL3(tmp_path, fsync=False)
    yield tier
    tier.close()


def put(l3: ZarrL3, block_id: int, data: np.ndarray, codec: Codec) -> Location:
    loc = l3.write(block_id, data, codec)
    l3.prepare()
    l3.commit()
    return loc


@pytest.fixture(params=[l3_reader.PIECE, 4096], ids=["piece-1MiB", "piece-4KiB"])
def piece(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Pieces of the default size, and of one granule (every chunk its own piece, many in flight)."""
    monkeypatch.setattr(l3_reader, "PIECE", request.param)
    return int(request.param)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nbytes=st.one_of(st.integers(0, 300_000), st.integers(1 << 20, (4 << 20) + 12_345)),
       dtype=st.sampled_from(DTYPES), setting=st.sampled_from(SETTINGS), seed=st.integers(0, 1000))
def test_every_size_dtype_and_codec_reads_back_with_its_crc(l3: ZarrL3, piece: int, nbytes: int,
                                                            dtype: torch.dtype, setting: str, seed: int) -> None:
    data = weights(nbytes, dtype, seed)
    codec = choose_codec(setting, torch.empty(0, dtype=dtype).element_size())
    loc = put(l3, next(_IDS), data, codec)
    out = np.full(data.nbytes, 0xA5, dtype=np.uint8)
    crc = l3.read_into(loc, out)
    assert out.tobytes() == data.tobytes()
    assert crc == crc32c.crc32c(data.data)


def test_read_many_reads_each_block_and_reports_each_failure_alone(l3: ZarrL3, piece: int) -> None:
    blocks = {i: weights(n, torch.bfloat16, i) for i, n in enumerate([3 << 20, 5000, 0, (2 << 20) + 77, 1 << 20])}
    locs = {i: put(l3, 100 + i, data, choose_codec("auto", 2)) for i, data in blocks.items()}
    gone = put(l3, 200, weights(2 << 20, torch.bfloat16, 9), choose_codec("auto", 2))
    l3.free([gone])  # its file is deleted: that request fails with FileNotFoundError
    cut = put(l3, 201, weights(3 << 20, torch.bfloat16, 10), choose_codec("auto", 2))
    with open(l3.shard_path(cut.array, cut.shard), "r+b") as fh:  # a torn large block: its last piece is short
        fh.truncate(cut.length - 10)
    requests = [(locs[i], np.empty(blocks[i].nbytes, dtype=np.uint8)) for i in blocks]
    requests.insert(2, (gone, np.empty(2 << 20, dtype=np.uint8)))
    requests.append((cut, np.empty(3 << 20, dtype=np.uint8)))
    results = l3.read_many(requests)
    assert isinstance(results[2], FileNotFoundError)
    assert isinstance(results[-1], CorruptBlockError) and "truncated" in str(results[-1])
    good = [(r, out) for r, (_loc, out) in zip(results, requests, strict=True) if not isinstance(r, BaseException)]
    assert len(good) == len(blocks)
    for (crc, out), want in zip(good, blocks.values(), strict=True):
        assert out.tobytes() == want.tobytes() and crc == crc32c.crc32c(want.data)
    l3.files.descriptors.close()
    assert len(l3.files.descriptors) == 0  # no read still holds a descriptor


def test_a_damaged_chunk_in_the_middle_of_a_block_is_caught(l3: ZarrL3, piece: int) -> None:
    data = weights(4 << 20, torch.bfloat16, 1)
    loc = put(l3, 1, data, choose_codec("auto", 2))
    middle = loc.offset + sum(loc.sizes[:2]) + loc.sizes[2] // 2
    with open(l3.shard_path(loc.array, loc.shard), "r+b") as fh:
        fh.seek(middle)
        byte = fh.read(1)
        fh.seek(middle)
        fh.write(bytes([byte[0] ^ 0xFF]))
    out = np.empty(data.nbytes, dtype=np.uint8)
    try:
        crc = l3.read_into(loc, out)
    except CorruptBlockError:
        return  # zstd refused the chunk
    assert crc != crc32c.crc32c(data.data)  # it decoded to other bytes: the checksum says so


def test_raw_blocks_are_read_straight_into_the_output(l3: ZarrL3, piece: int) -> None:
    data = weights((3 << 20) + 4097, torch.uint8, 2)
    loc = put(l3, 1, data, RAW)
    assert loc.codec == "raw" and len(loc.sizes) == 4
    out = np.empty(data.nbytes, dtype=np.uint8)
    assert l3.read_into(loc, out) == crc32c.crc32c(data.data)
    assert out.tobytes() == data.tobytes()


def test_threads_reading_the_same_and_different_blocks_at_once(l3: ZarrL3, piece: int) -> None:
    blocks = [weights(n, torch.bfloat16, i) for i, n in enumerate([3 << 20, 2 << 20, 70_000, (1 << 20) + 5])]
    locs = [put(l3, 10 + i, data, choose_codec("auto", 2)) for i, data in enumerate(blocks)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            start.wait()
            for _ in range(6):
                picks = rng.permutation(len(blocks))[:3]
                if seed % 2:
                    outs = [np.empty(blocks[i].nbytes, dtype=np.uint8) for i in picks]
                    crcs = l3.read_many([(locs[i], out) for i, out in zip(picks, outs, strict=True)])
                else:
                    outs = [np.empty(blocks[i].nbytes, dtype=np.uint8) for i in picks]
                    crcs = [l3.read_into(locs[i], out) for i, out in zip(picks, outs, strict=True)]
                for i, out, crc in zip(picks, outs, crcs, strict=True):
                    assert out.tobytes() == blocks[i].tobytes() and crc == crc32c.crc32c(blocks[i].data)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_a_forked_child_reads_with_a_fresh_pool(l3: ZarrL3) -> None:
    data = weights(3 << 20, torch.bfloat16, 4)
    loc = put(l3, 1, data, choose_codec("auto", 2))
    out = np.empty(data.nbytes, dtype=np.uint8)
    l3.read_into(loc, out)  # the parent's pools are started
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            got = np.empty(data.nbytes, dtype=np.uint8)
            code = 0 if l3.read_into(loc, got) == crc32c.crc32c(data.data) and got.tobytes() == data.tobytes() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("compression", ["auto", "off"])
def test_multi_piece_arrays_read_the_same_in_zarr_and_tensorstore(tmp_path: Path, compression: str) -> None:
    g = torch.Generator().manual_seed(5)
    tensors = {"big/bf16": torch.randn(1536, 1024 + 3, generator=g).to(torch.bfloat16),
               "big/fp16": torch.randn(3 << 19, generator=g).to(torch.float16),
               "big/fp32": torch.randn(700_001, generator=g)}
    store = tmp_path / "s"
    with tierstore.open(store, l3_compression=compression, l2_cache_size=0) as db, db.transaction():
        for key, tensor in tensors.items():
            db.put(key, tensor)
    with tierstore.open(store, l2_cache_size=0, readonly=True) as db:
        for key, tensor in tensors.items():
            assert torch.equal(db.get(key).view(torch.uint8), tensor.view(torch.uint8))
    check_readable(store, tensors)


def test_only_pack_shards_are_read_ahead_whole_when_opened(l3: ZarrL3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack shard gets one WILLNEED at open (its small blocks are read together); a large block's
    own file none: its pieces are read in order, paced by the kernel's readahead."""
    small = weights(20_000, torch.bfloat16, 1)
    large = weights((3 << 20) + 5, torch.bfloat16, 2)
    small_loc = put(l3, 1, small, choose_codec("auto", 2))
    large_loc = put(l3, 2, large, choose_codec("auto", 2))
    assert small_loc.array.startswith("packs/") and large_loc.array.startswith("blocks/")
    advised: list[tuple[str, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    fresh = ZarrL3(l3.root.parent, fsync=False, readonly=True)  # descriptors opened from now on
    try:
        out_small, out_large = np.empty(small.nbytes, dtype=np.uint8), np.empty(large.nbytes, dtype=np.uint8)
        assert fresh.read_into(small_loc, out_small) == crc32c.crc32c(small.data)
        assert fresh.read_many([(large_loc, out_large)]) == [crc32c.crc32c(large.data)]
        assert out_small.tobytes() == small.tobytes() and out_large.tobytes() == large.tobytes()
    finally:
        fresh.close()
    pack_file = str(fresh.shard_path(small_loc.array, small_loc.shard))
    block_file = str(fresh.shard_path(large_loc.array, large_loc.shard))
    assert (pack_file, os.POSIX_FADV_WILLNEED) in advised
    assert not [advice for path, advice in advised if path == block_file]
