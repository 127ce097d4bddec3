"""Qwen3-VL weights in a store: import/export of safetensors, streamed loading, the request's adapter."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tierstore
from tierstore import CheckpointError, ConfigError
from tierstore.cli import main
from tierstore.integrations import checkpoint, qwen3_vl
from tierstore.integrations.checkpoint import HF_META, read_header, read_json
from tierstore.integrations.qwen3_vl import (
    Qwen3VLHierarchicalCacheAdapter,
    export_safetensors,
    import_checkpoint,
    load_streamed,
)
from tierstore.integrations.tiny_model import build_tiny_model, save_tiny_checkpoint, synthetic_inputs, tiny_config

PROMPT, SUFFIX = [3, 14, 15, 92], [65, 35]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The in-memory tiny model and the same model written as a sharded checkpoint."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    config = tiny_config(layers=3, vision_depth=2)
    save_tiny_checkpoint(folder, max_shard_size="300KB", config=config)
    return build_tiny_model(config), folder


@pytest.fixture(scope="module")
def store(tiny: tuple[Any, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A store with the tiny model imported; L2 smaller than the model so blocks come and go."""
    path = tmp_path_factory.mktemp("store") / "s"
    with tierstore.open(path, l2_cache_size="3MiB") as db:
        import_checkpoint(tiny[1], db, require_config=True)
        yield db


def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(**inputs).logits
    return out


def _generate(model: Any, inputs: dict[str, torch.Tensor], tokens: int = 5) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out


# -- streamed loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("image_seed", [None, 0], ids=["text-only", "image+text"])
@pytest.mark.parametrize("options", [{}, {"prefetch": 0}, {"resident_bytes": "600KiB", "prefetch": 1},
                                     {"resident_bytes": 1 << 40}],
                         ids=["prefetch2", "no-prefetch", "some-resident", "all-resident"])
def test_streamed_logits_are_identical(tiny: tuple[Any, Path], store: Any, image_seed: int | None,
                                       options: dict[str, Any]) -> None:
    reference, _ = tiny
    model = load_streamed(store, **options)
    try:
        inputs = synthetic_inputs(PROMPT, image_seed=image_seed, suffix=SUFFIX)
        expected = _logits(reference, inputs)
        assert torch.equal(_logits(model, inputs), expected)
        assert torch.equal(_logits(model, inputs), expected)  # again, with the layers now in L2
        stats = model.weight_streamer.stats()
        ran = [u for u in model.weight_streamer.units if image_seed is not None or ".language_model." in u.name]
        assert stats.loads == 2 * len(ran)  # each streamed unit that ran loaded its weights once per forward
    finally:
        model.weight_streamer.close()


def test_streamed_generate_is_identical(tiny: tuple[Any, Path], store: Any) -> None:
    reference, _ = tiny
    model = load_streamed(store)
    try:
        for image_seed in (None, 0):
            inputs = synthetic_inputs(PROMPT, image_seed=image_seed, suffix=SUFFIX)
            assert torch.equal(_generate(model, inputs), _generate(reference, inputs))
        stats = model.weight_streamer.stats()
        assert stats.prefetch_used_blocks > 0 and stats.demand_fetches < stats.loads
    finally:
        model.weight_streamer.close()


def test_streamed_weights_are_released_after_each_layer(store: Any) -> None:
    model = load_streamed(store, resident_bytes="600KiB")
    try:
        layers = model.model.language_model.layers
        _logits(model, synthetic_inputs(PROMPT, image_seed=None))
        assert not any(p.is_meta for p in layers[0].parameters())  # within the resident budget
        assert all(p.is_meta for p in layers[2].parameters())  # streamed: back to meta after its forward
        embed = model.model.language_model.embed_tokens.weight
        assert model.lm_head.weight is embed and not embed.is_meta  # tied: one tensor
        assert model.weight_streamer.stats().units == 4  # 2 vision blocks + 2 of the 3 text layers
    finally:
        model.weight_streamer.close()


