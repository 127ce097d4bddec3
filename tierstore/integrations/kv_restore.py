"""Whether reading a stored K/V prefix back beats computing it again.

A restore is not free: SGLang HiCache users measured a file-backend hit slower than recomputing
(2,450 against 1,725 ms). :class:`RestorePolicy` predicts the time to the first token both ways
before a restore is used:

- restoring: reading the prefix's bytes back (for L3, its stored bytes at the measured disk read
  speed plus its decoded bytes at the measured decode speed of its codec; for L1/L2, memcpy), a
  fixed cost per stored block, and copying them into the cache's own tensors (``torch.cat`` into
  new memory, whose pages the copy faults in: :attr:`Bandwidth.fresh_copy`, 5-14x slower than
  memcpy into reused memory); then computing the prompt's tokens past the prefix, which attend
  to the whole restored context: their share of the measured prefill time when a token's cost
  grows with its position (``1 - (prefix / prompt)^2`` of it), plus the attention's copy of the
  restored K/V (``context_bytes``: transformers' sdpa/eager attention expands a GQA layer's K/V
  to every query head on each forward) at the same fresh-copy speed;
- recomputing: the whole prompt at the prefill speed this process has seen for the model (every
  :class:`~tierstore.integrations.kv_cache.TieredCache` prefill is timed and reported here).

Measured on a 4k-token prefix (BENCHMARKS.md, "Prefix restore prediction"): the old prediction
(bytes at disk read + memcpy speed) was 3-10x low, because the decode term was dropped (the
block's codec id, ``shuffle2-zstd1``, never matched the measured codec's name, so the decode was
priced as a memcpy), the copy into the cache ran at fresh-page speed, not memcpy speed, and the
computed suffix and the attention over the restored context were not counted at all.

Bandwidths measured on an idle moment miss what a loaded machine and the catalog add, so every
restore is timed too (the reads the model waited for, copies included) and the reading side is
scaled by what restores really took against what was predicted (a moving average).

Without a prefill measurement, or without bandwidths, there is nothing to weigh and the restore
is used (the cheaper side is unknown; reading what was stored is the default).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..engine.handle import TierStore
from ..plan.bandwidth import Bandwidth
from ..plan.hardware import HardwareOptimizer
from ..tiers.codecs import codec_from_id

__all__ = ["RestoreEstimate", "RestorePolicy", "policy_for"]

PER_BLOCK_S = 60e-6
"""Fixed cost of one store get of a stored block (catalog lookup, checksum, tensor), measured here."""


@dataclass(frozen=True, slots=True)
class RestoreEstimate:
    """A prediction for one restore: seconds to the first token by restoring the prefix and by recomputing it."""

    tokens: int
    nbytes: int
    blocks: int
    tier: str
    """Where the prefix's first block is: "L1", "L2" or "L3"."""
    restore_s: float | None
    """First token by restoring (None when the bandwidths are not measured): ``read_s * read_scale + compute_s``."""
    recompute_s: float | None
    """First token by computing the whole prompt (None before any prefill of this model was timed)."""
    read_scale: float = 1.0
    """Measured over predicted time of this policy's earlier restores (1.0 before any)."""
    read_s: float | None = None
    """Reading the prefix and copying it into the cache, before ``read_scale`` (what a restore's timing measures)."""
    compute_s: float = 0.0
    """Computing the prompt's tokens after the prefix, and the attention's pass over the restored context."""

    @property
    def restore(self) -> bool:
        """Whether the restore is predicted to win (True when either side is unknown)."""
        if self.restore_s is None or self.recompute_s is None:
            return True
        return self.restore_s < self.recompute_s


