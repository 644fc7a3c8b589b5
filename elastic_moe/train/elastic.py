"""What changes when the worker group changes size: the split of the global batch and the LR.

The data position is world-size independent (:mod:`elastic_moe.data.sampler`), so a resize only
changes how the next global batch is shared out. ``constant_batch`` (default) keeps the global
batch B at every world size W: rank r takes a contiguous share of B // W or B // W + 1 samples and
weights its loss by share / B, so the gradient is the global-batch mean whatever W is, and
gradient accumulation (micro-batches) absorbs the change. ``scale_lr`` keeps each rank's share
instead and scales the LR linearly with the resulting batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from elastic_moe.config import TrainConfig
from elastic_moe.data.sampler import rank_share

__all__ = ["CopyPlan", "Holdings", "RestoreDecision", "ShardManifest", "ShardSpec", "WardCopy",
           "decide_restore", "effective_batch", "rank_share"]


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
class ShardSpec:
    """One tensor block: ``key`` names the tensor, the block is ``shape`` at ``offset`` of
    ``global_shape``."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    # a copy of part of another rank's block (an expert replica): a restore may read it, the
    # peer copies never copy it (every layout fills its replicas from their owners)
    replica: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(slots=True)
class ShardManifest:
    """A :class:`~elastic_moe.train.shard_state.ShardSet` without its tensors: what a rank holds,
    cheap to send around (defined here, without torch, for the coordinator that reads it)."""

    rank: int
    step: int
    specs: list[ShardSpec]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WardCopy:
    """What a keeper holds of one ward: the copied blocks at ``step``; every other block of the
    ward is held identically by at least one rank of each tuple in ``replicated_on``."""

    step: int
    replicated_on: tuple[tuple[int, ...], ...] = ()
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """What one rank's buddy keeps of it: ``copied`` indexes the rank's specs that have no
    replica in another failure domain; the rest are on the ranks of ``replicated_on`` (one tuple
    per distinct set of holders)."""

    copied: tuple[int, ...]
    replicated_on: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class Holdings:
    """What one live rank can hand out: its live state at committed step ``live`` and, for each
    ward, the keeper's copy of it (:class:`~elastic_moe.train.peer_copies.WardCopy`)."""

    rank: int | None  # None: the worker holds no layout yet
    live: int | None
    wards: dict[int, WardCopy] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RestoreDecision:
    """Where the next layout's state comes from after a membership change.

    ``step``: the newest committed step at which the live processes hold every block of every
    rank (``None``: no such step; the last committed DCP checkpoint is the fallback).
    ``holders``: for each rank of the old layout, the old rank that hands its blocks out: itself,
    or the keeper of its copy (whose copy holds the blocks without a replica; the replicas come
    from the survivors that hold them, who are their own holders). A lost rank whose blocks all
    have live replicas has no holder.
    """

    step: int | None
    holders: dict[int, int]
    reason: str


def decide_restore(world_size: int, holdings: dict[int, Holdings],
                   plans: Sequence[CopyPlan] | None = None) -> RestoreDecision:
    """Pick the restore point from the survivors' holdings.

    ``holdings``: for each surviving old rank, what ``Trainer.holdings`` reports. Ranks missing
    from it are lost. A lost rank is restorable at step s when, for every set of ranks that holds
    replicas of some of its blocks (``replicated_on``), some rank of the set is alive at s, and a
    survivor keeps a copy of the rest at s. ``plans``: the layout's copy plan (every rank's
    ``CopyPlan``); with it, a rank whose blocks all have replicas needs no keeper. Without it the
    keepers' copies say what they leave out. Newest step first.
    """
    lost = sorted(set(range(world_size)) - set(holdings))
    steps = {int(h.live) for h in holdings.values() if h.live is not None}
    for held in holdings.values():
        steps.update(int(c.step) for c in held.wards.values())
    keepers: dict[int, list[tuple[int, WardCopy]]] = {}
    for keeper, held in sorted(holdings.items()):
        for ward, copy in held.wards.items():
            keepers.setdefault(ward, []).append((keeper, copy))
    for step in sorted(steps, reverse=True):
        live = {r for r, h in holdings.items() if h.live == step}
        holders: dict[int, int] = {}
        replicas = 0
        for rank in range(world_size):
            if rank in live:
                holders[rank] = rank
                continue
            plan = plans[rank] if plans is not None else None
            if plan is not None and not plan.copied:  # every block has replicas
                if not all(not live.isdisjoint(ranks) for ranks in plan.replicated_on):
                    break
                replicas += 1  # no holder: the survivors' own blocks cover it
                continue
            found = next((k for k, copy in keepers.get(rank, []) if k in live
                          and copy.step == step
                          and all(not live.isdisjoint(ranks) for ranks in copy.replicated_on)),
                         None)
            if found is None:
                break
            holders[rank] = found
            replicas += bool(holdings[found].wards[rank].replicated_on)
        else:
            copies = {r: k for r, k in holders.items() if r != k}
            if not lost:
                return RestoreDecision(step, holders, f"step {step}: every rank alive")
            return RestoreDecision(step, holders, f"step {step}: lost ranks {lost}; buddy copies "
                                                  f"(rank: keeper) {copies}; {replicas} of them "
                                                  "with blocks from live replicas")
    return RestoreDecision(None, {}, f"no committed step at which every block of the lost ranks "
                                     f"{lost} is still held (their keepers or replicas are gone "
                                     f"too, or the survivors are at different steps)")
