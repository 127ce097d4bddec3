"""One decoder layer's K/V for :class:`~tierstore.integrations.kv_cache.TieredCache`: live tensors plus stored segments.

A layer's stored tokens are a table of segments (a block table, as vLLM keeps one per
sequence): each segment is one store block ``[2, batch, kv_heads, tokens, head_dim]`` covering
a contiguous run of tokens. Durable prefix spans are segments of whole ``block_tokens``
blocks (keyed by the prompt's hash chain; a segment may use only the first blocks of a stored
span); everything else is written when the layer spills, as one segment per spill, and a new
segment swallows the segments before it that are no longer than itself (a binary counter: a
layer holds O(log n) segments, and every token is copied O(log n) times in all). Bringing a
spilled layer back is one store get per segment and one ``cat``: the same single copy a
``DynamicCache`` makes at every step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from .kv_cache import KVCacheStats

__all__ = ["Segment", "TieredLayer", "LayerStore"]


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens ``[start, stop)`` of one layer, stored under ``key``."""

    key: str
    start: int
    stop: int
    durable: bool
    """A prefix block keyed by the prompt's hash chain (kept in the store after the request)."""

    @property
    def tokens(self) -> int:
        return self.stop - self.start


class LayerStore(Protocol):
    """What a layer needs from its cache: reading and writing its segments."""

    block_tokens: int
    stats: KVCacheStats

    def fetch_segments(self, index: int, keys: Sequence[str], device: torch.device) -> list[torch.Tensor]: ...

    def store_segment(self, layer: TieredLayer, start: int, stop: int) -> None: ...

    def flush(self) -> None: ...

    def forget_segments(self, segments: Sequence[Segment]) -> None: ...

    def prefetch_layer(self, index: int) -> None: ...

    def note_read(self, index: int, seconds: float) -> None: ...


