"""Whether reading a stored K/V prefix back beats computing it again.

A restore is not free: SGLang HiCache users measured a file-backend hit slower than recomputing
(2,450 against 1,725 ms). :class:`RestorePolicy` predicts both sides before a restore is used:

- reading: the prefix's bytes at the measured speed of the tier that holds them (memcpy for
  L1/L2; disk read plus decompression for L3, from :mod:`tierstore.plan.bandwidth`), plus a fixed
  cost per stored block;
- recomputing: the prefix's tokens at the prefill speed this process has seen for the model
  (every :class:`~tierstore.integrations.kv_cache.TieredCache` prefill is timed and reported here).

Bandwidths measured on an idle moment miss what a loaded machine, the catalog and the cache's own
copies add, so every restore is timed too (the reads the model waited for) and the reading side
is scaled by what restores really took against what was predicted (a moving average).

Without a prefill measurement, or without bandwidths, there is nothing to weigh and the restore
is used (the cheaper side is unknown; reading what was stored is the default).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..engine.handle import TierStore
from ..plan.bandwidth import Bandwidth
from ..plan.hardware import HardwareOptimizer

__all__ = ["RestoreEstimate", "RestorePolicy", "policy_for"]

PER_BLOCK_S = 60e-6
"""Fixed cost of one store get of a stored block (catalog lookup, checksum, tensor), measured here."""


@dataclass(frozen=True, slots=True)
class RestoreEstimate:
    """A prediction for one restore: seconds to read the prefix back and to compute it again."""

    tokens: int
    nbytes: int
    blocks: int
    tier: str
    """Where the prefix's first block is: "L1", "L2" or "L3"."""
    restore_s: float | None
    """None when the bandwidths are not measured; includes ``read_scale``."""
    recompute_s: float | None
    """None before any prefill of this model was timed."""
    read_scale: float = 1.0
    """Measured over predicted time of this policy's earlier restores (1.0 before any)."""

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
        """Record that a restore predicted at ``predicted_s`` (before ``read_scale``) took ``seconds``."""
        if predicted_s <= 0 or seconds <= 0:
            return
        ratio = seconds / predicted_s
        with self._lock:
            self.read_scale = ratio if self._restores == 0 else 0.5 * self.read_scale + 0.5 * ratio
            self._restores += 1

    def read_bytes_per_s(self, tier: str, codec: str) -> float | None:
        """Predicted speed of reading bytes from ``tier`` (None when not measured)."""
        bw = self.bandwidth
        if bw is None:
            return None
        if tier in ("L1", "L2"):
            return bw.memcpy
        decode = bw.decode.get(codec, bw.memcpy) if codec not in ("", "raw", "none") else bw.memcpy
        return 1.0 / (1.0 / bw.disk_read + 1.0 / decode)

    def estimate(self, *, tokens: int, nbytes: int, blocks: int, tier: str = "L3", codec: str = "") -> RestoreEstimate:
        """Predict reading ``blocks`` blocks (``nbytes`` in all) of ``tier`` against computing ``tokens``."""
        speed = self.read_bytes_per_s(tier, codec)
        scale = self.read_scale
        restore_s = None if speed is None else (nbytes / speed + blocks * self.per_block_s) * scale
        rate = self.prefill_tokens_per_s
        recompute_s = None if rate is None else tokens / rate
        return RestoreEstimate(tokens, nbytes, blocks, tier, restore_s, recompute_s, scale)


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
