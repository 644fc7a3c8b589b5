"""The learning-rate schedule: DeepSeek-V3's shape (arXiv:2412.19437 sec. 4.2) simplified to a
linear warmup to the peak, then cosine decay to ``min_lr`` at the last step.

One object per trainer holds the whole schedule, including the multiplier of
``train.resize_policy=scale_lr`` (:func:`elastic_moe.train.elastic.effective_batch`): the config
keeps the configured ``lr`` / ``min_lr`` and the schedule scales both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elastic_moe.config import TrainConfig


@dataclass(frozen=True, slots=True)
class LRSchedule:
    lr: float  # peak, reached at the end of warmup (before ``scale``)
    min_lr: float  # floor the cosine ends at (before ``scale``)
    warmup_steps: int
    steps: int  # the run's total optimizer steps; the cosine reaches min_lr there
    scale: float = 1.0  # scale_lr's batch multiplier at this world size (1 for constant_batch)

    @classmethod
    def from_config(cls, cfg: TrainConfig, scale: float = 1.0) -> LRSchedule:
        return cls(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, steps=cfg.steps,
                   scale=scale)

    def at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        lr, min_lr = self.lr * self.scale, self.min_lr * self.scale
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        decay_steps = max(self.steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / decay_steps, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
