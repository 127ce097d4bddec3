"""A transformers ``Cache`` whose K/V lives in a tierstore (L1 -> L2 -> L3), with prefix reuse.

At most ``budget`` bytes of K/V stay as live tensors: after a layer has been used and the live
total is over budget, that layer (the one needed furthest in the future) writes its full
blocks of ``block_tokens`` tokens to the store as one segment, keeps only its partial last
block and drops the rest (cache-only blocks, ``durable=False``: in L2, spilled to L3 when L2
needs room). Segments are large and few (see :mod:`tierstore.integrations.kv_layer`), so a
spilled layer comes back in a handful of store gets and one copy. When layer ``i`` runs, the
store is asked to bring layer ``i + 1``'s segments up (``store.prefetch``: L2, or L1 on a GPU)
in the background. The tensors attention sees are bit-for-bit those a ``DynamicCache`` would
hold; sliding-window layers are transformers' own ``DynamicSlidingWindowLayer`` (they keep
only their window, as in a ``DynamicCache``, and are never spilled).

With ``persist=True``, the prompt's full blocks are stored durably under a hash chain (each
block's hash covers the previous hash, its token ids and, for image tokens, the image's content
hash and the token's place in that image), so a later request -- in this process or another --
whose prompt starts with the same blocks loads them instead of computing them, when reading
them is predicted to be faster than computing them (:mod:`tierstore.integrations.kv_restore`).
The blocks are stored as *spans* of up to ``span_blocks`` blocks per layer (one store block
each, keyed by the hashes before its first block and of its last, with the span's block hashes
beside it), so restoring a 16k-token prefix is a few gets per layer, not one per block; a later
prompt that shares only the start of a span reads the span and uses that start:

    with tierstore.open("kv.ts") as db:
        cache = TieredCache(db, config=model.config, persist=True, budget="64MiB")
        out = cache.generate(model, **inputs, max_new_tokens=32)   # computes only what is new
        print(cache.stats.restored_tokens)
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from ..config import normalize_compression, parse_size
from ..engine.handle import TierStore
from ..errors import CacheUsageError, ConfigError
from .kv_layer import Segment, TieredLayer
from .kv_prefix import IMAGE, ROOT, SpanMatch, block_hashes, match_span, prefix_inputs, span_chain_tensor
from .kv_restore import RestoreEstimate, RestorePolicy, policy_for
from .vision_cache import config_fingerprint, tensor_digest

__all__ = ["TieredCache", "TieredLayer", "KVCacheStats", "block_hashes", "prefix_inputs"]

PREFIX = "kv"
DEFAULT_BLOCK_TOKENS = 16
DEFAULT_SPAN_BLOCKS = 64
"""Blocks per durable prefix span: 1,024 tokens at 16-token blocks (LMCache's chunks are 256 tokens)."""


@dataclass
class KVCacheStats:
    """What a :class:`TieredCache` did since it was created."""

    blocks_written: int = 0
    """Store blocks put: durable prefix blocks and cache-only segments."""
    blocks_reused: int = 0
    """Durable prefix blocks (of ``block_tokens``) already in the store when their turn to be written came."""
    blocks_fetched: int = 0
    """Store blocks (segments) read back into live tensors."""
    spills: int = 0
    """Times a layer dropped its live tensors to stay under budget (or was offloaded)."""
    prefetches: int = 0
    """Background fetches started ahead of the layer that needed them."""
    prefetch_hits: int = 0
    """Layers whose background moves (``store.prefetch``) had finished when the layer ran."""
    restored_tokens: int = 0
    """Prompt tokens :meth:`TieredCache.prepare` loaded from the store instead of computing."""
    declined_tokens: int = 0
    """Stored prompt tokens :meth:`TieredCache.prepare` computed anyway: recomputing was predicted faster."""
    restore_estimate: RestoreEstimate | None = None
    """The last prediction :meth:`TieredCache.prepare` weighed (None when no prefix was found)."""


def _build_layers(owner: TieredCache, text_config: Any | None, num_layers: int | None) -> list[Any]:
    """A TieredLayer per full-attention layer; transformers' own layer for the others (sliding, linear, dummy)."""
    if text_config is None or getattr(text_config, "num_hidden_layers", None) is None:
        return [TieredLayer(owner, i) for i in range(num_layers or 0)]
    types, kwargs = get_layer_types_and_kwargs(text_config)
    return [TieredLayer(owner, i) if kind == "full_attention" else DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw)
            for i, (kind, kw) in enumerate(zip(types, kwargs, strict=True))]


