"""TieredCache: K/V blocks spilled through the tiers give DynamicCache's exact output; prefix reuse."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import tierstore
from tierstore.errors import CacheUsageError
from tierstore.integrations.kv_cache import TieredCache, block_hashes
from tierstore.integrations.tiny_model import build_tiny_model, synthetic_inputs, tiny_config
from tierstore.integrations.vision_cache import config_fingerprint

GEN: dict[str, Any] = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
TEXT = list(range(1, 40))
SUFFIX = list(range(60, 75))


@pytest.fixture(scope="module")
def model() -> Any:
    return build_tiny_model(seed=3)


@pytest.fixture
def computed(model: Any) -> Iterator[list[int]]:
    """Sequence lengths the language model is run on (prefill first), recorded by a forward hook."""
    seen: list[int] = []

    def hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(int(kwargs["inputs_embeds"].shape[1]))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    yield seen
    handle.remove()


def reference(model: Any, inputs: dict[str, torch.Tensor]) -> Any:
    return model.generate(**inputs, **GEN)


def assert_same_output(out: Any, ref: Any) -> None:
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits)
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)


def tiny_tiers(path: Path) -> tierstore.TierStore:
    """A store whose L2 holds one of the two layers' 32 KiB segments (and L1, on the CPU, none), so some reach L3."""
    return tierstore.open(path, l1_device="cpu", l1_cache_size="16KiB", l2_cache_size="40KiB", fsync=False)


@pytest.mark.parametrize("image", [False, True], ids=["text", "image+text"])
def test_spilled_blocks_give_dynamic_cache_output(model: Any, tmp_path: Path, image: bool) -> None:
    inputs = synthetic_inputs(TEXT, image_seed=1 if image else None, suffix=SUFFIX)
    ref = reference(model, inputs)
    with tiny_tiers(tmp_path / "s") as db, TieredCache(db, config=model.config, budget=20_000) as cache:
        out = model.generate(**inputs, cache=cache, **GEN)
        assert_same_output(out, ref)
        assert cache.get_seq_length() == out.sequences.shape[1] - 1
        assert cache.stats.spills > 0 and cache.stats.blocks_fetched > 0
        assert cache.live_bytes <= 20_000 + 2 * cache.layers[0].live_bytes
        # Blocks pushed out of L1/L2 were written to L3 and read back: by the get itself (an L3 hit) or,
        # when the layer-ahead prefetch won the race, by the store's worker moving them up first.
        assert db.stats().hits["L3"] + db.migrator.stats()["prefetched"] > 0
        tiers = [db.info(k).tiers for k in db.keys(prefix="kv/tmp/")]
        assert ("L3",) in tiers and any("L1" in t or "L2" in t for t in tiers)
        assert all(not db.info(k).durable for k in db.keys(prefix="kv/"))
    with tierstore.open(tmp_path / "s") as db:  # cache-only blocks do not survive a reopen
        assert list(db.keys(prefix="kv/")) == []


def test_release_deletes_cache_only_blocks(model: Any, db: tierstore.TierStore) -> None:
    inputs = synthetic_inputs(TEXT, image_seed=None)
    cache = TieredCache(db, config=model.config, budget=1)
    model.generate(**inputs, cache=cache, **GEN)
    segments = [layer.segments for layer in cache.layers]
    assert [[(s.start, s.stop) for s in layer] for layer in segments] == [[(0, 32)]] * 2  # 45 tokens: 2 blocks, merged
    assert sorted(db.keys(prefix="kv/tmp/")) == sorted(s.key for layer in segments for s in layer)  # none left over
    cache.release()
    assert list(db.keys(prefix="kv/")) == []


def test_no_budget_keeps_everything_live(model: Any, db: tierstore.TierStore) -> None:
    inputs = synthetic_inputs(TEXT, image_seed=2, suffix=SUFFIX)
    with TieredCache(db, config=model.config) as cache:
        assert_same_output(model.generate(**inputs, cache=cache, **GEN), reference(model, inputs))
        assert cache.stats.blocks_written == 0 and cache.stats.spills == 0
    assert len(db) == 0


