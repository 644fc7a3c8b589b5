"""What changes when the worker group changes size: the split of the global batch and the LR.

The data position is world-size independent (:mod:`elastic_moe.data.sampler`), so a resize only
changes how the next global batch is shared out. ``constant_batch`` (default) keeps the global
batch B at every world size W: rank r takes a contiguous share of B // W or B // W + 1 samples and
weights its loss by share / B, so the gradient is the global-batch mean whatever W is, and
gradient accumulation (micro-batches) absorbs the change. ``scale_lr`` keeps each rank's share
instead and scales the LR linearly with the resulting batch.
"""

from __future__ import annotations

from elastic_moe.config import TrainConfig
from elastic_moe.data.sampler import rank_share

__all__ = ["effective_batch", "rank_share"]


def effective_batch(cfg: TrainConfig, world_size: int, max_workers: int) -> tuple[int, float]:
    """Global batch and LR multiplier at this world size under ``train.resize_policy``.

    ``constant_batch``: the batch is ``global_batch_size`` at every size (gradient accumulation
    absorbs the change). ``scale_lr``: ``global_batch_size`` is the batch at ``max_workers``; each
    rank keeps its share of it, so the batch shrinks with the group and the LR follows linearly.
    """
    if cfg.resize_policy == "constant_batch":
        return cfg.global_batch_size, 1.0
    per_rank = max(cfg.global_batch_size // max_workers, 1)
    batch = per_rank * world_size
    return batch, batch / (per_rank * max_workers)
