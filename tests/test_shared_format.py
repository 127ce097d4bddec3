"""The shared tier without a server: object format, content hashes, config, redaction, degraded mode."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tierstore.config import CacheConfig, SharedCredentials
from tierstore.errors import BlockUnavailableError, ConfigError, CorruptBlockError, SharedTierUnavailableError
from tierstore.tensors import dtype_name, tensor_bytes
from tierstore.tiers.codecs import RAW, choose_codec
from tierstore.tiers.shared_objects import CHUNK, ChunkLayout, chunk_pool, parse_head
from tierstore.tiers.shared_s3 import (
    BlockHeader,
    SharedS3Tier,
    content_hash,
    decode_block,
    encode_block,
    manifest_path,
    parse_shared_url,
    ref_path,
)

CASES = [torch.randn(300, 7).to(torch.bfloat16), torch.arange(5000, dtype=torch.int64), torch.empty(0, 4),
         torch.tensor([float("nan"), -0.0]), torch.randn(64, 64)]


def _encoded(tensor: torch.Tensor, setting: str) -> tuple[BlockHeader, bytes, np.ndarray]:
    data = tensor_bytes(tensor)
    shape = tuple(tensor.shape)
    header = BlockHeader(content_hash(data, dtype_name(tensor.dtype), shape), dtype_name(tensor.dtype), shape,
                         data.nbytes, 0)
    header, body = encode_block(data, header, choose_codec(setting, tensor.element_size()))
    return header, body, data


@pytest.mark.parametrize("setting", ["off", "auto", "zstd:3", "blosc-lz4"])
@pytest.mark.parametrize("index", range(len(CASES)))
def test_blocks_round_trip_bit_exact_and_are_checked(setting: str, index: int) -> None:
    header, body, data = _encoded(CASES[index], setting)
    for form in (body, bytearray(body), memoryview(body)):
        got_header, got = decode_block(form, header.hash)
        assert got_header == header and got.tobytes() == data.tobytes()
    with pytest.raises(CorruptBlockError):
        decode_block(body, "0" * 64)  # not the block it is named for
    if data.nbytes:
        flipped = bytearray(body)
        flipped[-1] ^= 0x40
        with pytest.raises(CorruptBlockError):
            decode_block(bytes(flipped), header.hash)
    with pytest.raises(CorruptBlockError):
        decode_block(body[: len(body) // 2], header.hash)


def test_content_hash_covers_dtype_and_shape() -> None:
    raw = tensor_bytes(torch.arange(8, dtype=torch.int16))
    assert content_hash(raw, "int16", (8,)) != content_hash(raw, "int16", (2, 4))
    assert content_hash(raw, "int16", (8,)) != content_hash(raw, "float16", (8,))
    assert content_hash(raw, "int16", (8,)) == content_hash(raw.copy(), "int16", (8,))


def test_incompressible_blocks_are_stored_raw() -> None:
    header, _, _ = _encoded(torch.randint(0, 255, (4096,), dtype=torch.uint8), "zstd")
    assert header.codec == RAW.id


def test_object_names_are_safe() -> None:
    assert parse_shared_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert ref_path("../../etc/passwd").startswith("refs/") and ".." not in ref_path("../../etc/passwd")
    for bad in ("", "/abs", "a/../b", "x\0y"):
        with pytest.raises(tierstore.TierStoreError):
            manifest_path(bad)


def test_config_validates_and_never_stores_credentials() -> None:
    creds = SharedCredentials("AKIAEXAMPLE", "very-secret")
    config = CacheConfig(shared_url="s3://bucket/prefix", shared_credentials=creds, shared_timeout=2)
    assert "very-secret" not in repr(config) and "AKIAEXAMPLE" not in repr(config)
    assert "shared_credentials" not in config.to_dict() and "very-secret" not in str(config.to_dict())
    for bad in ({"shared_url": "http://bucket"}, {"shared_url": "s3://KEY:SECRET@bucket/x"},
                {"shared_timeout": 0}, {"shared_publish": "sometimes"}, {"shared_concurrency": 0},
                {"shared_credentials": ("a", "b")}, {"shared_compression": "gzip"}):
        with pytest.raises(ConfigError):
            CacheConfig(**bad)  # type: ignore[arg-type]


def test_errors_are_redacted() -> None:
    tier = SharedS3Tier("s3://bucket/p", endpoint="http://127.0.0.1:9",
                        credentials=SharedCredentials("AKIAEXAMPLE", "very-secret"), timeout=1.0)
    try:
        text = tier.redact("GET http://x/?X-Amz-Credential=AKIAEXAMPLE%2F2026&X-Amz-Signature=abcdef very-secret"
                           "\n\nDebug source: Authorization: AWS4 very-secret")
        assert "very-secret" not in text and "AKIAEXAMPLE" not in text and "abcdef" not in text
        assert "Debug source" not in text
    finally:
        tier.close()


def test_a_request_failing_as_its_task_is_cancelled_ends_the_task_cancelled() -> None:
    """The request fails in the loop step its task is cancelled in (a publish cancelling its window after
    one upload failed): the task ends cancelled, so no "Task exception was never retrieved" follows."""
    tier = SharedS3Tier("s3://bucket/p", endpoint="http://127.0.0.1:9",
                        credentials=SharedCredentials("a", "b"), timeout=1.0)
    try:
        async def scenario() -> tuple[bool, BaseException | None]:
            gate = asyncio.Event()

            async def request() -> None:
                await gate.wait()
                raise ValueError("connection refused")

            task = asyncio.ensure_future(tier.bounded(request()))
            for _ in range(5):  # until the request waits on the gate
                await asyncio.sleep(0)
            gate.set()  # the request wakes and fails in the next step...
            task.cancel()  # ...the step in which its task learns it was cancelled
            await asyncio.wait([task])
            return task.cancelled(), None if task.cancelled() else task.exception()

        cancelled, error = tier.submit(scenario(), size=None).result(timeout=10)
        assert cancelled, f"the task ended with {error!r}, which nobody retrieves"
    finally:
        tier.close()


def test_unreachable_shared_tier_degrades_without_a_server(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tierstore.open(tmp_path / "s", shared_url="s3://bucket/p", shared_endpoint=f"http://127.0.0.1:{port}",
                        shared_credentials=SharedCredentials("a", "b"), shared_timeout=2.0) as db:
        db.put("here", torch.ones(3))
        with pytest.raises(BlockUnavailableError):
            db.get("there")
        assert db.stats().tiers["shared"]["degraded"]
        with pytest.raises(SharedTierUnavailableError):
            db.pull("model")
        assert torch.equal(db.get("here"), torch.ones(3))
        assert "here" in db and "there" not in db  # membership is local: no network


# -- format 2: blocks larger than CHUNK, in independently encoded chunks ----------------------------

def _large(setting: str, count: int = (CHUNK * 5) // 4 + 3) -> tuple[BlockHeader, bytes, np.ndarray]:
    gen = torch.Generator().manual_seed(5)
    return _encoded((torch.randn(count, generator=gen) * 0.02).to(torch.bfloat16), setting)


@pytest.mark.parametrize("setting", ["off", "auto"])
def test_chunked_blocks_round_trip_and_hash_in_one_pass(setting: str) -> None:
    header, body, data = _large(setting)
    assert body[:4] == b"TSB2" and data.nbytes > 2 * CHUNK
    assert header.hash == content_hash(data, header.dtype, header.shape)
    assert header.hash == content_hash(data, header.dtype, header.shape, pool=chunk_pool())
    unnamed = BlockHeader("", header.dtype, header.shape, header.nbytes, 0)
    again, body_again = encode_block(data, unnamed, choose_codec(setting, 2), pool=chunk_pool())
    assert again == header and body_again == body  # deterministic: the same block, the same object
    for pool in (None, chunk_pool()):
        got_header, got = decode_block(body, header.hash, pool=pool)
        assert got_header == header and got.tobytes() == data.tobytes()
    with pytest.raises(ValueError):
        encode_block(data, BlockHeader("0" * 64, header.dtype, header.shape, header.nbytes, 0), RAW)


def test_chunked_block_with_a_damaged_chunk_is_refused() -> None:
    header, body, _ = _large("auto")
    _, layout = parse_head(body, header.hash)
    assert isinstance(layout, ChunkLayout) and len(layout.chunks) == 3
    start, stop = layout.chunks[1][:2]
    damaged = bytearray(body)
    damaged[(start + stop) // 2] ^= 0x01
    with pytest.raises(CorruptBlockError, match=r"chunk 1|damaged"):
        decode_block(bytes(damaged), header.hash)


def test_chunked_block_with_a_missing_chunk_is_refused() -> None:
    header, body, _ = _large("off")
    _, layout = parse_head(body, header.hash)
    assert isinstance(layout, ChunkLayout)
    with pytest.raises(CorruptBlockError, match="missing"):
        decode_block(body[:layout.chunks[-1][0]], header.hash)  # the last chunk never arrived
    with pytest.raises(CorruptBlockError):
        decode_block(body + b"extra", header.hash)


def test_chunked_block_with_a_rewritten_chunk_list_is_refused() -> None:
    header, body, _ = _large("off")
    size = int.from_bytes(body[4:8], "little")
    head = json.loads(body[8:8 + size])
    head["chunks"][0][1] = "0" * 64  # a chunk list that no longer hashes to the object's name
    text = json.dumps(head, separators=(",", ":")).encode()
    forged = b"TSB2" + len(text).to_bytes(4, "little") + text + body[8 + size:]
    with pytest.raises(CorruptBlockError, match="content hash"):
        decode_block(forged, header.hash)


def test_format_1_objects_of_large_blocks_still_read() -> None:
    gen = torch.Generator().manual_seed(9)
    data = tensor_bytes(torch.randn(CHUNK // 2 + 100, generator=gen).to(torch.float32))  # > CHUNK bytes
    digest = hashlib.sha256(f"tierstore-block-v1\0float32\0{[data.nbytes // 4]}\0".encode() + data.tobytes())
    header = BlockHeader(digest.hexdigest(), "float32", (data.nbytes // 4,), data.nbytes, 0)
    text = json.dumps(header.to_json(), separators=(",", ":")).encode()
    body = b"TSB1" + len(text).to_bytes(4, "little") + text + data.tobytes()  # as written before format 2
    got_header, got = decode_block(bytearray(body), header.hash)
    assert got_header == header and got.tobytes() == data.tobytes()