def test_prefix_reused_across_reopen(model: Any, tmp_path: Path, computed: list[int]) -> None:
    inputs = synthetic_inputs(TEXT, image_seed=1, suffix=SUFFIX)  # 72 tokens: 4 full blocks
    ref = reference(model, inputs)
    computed.clear()
    with tierstore.open(tmp_path / "p") as db:
        cache = TieredCache(db, config=model.config, persist=True)
        first = cache.generate(model, **inputs, **GEN)
        # 4 full blocks, one span a layer (2 layers) and the span's block hashes beside it
        assert cache.stats.restored_tokens == 0 and cache.stats.blocks_written == 2 + 1
        assert all(db.info(k).durable for k in db.keys(prefix="kv/prefix/"))
        cache.release()
    assert computed[0] == 72
    assert_same_output(first, ref)
    computed.clear()
    with tierstore.open(tmp_path / "p") as db:
        cache = TieredCache(db, config=model.config, persist=True, budget=10_000)
        second = cache.generate(model, **inputs, **GEN)
        cache.release()
    assert cache.stats.restored_tokens == 64
    assert computed[0] == 72 - 64  # the prefill ran on the 8 tokens after the restored blocks
    assert torch.equal(second.sequences, ref.sequences)
    for a, b in zip(second.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b)


def test_read_only_store_restores_but_stores_nothing(model: Any, store_path: Path) -> None:
    inputs = synthetic_inputs(TEXT, image_seed=1, suffix=SUFFIX)
    with tierstore.open(store_path) as db:
        TieredCache(db, config=model.config, persist=True).generate(model, **inputs, **GEN)
        count = len(db)
    with tierstore.open(store_path, readonly=True) as reader:
        with pytest.raises(CacheUsageError):
            TieredCache(reader, config=model.config, budget="1MiB")
        cache = TieredCache(reader, config=model.config, persist=True)
        out = cache.generate(model, **synthetic_inputs(TEXT, image_seed=1, suffix=[9, 9]), **GEN)
        assert cache.stats.restored_tokens == 48 and cache.stats.blocks_written == 0
        assert len(reader) == count
    assert out.sequences.shape[1] == 59 + GEN["max_new_tokens"]


def test_same_text_other_image_is_no_hit(model: Any, db: tierstore.TierStore, computed: list[int]) -> None:
    cache = TieredCache(db, config=model.config, persist=True)
    cache.generate(model, **synthetic_inputs(TEXT, image_seed=1, suffix=SUFFIX), **GEN)
    other = synthetic_inputs(TEXT, image_seed=2, suffix=SUFFIX)
    ref = reference(model, other)
    computed.clear()
    cache = TieredCache(db, config=model.config, persist=True)
    out = cache.generate(model, **other, **GEN)
    # blocks 0 and 1 are text only (tokens 0-31); block 2 holds the image and must not match
    assert cache.stats.restored_tokens == 32
    assert computed[0] == 72 - 32
    assert torch.equal(out.sequences, ref.sequences)


def test_image_cut_by_the_restored_prefix(model: Any, db: tierstore.TierStore, computed: list[int]) -> None:
    """The restored blocks end inside the image: only the image's remaining rows are fed to the model."""
    first = synthetic_inputs(list(range(1, 21)), image_seed=4, suffix=list(range(100, 111)))  # image at 21..36
    TieredCache(db, config=model.config, persist=True).generate(model, **first, **GEN)
    second = synthetic_inputs(list(range(1, 21)), image_seed=4, suffix=list(range(200, 215)))
    ref = reference(model, second)
    computed.clear()
    cache = TieredCache(db, config=model.config, persist=True)
    out = cache.generate(model, **second, **GEN)
    assert cache.stats.restored_tokens == 32  # block 2 (tokens 32-47) holds the new suffix
    assert computed[0] == second["input_ids"].shape[1] - 32
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b)


def test_other_text_hits_only_the_common_blocks(model: Any, db: tierstore.TierStore) -> None:
    base = list(range(1, 60))
    TieredCache(db, config=model.config, persist=True).generate(model, **synthetic_inputs(base, image_seed=None),
                                                                **GEN)
    changed = [*base[:20], 7, *base[21:]]  # differs at token 20, in block 1
    cache = TieredCache(db, config=model.config, persist=True)
    inputs = synthetic_inputs(changed, image_seed=None)
    out = cache.generate(model, **inputs, **GEN)
    assert cache.stats.restored_tokens == 16
    assert torch.equal(out.sequences, reference(model, inputs).sequences)
    unrelated = TieredCache(db, config=model.config, persist=True)
    assert unrelated.prepare(torch.tensor([list(range(300, 360))])) == 0


