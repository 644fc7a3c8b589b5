"""One optimizer step: micro-batches -> gradient accumulation -> clip -> AdamW -> router biases.

The learning rate of each step comes from an :class:`~elastic_moe.train.lr_schedule.LRSchedule`.
Aux-loss-free bias updates happen after the optimizer step with loads summed over the global batch
(all ranks).

A step whose loss or gradient norm is not finite on any rank is skipped on every rank (the commit
vote carries each rank's flag): gradients are dropped, and no parameter, Adam moment or router
bias changes, as Megatron-Core and torchtitan refuse to apply a non-finite step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from elastic_moe.config import ModelConfig, TrainConfig
from elastic_moe.model.moe import (
    apply_router_bias_update,
    clear_expert_loads,
    global_expert_loads,
    moe_layers,
)
from elastic_moe.parallel.expert_parallel import reduce_expert_grads
from elastic_moe.parallel.expert_replicas import (
    drop_replica_grads,
    replica_grads,
    return_replica_grads,
    send_replica_grads,
    step_replicas,
)
from elastic_moe.parallel.fsdp import mixed_precision_dtype
from elastic_moe.train.lr_schedule import LRSchedule


class ShardLocalAdamW(torch.optim.AdamW):
    """torch's AdamW, with the update of each DTensor parameter run on its local shard.

    AdamW is element-wise, so a shard's update needs nothing but that shard: the result is the
    same, bit for bit, as the update through DTensor (the same kernels on the same local
    tensors). What it saves is DTensor's dispatch: every one of the ~10 ops per parameter asks
    the sharding propagator for its output layout, and a new layout starts with empty caches,
    which made the first step after every rebuild 0.35 s slower on the CPU box. The state stays
    DTensor (state dicts, checkpoints and the peer copies are unchanged). A parameter whose
    gradient or moments have another layout than its own keeps the DTensor path.
    """

    def _init_group(self, group: dict[str, Any], *lists: Any) -> Any:
        has_complex = super()._init_group(group, *lists)
        # the aligned lists (parameters, gradients, moments): every list as long as the first
        params = lists[0]
        aligned = [items for items in lists
                   if isinstance(items, list) and len(items) == len(params)]
        for i, param in enumerate(params):
            if not isinstance(param, DTensor):
                continue
            layout = (param.device_mesh, param.placements)
            if all(isinstance(items[i], DTensor)
                   and (items[i].device_mesh, items[i].placements) == layout
                   for items in aligned if items[i] is not None
                   and items[i].dim() > 0):  # scalar step counts are plain tensors
                for items in aligned:
                    if isinstance(items[i], DTensor):
                        items[i] = items[i].to_local()  # a view: updated in place
        return has_complex


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (:class:`ShardLocalAdamW`); no weight decay on norms and other 1-D parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return ShardLocalAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                           foreach=False)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.mixed_precision`` on ``device`` (CUDA or CPU): bf16, or None
    (fp32, autocast off). It matches the FSDP2 parameter dtype ``setup_model`` applies."""
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device={device}: autocast supports cuda and cpu")
    return mixed_precision_dtype(cfg.mixed_precision)


