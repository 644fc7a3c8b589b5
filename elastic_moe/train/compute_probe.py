"""Each rank's own pace per step: the time of sections that never wait on a peer, and the time
the process was not running at all.

The straggler policy (:mod:`elastic_moe.train.stragglers`) compares these across ranks; the
commit vote carries them (:meth:`elastic_moe.train.trainer.Trainer._vote`).

A rank can be slow in two ways. Its device can compute slower (a throttled GPU, a slower
core): every section takes longer, which the section timings show. Or its process can be held
off the CPU (a noisy neighbour, a CPU quota, a stop/continue duty cycle): the sections run at
full speed while the process runs, and the process runs less. A probe that times a few short
sections catches such a stall only when it lands inside one, which is rare. :class:`StallMeter`
catches every one: a thread that wakes every few milliseconds sees a gap where the process did
not run. The section times leave out the stalls that fell inside them, so the two add up.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any

import torch
from torch import nn

TICK_S = 0.005  # the stall meter's period
MIN_STALL_S = 0.02  # a later wake-up than this is a stall (GIL hand-offs take up to 5 ms)


class StallMeter:
    """Spans of wall time in which this process did not run. One per process (:func:`meter`):
    a daemon thread sleeps ``TICK_S`` at a time and records each wake-up that came more than
    ``MIN_STALL_S`` late, as (sequence number, start, end) on the ``perf_counter`` clock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stalls: deque[tuple[int, float, float]] = deque(maxlen=4096)
        self._seq = itertools.count(1)
        threading.Thread(target=self._run, name="elastic-moe-stall-meter", daemon=True).start()

    def _run(self) -> None:
        before = time.perf_counter()
        while True:
            time.sleep(TICK_S)
            now = time.perf_counter()
            if now - before - TICK_S > MIN_STALL_S:
                with self._lock:
                    self._stalls.append((next(self._seq), before + TICK_S, now))
            before = now

    def since(self, seq: int) -> list[tuple[int, float, float]]:
        """The stalls recorded after sequence number ``seq``."""
        with self._lock:
            return [s for s in self._stalls if s[0] > seq]


_METER: StallMeter | None = None
_METER_LOCK = threading.Lock()


def meter() -> StallMeter:
    """This process's stall meter, started on first use."""
    global _METER
    with _METER_LOCK:
        if _METER is None:
            _METER = StallMeter()
        return _METER


def _overlap(start: float, end: float, stalls: list[tuple[int, float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for _, a, b in stalls)


class ComputeProbe:
    """Wall time this rank spends in the forward passes of ``modules`` (sections with no
    collective inside), summed per step, and the time its process stalled. On CUDA the
    sections are timed with events read once per step; on the CPU with the wall clock, less
    the stalls that fell inside them."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stalls = meter()
        self._seen = max((s[0] for s in self.stalls.since(0)), default=0)
        self._start = 0.0
        self._sections: list[tuple[float, float]] = []
        self._events: list[tuple[Any, Any]] = []
        self.handles = []
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append((event, None))
        else:
            self._start = time.perf_counter()

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1] = (self._events[-1][0], end)
        else:
            self._sections.append((self._start, time.perf_counter()))

    def take(self) -> tuple[float, float]:
        """(seconds in the sections, seconds stalled) since the last call."""
        stalls = self.stalls.since(self._seen)
        if stalls:
            self._seen = stalls[-1][0]
        compute = 0.0
        if self.cuda:
            for start, end in self._events:
                if end is not None:
                    end.synchronize()
                    compute += start.elapsed_time(end) / 1000.0
            self._events = []
        else:
            compute = sum(end - start - _overlap(start, end, stalls)
                          for start, end in self._sections)
            self._sections = []
        return max(compute, 0.0), sum(b - a for _, a, b in stalls)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
