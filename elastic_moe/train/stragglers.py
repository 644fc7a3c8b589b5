"""Slow ranks: flag a persistent straggler from each rank's own compute, and decide by a goodput
model whether the group is faster without it. Pure (no torch): the coordinator imports it.

Synchronous training runs at the pace of its slowest rank, and the slowness spreads: every
collective makes the fast ranks wait for the slow one, so step times and collective arrival
times look alike on every rank. What does not spread is the time a rank spends in work that
never waits on a peer. :class:`~elastic_moe.train.compute_probe.ComputeProbe` times such
sections -- the attention blocks'
forward passes (no collective inside: the layer's parameters are already gathered) -- and the
commit vote carries every rank's sum, so every rank reports all of them with the step
(``rank<r>_compute_s``), as NVRx scores ranks by their own section timings.

:class:`StragglerWatch` is the policy (pure): a rank whose compute is at least
``elastic.straggler_ratio`` times the other ranks' median, in total over a window of
``elastic.straggler_steps`` steps, is flagged. The group then runs at about ``slowdown``
times the speed it would have without the straggler. With a warm spare, evicting it costs one
rebuild and brings the step time back.
Without one, the group shrinks from W to W - 1 ranks, and each step takes about W / (W - 1)
times the straggler-free time: eviction pays only when ``slowdown > W / (W - 1)`` -- on two
workers a rank must be more than twice as slow. Either way the steps must get at least
``MIN_GAIN`` shorter, and the time saved over the steps left must exceed twice the rebuild
pause (the eviction's rebuild and the replacement's rejoin).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

MIN_GAIN = 0.1  # an eviction must promise at least 10% shorter steps


@dataclass(frozen=True, slots=True)
class StragglerVerdict:
    """A persistent straggler and what the goodput model says to do about it."""

    rank: int
    evict: bool
    slowdown: float  # its compute over the other ranks' median, totals over the window
    step_s: float  # the group's median step time over the window
    expected_step_s: float  # the step time the model expects after an eviction
    pause_s: float  # the rebuild an eviction costs
    steps_left: int
    with_spare: bool
    reason: str

    def detail(self) -> dict[str, Any]:
        return {"rank": self.rank, "evict": self.evict, "slowdown": round(self.slowdown, 3),
                "step_s": round(self.step_s, 4), "expected_step_s": round(self.expected_step_s, 4),
                "pause_s": round(self.pause_s, 3), "steps_left": self.steps_left,
                "with_spare": self.with_spare, "reason": self.reason}


@dataclass
class StragglerWatch:
    """Per-step compute times in; a verdict out once a window of ``steps`` steps shows a rank
    whose total compute (less its longest step) is at least ``ratio`` times the other ranks'
    median. Totals, not per-step ratios: a rank slowed in bursts (a noisy neighbour, a
    stop/continue duty cycle) has fast and slow steps, and what it costs the group is its
    average. After a verdict the window starts again.

    After :meth:`reset` (a new layout) the first ``steps`` steps are not counted: a rebuild
    leaves ranks uneven for a while (a new member's first steps, the next spare starting on the
    same machines), and a second eviction right after the first would judge that, not the ranks.
    """

    ratio: float  # elastic.straggler_ratio (0: off)
    steps: int  # elastic.straggler_steps
    history: list[tuple[list[float], float]] = field(default_factory=list)
    settling: int = 0  # steps still to pass before the window counts again

    def reset(self) -> None:
        """A new layout: ranks are renumbered, the old numbers mean nothing; let it settle."""
        self.history.clear()
        self.settling = self.steps

    def pause(self) -> None:
        """Drop the window: its steps ran while something else took the machines' time (a new
        worker starting), so they say nothing about a rank's own pace."""
        self.history.clear()

    def observe(self, compute_by_rank: list[float], step_s: float, *, steps_left: int,
                spare_ready: bool, pause_s: float) -> StragglerVerdict | None:
        if self.ratio <= 0 or len(compute_by_rank) < 2:
            return None
        if self.settling > 0:
            self.settling -= 1
            return None
        if self.history and len(self.history[-1][0]) != len(compute_by_rank):
            self.history.clear()
        self.history = [*self.history[-(self.steps - 1):], (list(compute_by_rank), step_s)]
        if len(self.history) < self.steps:
            return None
        world = len(compute_by_rank)
        # each rank's total without its single longest step: the probe times a small part of
        # the step, so one hiccup (a page fault storm, a collector pass, a neighbour's burst)
        # can outweigh a window of normal steps; a persistent straggler is slow in many
        totals = [_trimmed_total([c[r] for c, _ in self.history]) for r in range(world)]
        slowdowns = [totals[r] / max(_others(totals, r), 1e-12) for r in range(world)]
        rank = max(range(world), key=lambda r: slowdowns[r])
        slowdown = slowdowns[rank]
        if slowdown < self.ratio:
            return None
        now = statistics.median(s for _, s in self.history)
        self.history.clear()  # decided: look again after another window
        free = now / slowdown  # the step time at the other ranks' pace
        after = free if spare_ready else free * world / (world - 1)
        gain = (now - after) * steps_left
        # estimates from a noisy window: evict only for a clear gain, and one that pays back
        # the eviction's rebuild and the replacement's rejoin
        evict = after <= (1 - MIN_GAIN) * now and gain > 2 * pause_s
        if spare_ready:
            why = "a warm spare takes its place"
        else:
            why = (f"no spare: {world - 1} ranks would take {world / (world - 1):.2f}x the "
                   f"straggler-free step time")
        reason = (f"rank {rank} computed {slowdown:.2f}x as long as the other ranks over "
                  f"{self.steps} steps; step {now:.3f} s now, {after:.3f} s expected after an "
                  f"eviction ({why}); over the {steps_left} steps left that "
                  f"{'saves' if gain > 0 else 'costs'} {abs(gain):.1f} s against 2 x {pause_s:.1f} s "
                  f"of rebuilds: {'evict' if evict else 'keep'} it")
        return StragglerVerdict(rank, evict, slowdown, now, after, pause_s, steps_left,
                                spare_ready, reason)


def _trimmed_total(values: list[float]) -> float:
    return sum(values) - max(values) if len(values) > 2 else sum(values)


def _others(values: list[float], rank: int) -> float:
    """The median of the other ranks' values (on two ranks: the other one)."""
    return statistics.median(v for r, v in enumerate(values) if r != rank)
