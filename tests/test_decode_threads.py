"""torch's threads while a streamed unit decodes one token beside the prefetch thread (``decode_threads``).

A one-token forward of a streamed unit runs on the threads :func:`choose` gives (``auto``: a core
left to the prefetch thread), prefill keeps torch's count, and the caller's count is back after
every forward; the tokens are the same as with torch's own count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tierstore
from tests.model_fixtures import tiny_llama_store
from tierstore.errors import ConfigError
from tierstore.integrations import decode_threads
from tierstore.integrations.decode_threads import DecodeThreads, choose, tokens_of
from tierstore.integrations.streaming import load_streamed

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35]])
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """6 layers stored raw: with a small L2 most of them stream (mapped by the prefetch thread)."""
    return tiny_llama_store(tmp_path_factory, 6, max_shard_size="4MB", seed=3, hidden=128, intermediate=384,
                            vocab=1024, head_dim=32, compression="off")


def test_auto_leaves_a_core_to_the_prefetch_thread_only_where_it_competes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_threads, "available_cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert choose("auto", device=CPU, prefetch=2, streams=True) == 3
    assert choose("auto", device=CPU, prefetch=0, streams=True) is None  # no prefetch thread
    assert choose("auto", device=CPU, prefetch=2, streams=False) is None  # everything held: nothing fetched
    assert choose("auto", device=torch.device("cuda"), prefetch=2, streams=True) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # torch already leaves cores free
    assert choose("auto", device=CPU, prefetch=2, streams=True) is None
    monkeypatch.setattr(decode_threads, "available_cores", lambda: 1)
    assert choose("auto", device=CPU, prefetch=2, streams=True) is None
    assert choose(None, device=CPU, prefetch=2, streams=True) is None
    assert choose(3, device=CPU, prefetch=2, streams=True) == 3
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ConfigError, match="decode_threads"):
            choose(bad, device=CPU, prefetch=2, streams=True)  # type: ignore[arg-type]


def test_only_a_one_token_forward_changes_the_count_and_leave_restores_it() -> None:
    outer = torch.get_num_threads()
    threads = DecodeThreads(outer + 1)
    threads.enter(5)  # prefill: many tokens, compute-bound, keeps every thread
    assert torch.get_num_threads() == outer
    threads.leave()
    threads.enter(1)
    assert torch.get_num_threads() == outer + 1
    threads.leave()
    assert torch.get_num_threads() == outer
    assert tokens_of((torch.zeros(1, 1, 8),), {}) == 1 and tokens_of((), {"hidden_states": torch.zeros(1, 7, 8)}) == 7
    assert tokens_of((), {}) == 2


def test_streamed_decode_runs_on_the_chosen_threads_with_the_same_tokens(raw: tuple[Any, Path]) -> None:
    """The prefetch thread maps units while the model computes; a hook inside each unit sees the count."""
    _, path = raw
    outer = torch.get_num_threads()
    wanted = outer + 1  # differs from torch's count on any machine, so the switch is visible
    runs: dict[Any, tuple[list[int], set[tuple[int, int]]]] = {}
    for setting in (None, wanted):
        with tierstore.open(path, readonly=True, l2_cache_size=1 << 20) as db:
            model = load_streamed(db, prefetch=2, decode_threads=setting)
            streamer = model.weight_streamer
            seen: set[tuple[int, int]] = set()

            def record(module: Any, args: Any, kwargs: Any, seen: set[tuple[int, int]] = seen) -> None:
                seen.add((tokens_of(args, kwargs), torch.get_num_threads()))

            for unit in streamer.units:  # runs after the streamer's pre-hook, before the unit's products
                unit.module.register_forward_pre_hook(record, with_kwargs=True)
            with torch.inference_mode():
                out = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=4,
                                     do_sample=False)
            assert torch.get_num_threads() == outer  # restored after every forward
            stats = streamer.stats()
            streamer.close()
        assert stats.mapped_blocks > 0 and stats.prefetched_blocks > 0  # the prefetch thread mapped units
        runs[setting] = (out[0].tolist(), seen)
    assert runs[None][0] == runs[wanted][0]
    assert {threads for tokens, threads in runs[None][1]} == {outer}
    assert {threads for tokens, threads in runs[wanted][1] if tokens == 1} == {wanted}
    assert {threads for tokens, threads in runs[wanted][1] if tokens > 1} == {outer}


def test_auto_counts_only_decoder_units_that_stream(raw: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decoder layer held (a big L2): a decoded token fetches nothing, so auto keeps torch's count."""
    _, path = raw
    monkeypatch.setattr(decode_threads, "available_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chosen = {}
    for l2 in (1 << 20, 64 << 20):
        with tierstore.open(path, readonly=True, l2_cache_size=l2) as db:
            streamer = load_streamed(db, prefetch=2).weight_streamer
            chosen[l2] = streamer.threads.threads
            streamer.close()
    assert chosen == {1 << 20: 1, 64 << 20: None}