class RestorePolicy:
    """Weighs reading a stored prefix against recomputing it, from measured speeds.

    ``bandwidth`` is a :class:`~tierstore.plan.bandwidth.Bandwidth` measurement (``None``: unknown);
    ``prefill_tokens_per_s`` seeds the prefill speed, which :meth:`observe_prefill` then keeps
    up to date (a moving average of what the model really did).
    """

    def __init__(self, bandwidth: Bandwidth | None = None, *, prefill_tokens_per_s: float | None = None,
                 per_block_s: float = PER_BLOCK_S) -> None:
        self.bandwidth = bandwidth
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.per_block_s = per_block_s
        self.read_scale = 1.0
        """Measured over predicted restore time, a moving average over the restores observed."""
        self._restores = 0
        self._lock = threading.Lock()

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Record that the model computed ``tokens`` prompt tokens in ``seconds``."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        with self._lock:
            old = self.prefill_tokens_per_s
            self.prefill_tokens_per_s = rate if old is None else 0.5 * old + 0.5 * rate

    def observe_restore(self, predicted_s: float, seconds: float) -> None:
        """Record that a restore whose reads were predicted at ``predicted_s`` (``read_s``) took ``seconds``."""
        if predicted_s <= 0 or seconds <= 0:
            return
        ratio = seconds / predicted_s
        with self._lock:
            self.read_scale = ratio if self._restores == 0 else 0.5 * self.read_scale + 0.5 * ratio
            self._restores += 1

    def decode_bytes_per_s(self, codec: str) -> float | None:
        """Measured decode speed (decoded bytes/s) of a block codec id (``shuffle2-zstd1``...); None: no decode."""
        bw = self.bandwidth
        if bw is None or codec in ("", "raw", "none"):
            return None
        try:
            kind = codec_from_id(codec).kind
        except ValueError:
            kind = codec
        if kind == "raw":
            return None
        if kind in bw.decode:
            return bw.decode[kind]
        if kind == "zstd" and "shuffle-zstd" in bw.decode:  # the same decompressor, without the unshuffle
            return bw.decode["shuffle-zstd"]
        return min(bw.decode.values(), default=bw.memcpy)  # an unmeasured codec: the slowest measured

    def read_seconds(self, *, nbytes: int, stored_bytes: int, blocks: int, tier: str, codec: str) -> float | None:
        """Predicted seconds to read a prefix back and copy it into the cache (None when not measured)."""
        bw = self.bandwidth
        if bw is None:
            return None
        if tier in ("L1", "L2"):
            fetch = nbytes / bw.memcpy
        else:
            decode = self.decode_bytes_per_s(codec)
            fetch = stored_bytes / bw.disk_read + (0.0 if decode is None else nbytes / decode)
        copy = nbytes / (bw.fresh_copy or bw.memcpy)
        return fetch + copy + blocks * self.per_block_s

    def estimate(self, *, tokens: int, nbytes: int, blocks: int, tier: str = "L3", codec: str = "",
                 stored_bytes: int | None = None, prompt_tokens: int | None = None,
                 context_bytes: int = 0) -> RestoreEstimate:
        """Predict the first token by restoring ``tokens`` prefix tokens against computing ``prompt_tokens``.

        The prefix is ``blocks`` stored blocks of ``tier``, ``nbytes`` decoded (``stored_bytes`` as
        stored, default ``nbytes``), ``codec`` their codec id; ``prompt_tokens`` (default ``tokens``)
        is the whole prompt, whose tokens past the prefix are computed either way; ``context_bytes``
        are what the first forward copies of the restored K/V (0: it only reads them).
        """
        stored = nbytes if stored_bytes is None else stored_bytes
        total = max(tokens, prompt_tokens if prompt_tokens is not None else tokens)
        read_s = self.read_seconds(nbytes=nbytes, stored_bytes=stored, blocks=blocks, tier=tier, codec=codec)
        rate = self.prefill_tokens_per_s
        recompute_s = None if rate is None else total / rate
        compute_s = 0.0
        if recompute_s is not None and total > 0:
            compute_s = recompute_s * (1.0 - (tokens / total) ** 2)  # a token's cost grows with its position
        bw = self.bandwidth
        if bw is not None and context_bytes:
            compute_s += context_bytes / (bw.fresh_copy or bw.memcpy)
        scale = self.read_scale
        restore_s = None if read_s is None else read_s * scale + compute_s
        return RestoreEstimate(tokens, nbytes, blocks, tier, restore_s, recompute_s, scale, read_s, compute_s)


_POLICIES: dict[str, RestorePolicy] = {}
_POLICIES_LOCK = threading.Lock()


def policy_for(store: TierStore, fingerprint: str) -> RestorePolicy:
    """The process's policy for one model (its prefill speed is the model's), with the store's bandwidths.

    The bandwidths are those measured for the store (``tierstore probe --measure`` caches them);
    a store never measured leaves the restore decision to its default (restore).
    """
    with _POLICIES_LOCK:
        policy = _POLICIES.get(fingerprint)
        if policy is None:
            policy = _POLICIES[fingerprint] = RestorePolicy()
    if policy.bandwidth is None and not store.closed:
        policy.bandwidth = HardwareOptimizer(store).bandwidth
    return policy