class TieredCache(Cache):  # type: ignore[misc]  # transformers is not type-checked
    """A transformers ``Cache`` that keeps K/V in ``store`` and at most ``budget`` bytes live.

    ``config`` (the model's config) fixes the layers (their kinds and number) and the
    fingerprint prefix keys are stored under; without it layers are added as the model uses
    them and ``persist`` needs ``num_layers``. ``budget`` (bytes, or a size such as ``"64MiB"``)
    caps the live tensors; ``None`` keeps everything live (blocks are then written only when
    ``persist``, or when a layer is ``offload()``-ed). ``namespace`` separates checkpoints that
    share a configuration but not their weights. Use one cache per request; :meth:`release` (or
    ``with``) deletes its cache-only blocks. On a read-only store, ``persist=True`` restores
    stored prefixes but stores nothing. ``prefetch=True`` (the default) asks the store
    (``store.prefetch``) to bring the next layer's segments up while a layer runs.
    ``restore_policy`` decides whether a stored prefix is read or recomputed (default: the
    process's policy for this model, with the store's measured bandwidths). Prefix reuse needs
    every layer to be full attention: with sliding-window layers nothing is restored.
    ``span_blocks`` is how many blocks a durable prefix span holds (1: one store block per block).
    ``spill_compression`` is the L3 codec of the cache-only segments when the store spills them
    (``put(compression=)``; default ``"off"``: a spilled segment is read back every decode step,
    and decoding compressed K/V cost more than the disk saved in ``tools/bench_kv_long.py``);
    ``None`` uses the store's ``l3_compression``. Durable prefix spans always use the store's.
    """

    def __init__(self, store: TierStore, *, config: Any | None = None, persist: bool = False,
                 budget: int | str | None = None, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 prefetch: bool = True, num_layers: int | None = None, namespace: str = "",
                 restore_policy: RestorePolicy | None = None, span_blocks: int = DEFAULT_SPAN_BLOCKS,
                 spill_compression: bool | str | None = "off") -> None:
        if block_tokens < 1:
            raise CacheUsageError(f"block_tokens must be at least 1, not {block_tokens}")
        if span_blocks < 1:
            raise CacheUsageError(f"span_blocks must be at least 1, not {span_blocks}")
        text = config.get_text_config(decoder=True) if config is not None else None
        if num_layers is None and text is not None:
            num_layers = int(text.num_hidden_layers)
        if persist and num_layers is None:
            raise CacheUsageError("persist=True needs the model's config (or num_layers)")
        if store.readonly and budget is not None:
            raise CacheUsageError("a read-only store cannot take spilled K/V blocks: open it read-write or "
                                  "pass budget=None")
        try:
            self.spill_compression = None if spill_compression is None else normalize_compression(spill_compression)
        except ConfigError as exc:
            raise CacheUsageError(f"spill_compression: {exc}") from None
        self.store = store
        self.persist = persist
        self.budget = None if budget is None else parse_size(budget)
        self.block_tokens = block_tokens
        self.span_blocks = span_blocks
        self.stats = KVCacheStats()
        self.config = config
        self.image_token_id = getattr(config, "image_token_id", None)
        vision = getattr(config, "vision_config", None)
        self.spatial_merge_size = int(getattr(vision, "spatial_merge_size", 1) or 1)
        self.fingerprint = config_fingerprint(config, namespace) if config is not None else (namespace or "model")
        self.restore_policy = restore_policy
        self._session = uuid.uuid4().hex[:16]
        self._chain: list[str] = []
        self._found: list[SpanMatch] = []
        """The stored spans that match the prompt's start (found by prepare, restored or not)."""
        self._restoring: set[int] = set()
        """Layers whose restored prefix has not been read yet (the restore is being timed)."""
        self._restore_predicted = 0.0
        self._restore_seconds = 0.0
        self._temp_keys: set[str] = set()
        self._garbage: list[str] = []
        """Cache-only segments no layer refers to any more, deleted with the next write."""
        self._unwritten: list[tuple[str, torch.Tensor, bool, str | None]] = []
        """Blocks to put at the next flush: key, keys+values, durable, the key of the block before it."""
        self._lock = threading.Lock()
        self._l1: bool | None = None
        self._store_lock = threading.RLock()
        """Held around every store call this cache makes (one thread at a time, in any case)."""
        self._prefill_started: float | None = None
        self.prefetch_enabled = prefetch
        self._dynamic_layers = config is None
        super().__init__(layers=_build_layers(self, text, num_layers))

    # -- the Cache interface ------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append to layer ``layer_idx``; fetch the next layer in the background; stay under budget."""
        while len(self.layers) <= layer_idx:
            self.layers.append(TieredLayer(self, len(self.layers)))
        n = len(self.layers)
        prefill = key_states.shape[-2] > 1
        if layer_idx == 0 and prefill:  # only a whole prompt's prefill gives the prefill speed the policy weighs
            self._prefill_started = time.perf_counter() if self.layers[0].get_seq_length() == 0 else None
        self.prefetch_layer((layer_idx + 1) % n)
        layer = self.layers[layer_idx]
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if isinstance(layer, TieredLayer):
            self._write_durable(layer)
        if layer_idx == n - 1:
            self.flush()
            self._time_prefill(int(key_states.shape[-2]), n)
        self._enforce_budget(layer_idx)
        return keys, values

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
        """Each layer's ``(keys, values, sliding window tensor or None)``, as ``DynamicCache`` yields them.

        A spilled layer is read back (and is live until the budget is next enforced).
        """
        for layer in self.layers:
            yield layer.keys, layer.values, getattr(layer, "_sliding_window_tensor", None)

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Move layer ``layer_idx`` out of memory (into the store); sliding layers stay with ``only_non_sliding``."""
        layer = self.layers[layer_idx]
        if not (only_non_sliding and getattr(layer, "is_sliding", False)):
            layer.offload()

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Start bringing back the first offloaded layer from ``layer_idx`` on (wrapping around)."""
        n = len(self.layers)
        for step in range(n):
            layer = self.layers[(layer_idx + step) % n]
            if isinstance(layer, TieredLayer):
                layer.prefetch()
                return

    def reset(self) -> None:
        """Forget every token and delete this cache's cache-only blocks (durable prefix blocks stay)."""
        self._settle_prefetches()
        super().reset()
        self._chain = []
        self._found = []
        self._restoring = set()
        self._unwritten = []
        self._delete_temp()

    # -- lifetime -----------------------------------------------------------------------------------

    def release(self) -> None:
        """Delete this cache's cache-only blocks from the store."""
        self._settle_prefetches()
        self._unwritten = []
        self._delete_temp()

    def _settle_prefetches(self) -> None:
        """Wait for the store's moves of our blocks still in flight: never delete a block being moved."""
        pending = [layer.pending for layer in self._tiered() if layer.pending is not None]
        for layer in self._tiered():
            layer.pending = None
        if pending:
            wait(pending)

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _delete_temp(self) -> None:
        with self._lock:
            keys, self._temp_keys = sorted(self._temp_keys), set()
            self._garbage = []
        if not keys or self.store.closed:
            return
        with self._store_lock, self.store.transaction():
            for key in keys:
                if key in self.store:
                    self.store.delete(key)

    def _tiered(self) -> list[TieredLayer]:
        return [layer for layer in self.layers if isinstance(layer, TieredLayer)]

    @property
    def live_bytes(self) -> int:
        """Bytes held as live tensors now, over all layers (sliding ones included)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, TieredLayer):
                total += layer.live_bytes
            elif getattr(layer, "keys", None) is not None and getattr(layer, "values", None) is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    # -- blocks -------------------------------------------------------------------------------------

    def _span_head(self, start: int) -> str:
        """The key prefix of every stored span whose first block is block ``start`` of this prompt."""
        before = self._chain[start - 1] if start else ROOT
        return f"{PREFIX}/prefix/{self.fingerprint}/{before}/"

    def _span_base(self, start: int, stop: int) -> str:
        """The key of the span of blocks ``[start, stop)``, less the layer: ``.../<hash before>/<last hash>``."""
        return self._span_head(start) + self._chain[stop - 1]

    def _write_durable(self, layer: TieredLayer) -> None:
        """Queue the prefix spans ``layer`` completed (persist only; one sequence only).

        Spans end at multiples of ``span_blocks`` blocks and at the prompt's last full block; a
        span prepare() found stored (restored or declined) is used as it is, not written again.
        """
        live = layer.live_kv
        if not self.persist or self.store.readonly or live is None:
            return
        t = self.block_tokens
        full = min(layer.length // t, len(self._chain))
        start = layer.stored_tokens // t
        keys, values = live
        if full <= start or layer.stored_tokens % t or keys.shape[0] != 1:
            return  # batched or reordered sequences are not the prompt the chain was hashed from
        for match in self._found:
            if match.start == start and match.stop <= full:
                layer.segments.append(Segment(f"{match.base}/{layer.index}", start * t, match.stop * t, True))
                self.stats.blocks_reused += match.stop - start
                start = match.stop
        while start < full:
            stop = min(full, (start // self.span_blocks + 1) * self.span_blocks)
            base = self._span_base(start, stop)
            key = f"{base}/{layer.index}"
            if self._contains(key):
                self.stats.blocks_reused += stop - start
            else:
                span = slice(start * t, stop * t)
                parent = layer.segments[-1].key if layer.segments else None  # so the store evicts chain tails first
                self._unwritten.append((key, torch.stack([keys[..., span, :], values[..., span, :]]), True, parent))
                if layer.index == 0:  # the span's block hashes, once: prepare() matches a prompt against them
                    self._unwritten.append((f"{base}/chain", span_chain_tensor(self._chain[start:stop]), True, None))
            layer.segments.append(Segment(key, start * t, stop * t, True))
            start = stop

    def flush(self) -> None:
        """Put the queued prefix blocks in one transaction (one sync for a whole forward's blocks)."""
        if not self._unwritten:
            return
        batch, self._unwritten = self._unwritten, []
        try:
            with self._store_lock, self.store.transaction():
                for key, kv, durable, parent in batch:
                    self.store.put(key, kv, durable=durable, parent=parent,
                                   compression=None if durable else self.spill_compression)
        except BaseException:
            self._unwritten = batch + self._unwritten  # nothing was stored: try again at the next flush
            raise
        self.stats.blocks_written += len(batch)

    def store_segment(self, layer: TieredLayer, start: int, stop: int) -> None:
        """Store tokens ``[start, stop)`` of live ``layer`` as one segment, swallowing the segments not longer.

        The binary-counter merge keeps a layer at O(log n) segments: a run of ``k`` tokens takes
        in every trailing segment of at most ``k`` tokens (cache-only ones are deleted; durable
        prefix blocks stay in the store for later requests, only this layer stops reading them).
        """
        live = layer.live_kv
        if live is None or self.store.readonly:
            return
        keys, values = live
        dropped: list[Segment] = []
        while layer.segments and layer.segments[-1].tokens <= stop - start:
            dropped.append(layer.segments.pop())
            start = dropped[-1].start
        key = f"{PREFIX}/tmp/{self._session}/{layer.index}/{start}-{stop}"
        parent = layer.segments[-1].key if layer.segments else None
        kv = torch.stack([keys[..., start:stop, :], values[..., start:stop, :]])
        with self._lock:
            garbage = [k for k in self._garbage if k != key]
            garbage += [s.key for s in dropped if not s.durable and s.key != key]
            self._garbage = []
        with self._store_lock, self.store.transaction():
            self.store.put(key, kv, durable=False, parent=parent, compression=self.spill_compression)
            for old in garbage:
                if old in self.store:
                    self.store.delete(old)
        with self._lock:
            self._temp_keys.difference_update(garbage)
            self._temp_keys.add(key)
        self.stats.blocks_written += 1
        layer.segments.append(Segment(key, start, stop, False))

    def forget_segments(self, segments: Sequence[Segment]) -> None:
        """``segments`` no longer hold the layer's tokens: delete the cache-only ones with the next write."""
        with self._lock:
            self._garbage += [s.key for s in segments if not s.durable]

    def _has_l1(self) -> bool:
        if self._l1 is None:
            self._l1 = "L1" in self.store.stats().tiers
        return self._l1

    def _contains(self, key: str) -> bool:
        with self._store_lock:
            return key in self.store

    def fetch_segments(self, index: int, keys: Sequence[str], device: torch.device) -> list[torch.Tensor]:
        """Read ``keys`` back: ``index``'s segments, each ``[2, batch, heads, tokens, head_dim]``."""
        if not keys:
            raise CacheUsageError(f"layer {index} has neither live tensors nor stored blocks")
        with self._store_lock:
            parts = [self.store.get(key, device=device) for key in keys]
        self.stats.blocks_fetched += len(parts)
        return parts

    def prefetch_layer(self, index: int) -> None:
        """Ask the store to bring layer ``index``'s segments up in the background if it is spilled.

        Only the store's own worker moves blocks; the tensors are read on the model's thread, so
        every view of a store slot is created and dropped there.
        """
        layer = self.layers[index] if index < len(self.layers) else None
        if (not self.prefetch_enabled or not isinstance(layer, TieredLayer) or layer.live
                or layer.pending is not None or not layer.segments or not layer.is_initialized):
            return
        tier = "L1" if layer.device.type != "cpu" and self._has_l1() else "L2"
        with self._store_lock:
            layer.pending = self.store.prefetch(layer.block_keys, tier)
        self.stats.prefetches += 1

    def note_read(self, index: int, seconds: float) -> None:
        """Layer ``index`` read its stored segments in ``seconds``; the last restored layer read reports the restore."""
        if index not in self._restoring:
            return
        self._restoring.discard(index)
        self._restore_seconds += seconds
        if not self._restoring:
            self._policy().observe_restore(self._restore_predicted, self._restore_seconds)

    def _enforce_budget(self, used: int) -> None:
        """Spill layers, furthest next use first (the one just used, then the ones before it)."""
        if self.budget is None:
            return
        total = self.live_bytes
        if total <= self.budget:
            return
        self.flush()  # a layer is dropped only once the store holds its blocks
        n = len(self.layers)
        for step in range(n - 1):  # never the next layer, which is about to run
            if total <= self.budget:
                return
            layer = self.layers[(used - step) % n]
            if isinstance(layer, TieredLayer):
                before = layer.live_bytes
                if layer.spill():
                    self.stats.spills += 1
                    total -= before - layer.live_bytes

    def _time_prefill(self, tokens: int, layers: int) -> None:
        """Tell the restore policy how fast this model computed a prompt (layer 0's update to the last's)."""
        started, self._prefill_started = self._prefill_started, None
        if started is None or tokens <= 1 or layers < 2:
            return
        elapsed = (time.perf_counter() - started) * layers / (layers - 1)  # the span misses one layer
        self._policy().observe_prefill(tokens, elapsed)

    def _policy(self) -> RestorePolicy:
        if self.restore_policy is None:
            self.restore_policy = policy_for(self.store, self.fingerprint)
        return self.restore_policy

    # -- prefix reuse -------------------------------------------------------------------------------

    def prepare(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> int:
        """Load the longest stored prefix of this prompt; returns how many tokens it covers.

        Call it on an empty cache before the prompt is run. With ``persist=False`` it only
        returns 0. At least the prompt's last token is always left to compute (its logits are
        needed), and only whole blocks are restored; a stored prefix that the restore policy
        predicts slower to read than to compute is not used (``stats.declined_tokens``). After
        it, pass the *full* ``input_ids`` to ``generate`` with this cache (see :meth:`generate`
        / :func:`prefix_inputs`, which also handle Qwen3-VL's image features and 3D positions).
        ``device`` is where the restored blocks are read to (default: ``input_ids``' device;
        blocks are moved to the model's device anyway when the layer first runs).
        """
        if self.get_seq_length() > 0:
            raise CacheUsageError("prepare() needs an empty cache; use a new TieredCache (or reset()) per request")
        if not self.persist:
            return 0
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise CacheUsageError(f"persist=True reuses prefixes of one sequence at a time; input_ids has shape "
                                  f"{tuple(input_ids.shape)}")
        types = self._token_types(input_ids, mm_token_type_ids)
        self._chain = block_hashes(input_ids[0], types, self.block_tokens, image_digests=self._image_digests(
            types, pixel_values, image_grid_thw), seed=self.fingerprint.encode())
        tiered = self._tiered()
        if len(tiered) != len(self.layers):  # a sliding layer's window is not stored: no prefix can be whole
            return 0
        usable = min(len(self._chain), (input_ids.shape[1] - 1) // self.block_tokens)
        self._found = self._find_spans(usable)
        blocks = self._found[-1].stop if self._found else 0
        if blocks and not self._worth_restoring(self._found, int(input_ids.shape[1])):
            self.stats.declined_tokens = blocks * self.block_tokens
            blocks = 0
        if blocks:
            t = self.block_tokens
            target = torch.device(device) if device is not None else input_ids.device
            for layer in tiered:
                layer.segments = [Segment(f"{m.base}/{layer.index}", m.start * t, m.stop * t, True)
                                  for m in self._found]
                layer.length = blocks * t
                layer.device = target
                layer.is_initialized = True
                layer.keys = layer.values = None
            estimate = self.stats.restore_estimate
            if estimate is not None and estimate.restore_s is not None:  # time the reads the model waits for
                self._restoring = {layer.index for layer in tiered}
                self._restore_predicted = estimate.read_s or 0.0
                self._restore_seconds = 0.0
            self.prefetch_layer(0)
        self.stats.restored_tokens = blocks * self.block_tokens
        return self.stats.restored_tokens

    def _find_spans(self, usable: int) -> list[SpanMatch]:
        """The stored spans that hold the prompt's first blocks (at most ``usable``), in order.

        From block 0 on: of the spans stored from there (every layer's, judged by the first and
        last), the one whose block hashes match the prompt the longest, then the same from the
        block after it, until no stored span matches.
        """
        found: list[SpanMatch] = []
        start = 0
        layers = (0, len(self.layers) - 1)
        while start < usable:
            head = self._span_head(start)
            with self._store_lock:
                candidates = [k for k in self.store.keys(prefix=head) if k.endswith("/chain")
                              and k.count("/") == head.count("/") + 1]
            best: SpanMatch | None = None
            for chain_key in candidates:
                base = chain_key[:-len("/chain")]
                if not all(self._contains(f"{base}/{i}") for i in layers):
                    continue
                with self._store_lock:
                    stored = self.store.get(chain_key, copy=True)
                match = match_span(base, stored, self._chain, start, usable)
                if match is not None and (best is None or match.stop > best.stop):
                    best = match
            if best is None:
                break
            found.append(best)  # when the prompt left the span inside it, a span stored from there may follow
            start = best.stop
        return found

    def _worth_restoring(self, found: Sequence[SpanMatch], prompt_tokens: int) -> bool:
        """Whether reading the ``found`` spans of every layer, then computing the rest of the prompt's
        ``prompt_tokens``, is predicted to give the first token sooner than computing them all."""
        with self._store_lock:
            infos = [self.store.info(f"{m.base}/0") for m in found]
        layers = len(self.layers)
        tokens = found[-1].stop * self.block_tokens
        token_bytes = infos[0].nbytes / max(1, infos[0].shape[-2]) if infos[0].shape else 0.0  # K/V of a token
        estimate = self._policy().estimate(
            tokens=tokens, nbytes=sum(i.nbytes for i in infos) * layers,
            stored_bytes=sum(i.stored_bytes for i in infos) * layers, blocks=len(found) * layers,
            tier=infos[0].tiers[0], codec=infos[0].codec, prompt_tokens=prompt_tokens,
            context_bytes=int(self._query_groups() * token_bytes * prompt_tokens * layers))
        self.stats.restore_estimate = estimate
        return estimate.restore

    def _query_groups(self) -> int:
        """How many copies of a layer's K/V the attention makes on a forward: the query heads per K/V head
        (transformers' sdpa and eager attention ``repeat_kv`` a GQA layer's K/V to every query head),
        0 without grouped heads (the K/V are only read)."""
        text = self.config.get_text_config(decoder=True) if self.config is not None else None
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        if not heads or not kv_heads or heads <= kv_heads:
            return 0
        return int(heads) // int(kv_heads)

    def _token_types(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None) -> np.ndarray:
        if mm_token_type_ids is not None:
            source = mm_token_type_ids[0].detach()
        elif self.image_token_id is not None:
            source = input_ids[0] == self.image_token_id
        else:
            return np.zeros(input_ids.shape[1], dtype=np.int64)
        types: np.ndarray = source.cpu().numpy().astype(np.int64)
        return types

    def _image_digests(self, types: np.ndarray, pixel_values: torch.Tensor | None,
                       image_grid_thw: torch.Tensor | None) -> list[tuple[bytes, int]]:
        """``(content hash, token count)`` of each image, in order."""
        n_image_tokens = int((types == IMAGE).sum())
        if n_image_tokens == 0:
            return []
        if pixel_values is None or image_grid_thw is None:
            raise CacheUsageError("the prompt has image tokens: pass pixel_values and image_grid_thw to prepare()")
        grids = image_grid_thw.reshape(-1, 3).cpu()
        rows = grids.prod(-1).tolist()
        tokens = (grids.prod(-1) // (self.spatial_merge_size ** 2)).tolist()
        if sum(tokens) != n_image_tokens or sum(rows) != pixel_values.shape[0]:
            raise CacheUsageError(f"{n_image_tokens} image tokens in the prompt, but image_grid_thw describes "
                                  f"{sum(tokens)} (and {sum(rows)} pixel rows for {pixel_values.shape[0]})")
        return [(tensor_digest(pixels, tensor_digest(grid.to(torch.int64))), n)
                for pixels, grid, n in zip(torch.split(pixel_values, rows), grids, tokens, strict=True)]

    def generate(self, model: Any, **kwargs: Any) -> Any:
        """``model.generate(**kwargs)`` with this cache, computing only what is not restored.

        Takes the same arguments as ``generate`` (``input_ids``, ``attention_mask``,
        ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ``max_new_tokens``, ...).
        """
        input_ids = kwargs["input_ids"]
        restored = self.prepare(input_ids, pixel_values=kwargs.get("pixel_values"),
                                image_grid_thw=kwargs.get("image_grid_thw"),
                                mm_token_type_ids=kwargs.get("mm_token_type_ids"),
                                device=getattr(model, "device", None))
        return model.generate(cache=self, **prefix_inputs(model, kwargs, restored))