class TieredLayer(DynamicLayer):  # type: ignore[misc]  # transformers is not type-checked
    """A :class:`~transformers.cache_utils.DynamicLayer` whose full blocks live in a store while it is spilled.

    ``keys``/``values`` are always the whole sequence: reading them while the layer is spilled
    brings it back (the layer is live again until the cache next enforces its budget).
    ``tail_keys``/``tail_values`` hold the tokens after the last stored segment while spilled.
    """

    device: torch.device

    def __init__(self, owner: LayerStore, index: int) -> None:
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.segments: list[Segment] = []
        super().__init__()
        self.owner = owner
        self.index = index
        self.length = 0
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.pending: Future[list[str]] | None = None

    def __repr__(self) -> str:
        state = "live" if self.live else "spilled"
        return f"TieredLayer({self.index}, {self.length} tokens, {len(self.segments)} segments, {state})"

    # keys/values are properties so that code reading ``cache.layers[i].keys`` gets a tensor while spilled
    @property
    def keys(self) -> torch.Tensor | None:
        if self._keys is None and self.segments:
            self.materialize()
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys = value

    @property
    def values(self) -> torch.Tensor | None:
        if self._values is None and self.segments:
            self.materialize()
        return self._values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values = value

    @property
    def live(self) -> bool:
        """Whether the whole sequence is held as tensors now."""
        return self._keys is not None

    @property
    def live_kv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The live keys and values, or None while spilled (never reads the store)."""
        if self._keys is None or self._values is None:
            return None
        return self._keys, self._values

    @property
    def stored_tokens(self) -> int:
        """Tokens the store holds for this layer (a prefix of the sequence)."""
        return self.segments[-1].stop if self.segments else 0

    @property
    def block_keys(self) -> list[str]:
        """The store keys of the segments, in token order."""
        return [s.key for s in self.segments]

    @property
    def live_bytes(self) -> int:
        """Bytes of live keys and values (tail included when spilled)."""
        if self._keys is not None and self._values is not None:
            return self._keys.nbytes + self._values.nbytes
        if self.tail_keys is not None and self.tail_values is not None:
            return self.tail_keys.nbytes + self.tail_values.nbytes
        return 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states and return the whole sequence's keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._keys, self._values = self._join([key_states], [value_states])
        self.length = self._keys.shape[-2]
        return self._keys, self._values

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Make the layer live (from the background fetch when one ran) and return its keys and values."""
        self._keys, self._values = self._join([], [])
        return self._keys, self._values

    def _join(self, new_keys: list[torch.Tensor], new_values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole sequence followed by ``new_*``, with one ``cat`` per tensor (as DynamicLayer does)."""
        if self._keys is not None and self._values is not None:
            if not new_keys:
                return self._keys, self._values
            return torch.cat([self._keys, *new_keys], dim=-2), torch.cat([self._values, *new_values], dim=-2)
        started = time.perf_counter()
        if self.pending is not None:  # the store moved the segments up meanwhile (or is still at it)
            future, self.pending = self.pending, None
            self.owner.stats.prefetch_hits += future.done() and future.exception() is None
            wait([future])  # a segment read now may be merged and deleted at the next spill: no move in flight
        parts = self.owner.fetch_segments(self.index, self.block_keys, self.device)
        device = new_keys[0].device if new_keys else self.device  # a prepared prefix may be read elsewhere
        self.device = device
        # a durable span may hold more blocks than the prompt shares with it: use the segment's tokens
        keys = [kv[0][..., :s.tokens, :].to(device) for kv, s in zip(parts, self.segments, strict=True)]
        values = [kv[1][..., :s.tokens, :].to(device) for kv, s in zip(parts, self.segments, strict=True)]
        if self.tail_keys is not None and self.tail_values is not None:
            keys.append(self.tail_keys)
            values.append(self.tail_values)
        self.tail_keys = self.tail_values = None
        keys += new_keys
        values += new_values
        if len(keys) == 1:  # a lone store view: copy it, the cache's tensors are its own (as DynamicCache's)
            joined = keys[0].clone(), values[0].clone()
        else:
            joined = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
        self.owner.note_read(self.index, time.perf_counter() - started)
        return joined

    def spill(self) -> bool:
        """Store the full blocks not yet stored, then drop the live tensors but the tail. True if it did."""
        if self._keys is None or self._values is None:
            return False
        full = self.length // self.owner.block_tokens * self.owner.block_tokens
        if full > self.stored_tokens:
            self.owner.flush()  # durable prefix blocks first: a new segment may swallow them
            self.owner.store_segment(self, self.stored_tokens, full)
        stored = self.stored_tokens
        if stored == 0:
            return False
        if stored < self.length:  # the tail is small; clone it so the big tensor can be freed
            self.tail_keys = self._keys[..., stored:, :].clone()
            self.tail_values = self._values[..., stored:, :].clone()
        else:
            self.tail_keys = self.tail_values = None
        self._keys = self._values = None
        return True

    # -- the layer API transformers' offloading uses ---------------------------------------------------

    def offload(self) -> None:
        """Move the layer out of memory: its full blocks to the store, only the partial last block stays."""
        if self.is_initialized and self.spill():
            self.owner.stats.spills += 1

    def prefetch(self) -> None:
        """Ask the store to bring the spilled segments up in the background (the next read takes them)."""
        if self.is_initialized and not self.live:
            self.owner.prefetch_layer(self.index)

    def get_seq_length(self) -> int:
        """Tokens held, live or not."""
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        """Forget everything (the cache's own cache-only blocks are deleted by its ``reset``)."""
        self.pending = None
        self.length = 0
        self.segments = []
        self.tail_keys = self.tail_values = None
        super().reset()

    def _rewrite(self, keep_tokens: int) -> None:
        """After the sequence changed in place: segments past ``keep_tokens`` must be written again."""
        keep = 0
        while keep < len(self.segments) and self.segments[keep].stop <= keep_tokens:
            keep += 1
        self.owner.forget_segments(self.segments[keep:])
        del self.segments[keep:]
        self.length = self._keys.shape[-2] if self._keys is not None else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        self.materialize()
        super().crop(tokens_to_remove)
        self._rewrite(self._keys.shape[-2] if self._keys is not None else 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search; every segment is written again."""
        if self.get_seq_length() > 0:
            self.materialize()
            super().reorder_cache(beam_idx)
            self._rewrite(0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat the batch ``repeats`` times; every segment is written again."""
        if self.get_seq_length() > 0:
            self.materialize()
            super().batch_repeat_interleave(repeats)
            self._rewrite(0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only ``indices`` of the batch; every segment is written again."""
        if self.get_seq_length() > 0:
            self.materialize()
            super().batch_select_indices(indices)
            self._rewrite(0)
