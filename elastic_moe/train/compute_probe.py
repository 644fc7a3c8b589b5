"""Each rank's own compute per step: the wall time of sections that never wait on a peer.

The straggler policy (:mod:`elastic_moe.train.stragglers`) compares these times across ranks;
the commit vote carries them (:meth:`elastic_moe.train.trainer.Trainer._vote`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


class ComputeProbe:
    """Wall time this rank spends in the forward passes of ``modules`` (sections with no
    collective inside), summed per step. On CUDA, timed with events read once per step."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.total = 0.0
        self._start = 0.0
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
            self.total += time.perf_counter() - self._start

    def take(self) -> float:
        """Seconds spent in the sections since the last call."""
        if self.cuda:
            for start, end in self._events:
                if end is not None:
                    end.synchronize()
                    self.total += start.elapsed_time(end) / 1000.0
            self._events = []
        value, self.total = self.total, 0.0
        return value

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