def test_streamed_dtype_matches_the_cast_model(tiny: tuple[Any, Path], store: Any) -> None:
    reference = build_tiny_model(tiny_config(layers=3, vision_depth=2)).to(torch.bfloat16)
    model = load_streamed(store, dtype=torch.bfloat16)
    try:
        inputs = synthetic_inputs(PROMPT, image_seed=0, suffix=SUFFIX)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        got = _logits(model, inputs)
        assert got.dtype == torch.bfloat16 and torch.equal(got, _logits(reference, inputs))
    finally:
        model.weight_streamer.close()


def test_load_streamed_refuses_an_incomplete_store(tiny: tuple[Any, Path], tmp_path: Path) -> None:
    with tierstore.open(tmp_path / "empty") as db:
        db.put("x", torch.ones(2))
        with pytest.raises(CheckpointError, match="no model config"):
            load_streamed(db)
    with tierstore.open(tmp_path / "partial") as db:
        import_checkpoint(tiny[1], db)
        db.delete("model.language_model.layers.1.mlp.up_proj.weight")
        with pytest.raises(CheckpointError, match=r"lacks 1 weights.*layers\.1\.mlp\.up_proj"):
            load_streamed(db)


# -- import and export ----------------------------------------------------------------------------------


def test_import_of_a_sharded_folder_keeps_every_tensor_and_the_config(tiny: tuple[Any, Path], store: Any) -> None:
    folder = tiny[1]
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 3
    names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(k for k in store if not k.startswith(HF_META)) == sorted(names)
    assert read_json(store, "config.json") == json.loads((folder / "config.json").read_text())
    assert read_json(store, "generation_config.json") == json.loads((folder / "generation_config.json").read_text())
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert torch.equal(store.get(name), f.get_tensor(name))


def test_export_round_trips_the_bytes_of_every_tensor(tiny: tuple[Any, Path], store: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    assert export_safetensors(store, out) == len(json.loads(
        (tiny[1] / "model.safetensors.index.json").read_text())["weight_map"])
    with safe_open(out, "pt") as exported:
        assert exported.metadata() == {"format": "pt"}
        for shard in tiny[1].glob("*.safetensors"):
            with safe_open(shard, "pt") as source:
                for name in source.keys():  # noqa: SIM118
                    a, b = exported.get_tensor(name), source.get_tensor(name)
                    assert a.dtype == b.dtype and a.shape == b.shape
                    assert a.reshape(-1).view(torch.uint8).numpy().tobytes() == \
                        b.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_export_of_a_single_file_is_byte_identical(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {"b.w": torch.randn(7, 5, generator=gen).to(torch.bfloat16), "a.w": torch.randn(3, 4, generator=gen),
               "a.b": torch.arange(5, dtype=torch.int64), "mask": torch.tensor([True, False, True]),
               "scale": torch.tensor(2.5), "empty": torch.zeros(0, 3), "f8": torch.ones(4).to(torch.float8_e4m3fn),
               "i8": torch.tensor([-1, 2], dtype=torch.int8), "ünï": torch.ones(2, dtype=torch.float16)}
    source = tmp_path / "in.safetensors"
    save_file(tensors, source, metadata={"format": "pt", "note": "x"})
    with tierstore.open(tmp_path / "s") as db:
        assert import_checkpoint(source, db, prefix="m/") == len(tensors)
        db.put("other", torch.ones(3))  # outside the prefix: not exported
        export_safetensors(db, tmp_path / "out.safetensors", prefix="m/")
    assert (tmp_path / "out.safetensors").read_bytes() == source.read_bytes()


def test_import_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(256, 1024, generator=gen) for i in range(24)}, tmp_path / "m.safetensors")
    with tierstore.open(tmp_path / "s", l2_cache_size=0) as db:
        tracemalloc.start()
        try:
            import_checkpoint(tmp_path / "m.safetensors", db)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(db) == 25
    assert peak < 8 << 20  # the file is 24 MiB, its largest tensor 1 MiB


