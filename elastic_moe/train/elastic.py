"""What changes when the worker group changes size: the split of the global batch and the LR.

The data position is world-size independent (:mod:`elastic_moe.data.sampler`), so a resize only
changes how the next global batch is shared out. ``constant_batch`` (default) keeps the global
batch B at every world size W: rank r takes a contiguous share of B // W or B // W + 1 samples and
weights its loss by share / B, so the gradient is the global-batch mean whatever W is, and
gradient accumulation (micro-batches) absorbs the change. ``scale_lr`` keeps each rank's share
instead and scales the LR linearly with the resulting batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elastic_moe.config import TrainConfig
from elastic_moe.data.sampler import rank_share

__all__ = ["Holdings", "RestoreDecision", "decide_restore", "effective_batch", "rank_share"]


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


@dataclass(frozen=True, slots=True)
class Holdings:
    """Which committed steps one live rank can hand out: its live state (``live``), its own
    snapshots (``own``) and the copies it keeps of each ward (``wards``: rank -> steps)."""

    rank: int | None  # None: the worker holds no layout yet
    live: int | None
    own: list[int] = field(default_factory=list)
    wards: dict[int, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RestoreDecision:
    """Where the next layout's state comes from after a membership change.

    ``step``: the newest committed step of which some live process holds every rank's shards
    (``None``: no such step; the last committed DCP checkpoint is the fallback). ``holders``:
    for each rank of the old layout, the old rank of the survivor that hands its shards out
    (itself, or the buddy keeping its copy).
    """

    step: int | None
    holders: dict[int, int]
    reason: str


def decide_restore(world_size: int, holdings: dict[int, Holdings]) -> RestoreDecision:
    """Pick the restore point from the survivors' holdings.

    ``holdings``: for each surviving old rank, what ``Trainer.holdings`` reports. Ranks missing
    from it are lost. Newest step first; a survivor's own state beats a peer's copy.
    """
    lost = sorted(set(range(world_size)) - set(holdings))
    steps = set()
    for held in holdings.values():
        if held.live is not None:
            steps.add(int(held.live))
        steps.update(int(s) for s in held.own)
        for ward_steps in held.wards.values():
            steps.update(int(s) for s in ward_steps)
    for step in sorted(steps, reverse=True):
        holders: dict[int, int] = {}
        for rank in range(world_size):
            mine = holdings.get(rank)
            if mine is not None and (mine.live == step or step in mine.own):
                holders[rank] = rank
                continue
            keeper = next((r for r, h in sorted(holdings.items())
                           if step in h.wards.get(rank, [])), None)
            if keeper is None:
                break
            holders[rank] = keeper
        else:
            copies = {r: k for r, k in holders.items() if r != k}
            return RestoreDecision(step, holders,
                                   f"step {step}: lost ranks {lost} restored from peer copies "
                                   f"{copies}" if lost else f"step {step}: every rank alive")
    return RestoreDecision(None, {}, f"no committed step has a copy of every shard of the lost "
                                     f"ranks {lost} (their peers are gone too)")
