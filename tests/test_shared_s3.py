"""The shared tier against a real S3 server (Ceph RGW): machines are separate processes.

Use cases: a model imported by one machine is loaded by another that never saw it
(``pull`` and ``get`` fallthrough); a KV prefix block and a vision feature computed by one
machine are hits on another; two machines publishing the same block at once leave one copy.
Faults: nothing listening, a server that never answers, the gateway really stopped and
restarted, a damaged object, wrong credentials, a publish cut off before its manifest.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
import torch
from s3_server import S3Server, s3_server  # noqa: F401  (the session fixture)

import tierstore
from tierstore.cli import main
from tierstore.config import SharedCredentials
from tierstore.errors import BlockUnavailableError, CorruptBlockError, SharedTierError, SharedTierUnavailableError
from tierstore.tensors import dtype_name, tensor_bytes
from tierstore.tiers.l3_codecs import choose_codec
from tierstore.tiers.shared_objects import CHUNK, ChunkLayout, chunk_pool, parse_head
from tierstore.tiers.shared_s3 import BlockHeader, SharedS3Tier, block_path, encode_block


def _digest(t: torch.Tensor) -> str:
    flat = t.contiguous().reshape(-1)
    return f"{t.dtype}{tuple(t.shape)}" + hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _model() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        "model/embed.weight": torch.randn(512, 256, generator=gen).to(torch.bfloat16),
        "model/layers.0.weight": torch.randn(1024, 512, generator=gen),  # 2 MiB: uploaded after a HEAD
        "model/layers.0.bias": torch.randn(64, generator=gen).to(torch.float16),
        "model/norm.eps": torch.tensor([1e-6], dtype=torch.float64),
        "model/empty": torch.empty(0, 3, dtype=torch.int32),
        "model/mask": torch.tensor([True, False, True]),
    }


# -- the machines (each runs in its own spawned process) -------------------------------------------

def machine_import(store: str, shared: dict[str, Any]) -> dict[str, Any]:
    """Import the tiny model and publish it as ``model/tiny``."""
    with tierstore.open(store, **shared) as db:
        with db.transaction():
            for key, tensor in _model().items():
                db.put(key, tensor)
        report = db.publish("model/", name="model/tiny")
        return {"keys": report.keys, "uploaded": report.uploaded}


def machine_pull(store: str, shared: dict[str, Any]) -> dict[str, Any]:
    """Pull ``model/tiny`` into an empty store, reopen it offline, read everything."""
    with tierstore.open(store, **shared) as db:
        report = db.pull("model/tiny")
        again = db.pull("model/tiny")
    offline = {**shared, "shared_url": None}
    with tierstore.open(store, **offline) as db:
        digests = {key: _digest(db.get(key)) for key in db}
        tiers = {key: db.info(key).tiers for key in db}
    return {"fetched": report.fetched, "again_fetched": again.fetched, "again_skipped": again.skipped,
            "digests": digests, "tiers": tiers}


def machine_get(store: str, shared: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """Read ``keys`` from a store that has none of them: each comes from the shared tier once."""
    with tierstore.open(store, **shared) as db:
        first = {key: _digest(db.get(key)) for key in keys}
        second = {key: _digest(db.get(key)) for key in keys}
        stats = db.stats()
        return {"first": first, "second": second, "hits": stats.hits, "local": sorted(db.keys()),
                "durable": {key: db.info(key).durable for key in keys}}


def machine_compute(store: str, shared: dict[str, Any], chain: str, image: str) -> dict[str, Any]:
    """Compute a KV prefix block (cache-only, published when L2 evicts it) and a vision feature
    (durable, published write-through)."""
    gen = torch.Generator().manual_seed(11)
    kv = torch.randn(2, 4, 16, 64, generator=gen).to(torch.float16)
    feature = torch.randn(32, 128, generator=gen)
    with tierstore.open(store, **shared, l2_cache_size="1MiB") as db:
        db.put(f"kv/{chain}", kv, durable=False)
        db.put(f"vision/{image}", feature)
        for i in range(8):  # fill L2: the KV block is evicted, spilled to L3 and published
            db.put(f"scratch/{i}", torch.zeros(64, 1024), durable=False)
        assert db.wait_published(timeout=30)
        return {"kv": _digest(kv), "feature": _digest(feature), "shared": db.stats().tiers["shared"]}


def machine_publish_same(store: str, shared: dict[str, Any], key: str, start_at: float) -> int:
    """Publish the same big block as the other machine, starting at the same moment."""
    tensor = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB, identical on both machines
    with tierstore.open(store, **shared) as db:
        db.put(key, tensor)
        time.sleep(max(0.0, start_at - time.time()))
        return db.publish(keys=[key]).keys


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture
def shared(s3_server: S3Server) -> dict[str, Any]:  # noqa: F811
    """Shared-tier settings of a fresh prefix of the test bucket."""
    return {"shared_url": f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:12]}", "shared_endpoint": s3_server.endpoint,
            "shared_credentials": SharedCredentials(s3_server.access_key, s3_server.secret_key),
            "shared_timeout": 10.0}


@pytest.fixture(scope="module")
def machines() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """Two worker processes, each a machine of its own (spawned: no state shared with the test)."""
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _tier(shared: dict[str, Any]) -> SharedS3Tier:
    return SharedS3Tier(shared["shared_url"], endpoint=shared["shared_endpoint"],
                        credentials=shared["shared_credentials"], timeout=10.0)


# -- use cases -------------------------------------------------------------------------------------

def test_model_imported_on_one_machine_loads_on_another(
        tmp_path: Path, shared: dict[str, Any], machines: concurrent.futures.ProcessPoolExecutor) -> None:
    model = _model()
    done = machines.submit(machine_import, str(tmp_path / "a"), shared).result()
    assert done == {"keys": len(model), "uploaded": len(model)}
    pulled = machines.submit(machine_pull, str(tmp_path / "b"), shared).result()
    assert pulled["digests"] == {key: _digest(t) for key, t in model.items()}
    assert pulled["fetched"] == len(model) and pulled["again_fetched"] == 0
    assert pulled["again_skipped"] == len(model)
    assert all("L3" in tiers for tiers in pulled["tiers"].values())  # landed durably, readable offline
    # a third machine reads two keys by get fallthrough, without pulling
    keys = ["model/embed.weight", "model/layers.0.weight"]
    got = machines.submit(machine_get, str(tmp_path / "c"), shared, keys).result()
    assert got["first"] == got["second"] == {key: _digest(model[key]) for key in keys}
    assert got["hits"]["shared"] == 2 and got["hits"]["L2"] == 2  # once from the shared tier, then local
    assert got["local"] == sorted(keys)


def test_kv_block_and_vision_feature_computed_on_one_machine_hit_on_another(
        tmp_path: Path, shared: dict[str, Any], machines: concurrent.futures.ProcessPoolExecutor) -> None:
    chain, image = hashlib.sha256(b"tokens 0..16").hexdigest(), hashlib.sha256(b"image").hexdigest()
    made = machines.submit(machine_compute, str(tmp_path / "a"),
                           {**shared, "shared_publish": "write-through"}, chain, image).result()
    assert made["shared"]["published"] >= 2 and not made["shared"]["degraded"]
    keys = [f"kv/{chain}", f"vision/{image}"]
    got = machines.submit(machine_get, str(tmp_path / "b"), shared, keys).result()
    assert got["first"] == {keys[0]: made["kv"], keys[1]: made["feature"]}
    assert got["hits"]["shared"] == 2
    assert got["durable"] == {keys[0]: False, keys[1]: True}  # a cache-only block stays cache-only


def test_two_machines_publishing_one_block_at_once_leave_one_copy(
        tmp_path: Path, shared: dict[str, Any], machines: concurrent.futures.ProcessPoolExecutor) -> None:
    start_at = time.time() + 6.0  # both processes import torch first
    futures = [machines.submit(machine_publish_same, str(tmp_path / name), shared, f"w/{name}", start_at)
               for name in ("a", "b")]
    assert [f.result() for f in futures] == [1, 1]
    tier = _tier(shared)
    try:
        blocks = tier.run(tier.list_objects("blocks/"), "list")
        refs = tier.run(tier.list_objects("refs/"), "list")
    finally:
        tier.close()
    assert len(blocks) == 1 and len(refs) == 2
    with tierstore.open(tmp_path / "c", **shared) as db:
        assert torch.equal(db.get("w/a"), torch.arange(1 << 19, dtype=torch.float32))
        assert torch.equal(db.get("w/b"), db.get("w/a"))


# -- faults ----------------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: nothing listens there


def test_unreachable_server_leaves_local_tiers_working_and_degraded(
        tmp_path: Path, shared: dict[str, Any]) -> None:
    settings = {**shared, "shared_endpoint": f"http://127.0.0.1:{_closed_port()}"}
    with tierstore.open(tmp_path / "s", **settings) as db:
        db.put("local", torch.ones(4))
        assert torch.equal(db.get("local"), torch.ones(4))
        with pytest.raises(BlockUnavailableError) as caught:
            db.get("elsewhere")
        assert isinstance(caught.value, KeyError) and isinstance(caught.value, SharedTierUnavailableError)
        state = db.stats().tiers["shared"]
        assert state["degraded"] and state["errors"] == 1 and state["retry_in"] > 0
        with pytest.raises(KeyError):  # within the backoff: fails at once, the server is not asked
            db.get("elsewhere")
        assert db.stats().tiers["shared"]["errors"] == 1
        assert torch.equal(db.get("local"), torch.ones(4)) and db.stats().hits["L2"] == 2
        with pytest.raises(SharedTierUnavailableError):
            db.publish()
        secret = shared["shared_credentials"].secret_access_key
        assert secret not in str(caught.value) and secret not in str(db.stats())


def test_server_that_never_answers_fails_within_the_timeout(tmp_path: Path, shared: dict[str, Any]) -> None:
    with socket.socket() as hole:  # accepts connections (the kernel's backlog) and never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        settings = {**shared, "shared_endpoint": f"http://127.0.0.1:{hole.getsockname()[1]}", "shared_timeout": 1.0}
        outcome: list[BaseException] = []
        with tierstore.open(tmp_path / "s", **settings) as db:
            def read() -> None:
                try:
                    db.get("missing")
                except BaseException as exc:
                    outcome.append(exc)
            worker = threading.Thread(target=read)
            worker.start()
            worker.join(60)  # a liveness bound, far above the 1 s timeout: not a timing assertion
            assert not worker.is_alive(), "get() hung past shared_timeout"
            assert len(outcome) == 1 and isinstance(outcome[0], BlockUnavailableError)
            assert "shared tier" in str(outcome[0]) and db.stats().tiers["shared"]["degraded"]


def test_gateway_stopped_and_restarted(tmp_path: Path, shared: dict[str, Any], s3_server: S3Server) -> None:  # noqa: F811
    if s3_server.ceph_dir is None:
        pytest.skip("the S3 server was not started by tools/ceph_s3.sh here (TIERSTORE_TEST_CEPH_DIR unset)")
    with tierstore.open(tmp_path / "a", **shared) as a:
        a.put("x", torch.arange(10))
        a.publish(keys=["x"])
    with tierstore.open(tmp_path / "b", **shared, shared_publish="write-through") as b:
        b.put("mine", torch.zeros(3))
        assert b.wait_published(timeout=30)
        s3_server.rgw("rgw-stop")
        try:
            with pytest.raises(BlockUnavailableError):
                b.get("x")
            assert b.stats().tiers["shared"]["degraded"]
            assert torch.equal(b.get("mine"), torch.zeros(3))  # local tiers keep working
            b.put("made offline", torch.full((5,), 7))  # published once the server is back
        finally:
            s3_server.rgw("rgw-start")
        deadline = time.monotonic() + 60
        while True:  # retried with backoff: a call after the retry time reaches the server again
            try:
                got = b.get("x")
                break
            except BlockUnavailableError:
                assert time.monotonic() < deadline, "the shared tier did not recover after the restart"
                time.sleep(0.2)
        assert torch.equal(got, torch.arange(10))
        assert not b.stats().tiers["shared"]["degraded"]
        assert b.wait_published(timeout=60)  # the background queue kept the key and retried
    with tierstore.open(tmp_path / "c", **shared) as c:
        assert torch.equal(c.get("made offline"), torch.full((5,), 7))


@pytest.mark.parametrize("damage", ["flipped", "swapped"])
def test_damaged_object_is_never_used(tmp_path: Path, shared: dict[str, Any], damage: str) -> None:
    with tierstore.open(tmp_path / "a", **shared) as a:
        a.put("w", torch.arange(1000, dtype=torch.int64))
        a.put("v", torch.randn(100))
        a.publish(keys=["w", "v"], name="m")
        entries = a.shared.manifest("m")[1]  # type: ignore[union-attr]
        tier = a.shared.tier  # type: ignore[union-attr]
        body = tier.run(tier.get_object(block_path(entries["w"].hash)), "get")
        other = tier.run(tier.get_object(block_path(entries["v"].hash)), "get")
        assert body is not None and other is not None
        damaged = body[:-8] + bytes(8) if damage == "flipped" else other  # a valid object, but not this block
        tier.run(tier.put_object(block_path(entries["w"].hash), damaged), "put")
        report = a.verify_shared()
        assert not report.ok and len(report.problems) == 1 and "m:w" in report.problems[0]
        assert ("content hash" if damage == "swapped" else "damaged") in report.problems[0]
    with tierstore.open(tmp_path / "b", **shared) as b:
        with pytest.raises(CorruptBlockError):
            b.get("w")
        assert "w" not in b and len(b) == 0
        with pytest.raises(CorruptBlockError):
            b.pull("m")
        assert "w" not in b


def test_cut_off_publish_leaves_no_manifest(tmp_path: Path, shared: dict[str, Any]) -> None:
    with tierstore.open(tmp_path / "a", **shared) as a:
        for i in range(40):
            a.put(f"k{i}", torch.full((10,), i))

        def stop(done: int, total: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            a.publish(name="half", progress=stop)
        assert [name for name, _ in a.shared.manifests()] == []  # type: ignore[union-attr]
        with pytest.raises(KeyError):
            a.pull("half")
        assert a.verify_shared().ok and a.verify_shared().manifests == 0


def test_credentials_stay_out_of_errors_and_catalog(tmp_path: Path, shared: dict[str, Any]) -> None:
    wrong = SharedCredentials(shared["shared_credentials"].access_key_id, "not-the-secret-" + uuid.uuid4().hex)
    with tierstore.open(tmp_path / "s", **{**shared, "shared_credentials": wrong}) as db:
        db.put("k", torch.ones(2))
        with pytest.raises(SharedTierError) as caught:
            db.publish()
        assert not isinstance(caught.value, SharedTierUnavailableError)  # refused, not unreachable
        text = f"{caught.value} {db.stats()} {db.config!r} {wrong!r}"
        assert wrong.secret_access_key not in text and wrong.access_key_id not in text
        assert "access denied" in str(caught.value)
    for path in (tmp_path / "s").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert wrong.secret_access_key.encode() not in data and wrong.access_key_id.encode() not in data
    with tierstore.open(tmp_path / "s") as db:  # the stored config has the URL, not the credentials
        assert db.config.shared_url == shared["shared_url"] and db.config.shared_credentials is None


# -- command line ----------------------------------------------------------------------------------

def test_cli_publish_pull_ls_stats_verify(tmp_path: Path, shared: dict[str, Any], s3_server: S3Server,  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)  # the CLI takes credentials the usual way
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    settings = {k: v for k, v in shared.items() if k != "shared_credentials"}
    with tierstore.open(tmp_path / "a", **settings) as db:
        db.put("m/w", torch.randn(64, 64))
        db.put("m/b", torch.zeros(64))
        db.put("other", torch.ones(1))
    assert main(["publish", str(tmp_path / "a"), "m/", "--name", "model/cli", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == 2
    assert main(["shared", "ls", str(tmp_path / "a"), "--json"]) == 0
    assert [row["name"] for row in json.loads(capsys.readouterr().out)] == ["model/cli"]
    assert main(["shared", "ls", str(tmp_path / "a"), "model/cli", "--json"]) == 0
    assert sorted(row["key"] for row in json.loads(capsys.readouterr().out)["blocks"]) == ["m/b", "m/w"]
    assert main(["ls", str(tmp_path / "a"), "--shared", "--json"]) == 0  # ls covers the shared tier too
    assert [row["name"] for row in json.loads(capsys.readouterr().out)] == ["model/cli"]
    assert main(["ls", str(tmp_path / "a"), "model/cli", "--shared", "--json"]) == 0
    assert sorted(row["key"] for row in json.loads(capsys.readouterr().out)["blocks"]) == ["m/b", "m/w"]
    url = settings["shared_url"]
    assert main(["pull", str(tmp_path / "b"), "model/cli", "--url", url, "--endpoint", s3_server.endpoint]) == 0
    assert "pulled" in capsys.readouterr().out
    with tierstore.open(tmp_path / "b") as b:
        assert sorted(b.keys()) == ["m/b", "m/w"] and b.config.shared_url == url
    assert main(["stats", str(tmp_path / "b")]) == 0
    assert "shared tier" in capsys.readouterr().out
    assert main(["shared", "stats", str(tmp_path / "b"), "--json"]) == 0
    objects = json.loads(capsys.readouterr().out)["objects"]
    assert objects["blocks"]["count"] == 2 and objects["manifests"]["count"] == 1
    assert main(["shared", "verify", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"manifests": 1, "blocks": 2, "problems": []}
    assert main(["verify", str(tmp_path / "b"), "--shared", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shared"] == {"manifests": 1, "blocks": 2, "problems": []}
    assert main(["shared", "ls", str(tmp_path / "b"), "no/such"]) == 2
    assert s3_server.secret_key not in capsys.readouterr().err


# -- chunked (format 2) blocks -----------------------------------------------------------------------

def _put_large(tier: SharedS3Tier, tensor: torch.Tensor, setting: str = "auto") -> tuple[BlockHeader, bytes]:
    data = tensor_bytes(tensor)
    header = BlockHeader("", dtype_name(tensor.dtype), tuple(tensor.shape), data.nbytes, 0)
    header, body = encode_block(data, header, choose_codec(setting, tensor.element_size()), pool=chunk_pool())
    tier.run(tier.put_block(header.hash, body), "put", size=len(body))  # skipped when already there
    return header, body


def test_chunked_blocks_are_fetched_in_ranges_and_checked(tmp_path: Path, shared: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(3)
    weights = (torch.randn(5 * CHUNK // 4 + 3, generator=gen) * 0.02).to(torch.bfloat16)  # 3 chunks
    zeros = torch.zeros(CHUNK, dtype=torch.float32)  # 4 chunks, a whole object smaller than its first range
    tier = _tier(shared)
    try:
        for tensor in (weights, zeros):
            header, body = _put_large(tier, tensor)
            assert body[:4] == b"TSB2"
            got = tier.run(tier.get_block(header.hash, header.nbytes), "get", size=None)
            assert got is not None and got[0] == header and got[1].tobytes() == tensor_bytes(tensor).tobytes()
        header, body = _put_large(tier, weights)
        _, layout = parse_head(body, header.hash)
        assert isinstance(layout, ChunkLayout)
        start, stop = layout.chunks[2][:2]
        damaged = bytearray(body)
        damaged[(start + stop) // 2] ^= 0x10
        tier.run(tier.put_object(block_path(header.hash), bytes(damaged)), "put")
        with pytest.raises(CorruptBlockError):
            tier.run(tier.get_block(header.hash, header.nbytes), "get", size=None)
        tier.run(tier.put_object(block_path(header.hash), body[:layout.chunks[2][0]]), "put")  # last chunk lost
        with pytest.raises(CorruptBlockError, match="missing"):
            tier.run(tier.get_block(header.hash, header.nbytes), "get", size=None)
        tier.run(tier.put_object(block_path(header.hash), body), "put")
        # what the store sees: a key published with it reads back whole on another machine
        with tierstore.open(tmp_path / "a", **shared) as a:
            a.put("big", weights)
            assert a.publish(keys=["big"]).keys == 1
        with tierstore.open(tmp_path / "b", **shared) as b:
            assert torch.equal(b.get("big").view(torch.int16), weights.view(torch.int16))
    finally:
        tier.close()


def test_format_1_large_object_still_reads(shared: dict[str, Any]) -> None:
    data = tensor_bytes(torch.arange(3 * CHUNK // 4, dtype=torch.float32))  # 1.5 CHUNK, one blob
    digest = hashlib.sha256(f"tierstore-block-v1\0float32\0{[data.nbytes // 4]}\0".encode() + data.tobytes())
    header = BlockHeader(digest.hexdigest(), "float32", (data.nbytes // 4,), data.nbytes, 0)
    text = json.dumps(header.to_json(), separators=(",", ":")).encode()
    tier = _tier(shared)
    try:
        tier.run(tier.put_object(block_path(header.hash),
                                 b"TSB1" + len(text).to_bytes(4, "little") + text + data.tobytes()), "put")
        got = tier.run(tier.get_block(header.hash, header.nbytes), "get", size=None)
        assert got is not None and got[1].tobytes() == data.tobytes()
    finally:
        tier.close()


def test_upload_cut_off_mid_body_is_never_visible(shared: dict[str, Any]) -> None:
    tensor = (torch.randn(4 * CHUNK) * 0.02).to(torch.bfloat16)
    data = tensor_bytes(tensor)
    header, body = encode_block(data, BlockHeader("", "bfloat16", tuple(tensor.shape), data.nbytes, 0),
                                choose_codec("auto", 2))
    path = block_path(header.hash)

    def parts() -> Iterator[bytes]:  # a multipart upload whose sender dies after two parts
        yield body[:5 << 20]
        yield body[5 << 20:10 << 20]
        raise ConnectionAbortedError("the uploader died")

    tier = _tier(shared)

    async def upload() -> None:
        await obstore.put_async(tier.store.store, path, parts(), chunk_size=5 << 20)

    try:
        with pytest.raises(Exception, match="died"):
            tier.run(upload(), "put", size=None)
        assert not tier.run(tier.exists(path), "exists")
        assert tier.run(tier.get_block(header.hash, header.nbytes), "get", size=None) is None
        assert tier.run(tier.put_block(header.hash, body), "put", size=len(body))  # a retry stores it whole
        got = tier.run(tier.get_block(header.hash, header.nbytes), "get", size=None)
        assert got is not None and got[1].tobytes() == data.tobytes()
    finally:
        tier.close()