def _assert_unchanged(path: Path) -> None:
    with tierstore.open(path, readonly=True) as db:
        assert list(db.keys()) == ["keep"] and torch.equal(db.get("keep"), torch.arange(4))


@pytest.mark.parametrize("damage", ["no-safetensors", "garbage", "huge-length", "not-json", "bad-dtype",
                                    "offsets", "truncated", "second-shard-bad", "duplicate"])
def test_bad_checkpoints_raise_and_leave_the_store_alone(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    good = {"w": torch.ones(4, 4)}
    save_file(good, folder / "a.safetensors")
    raw = (folder / "a.safetensors").read_bytes()
    header = raw[8:8 + struct.unpack("<Q", raw[:8])[0]]
    bad = folder / "b.safetensors"
    if damage == "no-safetensors":
        (folder / "a.safetensors").unlink()
        (folder / "weights.bin").write_bytes(b"x" * 100)
    elif damage == "garbage":
        bad.write_bytes(b"\x07")
    elif damage == "huge-length":
        bad.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif damage == "not-json":
        bad.write_bytes(struct.pack("<Q", 8) + b"\xff\xfe{{{{{{" + b"\0" * 64)
    elif damage == "bad-dtype":
        bad.write_bytes(raw[:8] + header.replace(b'"F32"', b'"Q99"') + raw[8 + len(header):])
    elif damage == "offsets":
        bad.write_bytes(raw[:8] + header.replace(b"[0,64]", b"[0,60]") + raw[8 + len(header):])
    elif damage == "truncated":
        bad.write_bytes(raw[:-10])
    elif damage == "second-shard-bad":
        save_file({"v": torch.ones(2)}, bad)
        bad.write_bytes(bad.read_bytes()[:-1])
    elif damage == "duplicate":
        save_file(good, bad)
    with tierstore.open(tmp_path / "s") as db:
        db.put("keep", torch.arange(4))
        with pytest.raises(CheckpointError):
            import_checkpoint(folder, db)
        if damage in {"garbage", "huge-length", "not-json", "bad-dtype", "offsets", "truncated"}:
            with pytest.raises(CheckpointError):
                read_header(bad)
    _assert_unchanged(tmp_path / "s")


def test_import_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a": torch.ones(3)}, folder / "1.safetensors")
    save_file({"b": torch.ones(300, 300)}, folder / "2.safetensors")
    validate = checkpoint.read_header

    def validate_then_truncate(path: Path) -> Any:
        header = validate(path)
        if path.name == "2.safetensors":  # cut short after its header was checked: fails mid-import
            with open(path, "r+b") as f:
                f.truncate(f.seek(0, 2) - 4)
        return header

    monkeypatch.setattr(checkpoint, "read_header", validate_then_truncate)
    with tierstore.open(tmp_path / "s") as db:
        db.put("keep", torch.arange(4))
        with pytest.raises(CheckpointError, match="not fully covered"):
            import_checkpoint(folder, db)
    _assert_unchanged(tmp_path / "s")


# -- command line -------------------------------------------------------------------------------------


def test_cli_import_hf_import_and_export(tiny: tuple[Any, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    assert main(["import-hf", str(tiny[1]), str(store), "--prefix", "q/"]) == 0
    assert "imported" in capsys.readouterr().out
    single = tmp_path / "one.safetensors"
    save_file({"x": torch.arange(6, dtype=torch.int32)}, single, metadata={"format": "pt"})
    assert main(["import", str(store), str(single), "--prefix", "extra/"]) == 0
    assert main(["export", str(store), str(tmp_path / "x.safetensors"), "--prefix", "extra/"]) == 0
    assert (tmp_path / "x.safetensors").read_bytes() == single.read_bytes()
    assert main(["export", str(store), str(tmp_path / "all.safetensors")]) == 0  # no prefix: both models' tensors
    with safe_open(tmp_path / "all.safetensors", "pt") as f:
        names = list(f.keys())
    assert "extra/x" in names and "q/model.language_model.norm.weight" in names
    assert not any(HF_META in name for name in names)
    with tierstore.open(store, readonly=True) as db:
        assert read_json(db, "config.json", prefix="q/")["model_type"] == "qwen3_vl"
    assert main(["import-hf", str(tmp_path / "nowhere"), str(tmp_path / "s2")]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err and not (tmp_path / "s2").exists()
    assert main(["import-hf", str(single), str(tmp_path / "s3")]) == 2  # a file is not a model folder
    assert "not a Hugging Face model folder" in capsys.readouterr().err and not (tmp_path / "s3").exists()
    assert main(["import", str(tmp_path / "s4"), str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (tmp_path / "s4").exists()


# -- the request's adapter and the facade ----------------------------------------------------------------


def test_adapter_allocates_from_l1_then_l2(tmp_path: Path) -> None:
    with tierstore.open(tmp_path / "s", l1_device="cpu", l1_cache_size="20MiB", l2_cache_size="32MiB") as db:
        adapter = Qwen3VLHierarchicalCacheAdapter(db)
        attention = adapter.allocate_attention_weights(2, 8, 512, 64)
        kv = adapter.allocate_kv_cache(1, 16, 1024, 128)
        assert attention.shape == (2, 8, 512, 512) and kv.shape == (2, 1, 16, 1024, 128)
        assert attention.dtype == kv.dtype == torch.float16
        assert db.stats().tiers["L1"]["used"] >= attention.nbytes + kv.nbytes
        kv.fill_(1.0)
        assert float(kv.float().sum()) == kv.numel()
        del attention, kv
        assert db.stats().tiers["L1"]["used"] == 0  # the slots went back to the pool
        with pytest.raises(ConfigError):
            adapter.allocate_kv_cache(1, -1, 4, 4)
        with pytest.raises(ConfigError):
            adapter.allocate_attention_weights(1, 1, 1, 0)
    with Qwen3VLHierarchicalCacheAdapter() as adapter:  # no store: a temporary one, L2 only on a CPU machine
        kv = adapter.allocate_kv_cache(1, 2, 8, 4, dtype=torch.bfloat16)
        assert kv.dtype == torch.bfloat16 and adapter.store.stats().tiers["L2"]["used"] >= kv.nbytes


def test_facade_exports_the_public_names() -> None:
    for name in ("import_checkpoint", "export_safetensors", "export", "load_streamed", "TieredCache",
                 "VisionFeatureCache", "Qwen3VLHierarchicalCacheAdapter", "create_hardware_optimized_cache_manager"):
        assert callable(getattr(qwen3_vl, name))
    assert qwen3_vl.create_hardware_optimized_cache_manager is tierstore.create_hardware_optimized_cache_manager


def test_cli_import_hf_stores_raw_with_l3_compression_off(tiny: tuple[Any, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``--l3-compression off`` keeps the blocks raw (no decode on a read); the store remembers the codec."""
    assert main(["import-hf", str(tiny[1]), str(tmp_path / "z")]) == 0
    assert main(["import-hf", str(tiny[1]), str(tmp_path / "raw"), "--l3-compression", "off"]) == 0
    with tierstore.open(tmp_path / "z", readonly=True) as z, tierstore.open(tmp_path / "raw", readonly=True) as raw:
        assert raw.config.l3_compression == "off" and z.config.l3_compression == "auto"
        assert raw.stats().compression_ratio <= 1.0 < z.stats().compression_ratio
        assert {raw.info(k).codec for k in raw.keys(prefix=None)} == {"raw"}
        for key in z.keys(prefix=None):
            assert torch.equal(raw.get(key), z.get(key))
    assert main(["import-hf", str(tiny[1]), str(tmp_path / "bad"), "--l3-compression", "gzip"]) == 2
    assert "is not a codec" in capsys.readouterr().err