def test_prompt_needs_one_token_left(model: Any, db: tierstore.TierStore) -> None:
    inputs = synthetic_inputs(list(range(1, 33)), image_seed=None)  # exactly 2 blocks
    TieredCache(db, config=model.config, persist=True).generate(model, **inputs, **GEN)
    cache = TieredCache(db, config=model.config, persist=True)
    assert cache.prepare(inputs["input_ids"]) == 16  # the last token's logits must be computed
    assert cache.get_seq_length() == 16


def test_block_hashes_chain_and_image_content() -> None:
    ids = torch.arange(40)
    types = torch.zeros(40, dtype=torch.long).numpy()
    types[20:24] = 1
    a = block_hashes(ids, types, 8, image_digests=[(b"A" * 16, 4)])
    b = block_hashes(ids, types, 8, image_digests=[(b"B" * 16, 4)])
    assert len(a) == 5
    assert a[:2] == b[:2] and a[2] != b[2] and a[3:] != b[3:]  # the chain carries the difference on
    shifted = block_hashes(ids.roll(1), types, 8, image_digests=[(b"A" * 16, 4)])
    assert all(x != y for x, y in zip(a, shifted, strict=True))
    assert block_hashes(ids, types, 8, image_digests=[(b"A" * 16, 4)], seed=b"other")[0] != a[0]


