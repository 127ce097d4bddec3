"""While a streamed model runs, at most ``prefetch + 1`` streamed units' weights are alive (not held ones).

The unit running and the ``prefetch`` fetched ahead by the background thread; a unit's tensors die
when its forward returns (its placeholders go back), so their L2 slots can be evicted, or, for a
fetch that bypassed L2, its private copy freed: more alive would be memory outside the budget.
"""

from __future__ import annotations

import re
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tierstore
from tests.model_fixtures import tiny_llama_store
from tierstore.integrations.streaming import load_streamed

LAYERS = 6


class _Recording:
    """Stands in for the store the streamer reads: every tensor handed out is remembered by a weak reference."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()
        self.handed: list[tuple[str, weakref.ref[np.ndarray]]] = []

    def get(self, key: str, **kwargs: Any) -> torch.Tensor:
        """The block as a tensor over a numpy buffer of its own, which lives exactly as long as its storage.

        (A weak reference to the tensor itself would die at once: the streamer wraps it in a new
        ``nn.Parameter`` object sharing the storage.)
        """
        return self._hand(key, self._store.get(key, **kwargs))

    def get_many(self, keys: list[str], **kwargs: Any) -> dict[str, torch.Tensor]:
        """:meth:`get` of each key, read with one ``get_many`` (what the streamer fetches a unit with)."""
        return {key: self._hand(key, tensor) for key, tensor in self._store.get_many(keys, **kwargs).items()}

    def _hand(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().copy()
        with self._lock:  # the prefetch thread calls this too
            self.handed.append((key, weakref.ref(buffer)))
        return torch.from_numpy(buffer).view(tensor.dtype).reshape(tensor.shape)

    def alive_units(self) -> set[str]:
        with self._lock:
            return {m.group(0) for key, ref in self.handed if ref() is not None
                    for m in [re.match(r"model\.layers\.\d+", key)] if m}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_at_most_prefetch_plus_one_units_alive(tmp_path_factory: pytest.TempPathFactory, prefetch: int) -> None:
    _, path = tiny_llama_store(tmp_path_factory, LAYERS)
    with tierstore.open(Path(path), readonly=True, l2_cache_size=8 << 20) as db:
        model = load_streamed(db, prefetch=prefetch, hold_bytes=0)  # nothing held: every unit streams
        streamer = model.weight_streamer
        recording = _Recording(db)
        streamer.store = recording  # type: ignore[assignment]
        counts: list[int] = []
        for layer in model.model.layers:  # registered after the streamer's hooks: they run after its fetch
            layer.register_forward_pre_hook(lambda m, a: counts.append(len(recording.alive_units())))
        with torch.inference_mode():
            model.generate(torch.tensor([[1, 5, 9, 2]]), max_new_tokens=3, do_sample=False)
        streamer.close()
    assert len(counts) == 3 * LAYERS
    assert max(counts) <= prefetch + 1
    assert min(counts) >= 1  # the unit running is alive: the count sees real tensors
    assert not recording.alive_units() or prefetch > 0  # without prefetch nothing outlives its forward
