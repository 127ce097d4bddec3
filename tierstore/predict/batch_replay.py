"""The predictive policy over a whole key sequence at once: the trace simulator's fast path.

:meth:`tierstore.predict.predictor.PredictivePolicy.simulate` replays a sequence of unit-size accesses and
makes, access for access, the decisions that driving the policy through
:func:`tierstore.predict.policies.access` makes (``tests/test_predict_batch.py`` checks that on random
traces), 2-4x faster (BENCHMARKS.md, trace replay): the panel runs one epoch at a time, each
expert over the epoch's keys in one tight loop (:meth:`tierstore.predict.shadow_caches.ShadowCache.run`;
the tracker, the predictor and its Belady expert in :func:`learn`), then the tier follows the
leader's reported evictions through the same epoch, and :meth:`PredictivePolicy.choose_leader`
(the one both paths call) picks the leader for the next. The loops work on the owners' state as
their ``export_state()`` hands it out and give it back through ``load_state()``
(:mod:`tierstore.predict.replay_state`).

:func:`learn` is the per-access work of ``AccessPatternTracker.record``, ``SimpleMLPredictor.observe``
and ``PredictedNextUse.access`` fused into one loop over the predictor's own state, the same
floating-point operations in the same order, so the learned weights and predictions are the same.
It counts time in ticks and leaves the caller-time statistics (``last_time``, ``time_gap``,
``time_per_tick``), which no decision reads, as they were.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..errors import ConfigError
from .access_tracker import KeyState

if TYPE_CHECKING:
    from .compiled_learn import CompiledLearner
    from .predictor import PredictedNextUse, PredictivePolicy, SimpleMLPredictor
    from .replay_state import PanelState
    from .shadow_caches import Evictions

__all__ = ["learn", "simulate"]

CROWDED = 4
"""The Belady expert compacts its heaps when they hold this many entries per key it holds."""

K = TypeVar("K", bound=Hashable)


def learn(predictor: SimpleMLPredictor[K], keys: Sequence[K], expert: PredictedNextUse[K] | None = None,
          evicted: Evictions[K] | None = None) -> int:
    """Record ``keys`` in the predictor's tracker, train the predictor on them, and run ``expert``.

    Returns the expert's hits (0 without one); its evictions go to ``evicted`` as in
    :meth:`tierstore.predict.shadow_caches.ShadowCache.run` (the accessed key itself when it was not admitted).
    """
    tracker = predictor.tracker
    tracked, learned = tracker.export_state(), predictor.export_state()
    states, successors, max_successors = tracked.keys, tracked.successors, tracker.max_successors
    recent, in_window, window, alpha = tracked.recent, tracked.in_window, tracker.window, tracker.alpha
    slide, expire = recent.append, recent.popleft
    tick, first_gap, transition = tracked.tick, tracked.first_gap, tracked.transition
    previous, previous_state = tracked.previous, tracked.previous_state
    rate, horizon, log_h = predictor.learning_rate, predictor.horizon, learned.log_horizon
    pending, expiry, probability = learned.pending, learned.expiry, learned.probability
    draw, cut = learned.draw, learned.cut
    w0, w1, w2, w3, w4, w5 = predictor.weights
    samples = predictor.samples
    log1p, exp = math.log1p, math.exp
    first = (1.0, log1p(1) * 0.25, 1.0, 1.0, 1.0, 0.0)  # the features of a first access
    _, n1, n2, n3, n4, n5 = first
    far_horizon = 2.0 * horizon
    belady = expert is not None
    if expert is not None:
        held = expert.export_state()
        version, far, due, serial = held.version, held.far, held.due, held.serial
        capacity, patience = expert.capacity, expert.patience
        crowded = CROWDED * capacity + 64
    push = heapq.heappush
    hits = 0
    for i, key in enumerate(keys):
        # AccessPatternTracker.record
        tick += 1
        state = states.get(key)
        if state is None:
            state = states[key] = KeyState(tick, float(tick))
            repeat = False
        else:
            gap = tick - state.last_tick
            if state.count == 1:
                state.gap = float(gap)
                first_gap = gap if first_gap == 0.0 else first_gap + 0.01 * (gap - first_gap)
            else:
                state.gap += alpha * (gap - state.gap)
            state.count += 1
            state.last_gap = gap
            state.last_tick = tick
            repeat = True
        if window:  # off in the predictive policy's tracker
            slide(key)
            in_window[key] = in_window.get(key, 0) + 1
            if len(recent) > window:
                leaving = expire()
                left = in_window[leaving] - 1
                if left:
                    in_window[leaving] = left
                else:
                    del in_window[leaving]
        if max_successors:  # off in the predictive policy's tracker
            if previous_state is None or previous is None:
                transition = 0.0
            else:
                table = successors.get(previous)
                out = previous_state.out
                transition = 0.0 if table is None or not out else table.get(key, 0) / out
                previous_state.out = out + 1
                if table is None:
                    successors[previous] = {key: 1}
                elif key in table:
                    table[key] += 1
                elif len(table) < max_successors:
                    table[key] = 1
                else:  # Misra-Gries, as AccessPatternTracker._follow (same entries, same order)
                    successors[previous] = {k: c - 1 for k, c in table.items() if c > 1}
            previous, previous_state = key, state
        # SimpleMLPredictor.observe: label the pending samples, then score this access
        sample = pending.pop(key, None)
        labelled = None if sample is None else [(sample[1], 1.0)]
        if expiry and expiry[0][0] < tick - horizon:
            limit = tick - horizon
            while expiry and expiry[0][0] < limit:
                born, gone = expiry.popleft()
                stale = pending.get(gone)
                if stale is not None and stale[0] == born:
                    del pending[gone]
                    if labelled is None:
                        labelled = []
                    labelled.append((stale[1], 0.0))
        if labelled is not None:  # the returned key's sample (1) first, then the expired ones (0)
            for features, label in labelled:
                _, x1, x2, x3, x4, x5 = features  # x0 is 1.0: w0 * x0 == w0, step * x0 == step
                z = w0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5
                z = 30.0 if z > 30.0 else (-30.0 if z < -30.0 else z)
                step = rate * (label - 1.0 / (1.0 + exp(-z)))
                w0 += step
                w1 += step * x1
                w2 += step * x2
                w3 += step * x3
                w4 += step * x4
                w5 += step * x5
                samples += 1
        if repeat:
            g = state.gap
            x3 = log1p(g) / log_h
            if x3 > 2.0:
                x3 = 2.0
            x4 = log1p(state.last_gap) / log_h
            if x4 > 2.0:
                x4 = 2.0
            x1 = log1p(state.count) * 0.25
            x5 = 1.0 if g <= horizon else 0.0
            z = w0 + w1 * x1 + w2 * 0.0 + w3 * x3 + w4 * x4 + w5 * x5
            draw = (draw * 1664525 + 1013904223) & 0xFFFFFFFF  # SimpleMLPredictor's sampling draw
            if draw < cut:
                pending[key] = (tick, (1.0, x1, 0.0, x3, x4, x5))
                expiry.append((tick, key))
        else:
            z = w0 + w1 * n1 + w2 * n2 + w3 * n3 + w4 * n4 + w5 * n5
            draw = (draw * 1664525 + 1013904223) & 0xFFFFFFFF
            if draw < cut:
                pending[key] = (tick, first)
                expiry.append((tick, key))
        z = 30.0 if z > 30.0 else (-30.0 if z < -30.0 else z)
        p = probability[key] = 1.0 / (1.0 + exp(-z))
        if not belady:
            continue
        # PredictedNextUse.access, with SimpleMLPredictor.expected_next_tick
        gap_ = state.gap if repeat else (first_gap if first_gap > 1.0 else 1.0)
        double = 2.0 * gap_
        expected = tick + p * gap_ + (1.0 - p) * (double if double > far_horizon else far_horizon)  # last_tick
        if key in version:
            hits += 1
        elif len(version) >= capacity:
            while version.get(due[0][2]) != due[0][1]:
                heapq.heappop(due)
            if due[0][0] >= tick:
                while version.get(far[0][2]) != far[0][1]:
                    heapq.heappop(far)
                if -far[0][0] <= expected:
                    if evicted is not None:
                        evicted.append((i, key))  # expected back last: not admitted
                    continue
                victim = far[0][2]
            else:
                victim = due[0][2]
            del version[victim]
            if evicted is not None:
                evicted.append((i, victim))
        serial += 1
        version[key] = serial
        push(far, (-expected, serial, key))
        ahead = expected - tick
        push(due, (tick + patience * (ahead if ahead > 1.0 else 1.0), serial, key))
        if len(far) > crowded:  # drop stale entries now and then, as PredictedNextUse._push
            far = [e for e in far if version.get(e[2]) == e[1]]
            due = [e for e in due if version.get(e[2]) == e[1]]
            heapq.heapify(far)
            heapq.heapify(due)
    if keys and not max_successors:  # the latest access (the successor branch tracks it as it goes)
        previous, previous_state = keys[-1], states[keys[-1]]
    tracked.tick, tracked.first_gap, tracked.transition = tick, first_gap, transition
    tracked.previous, tracked.previous_state = previous, previous_state
    tracker.load_state(tracked)
    predictor.weights[:] = [w0, w1, w2, w3, w4, w5]
    predictor.samples, learned.draw = samples, draw
    predictor.load_state(learned)
    if expert is not None:
        held.far, held.due, held.serial = far, due, serial
        expert.load_state(held)
    return hits


def simulate(policy: PredictivePolicy[K], keys: Sequence[K], parents: Sequence[K | None] | None = None,
             belady: PredictedNextUse[K] | None = None, compiled: CompiledLearner | None = None) -> bytearray:
    """Hits (1) and misses (0) of ``keys`` through ``policy``, as :meth:`PredictivePolicy.simulate`.

    ``belady`` is the policy's Belady expert among its experts, if it has one (the caller names it:
    this module does not import the predictor's classes, which import it). ``compiled``, instead of
    it, is the policy's :class:`tierstore.predict.compiled_learn.CompiledLearner`: it stands in the
    panel for the Belady expert (if the panel has one) and learns in place of :func:`learn`.
    """
    panel = policy.export_state()
    if panel.used != len(panel.resident):
        raise ConfigError("simulate replays unit-size accesses; this policy already holds keys of other "
                          "sizes: simulate on a fresh policy, or drive it through tierstore.predict.policies.access")
    if parents is not None and len(parents) != len(keys):
        raise ConfigError(f"simulate needs one parent per key: {len(parents)} parents for {len(keys)} keys")
    n, capacity = len(keys), policy.capacity
    hits = bytearray(n)
    experts, tally, predictor = policy.experts, panel.hits, policy.predictor
    resident, parent_of, children, lineage = panel.resident, panel.parent, panel.children, panel.lineage
    touch = resident.move_to_end
    used = panel.used
    dense = None if compiled is None else np.asarray(keys, dtype=np.int64)
    stand_in = compiled if compiled is not None and compiled.belady else belady
    arrays = [getattr(expert, "dense", False) for expert in experts]  # compiled experts take int64 slices
    start = 0
    while start < n:
        stop = min(n, start + panel.countdown)
        chunk = keys[start:stop]
        leader = panel.leader
        reported: Evictions[K] = []
        report = reported if experts[leader] is stand_in else None
        if dense is not None and compiled is not None:
            learned = compiled.run(dense[start:stop], report)  # type: ignore[arg-type]
        else:
            learned = learn(predictor, chunk, belady, report)
        for e, expert in enumerate(experts):
            if expert is stand_in:
                tally[e] += learned
            elif dense is not None and arrays[e]:
                tally[e] += expert.run(dense[start:stop], reported if e == leader else None)  # type: ignore[arg-type]
            else:
                tally[e] += expert.run(chunk, reported if e == leader else None)
        countdown = panel.countdown - (stop - start)
        boundary = not countdown
        outside = panel.outside
        events = iter(reported)
        done = (-1, chunk[0])  # past the last eviction: `at` matches no index
        at, gone = next(events, done)
        last = stop - start - 1
        for i, key in enumerate(chunk):
            held = True  # does the leader hold `key` after this access? (only the Belady expert may not)
            if i == at:
                if gone == key:
                    held = False
                elif gone in resident:
                    outside[gone] = None
                at, gone = next(events, done)
            if key in resident:
                touch(key)
                if held and key in outside:
                    del outside[key]
                hits[start + i] = 1
                if i == last and boundary:
                    panel = _next_epoch(policy, panel, used)
                    used = panel.used  # a takeover may have changed the tier
                continue
            if i == last and boundary:  # the epoch's last access is admitted under the next leader
                panel = _next_epoch(policy, panel, used)
                outside, used = panel.outside, panel.used
                if key in resident:  # a takeover loaded it: still this access's miss
                    continue
                held = key in experts[panel.leader]
            if not held and used >= capacity:
                continue
            while used >= capacity:
                victim = next(iter(outside)) if outside else next(iter(resident))
                if children:
                    for _ in range(len(resident)):  # walk to the chain's tail, as victim()
                        below = children.get(victim)
                        if not below:
                            break
                        victim = next(iter(below))
                del resident[victim]
                used -= 1
                outside.pop(victim, None)
                parent = parent_of.pop(victim, None)
                if parent is not None:
                    siblings = children[parent]
                    siblings.pop(victim, None)
                    if not siblings:
                        del children[parent]
            resident[key] = 1
            used += 1
            if not held:
                outside[key] = None
            if parents is not None:
                parent = parents[start + i]
                if parent is not None and parent != key:
                    parent_of[key] = parent
                    children.setdefault(parent, {})[key] = None
                    if lineage is not None:
                        lineage[key] = parent
        panel.used = used
        if not boundary:  # else the next epoch's countdown, from choose_leader
            panel.countdown = countdown
        policy.load_state(panel)
        start = stop
    return hits


def _next_epoch(policy: PredictivePolicy[K], panel: PanelState[K], used: int) -> PanelState[K]:
    """Hand ``panel`` (the tier holding ``used``) back to ``policy``, end its epoch; the next epoch's state."""
    panel.used, panel.countdown = used, 0
    policy.load_state(panel)
    policy.choose_leader()
    return policy.export_state()