def test_misuse_raises_typed_errors(model: Any, db: tierstore.TierStore) -> None:
    with pytest.raises(CacheUsageError):
        TieredCache(db, persist=True)  # no config: layer count unknown
    with pytest.raises(CacheUsageError):
        TieredCache(db, config=model.config, block_tokens=0)
    cache = TieredCache(db, config=model.config, persist=True)
    with pytest.raises(CacheUsageError):
        cache.prepare(torch.zeros(2, 20, dtype=torch.long))  # batches of one only
    inputs = synthetic_inputs(TEXT, image_seed=1)
    with pytest.raises(CacheUsageError):
        cache.prepare(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"])  # no pixel_values
    model.generate(**synthetic_inputs(TEXT, image_seed=None), cache=cache, **GEN)
    with pytest.raises(CacheUsageError):
        cache.prepare(inputs["input_ids"])  # not empty any more
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.prepare(torch.tensor([TEXT])) == 0
    assert len(db) == len(list(db.keys(prefix="kv/prefix/")))  # nothing left but durable prefix blocks


def test_fingerprint_is_stable_and_tells_configs_apart() -> None:
    """Prefix keys must match in a later process (same config) and differ for another model."""
    assert config_fingerprint(tiny_config()) == config_fingerprint(tiny_config())
    assert config_fingerprint(tiny_config()) != config_fingerprint(tiny_config(layers=3))
    assert config_fingerprint(tiny_config()) != config_fingerprint(tiny_config(), namespace="other-checkpoint")


@pytest.mark.parametrize("mode", ["batch", "beams"])
def test_batches_and_beam_search_match_dynamic_cache(model: Any, tmp_path: Path, mode: str) -> None:
    """Batch expansion and beam reordering rewrite the stored blocks; the output stays DynamicCache's."""
    ids = torch.tensor([list(range(1, 41)), list(range(101, 141))])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs: dict[str, Any] = dict(max_new_tokens=6, do_sample=False)
    if mode == "beams":
        inputs = {k: v[:1] for k, v in inputs.items()}
        kwargs.update(num_beams=3, num_return_sequences=2)
    ref = model.generate(**inputs, **kwargs)
    with tiny_tiers(tmp_path / "b") as db, TieredCache(db, config=model.config, budget=4_000) as cache:
        out = model.generate(**inputs, cache=cache, **kwargs)
        assert cache.stats.spills > 0
    assert torch.equal(out, ref)


# -- the edges of the Cache API, side by side with DynamicCache ---------------------------------------------


def _filled(model: Any, db: tierstore.TierStore, budget: int | None = 1) -> tuple[TieredCache, Any]:
    """A TieredCache and a DynamicCache after the same generate; the TieredCache's layers are spilled."""
    from transformers import DynamicCache

    inputs = synthetic_inputs(TEXT, image_seed=None, suffix=SUFFIX)
    dynamic = DynamicCache(config=model.config)
    model.generate(**inputs, cache=dynamic, **GEN)
    tiered = TieredCache(db, config=model.config, budget=budget)
    model.generate(**inputs, cache=tiered, **GEN)
    return tiered, dynamic


def test_iter_yields_what_dynamic_cache_yields(model: Any, db: tierstore.TierStore) -> None:
    tiered, dynamic = _filled(model, db)
    assert all(not layer.live for layer in tiered.layers)  # every layer spilled: iter must read them back
    mine, theirs = list(tiered), list(dynamic)
    assert len(mine) == len(theirs) == 2
    for (k, v, window), (dk, dv, dwindow) in zip(mine, theirs, strict=True):
        assert torch.equal(k, dk) and torch.equal(v, dv) and window is None and dwindow is None
    tiered.release()


def test_keys_are_real_tensors_while_spilled(model: Any, db: tierstore.TierStore) -> None:
    tiered, dynamic = _filled(model, db)
    layer = tiered.layers[1]
    assert not layer.live and layer.tail_keys is not None
    assert isinstance(layer.keys, torch.Tensor) and torch.equal(layer.keys, dynamic.layers[1].keys)
    assert torch.equal(layer.values, dynamic.layers[1].values)
    assert layer.live  # read back: live until the budget is next enforced
    tiered.release()


def test_offload_and_prefetch_behave(model: Any, db: tierstore.TierStore) -> None:
    tiered, dynamic = _filled(model, db, budget=None)  # no budget: everything live
    layer, theirs = tiered.layers[0], dynamic.layers[0]
    assert layer.live and tiered.stats.blocks_written == 0
    theirs.offload()
    layer.offload()  # the full blocks go to the store; the partial last block stays
    assert not layer.live and layer.live_bytes == layer.tail_keys.nbytes * 2
    assert [(s.start, s.stop) for s in layer.segments] == [(0, 48)] and tiered.stats.spills == 1
    layer.prefetch()
    assert layer.pending is not None and tiered.stats.prefetches == 1
    tiered.prefetch(1)  # the cache-level call transformers' offloading makes: layer 1 is live, nothing to do
    assert tiered.layers[1].pending is None
    theirs.prefetch()
    assert torch.equal(layer.keys, theirs.keys) and torch.equal(layer.values, theirs.values)
    assert layer.keys.device == theirs.keys.device
    tiered.offload(1)
    assert not tiered.layers[1].live
    # generation goes on from offloaded layers with DynamicCache's results
    step = torch.tensor([[5]])
    ref = model(input_ids=step, cache=dynamic).logits
    torch.testing.assert_close(model(input_ids=step, cache=tiered).logits, ref, rtol=0, atol=0)
    tiered.release()
    assert list(db.keys(prefix="kv/")) == []


def _sliding_model() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         max_window_layers=1, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def test_sliding_window_layers_keep_what_dynamic_cache_keeps(db: tierstore.TierStore) -> None:
    from transformers import DynamicCache

    model = _sliding_model()
    ids = torch.arange(1, 41)[None]
    kwargs: dict[str, Any] = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    dynamic = DynamicCache(config=model.config)
    ref = model.generate(ids, cache=dynamic, **kwargs)
    with TieredCache(db, config=model.config, budget=1) as tiered:
        out = model.generate(ids, cache=tiered, **kwargs)
        assert_same_output(out, ref)
        assert [layer.keys.shape for layer in tiered.layers] == [layer.keys.shape for layer in dynamic.layers]
        assert tiered.layers[0].keys.shape[-2] == 7 and tiered.get_seq_length() == 42
        assert tiered.is_sliding == dynamic.is_sliding == [True, False]
        assert tiered.stats.spills > 0  # the full-attention layer still spills
        persist = TieredCache(db, config=model.config, persist=True)
        assert persist.prepare(ids) == 0  # a sliding window is not stored: nothing to restore


# -- restore only when it is predicted to beat recomputing --------------------------------------------------


@pytest.mark.parametrize("read_speed, restored", [(1e12, 64), (1e3, 0)], ids=["read-fast", "read-slow"])
def test_restore_only_when_predicted_faster(model: Any, db: tierstore.TierStore, computed: list[int],
                                            read_speed: float, restored: int) -> None:
    from tierstore.integrations.kv_restore import RestorePolicy
    from tierstore.plan.bandwidth import Bandwidth

    inputs = synthetic_inputs(TEXT, image_seed=1, suffix=SUFFIX)  # 72 tokens: 4 full blocks stored
    TieredCache(db, config=model.config, persist=True).generate(model, **inputs, **GEN)
    speeds = Bandwidth(disk_read=read_speed, disk_write=read_speed, memcpy=read_speed, h2d_pinned=None, decode={},
                       ratio={}, measured_at=0.0, disk_path="")
    policy = RestorePolicy(speeds, prefill_tokens_per_s=10_000.0, per_block_s=0.0)  # 72 tokens: 7.2 ms to compute
    computed.clear()
    cache = TieredCache(db, config=model.config, persist=True, restore_policy=policy)
    out = cache.generate(model, **inputs, **GEN)
    estimate = cache.stats.restore_estimate
    assert estimate is not None and estimate.tokens == 64 and estimate.recompute_s == pytest.approx(0.0072)
    assert estimate.compute_s >= 0.0072 * (1 - (64 / 72) ** 2)  # the 8 tokens after the prefix, either way
    assert estimate.nbytes == 2 * db.info(cache.layers[0].block_keys[0]).nbytes  # 2 layers x one span of 4 blocks
    assert estimate.blocks == 2  # one get a layer
    assert cache.stats.restored_tokens == restored and cache.stats.declined_tokens == 64 - restored
    assert computed[0] == 72 - restored
    assert torch.equal(out.sequences, reference(model, inputs).sequences)
    # a whole prompt's prefill is timed; the 8 tokens computed after a restore are not a prefill speed
    assert policy.prefill_tokens_per_s is not None and (policy.prefill_tokens_per_s != 10_000.0) == (restored == 0)


def test_restore_policy_without_measurements_restores() -> None:
    from tierstore.integrations.kv_restore import RestorePolicy

    policy = RestorePolicy()
    assert policy.estimate(tokens=10, nbytes=10, blocks=1).restore  # nothing to weigh: restore
    policy.observe_prefill(100, 0.5)
    policy.observe_prefill(300, 0.5)
    assert policy.prefill_tokens_per_s == pytest.approx(400.0)  # moving average of 200 and 600 tokens/s


def test_caches_in_threads_merge_and_delete_segments_beside_the_store_mover(model: Any, tmp_path: Path) -> None:
    """Two requests in two threads on one store: segment merges delete blocks while prefetches move others."""
    import threading

    inputs = synthetic_inputs(list(range(1, 70)), image_seed=None)
    kwargs: dict[str, Any] = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)  # several merges a layer
    ref = model.generate(**inputs, **kwargs)
    errors: list[BaseException] = []
    with tiny_tiers(tmp_path / "t") as db:
        def request() -> None:
            try:
                for _ in range(2):
                    with TieredCache(db, config=model.config, budget=1) as cache:
                        out = model.generate(**inputs, cache=cache, **kwargs)
                        assert torch.equal(out, ref)
                        assert cache.stats.prefetches > 0 and cache.stats.blocks_written > cache.stats.spills / 16
                        assert all(len(layer.segments) <= 4 for layer in cache.layers)  # merged: O(log n)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=request) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert list(db.keys(prefix="kv/")) == []


