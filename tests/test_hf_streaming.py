"""Any transformers decoder model streams from a store: tiny random Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma3.

Each model is built from a config in-process (no hub), saved as a sharded checkpoint, imported, and
loaded with :func:`load_streamed`; its logits and greedy ``generate`` output must equal those of the
model held in memory, bit for bit. (Qwen3-VL, with its vision tower, is covered in test_qwen_weights.)
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights

import tierstore
from tierstore import CheckpointError
from tierstore.integrations.checkpoint import import_checkpoint
from tierstore.integrations.hf_model import build_empty_model, unit_groups
from tierstore.integrations.streaming import load_streamed

LAYERS = 3
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def _config(arch: str) -> Any:
    import transformers

    extra: dict[str, Any] = {
        "llama": {"tie_word_embeddings": False},
        "qwen2": {"tie_word_embeddings": False},
        "qwen3": {"tie_word_embeddings": True},
        "mistral": {"sliding_window": 4},
        "gemma": {},  # ties lm_head to the embeddings and scales them by a buffer
        "gemma3_text": {"sliding_window": 4,
                        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    }[arch]
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig,
           "gemma3_text": transformers.Gemma3TextConfig}[arch]
    return cls(**TINY, **extra)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3_text"]
PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])


@pytest.fixture(scope="module", params=ARCHS)
def stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(in-memory model, store holding its import): L2 smaller than the model, so blocks come and go."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(_config(request.param)).eval()
    folder = tmp_path_factory.mktemp("ckpt") / request.param
    reference.save_pretrained(folder, max_shard_size="100KB")
    with tierstore.open(tmp_path_factory.mktemp("store") / "s", l2_cache_size="256KiB") as db:
        import_checkpoint(folder, db, require_config=True)
        yield reference, db


def _logits(model: Any, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return out


def _generate(model: Any, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                           do_sample=False)
    return out


@pytest.mark.parametrize("options", [{}, {"prefetch": 0}, {"resident_bytes": 50_000, "prefetch": 1}],
                         ids=["prefetch2", "no-prefetch", "some-resident"])
def test_streamed_logits_and_generate_are_identical(stored: Any, options: dict[str, Any]) -> None:
    reference, db = stored
    model = load_streamed(db, **options)
    try:
        assert type(model) is type(reference)
        expected = _logits(reference)
        assert torch.equal(_logits(model), expected)
        assert torch.equal(_logits(model), expected)  # again, with the layers now in L2 (or evicted)
        assert torch.equal(_generate(model), _generate(reference))
        stats = model.weight_streamer.stats()
        assert 0 < stats.units <= LAYERS and stats.loads > 2 * stats.units
        if options.get("prefetch", 2):
            assert stats.prefetch_used_blocks > 0 and stats.demand_fetches < stats.loads
        else:
            assert stats.demand_fetches == stats.loads and stats.prefetched_blocks == 0
    finally:
        model.weight_streamer.close()


def test_units_are_the_decoder_layers_and_tied_embeddings_are_kept_once(stored: Any) -> None:
    reference, db = stored
    model = load_streamed(db, resident_bytes=1)  # nothing fits: every layer streams
    try:
        names = [u.name for u in model.weight_streamer.units]
        assert names == [f"model.layers.{i}" for i in range(LAYERS)]
        _logits(model)
        assert all(p.is_meta for p in model.model.layers.parameters())  # released after each forward
        embed = model.model.embed_tokens.weight
        assert not embed.is_meta
        if reference.config.tie_word_embeddings:
            assert "lm_head.weight" not in db and model.lm_head.weight is embed
        else:
            assert not torch.equal(model.lm_head.weight, embed)
        for name, buffer in reference.named_buffers():  # rotary frequencies, embedding scales: as in memory
            assert torch.equal(model.get_buffer(name), buffer), name
    finally:
        model.weight_streamer.close()


def test_a_resident_budget_keeps_the_layers_that_fit(stored: Any) -> None:
    reference, db = stored
    layer = sum(p.nbytes for p in reference.model.layers[0].parameters())
    model = load_streamed(db, resident_bytes=2 * layer)
    try:
        assert [u.name for u in model.weight_streamer.units] == [f"model.layers.{LAYERS - 1}"]
        assert torch.equal(_logits(model), _logits(reference))
        assert not any(p.is_meta for p in model.model.layers[0].parameters())
    finally:
        model.weight_streamer.close()


def test_streaming_survives_a_model_being_built_meanwhile(stored: Any) -> None:
    # accelerate's init_empty_weights patches nn.Module.register_parameter process-wide: streamed
    # weights placed while another thread builds a model must stay real.
    reference, db = stored
    model = load_streamed(db, prefetch=1)
    building, done = threading.Event(), threading.Event()

    def build() -> None:
        with init_empty_weights(include_buffers=False):
            building.set()
            done.wait(timeout=60)

    builder = threading.Thread(target=build)
    builder.start()
    try:
        assert building.wait(timeout=60)
        assert torch.equal(_logits(model), _logits(reference))
    finally:
        done.set()
        builder.join()
        model.weight_streamer.close()


def test_a_model_without_decoder_layers_is_refused() -> None:
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    model = build_empty_model(config)
    assert unit_groups(model) == [["transformer.h.0"]]  # GPT-2's blocks are found too
    with pytest.raises(CheckpointError, match="cannot find the decoder layers"):
        unit_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)))
