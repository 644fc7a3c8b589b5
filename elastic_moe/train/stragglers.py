"""Slow ranks: flag a persistent straggler from each rank's own pace, and decide by a goodput
model whether the group is faster without it. Pure (no torch): the coordinator imports it.

Synchronous training runs at the pace of its slowest rank, and the slowness spreads: every
collective makes the fast ranks wait for the slow one, so step times and collective arrival
times look alike on every rank. What does not spread is a rank's own pace, which
:class:`~elastic_moe.train.compute_probe.ComputeProbe` measures two ways: the time spent in
sections that never wait on a peer (the attention blocks' forward passes: the layer's
parameters are already gathered), and the time the process did not run at all (stalls: held
off the CPU by a neighbour, a quota or a stop). The commit vote carries every rank's numbers,
so every rank reports all of them with the step (``rank<r>_compute_s``,
``rank<r>_stalled_s``), as NVRx scores ranks by their own section timings.

:class:`StragglerWatch` is the policy (pure). Over a window of ``elastic.straggler_steps``
steps it estimates, for each rank, the step time the group would have at the other ranks'
pace: a rank whose sections take ``k`` times the others' slows the step by that factor, and
a rank that stalls ``s`` seconds a step more than the others adds those seconds. A rank
whose estimate makes the steps ``elastic.straggler_ratio`` times shorter (its ``slowdown``)
is flagged. With a warm spare, evicting it costs one rebuild and brings the step time back.
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
MIN_PACE = 0.1  # stalls are taken to cost at most 90% of the step time


@dataclass(frozen=True, slots=True)
class StragglerVerdict:
    """A persistent straggler and what the goodput model says to do about it."""

    rank: int
    evict: bool
    slowdown: float  # the group's step time over the step time at the other ranks' pace
    compute_ratio: float  # its section times over the other ranks' median, totals over the window
    stalled_s: float  # how much longer than the other ranks' median it stalled, per step
    step_s: float  # the group's mean step time over the window (its longest step left out)
    expected_step_s: float  # the step time the model expects after an eviction
    pause_s: float  # the rebuild an eviction costs
    steps_left: int
    with_spare: bool
    reason: str

    def detail(self) -> dict[str, Any]:
        return {"rank": self.rank, "evict": self.evict, "slowdown": round(self.slowdown, 3),
                "compute_ratio": round(self.compute_ratio, 3),
                "stalled_s": round(self.stalled_s, 4), "step_s": round(self.step_s, 4),
                "expected_step_s": round(self.expected_step_s, 4),
                "pause_s": round(self.pause_s, 3), "steps_left": self.steps_left,
                "with_spare": self.with_spare, "reason": self.reason}


@dataclass
class StragglerWatch:
    """Per-step compute and stall times in; a verdict out once a window of ``steps`` steps
    shows a rank without which the steps would be at least ``ratio`` times shorter. Totals over
    the window (each rank's longest step left out), not per-step ratios: a rank slowed in bursts
    (a noisy neighbour, a stop/continue duty cycle) has fast and slow steps, and what it costs
    the group is its average. After a verdict the window starts again.

    After :meth:`reset` (a new layout) the first ``steps`` steps are not counted: a rebuild
    leaves ranks uneven for a while (a new member's first steps, the next spare starting on the
    same machines), and a second eviction right after the first would judge that, not the ranks.
    """

    ratio: float  # elastic.straggler_ratio (0: off)
    steps: int  # elastic.straggler_steps
    history: list[tuple[list[float], list[float], float]] = field(default_factory=list)
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
                spare_ready: bool, pause_s: float,
                stalled_by_rank: list[float] | None = None) -> StragglerVerdict | None:
        if self.ratio <= 0 or len(compute_by_rank) < 2:
            return None
        if self.settling > 0:
            self.settling -= 1
            return None
        world = len(compute_by_rank)
        stalled = list(stalled_by_rank) if stalled_by_rank is not None else [0.0] * world
        if len(stalled) != world:
            raise ValueError(f"{len(stalled)} stall times for {world} ranks")
        if self.history and len(self.history[-1][0]) != world:
            self.history.clear()
        self.history = [*self.history[-(self.steps - 1):], (list(compute_by_rank), stalled, step_s)]
        if len(self.history) < self.steps:
            return None
        # each rank's totals without its single longest step: the probe times a small part of
        # the step, so one hiccup (a page fault storm, a collector pass, a neighbour's burst)
        # can outweigh a window of normal steps; a persistent straggler is slow in many. The
        # step time likewise: a mean, as the stalls are, so that the two compare
        counted = len(self.history) - 1 if len(self.history) > 2 else len(self.history)
        compute = [_trimmed_total([c[r] for c, _, _ in self.history]) for r in range(world)]
        stalls = [_trimmed_total([s[r] for _, s, _ in self.history]) for r in range(world)]
        now = _trimmed_total([t for _, _, t in self.history]) / counted

        def slowed_by(rank: int) -> tuple[float, float, float]:
            """(its compute over the others', its extra stall per step, the group's step time
            over the step time at the others' pace)"""
            ratio = max(compute[rank] / max(_others(compute, rank), 1e-12), 1.0)
            extra = max(stalls[rank] - _others(stalls, rank), 0.0) / counted
            return ratio, extra, ratio * (now / max(now - extra, MIN_PACE * now, 1e-12))

        verdicts = [slowed_by(r) for r in range(world)]
        rank = max(range(world), key=lambda r: verdicts[r][2])
        compute_ratio, extra, slowdown = verdicts[rank]
        if slowdown < self.ratio:
            return None
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
        reason = (f"rank {rank} slows the steps {slowdown:.2f}x over {self.steps} steps (its "
                  f"sections take {compute_ratio:.2f}x the other ranks', and it stalls "
                  f"{extra:.3f} s a step more); step {now:.3f} s now, {after:.3f} s expected "
                  f"after an eviction ({why}); over the {steps_left} steps left that "
                  f"{'saves' if gain > 0 else 'costs'} {abs(gain):.1f} s against 2 x {pause_s:.1f} s "
                  f"of rebuilds: {'evict' if evict else 'keep'} it")
        return StragglerVerdict(rank, evict, slowdown, compute_ratio, extra, now, after, pause_s,
                                steps_left, spare_ready, reason)


def _trimmed_total(values: list[float]) -> float:
    return sum(values) - max(values) if len(values) > 2 else sum(values)


def _others(values: list[float], rank: int) -> float:
    """The median of the other ranks' values (on two ranks: the other one)."""
    return statistics.median(v for r, v in enumerate(values) if r != rank)
