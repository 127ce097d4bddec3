"""When the tier should stop following an expert's decisions and become that expert: the takeover rule.

The predictive policy's tier follows its leading expert's *decisions*: it evicts what the leader
evicts and admits what the leader admits, but it keeps its old contents until they are evicted, so
after a change of leader it misses on every key the new leader holds and the tier lacks. That cost
is why the panel switches only when a challenger's lead beats ``switch_cost`` misses per such key,
and why it rarely switches at all on traces where one classic expert is simply better (S3-FIFO on
cloudPhysicsIO, BENCHMARKS.md). A *takeover* instead makes the tier a copy of the expert at once:
the tier drops what the expert does not hold and loads what it holds (keys moved into the tier
without a demand miss: a bulk migration, which only an owner that can load keys on the policy's
word, such as the trace simulator, may allow).

:class:`TakeoverRule` decides when: an expert has been the top scorer for ``epochs`` epochs in a
row, each time ahead of the expert the tier follows (or, when it is that expert, of the runner-up)
by more than ``margin`` of that one's score, by at least ``noise`` standard deviations of a Poisson
count (``noise * sqrt(both scores)``: a lead of a few hits on a small score is chance) and by at
least one hit, scoring at least ``floor`` (the policy passes its capacity in entries: a takeover
reloads up to that many keys, and fewer hits than that over a score window are too little evidence
for it), and the tier is not already its copy; and not before ``warmup`` epochs have passed
(the policy passes its score window's length: until the scores cover it, an expert that learns
slowly, as the LRFU expert does on Mooncake, looks worse than it is). When the top scorer is the
leader itself and the tier is not its copy (it followed a paid switch and still holds old contents), being on top
for ``epochs`` epochs is enough.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError

__all__ = ["TakeoverRule"]


class TakeoverRule:
    """Counts how long one expert has led the panel by a margin; says when the tier should become it."""

    def __init__(self, margin: float, epochs: int, noise: float = 0.0, *, warmup: int = 0, floor: float = 0.0) -> None:
        if not (margin >= 0.0 and noise >= 0.0) or epochs < 1:  # `not >=` also rejects NaN
            raise ConfigError(f"a takeover needs a margin and a noise >= 0 and at least 1 epoch, got "
                              f"{margin!r}, {epochs!r}, {noise!r}")
        self.margin = float(margin)
        self.epochs = int(epochs)
        self.noise = float(noise)
        self.warmup = warmup  # epochs to wait first (the policy's: its score window), as scores fill up
        self.floor = floor  # the least score a taken-over expert needs (the policy's: its capacity in entries)
        self._expert = -1  # the expert on a streak, -1 for none
        self._streak = 0
        self._seen = 0  # epochs ended

    def step(self, scores: Sequence[float], leader: int, copy_of: int) -> int:
        """End an epoch: the expert to take over now, or -1.

        ``scores``: the experts' decayed scores after this epoch; ``leader``: the expert the tier
        follows; ``copy_of``: the expert the tier is an exact copy of (-1 if none).
        """
        self._seen += 1
        if self._seen <= self.warmup:
            return -1
        top = max(range(len(scores)), key=scores.__getitem__)  # the first of equals
        if top == leader and copy_of != leader:
            ahead = True  # the leader on top: copying it needs no lead
        else:
            others = (s for i, s in enumerate(scores) if i != top)
            ref = max(others, default=0.0) if top == leader else scores[leader]  # the leader, or the runner-up
            lead, best = scores[top] - ref, scores[top]
            ahead = (lead > ref * self.margin and lead >= 1.0 and lead >= self.noise * math.sqrt(best + ref)
                     and best >= self.floor)
        if ahead:
            self._streak = self._streak + 1 if top == self._expert else 1
            self._expert = top
        else:
            self._streak, self._expert = 0, -1
        if self._streak < self.epochs or top == copy_of:
            return -1
        self._streak, self._expert = 0, -1
        return top