# -- durable prefix spans: a few gets a layer, partial matches, continuations --------------------------------


def test_spans_restore_in_one_get_per_span(model: Any, db: tierstore.TierStore, computed: list[int]) -> None:
    """7 full blocks stored as spans of 3 (3+3+1 blocks): a restore is 3 gets a layer, output as DynamicCache's."""
    inputs = synthetic_inputs(list(range(1, 100)), image_seed=2, suffix=list(range(100, 108)))  # 125 tokens
    first = TieredCache(db, config=model.config, persist=True, span_blocks=3)
    first.generate(model, **inputs, **GEN)
    assert [(s.start, s.stop) for s in first.layers[0].segments] == [(0, 48), (48, 96), (96, 112)]
    assert first.stats.blocks_written == 2 * 3 + 3  # 2 layers x 3 spans, and 3 hash lists
    ref = reference(model, inputs)
    computed.clear()
    cache = TieredCache(db, config=model.config, persist=True, span_blocks=3)
    out = cache.generate(model, **inputs, **GEN)
    assert cache.stats.restored_tokens == 112 and computed[0] == 125 - 112
    assert cache.stats.restore_estimate is not None and cache.stats.restore_estimate.blocks == 2 * 3
    assert cache.stats.blocks_written == 0 and cache.stats.blocks_fetched == 2 * 3  # each layer read once
    assert_same_output(out, ref)


