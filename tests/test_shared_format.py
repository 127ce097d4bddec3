"""The shared tier without a server: object format, content hashes, config, redaction, degraded mode."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tierstore.config import CacheConfig, SharedCredentials
from tierstore.errors import BlockUnavailableError, ConfigError, CorruptBlockError, SharedTierUnavailableError
from tierstore.tensors import dtype_name, tensor_bytes
from tierstore.tiers.l3_codecs import RAW, choose_codec
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
