"""torch's intra-op threads while a streamed unit decodes one token beside the prefetch thread.

Measured on the 2-core bench VM (the 2B streamed mapped from raw L3, ``perf record`` of a decode):
43% of all CPU samples were libgomp's threads spinning (``pause`` loops) between the small
one-token products, on the cores the prefetch thread needs for its maps and checksums; the
prefetch thread got its work done only in what the spinning left. Running the one-token forwards
of streamed units on ``cores - 1`` threads leaves one core to the prefetch thread: 540-674 ->
434-472 ms/token for the 2B (BENCHMARKS.md, "Mapped streaming attributed").

:func:`choose` decides the count (``"auto"``: ``cores - 1`` on a CPU device with a prefetch thread
and at least two cores, when torch would use them all); :class:`DecodeThreads` applies it around a
unit's forward and puts the caller's count back after it, so the rest of the model (the head,
prefill, the vision tower: many tokens, compute-bound) keeps every thread.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["DecodeThreads", "choose", "available_cores", "tokens_of"]


def available_cores() -> int:
    """Cores this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def choose(requested: int | str | None, *, device: torch.device, prefetch: int, streams: bool) -> int | None:
    """Threads for one-token forwards of streamed units, or None to leave torch's count alone.

    ``requested``: ``"auto"`` (``cores - 1`` where a prefetch thread fetches on the CPU beside
    compute that would take every core: a CPU ``device``, ``prefetch > 0``, some unit that
    ``streams``, two cores or more, ``torch.get_num_threads() >= cores``), None (leave it), or a
    number of threads (at least 1).
    """
    if requested is None:
        return None
    if requested == "auto":
        cores = available_cores()
        if device.type != "cpu" or prefetch <= 0 or not streams or cores < 2 or torch.get_num_threads() < cores:
            return None
        return cores - 1
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ConfigError(f"load_streamed: decode_threads must be 'auto', None or a whole number of at least 1, "
                          f"not {requested!r}")
    return requested


def tokens_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Tokens in a unit's input (``hidden_states``: ``(batch, tokens, hidden)``); 2 when it cannot tell."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    return int(hidden.shape[-2]) if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 else 2


class DecodeThreads:
    """Sets torch's threads to ``threads`` for a one-token forward; :meth:`leave` restores the caller's count.

    Used from the model's thread only (the hooks of one model run one after another).
    """

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self._outer: int | None = None

    def enter(self, tokens: int) -> None:
        """Before a unit's forward of ``tokens`` tokens."""
        if self.threads is None or tokens != 1 or self._outer is not None:
            return
        outer = torch.get_num_threads()
        if outer != self.threads:
            torch.set_num_threads(self.threads)
            self._outer = outer

    def leave(self) -> None:
        """After the unit's forward (also when it raised)."""
        if self._outer is not None:
            torch.set_num_threads(self._outer)
            self._outer = None