def test_prompt_leaving_a_span_inside_it_and_its_continuation(model: Any, db: tierstore.TierStore,
                                                              computed: list[int]) -> None:
    """B shares 4 of A's blocks (inside A's second span): it restores 4 blocks, stores its own from there; C = B."""
    a = list(range(1, 100))  # 6 full blocks of 99 tokens: spans [0,3) and [3,6)
    b = [*a[:64], *range(200, 235)]  # differs from token 64 on: block 4, inside A's span [3, 6)
    TieredCache(db, config=model.config, persist=True, span_blocks=3).generate(
        model, **synthetic_inputs(a, image_seed=None), **GEN)
    inputs = synthetic_inputs(b, image_seed=None)
    ref = reference(model, inputs)
    computed.clear()
    cache_b = TieredCache(db, config=model.config, persist=True, span_blocks=3)
    out = cache_b.generate(model, **inputs, **GEN)
    assert cache_b.stats.restored_tokens == 64 and computed[0] == 99 - 64
    assert [(s.start, s.stop) for s in cache_b.layers[1].segments] == [(0, 48), (48, 64), (64, 96)]
    assert_same_output(out, ref)
    computed.clear()
    cache_c = TieredCache(db, config=model.config, persist=True, span_blocks=3)
    again = cache_c.generate(model, **inputs, **GEN)
    assert cache_c.stats.restored_tokens == 96 and computed[0] == 99 - 96  # A's span, part of A's, B's own
    assert cache_c.stats.blocks_written == 0 and cache_c.stats.restore_estimate is not None
    assert cache_c.stats.restore_estimate.blocks == 2 * 3
    assert torch.equal(again.sequences, ref.sequences)
    for x, y in zip(again.logits, ref.logits, strict=True):
        torch.testing.assert_close(x, y)


def test_declined_restore_uses_the_stored_spans_instead_of_writing_them_again(model: Any, db: tierstore.TierStore,
                                                                             computed: list[int]) -> None:
    from tierstore.integrations.kv_restore import RestorePolicy
    from tierstore.plan.bandwidth import Bandwidth

    inputs = synthetic_inputs(TEXT, image_seed=1, suffix=SUFFIX)
    TieredCache(db, config=model.config, persist=True).generate(model, **inputs, **GEN)
    count = len(db)
    slow = Bandwidth(disk_read=1e3, disk_write=1e3, memcpy=1e3, h2d_pinned=None, decode={}, ratio={}, measured_at=0.0,
                     disk_path="")
    cache = TieredCache(db, config=model.config, persist=True, budget=1,
                        restore_policy=RestorePolicy(slow, prefill_tokens_per_s=1e6))
    out = cache.generate(model, **inputs, **GEN)
    assert cache.stats.declined_tokens == 64 and cache.stats.restored_tokens == 0 and computed[0] == 72
    assert cache.stats.blocks_reused == 2 * 4 and cache.layers[0].segments[0].durable
    cache.release()
    assert len(db) == count  # nothing durable written twice; the spilled segments are gone again
    assert torch.equal(out.sequences, reference(model, inputs).sequences)


def test_match_span_stops_at_the_first_other_block() -> None:
    from tierstore.integrations.kv_prefix import match_span, span_chain_tensor

    stored = span_chain_tensor(["00" * 16, "11" * 16, "22" * 16])
    assert stored.shape == (3, 16)
    whole = match_span("b", stored, ["00" * 16, "11" * 16, "22" * 16, "33" * 16], 0, 10)
    assert whole is not None and (whole.stop, whole.whole) == (3, True)
    part = match_span("b", stored, ["ff" * 16, "00" * 16, "11" * 16, "99" * 16], 1, 10)
    assert part is not None and (part.start, part.stop, part.whole) == (1, 3, False)
    cut = match_span("b", stored, ["00" * 16, "11" * 16, "22" * 16], 0, 2)  # at most 2 blocks usable
    assert cut is not None and (cut.stop, cut.whole) == (2, False)
    assert match_span("b", stored, ["99" * 16], 0, 10) is None
    assert match_span("b", torch.zeros(3, 8, dtype=torch.uint8), ["00" * 16], 0, 10) is None  # not a hash list


