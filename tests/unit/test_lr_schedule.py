"""The learning-rate schedule: warmup, cosine decay to min_lr, and the scale_lr multiplier."""

from __future__ import annotations

import dataclasses
import math

import pytest

from elastic_moe.config import TrainConfig
from elastic_moe.train.elastic import effective_batch
from elastic_moe.train.lr_schedule import LRSchedule


def _scaled_config_lr(step: int, cfg: TrainConfig) -> float:
    """The schedule as it was computed before LRSchedule: on a TrainConfig whose lr and min_lr
    were already multiplied by the scale_lr factor."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup_steps", [0, 1, 7])
@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_equals_a_config_with_scaled_lr_exactly(warmup_steps, world_size):
    cfg = TrainConfig(steps=40, lr=3e-3, min_lr=3e-4, warmup_steps=warmup_steps,
                      global_batch_size=16, resize_policy="scale_lr")
    _, scale = effective_batch(cfg, world_size, max_workers=8)
    schedule = LRSchedule.from_config(cfg, scale=scale)
    scaled = dataclasses.replace(cfg, lr=cfg.lr * scale, min_lr=cfg.min_lr * scale)
    for step in range(50):  # past the end too: stays at min_lr
        assert schedule.at(step) == _scaled_config_lr(step, scaled)


def test_shape():
    schedule = LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=4, steps=14)
    assert [schedule.at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.at(4) == 1.0  # cosine starts at the peak
    assert schedule.at(9) == pytest.approx(0.55)  # halfway
    assert schedule.at(14) == pytest.approx(0.1) and schedule.at(100) == pytest.approx(0.1)
    half = dataclasses.replace(schedule, scale=0.5)
    assert half.at(9) == pytest.approx(0.275) and half.at(100) == pytest.approx(0.05)
