"""Small models built in-process for the streaming, budget, plan and hybrid-execution tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tierstore


def tiny_llama_store(tmp_path_factory: pytest.TempPathFactory, layers: int, *, dtype: torch.dtype | None = None,
                     max_shard_size: str | None = None, seed: int = 0, hidden: int = 64, intermediate: int = 96,
                     vocab: int = 128, head_dim: int = 16, compression: bool | str = True) -> tuple[object, Path]:
    """A small seeded Llama of ``layers`` equal decoder layers, in memory and imported into a store.

    The defaults make layers of ~100 KiB (4 heads, 2 KV heads of ``head_dim``). ``compression`` is
    the store's ``l3_compression`` (``"off"``: every block raw, as ``import-hf --l3-compression off``).

    Returns the model (eval mode, in ``dtype`` if given) and the store's path; the tests of streaming,
    budgets, plans and hybrid execution compare what they stream against this model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from tierstore.integrations.checkpoint import import_checkpoint

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model = (model.to(dtype) if dtype is not None else model).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "llama"
    if max_shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    store = tmp_path_factory.mktemp("store") / "s"
    with tierstore.open(store, l2_cache_size=0, l3_compression=compression) as db:
        import_checkpoint(folder, db, require_config=True)
    return model, store