@dataclass
class StepMetrics:
    step: int
    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    lr: float
    tokens: int  # tokens in the global batch
    seconds: float
    expert_stats: dict[str, float] = field(default_factory=dict)
    expert_loads: torch.Tensor | None = None  # [num_moe_layers, E], global batch
    skipped: bool = False  # non-finite on some rank: nothing was applied

    def as_dict(self) -> dict[str, float]:
        out = {"loss": self.loss, "lm_loss": self.lm_loss, "mtp_loss": self.mtp_loss,
               "balance_loss": self.balance_loss, "grad_norm": self.grad_norm, "lr": self.lr,
               "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
               "step_skipped": float(self.skipped)}
        out.update(self.expert_stats)
        return out


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float,
                   also_scale: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Total L2 gradient norm over all parameters (and clipping when ``max_norm`` > 0).

    Works for plain tensors and for DTensors on different meshes (dense weights on the FSDP
    mesh, routed experts on the EP mesh), where ``torch.nn.utils.clip_grad_norm_`` fails: the
    squared norm of each (mesh, placements) layout is computed from local shards and summed over
    the mesh dims the layout is sharded on (never over replicated dims), in float64. Every rank
    returns the same norm. Collective when any gradient is a DTensor. ``also_scale``: gradients
    that are clipped with the same coefficient but not counted (copies of counted ones: the
    expert replicas).
    """
    params = [p for p in parameters if p.grad is not None]
    # Insertion-ordered: parameter order is identical on every rank, so are the collectives.
    squares: dict[Any, torch.Tensor] = {}
    locals_: list[torch.Tensor] = []
    for param in params:
        grad = param.grad
        assert grad is not None
        key: Any = None
        if isinstance(grad, DTensor):
            key = (grad.device_mesh, tuple(grad.placements))
            grad = grad.to_local()
        locals_.append(grad)
        sq = grad.detach().to(torch.float64).pow(2).sum()
        squares[key] = squares[key] + sq if key in squares else sq
    total = torch.zeros((), dtype=torch.float64)
    for key, sq in squares.items():
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if placement.is_shard() or placement.is_partial():
                    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        total = total + sq.cpu()
    norm = total.sqrt()
    if max_norm > 0:
        coef = min(max_norm / (float(norm) + 1e-6), 1.0)
        if coef < 1.0:
            for grad in [*locals_, *also_scale]:
                grad.mul_(coef)
    return norm.to(torch.float32)


def _sum_over_ranks(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        # SUM (never AVG: gloo lacks it); callers pre-weight each rank's share.
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def max_over_ranks(value: int, group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())


def _zero_weight_pass(model: nn.Module, batch: dict[str, Any], device: torch.device,
                      amp: torch.dtype | None, train_cfg: TrainConfig) -> None:
    """Forward + backward that joins every collective but changes no gradient or load count."""
    loads = [(m, m.tokens_per_expert.clone()) for m in moe_layers(model)]
    doc_ids = batch.get("doc_ids")
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(batch["input_ids"].to(device), batch["labels"].to(device),
                    doc_ids.to(device) if doc_ids is not None else None,
                    mtp_loss_weight=train_cfg.mtp_loss_weight)
    (out.loss * 0.0).backward()
    for module, counts in loads:
        module.tokens_per_expert.copy_(counts)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[dict[str, Any]], step: int, train_cfg: TrainConfig,
               model_cfg: ModelConfig, *, dp_size: int = 1,
               group: dist.ProcessGroup | None = None,
               batch_fraction: float | None = None,
               commit_vote: Callable[[bool], bool] | None = None,
               lr_schedule: LRSchedule | None = None) -> StepMetrics:
    """Run one optimizer step over this rank's micro-batches of the global batch.

    ``batch_fraction`` is this rank's share of the global batch (its sequences / global batch
    size); ranks may hold different shares (an uneven split after a resize). Default: an even
    split, ``1 / dp_size``. Each micro-batch loss (a mean over its tokens) is scaled by
    ``batch_fraction * rows / rows on this rank``, so gradients summed over ranks (FSDP
    reduce-scatter with SUM, the expert all-reduce) equal the gradient of the mean over the
    global batch's sequences -- equal to the single-process step on the same batch. Reported
    losses are the same weighted means, summed over ``group`` (default: the whole world);
    ``tokens`` is the global batch's token count.

    ``commit_vote(nonfinite)`` is the step's last collective, after the gradients are reduced:
    it takes this rank's non-finite flag and returns whether every rank may apply the step.
    Without a vote the step is skipped when it is non-finite here.

    ``lr_schedule`` gives the step's learning rate; default: ``train_cfg``'s schedule, unscaled.
    """
    start = time.perf_counter()
    if batch_fraction is None:
        batch_fraction = 1.0 / dp_size
    if not 0.0 < batch_fraction <= 1.0:
        raise ValueError(f"batch_fraction={batch_fraction!r}: must be in (0, 1]")
    device = next(model.parameters()).device
    amp = autocast_dtype(train_cfg, device)
    lr = (lr_schedule or LRSchedule.from_config(train_cfg)).at(step)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    model.train()
    if not micro_batches:
        raise ValueError("micro_batches=[]: every rank needs at least one sequence")
    rows_local = sum(int(batch["input_ids"].shape[0]) for batch in micro_batches)
    sums = torch.zeros(5, dtype=torch.float64)  # 4 weighted losses + tokens
    # FSDP all-gathers and EP all-to-alls run once per forward/backward on every rank, so all
    # ranks must run the same number of micro-batches. After an uneven split (a resize) a rank
    # with fewer pads with zero-weight passes over its last micro-batch (no gradient, no loads).
    num_passes = max_over_ranks(len(micro_batches), group)
    for index in range(num_passes):
        if index >= len(micro_batches):
            _zero_weight_pass(model, micro_batches[-1], device, amp, train_cfg)
            continue
        batch = micro_batches[index]
        doc_ids = batch.get("doc_ids")
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(batch["input_ids"].to(device), batch["labels"].to(device),
                        doc_ids.to(device) if doc_ids is not None else None,
                        mtp_loss_weight=train_cfg.mtp_loss_weight)
        weight = batch_fraction * int(batch["input_ids"].shape[0]) / rows_local
        (out.loss * weight).backward()
        sums += torch.tensor([weight * out.loss.item(), weight * out.lm_loss.item(),
                              weight * out.mtp_loss.item(), weight * out.balance_loss.item(),
                              out.num_tokens], dtype=torch.float64)
    # Expert weights live outside FSDP: sum their gradients over the ranks that hold them.
    send_replica_grads(model)  # expert copies' gradients into their owners' (EP group)
    reduce_expert_grads(model)
    return_replica_grads(model)  # the owners' totals back to the copies
    grad_norm = clip_grad_norm(model.parameters(), train_cfg.grad_clip,
                               also_scale=replica_grads(model))
    loads_LE = global_expert_loads(model, group)
    totals = _sum_over_ranks(sums, group)
    nonfinite = not (math.isfinite(float(sums[0])) and math.isfinite(float(totals[0]))
                     and math.isfinite(float(grad_norm)))
    apply = commit_vote(nonfinite) if commit_vote is not None else not nonfinite
    if not apply:
        optimizer.zero_grad(set_to_none=True)
        drop_replica_grads(model)
        clear_expert_loads(model)
        return StepMetrics(step=step, loss=float(totals[0]), lm_loss=float(totals[1]),
                           mtp_loss=float(totals[2]), balance_loss=float(totals[3]),
                           grad_norm=float(grad_norm), lr=lr, tokens=int(totals[4]),
                           seconds=time.perf_counter() - start, skipped=True)
    optimizer.step()
    step_replicas(model, optimizer)  # the same update on the expert copies
    optimizer.zero_grad(set_to_none=True)
    expert_stats, loads = apply_router_bias_update(model, loads_LE, model_cfg.bias_update_speed)
    return StepMetrics(step=step, loss=float(totals[0]), lm_loss=float(totals[1]),
                       mtp_loss=float(totals[2]), balance_loss=float(totals[3]),
                       grad_norm=float(grad_norm), lr=lr, tokens=int(totals[4]),
                       seconds=time.perf_counter() - start, expert_stats=expert_stats,
                       expert_loads=loads)