def test_requests_in_threads_store_and_restore_the_same_spans(model: Any, db: tierstore.TierStore) -> None:
    """Four requests in threads share a prompt: whoever stores the spans first, every output is DynamicCache's."""
    import threading

    inputs = synthetic_inputs(list(range(1, 90)), image_seed=3, suffix=list(range(90, 100)))
    ref = reference(model, inputs)
    errors: list[BaseException] = []
    restored: list[int] = []

    def request() -> None:
        try:
            for _ in range(2):
                with TieredCache(db, config=model.config, persist=True, span_blocks=2, budget=1) as cache:
                    out = cache.generate(model, **inputs, **GEN)
                    assert torch.equal(out.sequences, ref.sequences)
                    restored.append(cache.stats.restored_tokens)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert max(restored) == 112 and len(restored) == 8  # the 7 full blocks of 117 tokens
    assert all(k.startswith("kv/prefix/") for k in db.keys(prefix="kv/"))  # the cache-only segments are gone


def test_restores_are_timed_and_scale_the_next_prediction(model: Any, db: tierstore.TierStore) -> None:
    """A restore's measured reads replace the bandwidths' guess: predicted far too fast, the next one declines."""
    from tierstore.integrations.kv_restore import RestorePolicy
    from tierstore.plan.bandwidth import Bandwidth

    inputs = synthetic_inputs(TEXT, image_seed=1, suffix=SUFFIX)
    TieredCache(db, config=model.config, persist=True).generate(model, **inputs, **GEN)
    fast = Bandwidth(disk_read=1e15, disk_write=1e15, memcpy=1e15, h2d_pinned=None, decode={}, ratio={},
                     measured_at=0.0, disk_path="")
    policy = RestorePolicy(fast, prefill_tokens_per_s=1e6, per_block_s=1e-9)  # 64 tokens: 64 us to compute
    first = TieredCache(db, config=model.config, persist=True, restore_policy=policy)
    first.generate(model, **inputs, **GEN)
    assert first.stats.restored_tokens == 64 and first.stats.restore_estimate is not None
    assert first.stats.restore_estimate.read_scale == 1.0
    assert policy.read_scale > 1000  # two layers read, a cat each: far more than 2 ns
    policy.prefill_tokens_per_s = 1e6  # the prefill of the 8 new tokens was timed too: keep the test's speed
    second = TieredCache(db, config=model.config, persist=True, restore_policy=policy)
    out = second.generate(model, **inputs, **GEN)
    estimate = second.stats.restore_estimate
    assert estimate is not None and estimate.read_scale == policy.read_scale and not estimate.restore
    assert second.stats.restored_tokens == 0 and second.stats.declined_tokens == 64
    assert torch.equal(out.sequences, reference(model, inputs).sequences)
    policy.observe_restore(1.0, 3.0)
    assert policy.read_scale == pytest.approx(0.5 * estimate.read_scale + 1.5)  # a moving average


@pytest.mark.parametrize("spill, expected", [("off", "off"), ("zstd:1", "zstd:1"), (None, None)],
                         ids=["default-raw", "zstd", "store-codec"])
def test_spilled_segments_ask_for_the_cache_codec(model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  spill: str | None, expected: str | None) -> None:
    """Cache-only segments are put with ``spill_compression`` (raw by default: read back every step),
    durable prefix spans with the store's codec (tests/test_put_compression.py: the store honours it)."""
    inputs = synthetic_inputs(TEXT, image_seed=None, suffix=SUFFIX)
    ref = reference(model, inputs)
    kwargs: dict[str, Any] = {} if spill == "off" else {"spill_compression": spill}
    asked: dict[bool, set[str | None]] = {True: set(), False: set()}
    with tiny_tiers(tmp_path / "s") as db:
        put = db.put

        def spy(key: str, tensor: torch.Tensor, **kw: Any) -> None:
            asked[bool(kw.get("durable", True))].add(kw.get("compression"))
            put(key, tensor, **kw)

        monkeypatch.setattr(db, "put", spy)
        with TieredCache(db, config=model.config, budget=20_000, **kwargs) as cache:
            out = model.generate(**inputs, cache=cache, **GEN)
            assert_same_output(out, ref)
            assert db.stats().hits["L3"] + db.migrator.stats()["prefetched"] > 0  # read back (see above)
        with TieredCache(db, config=model.config, persist=True, span_blocks=1, **kwargs) as cache:
            assert_same_output(cache.generate(model, **inputs, **GEN), ref)
    assert asked[False] == {expected}
    assert asked[True] == {None}


def test_a_bad_spill_codec_is_a_cache_usage_error(db: tierstore.TierStore) -> None:
    with pytest.raises(CacheUsageError):
        TieredCache(db, num_layers=2, spill_compression="lzma")
