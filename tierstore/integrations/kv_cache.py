"""A transformers ``Cache`` whose K/V blocks live in a tierstore (L1 -> L2 -> L3), with prefix reuse.

Each layer's keys and values are cut into blocks of ``block_tokens`` tokens; every full block
is stored as one tensor ``[2, batch, kv_heads, block_tokens, head_dim]`` (keys, values). At most
``budget`` bytes stay as live tensors: after a layer has been used and the live total is over
budget, that layer (the one needed furthest in the future) keeps only its partial last block
and drops the rest, which the store holds (cache-only blocks, ``durable=False``: in L2, spilled
to L3 when L2 needs room). When layer ``i`` runs, the store is asked to bring layer ``i + 1``'s
blocks up (``store.prefetch``: L2, or L1 on a GPU) in the background, so they are usually there
by the time it needs them. The tensors attention
sees are bit-for-bit those a ``DynamicCache`` would hold.

With ``persist=True``, the prompt's full blocks are stored durably under a hash chain (each
block's hash covers the previous hash, its token ids and, for image tokens, the image's content
hash and the token's place in that image), so a later request -- in this process or another --
whose prompt starts with the same blocks loads them instead of computing them:

    with tierstore.open("kv.ts") as db:
        cache = TieredCache(db, config=model.config, persist=True, budget="64MiB")
        out = cache.generate(model, **inputs, max_new_tokens=32)   # computes only what is new
        print(cache.stats.restored_tokens)
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..config import parse_size
from ..engine.handle import TierStore
from ..errors import CacheUsageError
from .vision_cache import config_fingerprint, tensor_digest

__all__ = ["TieredCache", "TieredLayer", "KVCacheStats", "block_hashes", "prefix_inputs"]

PREFIX = "kv"
DEFAULT_BLOCK_TOKENS = 16
_IMAGE, _VIDEO = 1, 2


@dataclass
class KVCacheStats:
    """What a :class:`TieredCache` did since it was created."""

    blocks_written: int = 0
    """Blocks put into the store (cache-only or durable prefix blocks)."""
    blocks_reused: int = 0
    """Durable prefix blocks already in the store when their turn to be written came."""
    blocks_fetched: int = 0
    """Blocks read back from the store into live tensors."""
    spills: int = 0
    """Times a layer dropped its live tensors to stay under budget."""
    prefetches: int = 0
    """Background fetches started ahead of the layer that needed them."""
    prefetch_hits: int = 0
    """Layers whose background moves (``store.prefetch``) had finished when the layer ran."""
    restored_tokens: int = 0
    """Prompt tokens :meth:`TieredCache.prepare` loaded from the store instead of computing."""


class TieredLayer(DynamicLayer):  # type: ignore[misc]  # transformers is not type-checked
    """One decoder layer's K/V: a :class:`~transformers.cache_utils.DynamicLayer` whose full blocks live in a store.

    ``keys``/``values`` are the whole sequence while the layer is live, and ``None`` while it is
    spilled (then ``tail_keys``/``tail_values`` hold the tokens after the last full block).
    """

    keys: torch.Tensor | None
    values: torch.Tensor | None
    device: torch.device

    def __init__(self, owner: TieredCache, index: int) -> None:
        super().__init__()
        self.owner = owner
        self.index = index
        self.length = 0
        self.block_keys: list[str] = []
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.pending: Future[list[str]] | None = None

    def __repr__(self) -> str:
        state = "live" if self.live else "spilled"
        return f"TieredLayer({self.index}, {self.length} tokens, {len(self.block_keys)} blocks, {state})"

    @property
    def live(self) -> bool:
        """Whether the whole sequence is held as tensors now."""
        return self.keys is not None

    @property
    def live_bytes(self) -> int:
        """Bytes of live keys and values (tail included when spilled)."""
        if self.keys is not None and self.values is not None:
            return self.keys.nbytes + self.values.nbytes
        if self.tail_keys is not None and self.tail_values is not None:
            return self.tail_keys.nbytes + self.tail_values.nbytes
        return 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states and return the whole sequence's keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self._join([key_states], [value_states])
        self.length = self.keys.shape[-2]
        self.owner._write_blocks(self)
        return self.keys, self.values

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Make the layer live (from the background fetch when one ran) and return its keys and values."""
        self.keys, self.values = self._join([], [])
        return self.keys, self.values

    def _join(self, new_keys: list[torch.Tensor], new_values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole sequence followed by ``new_*``, with one ``cat`` per tensor (as DynamicLayer does)."""
        if self.keys is not None and self.values is not None:
            if not new_keys:
                return self.keys, self.values
            return torch.cat([self.keys, *new_keys], dim=-2), torch.cat([self.values, *new_values], dim=-2)
        if self.pending is not None:  # the store moved the blocks up meanwhile (or is still at it)
            future, self.pending = self.pending, None
            self.owner.stats.prefetch_hits += future.done() and future.exception() is None
        blocks = self.owner._fetch(self.index, list(self.block_keys), self.device)
        device = new_keys[0].device if new_keys else self.device  # a prepared prefix may be read elsewhere
        self.device = device
        keys = [kv[0].to(device) for kv in blocks]
        values = [kv[1].to(device) for kv in blocks]
        if self.tail_keys is not None and self.tail_values is not None:
            keys.append(self.tail_keys)
            values.append(self.tail_values)
        self.tail_keys = self.tail_values = None
        keys += new_keys
        values += new_values
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    def spill(self) -> bool:
        """Drop the live tensors the store already holds; keep the partial last block. True if it did."""
        if self.keys is None or self.values is None or not self.block_keys:
            return False
        stored = len(self.block_keys) * self.owner.block_tokens
        if stored < self.length:  # the tail is small; clone it so the big tensor can be freed
            self.tail_keys = self.keys[..., stored:, :].clone()
            self.tail_values = self.values[..., stored:, :].clone()
        else:
            self.tail_keys = self.tail_values = None
        self.keys = self.values = None
        return True

    def get_seq_length(self) -> int:
        """Tokens held, live or not."""
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        """Forget everything (the cache's own cache-only blocks are deleted by :meth:`TieredCache.reset`)."""
        self.pending = None
        self.length = 0
        self.block_keys = []
        self.tail_keys = self.tail_values = None
        super().reset()

    def _rewrite(self, keep_blocks: int) -> None:
        """After the sequence changed in place: blocks past ``keep_blocks`` must be written again."""
        del self.block_keys[keep_blocks:]
        self.length = self.keys.shape[-2] if self.keys is not None else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        self.materialize()
        super().crop(tokens_to_remove)
        length = self.keys.shape[-2] if self.keys is not None else 0
        self._rewrite(min(len(self.block_keys), length // self.owner.block_tokens))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search; every block is written again."""
        if self.get_seq_length() > 0:
            self.materialize()
            super().reorder_cache(beam_idx)
            self._rewrite(0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat the batch ``repeats`` times; every block is written again."""
        if self.get_seq_length() > 0:
            self.materialize()
            super().batch_repeat_interleave(repeats)
            self._rewrite(0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only ``indices`` of the batch; every block is written again."""
        if self.get_seq_length() > 0:
            self.materialize()
            super().batch_select_indices(indices)
            self._rewrite(0)


class TieredCache(Cache):  # type: ignore[misc]  # transformers is not type-checked
    """A transformers ``Cache`` that keeps K/V blocks in ``store`` and at most ``budget`` bytes live.

    ``config`` (the model's config) fixes the number of layers and the fingerprint prefix keys
    are stored under; without it layers are added as the model uses them and ``persist`` needs
    ``num_layers``. ``budget`` (bytes, or a size such as ``"64MiB"``) caps the live tensors;
    ``None`` keeps everything live (blocks are then written only when ``persist``).
    ``namespace`` separates checkpoints that share a configuration but not their weights.
    Use one cache per request; :meth:`release` (or ``with``) deletes its cache-only blocks.
    On a read-only store, ``persist=True`` restores stored prefixes but stores nothing.
    ``prefetch=True`` (the default) asks the store (``store.prefetch``) to bring the next layer's
    blocks up while a layer runs.
    """

    def __init__(self, store: TierStore, *, config: Any | None = None, persist: bool = False,
                 budget: int | str | None = None, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 prefetch: bool = True, num_layers: int | None = None, namespace: str = "") -> None:
        if block_tokens < 1:
            raise CacheUsageError(f"block_tokens must be at least 1, not {block_tokens}")
        text = config.get_text_config(decoder=True) if config is not None else None
        if num_layers is None and text is not None:
            num_layers = int(text.num_hidden_layers)
        if persist and num_layers is None:
            raise CacheUsageError("persist=True needs the model's config (or num_layers)")
        if store.readonly and budget is not None:
            raise CacheUsageError("a read-only store cannot take spilled K/V blocks: open it read-write or "
                                  "pass budget=None")
        self.store = store
        self.persist = persist
        self.budget = None if budget is None else parse_size(budget)
        self.block_tokens = block_tokens
        self.stats = KVCacheStats()
        self.config = config
        self.image_token_id = getattr(config, "image_token_id", None)
        vision = getattr(config, "vision_config", None)
        self.spatial_merge_size = int(getattr(vision, "spatial_merge_size", 1) or 1)
        self.fingerprint = config_fingerprint(config, namespace) if config is not None else (namespace or "model")
        self._session = uuid.uuid4().hex[:16]
        self._chain: list[str] = []
        self._temp_keys: set[str] = set()
        self._unwritten: list[tuple[str, torch.Tensor, bool, str | None]] = []
        """Blocks to put at the next flush: key, keys+values, durable, the key of the block before it."""
        self._lock = threading.Lock()
        self._l1: bool | None = None
        self._store_lock = threading.RLock()
        """Held around every store call this cache makes (one thread at a time, in any case)."""
        self.prefetch_enabled = prefetch
        layers: list[Any] = [TieredLayer(self, i) for i in range(num_layers or 0)]
        super().__init__(layers=layers)

    # -- the Cache interface ------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append to layer ``layer_idx``; fetch the next layer in the background; stay under budget."""
        while len(self.layers) <= layer_idx:
            self.layers.append(TieredLayer(self, len(self.layers)))
        self._prefetch((layer_idx + 1) % len(self.layers))
        keys, values = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self._flush()
        self._enforce_budget(layer_idx)
        return keys, values

    def reset(self) -> None:
        """Forget every token and delete this cache's cache-only blocks (durable prefix blocks stay)."""
        self._settle_prefetches()
        super().reset()
        self._chain = []
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
        """Bytes held as live tensors now, over all layers."""
        return sum(layer.live_bytes for layer in self._tiered())

    # -- blocks -------------------------------------------------------------------------------------

    def _block_key(self, layer: int, block: int) -> tuple[str, bool]:
        """The store key of ``block`` of ``layer`` and whether it is a durable prefix block."""
        if self.persist and block < len(self._chain):
            return f"{PREFIX}/prefix/{self.fingerprint}/{self._chain[block]}/{layer}", True
        return f"{PREFIX}/tmp/{self._session}/{layer}/{block}", False

    def _write_blocks(self, layer: TieredLayer) -> None:
        """Queue the blocks ``layer`` completed since it last wrote (none without budget or persist)."""
        if (self.budget is None and not self.persist) or self.store.readonly:
            return  # (a read-only store only restores prefixes)
        t = self.block_tokens
        full = layer.length // t
        start = len(layer.block_keys)
        if full <= start or layer.keys is None or layer.values is None:
            return
        keys, values = layer.keys, layer.values
        for block in range(start, full):
            key, durable = self._block_key(layer.index, block)
            if not durable and self.budget is None:
                break  # nothing will ever be spilled: only the prefix blocks are worth writing
            if durable and self._contains(key):
                self.stats.blocks_reused += 1
            else:
                span = slice(block * t, (block + 1) * t)
                parent = layer.block_keys[block - 1] if block else None  # so the store evicts chain tails first
                self._unwritten.append((key, torch.stack([keys[..., span, :], values[..., span, :]]), durable, parent))
            layer.block_keys.append(key)

    def _flush(self) -> None:
        """Put the queued blocks in one transaction (one sync for a whole forward's prefix blocks)."""
        if not self._unwritten:
            return
        batch, self._unwritten = self._unwritten, []
        try:
            with self._store_lock, self.store.transaction():
                for key, kv, durable, parent in batch:
                    self.store.put(key, kv, durable=durable, parent=parent)
        except BaseException:
            self._unwritten = batch + self._unwritten  # nothing was stored: try again at the next flush
            raise
        self.stats.blocks_written += len(batch)
        with self._lock:
            self._temp_keys.update(key for key, _kv, durable, _parent in batch if not durable)

    def _has_l1(self) -> bool:
        if self._l1 is None:
            self._l1 = "L1" in self.store.stats().tiers
        return self._l1

    def _contains(self, key: str) -> bool:
        with self._store_lock:
            return key in self.store

    def _fetch(self, index: int, keys: Sequence[str], device: torch.device) -> list[torch.Tensor]:
        """Read ``keys`` back: ``index``'s stored blocks, each ``[2, batch, heads, tokens, head_dim]``."""
        if not keys:
            raise CacheUsageError(f"layer {index} has neither live tensors nor stored blocks")
        with self._store_lock:
            parts = [self.store.get(key, device=device) for key in keys]
        self.stats.blocks_fetched += len(parts)
        return parts

    def _prefetch(self, index: int) -> None:
        """Ask the store to bring layer ``index``'s blocks up in the background if it is spilled.

        Only the store's own worker moves blocks; the tensors are read on the model's thread, so
        every view of a store slot is created and dropped there.
        """
        layer = self.layers[index] if index < len(self.layers) else None
        if (not self.prefetch_enabled or not isinstance(layer, TieredLayer) or layer.live
                or layer.pending is not None or not layer.block_keys or not layer.is_initialized):
            return
        tier = "L1" if layer.device.type != "cpu" and self._has_l1() else "L2"
        with self._store_lock:
            layer.pending = self.store.prefetch(list(layer.block_keys), tier)
        self.stats.prefetches += 1

    def _enforce_budget(self, used: int) -> None:
        """Spill layers, furthest next use first (the one just used, then the ones before it)."""
        if self.budget is None:
            return
        total = self.live_bytes
        if total <= self.budget:
            return
        self._flush()  # a layer is dropped only once the store holds its blocks
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

    # -- prefix reuse -------------------------------------------------------------------------------

    def prepare(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> int:
        """Load the longest stored prefix of this prompt; returns how many tokens it covers.

        Call it on an empty cache before the prompt is run. With ``persist=False`` it only
        returns 0. At least the prompt's last token is always left to compute (its logits are
        needed), and only whole blocks are restored. After it, pass the *full* ``input_ids`` to
        ``generate`` with this cache (see :meth:`generate` / :func:`prefix_inputs`, which also
        handle Qwen3-VL's image features and 3D positions). ``device`` is where the restored
        blocks are read to (default: ``input_ids``' device; blocks are moved to the model's
        device anyway when the layer first runs).
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
        usable = min(len(self._chain), (input_ids.shape[1] - 1) // self.block_tokens)
        last = len(self.layers) - 1
        blocks = 0
        while blocks < usable and all(self._contains(self._block_key(i, blocks)[0]) for i in (0, last)):
            blocks += 1
        if blocks:
            target = torch.device(device) if device is not None else input_ids.device
            for layer in self._tiered():
                layer.block_keys = [self._block_key(layer.index, b)[0] for b in range(blocks)]
                layer.length = blocks * self.block_tokens
                layer.device = target
                layer.is_initialized = True
                layer.keys = layer.values = None
            self._prefetch(0)
        self.stats.restored_tokens = blocks * self.block_tokens
        return self.stats.restored_tokens

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
        n_image_tokens = int((types == _IMAGE).sum())
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


def block_hashes(input_ids: torch.Tensor, token_types: np.ndarray, block_tokens: int, *,
                 image_digests: Sequence[tuple[bytes, int]] = (), seed: bytes = b"") -> list[str]:
    """Hex hashes of the full blocks of one prompt, each chained on the one before.

    A block's hash covers the previous block's hash, its token ids, and for each image token
    the image's content hash and the token's index within that image; the chain stops before
    the first block holding a video token (videos are not keyed).
    """
    ids = input_ids.detach().cpu().numpy().astype(np.int64)
    n = ids.shape[0]
    image_of = np.full(n, -1, dtype=np.int64)
    index_in = np.zeros(n, dtype=np.int64)
    positions = np.flatnonzero(token_types == _IMAGE)
    start = 0
    for k, (_digest, count) in enumerate(image_digests):
        where = positions[start:start + count]
        image_of[where] = k
        index_in[where] = np.arange(count)
        start += count
    videos = np.flatnonzero(token_types == _VIDEO)
    limit = n // block_tokens if not videos.size else int(videos[0]) // block_tokens
    chain: list[str] = []
    previous = hashlib.blake2b(seed, digest_size=16).digest()
    for block in range(limit):
        span = slice(block * block_tokens, (block + 1) * block_tokens)
        h = hashlib.blake2b(previous, digest_size=16)
        h.update(ids[span].tobytes())
        h.update(image_of[span].tobytes())
        h.update(index_in[span].tobytes())
        for k in np.unique(image_of[span]):
            if k >= 0:
                h.update(image_digests[int(k)][0])
        previous = h.digest()
        chain.append(previous.hex())
    return chain


def prefix_inputs(model: Any, inputs: dict[str, Any], restored: int) -> dict[str, Any]:
    """``generate`` arguments for a Qwen3-VL prompt whose first ``restored`` tokens are in the cache.

    The 3D (mrope) positions are recomputed from the full prompt (the model's remembered
    ``rope_deltas`` belong to its previous request), and the image features of image tokens
    inside the restored prefix are left out: images wholly inside it are not encoded at all,
    and an image cut by the boundary passes only its remaining rows (as ``mm_encoder_outputs``).
    """
    kwargs = dict(inputs)
    inner = getattr(model, "model", model)
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
    if restored <= 0 or kwargs.get("pixel_values") is None:
        return kwargs
    input_ids = kwargs["input_ids"]
    types = kwargs.get("mm_token_type_ids")
    image_mask = (types == _IMAGE) if types is not None else (input_ids == model.config.image_token_id)
    image_mask = image_mask[0]
    pixel_values = kwargs.pop("pixel_values")
    if not bool(image_mask[restored:].any()):
        return kwargs  # every image is inside the restored prefix
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    features = inner.get_image_features(pixel_values, kwargs.get("image_grid_thw"), return_dict=True)
    rows = (image_mask.cumsum(0) - 1)[restored:][image_mask[restored:]]
    embeds = torch.cat(list(features.pooler_output))[rows]
    deep = [[torch.cat(list(level))[rows]] for level in features.deepstack_features]
    kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithDeepstackFeatures(
        last_hidden_state=None, pooler_output=[embeds], deepstack_features=deep)}
    return kwargs
