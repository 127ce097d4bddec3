"""``export_hf`` / ``tierstore export-hf``: a store's model written as a folder ``from_pretrained`` loads.

A tiny Llama and the tiny Qwen3-VL are imported beside KV-cache and other blocks, exported with small
shards, and loaded back with transformers: logits and greedy generation equal the original model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import tierstore
from tierstore import CheckpointError, ConfigError
from tierstore.cli import main
from tierstore.integrations.checkpoint import HF_META, import_checkpoint
from tierstore.integrations.hf_export import export_hf
from tierstore.integrations.tiny_model import build_tiny_model, save_tiny_checkpoint, synthetic_inputs, tiny_config

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
OTHER_BLOCKS = ["kv/7f3a/0/keys", "kv/7f3a/0/values", "m/notes", "vision/abc"]


def _tiny_llama() -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(in-memory Llama, store with it under prefix "m/" beside blocks of other kinds)."""
    reference = _tiny_llama()
    folder = tmp_path_factory.mktemp("ckpt") / "llama"
    reference.save_pretrained(folder)
    with tierstore.open(tmp_path_factory.mktemp("store") / "s") as db:
        import_checkpoint(folder, db, prefix="m/", require_config=True)
        for key in OTHER_BLOCKS:
            db.put(key, torch.ones(2, 3))
        yield reference, db, folder


def _same_outputs(a: Any, b: Any, inputs: dict[str, torch.Tensor]) -> bool:
    with torch.inference_mode():
        logits = torch.equal(a(**inputs).logits, b(**inputs).logits)
        tokens = torch.equal(a.generate(**inputs, max_new_tokens=5, do_sample=False),
                             b.generate(**inputs, max_new_tokens=5, do_sample=False))
    return logits and tokens


def test_a_llama_exports_as_a_sharded_folder_from_pretrained_loads(llama_store: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    reference, db, source = llama_store
    out = tmp_path / "out"
    count = export_hf(db, out, prefix="m/", max_shard_size="100KB")
    state = reference.state_dict()
    assert count == len(state)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors.index.json", *(p.name for p in shards)}
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(state)  # no kv/..., vision or other blocks; no prefix
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    assert index["metadata"]["total_parameters"] == reference.num_parameters()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert index["weight_map"][name] == shard.name and torch.equal(f.get_tensor(name), state[name])
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(reference)
    assert _same_outputs(loaded, reference, {"input_ids": PROMPT, "attention_mask": torch.ones_like(PROMPT)})


def test_one_shard_is_written_as_save_pretrained_writes_it(llama_store: Any, tmp_path: Path) -> None:
    _, db, source = llama_store
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    export_hf(db, out, prefix="m/")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(out / "model.safetensors", "pt") as got, safe_open(source / "model.safetensors", "pt") as want:
        assert sorted(got.keys()) == sorted(want.keys())
        for name in want.keys():  # noqa: SIM118
            assert torch.equal(got.get_tensor(name), want.get_tensor(name))


def test_the_tiny_qwen3_vl_exports_and_loads_with_identical_outputs(tmp_path: Path) -> None:
    from transformers import Qwen3VLForConditionalGeneration

    config = tiny_config(layers=2, vision_depth=2)
    reference = build_tiny_model(config)
    save_tiny_checkpoint(tmp_path / "ckpt", config=config, max_shard_size="300KB")
    with tierstore.open(tmp_path / "s", l2_cache_size="1MiB") as db:
        import_checkpoint(tmp_path / "ckpt", db, require_config=True)
        for key in OTHER_BLOCKS:
            db.put(key, torch.zeros(4))
        count = export_hf(db, tmp_path / "out", max_shard_size="300KB")
    state = reference.state_dict()
    tied = "lm_head.weight"  # tied to the embeddings: save_pretrained leaves it out, from_pretrained ties it
    assert config.tie_word_embeddings and count == len(state) - 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(k for k in state if k != tied)
    loaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    inputs = synthetic_inputs([3, 14, 15, 92], image_seed=0, suffix=[65, 35])
    assert _same_outputs(loaded, reference, inputs)


def test_export_refusals_leave_nothing_behind(llama_store: Any, tmp_path: Path) -> None:
    _, db, _ = llama_store
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty folder"):
        export_hf(db, taken, prefix="m/")
    assert [p.name for p in taken.iterdir()] == ["x"]
    with pytest.raises(CheckpointError, match="no model config"):
        export_hf(db, tmp_path / "a", prefix="kv/")
    with pytest.raises(ConfigError, match="max_shard_size"):
        export_hf(db, tmp_path / "b", prefix="m/", max_shard_size="lots")
    with tierstore.open(tmp_path / "partial") as partial:
        for key in db.keys(prefix="m/"):
            if key != "m/model.layers.1.mlp.up_proj.weight":
                partial.put(key, db.get(key, copy=True))
        with pytest.raises(CheckpointError, match=r"lacks 1 tensors.*layers\.1\.mlp\.up_proj"):
            export_hf(partial, tmp_path / "c", prefix="m/")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial", "taken"]  # no folder, no .partial


def test_cli_export_hf(llama_store: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = llama_store[2]
    store = tmp_path / "s"
    assert main(["import-hf", str(source), str(store), "--prefix", "m/"]) == 0
    with tierstore.open(store) as other:
        other.put("kv/x/0/keys", torch.ones(3))
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["export-hf", str(store), str(out), "--prefix", "m/", "--max-shard-size", "200KB"]) == 0
    assert "wrote 30 tensors" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any(HF_META in k or k.startswith("kv/") for k in index["weight_map"])
    assert main(["export-hf", str(store), str(out), "--prefix", "m/"]) == 2  # not empty now (CLI errors exit 2)
    assert "not an empty folder" in capsys.readouterr().err
