"""Expert parallelism: routed experts split over the ``ep`` ranks, tokens moved by all-to-all.

DeepSeek-V3 trains with expert parallelism and all-to-all dispatch/combine (arXiv:2412.19437
sec. 3.2.2). Here one module, :class:`ExpertParallelExperts`, replaces each ``RoutedExperts``
with the same forward signature. Per layer and step:

1. permute: sort this rank's T*K routed rows by expert; since each EP rank owns a contiguous
   range of ``L = E / ep`` experts, this also sorts them by destination rank;
2. exchange the per-expert row counts (one small ``all_to_all_single``), then the rows
   (``all_to_all_single`` with uneven splits);
3. regroup the received rows by local expert and run ``elastic_moe.kernels.expert_mlp`` (the model's expert
   function boundary) on the local experts;
4. send the results back with the reverse all-to-all and unpermute + combine with the gate
   weights, exactly as the single-process reference does.

Autograd runs through both all-to-alls (:class:`_AllToAll`: backward is the all-to-all with the
splits swapped). Weights are DTensors ``Shard(0)`` on the expert dim over the ``ep`` mesh, so
checkpoints (DCP) reshard them to any other EP degree. The ``W / ep`` ranks holding the same
experts sum their gradients in :func:`reduce_expert_grads`.

With load-driven expert replicas (``parallel.expert_replicas``,
:mod:`elastic_moe.parallel.expert_replicas`) each rank also holds ``C`` copies of other ranks'
experts. Rows are then sorted by *slot* instead of expert: rank p's slots are its L own experts
followed by its C copies, and a source sends a replicated expert's rows to one of its holders
(itself when it holds one). Everything else above is unchanged, with L + C slots per rank.

Legend: T = tokens on this rank, K = experts per token, E = routed experts, L = experts on this
rank (E / P), P = EP degree, D = model dim, I = expert hidden dim, H = 2 * I,
M = routed rows sent by this rank (T * K), R = rows received by this rank, C = replica slots
per rank, S = slots on this rank (L + C).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

import elastic_moe.kernels as kernels
from elastic_moe.model.moe import RoutedExperts

logger = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state, carried by expert replicas


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on rows with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x_MD: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out_RD = x_MD.new_empty((sum(output_splits), *x_MD.shape[1:]))
        with torch.profiler.record_function("ep/all_to_all"):
            dist.all_to_all_single(out_RD, x_MD.contiguous(), output_splits, input_splits,
                                   group=group)
        return out_RD

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):  # type: ignore[override]
        grad_MD = grad_RD.new_empty((sum(ctx.input_splits), *grad_RD.shape[1:]))
        with torch.profiler.record_function("ep/all_to_all"):
            dist.all_to_all_single(grad_MD, grad_RD.contiguous(), ctx.input_splits,
                                   ctx.output_splits, group=ctx.group)
        return grad_MD, None, None, None


def all_to_all_rows(x_MD: torch.Tensor, output_splits: list[int], input_splits: list[int],
                    group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 (row ``splits`` per peer rank)."""
    return _AllToAll.apply(x_MD, output_splits, input_splits, group)


@dataclass(eq=False)
class ExpertReplicas:
    """This rank's copies of other ranks' experts for one layer, and the routing they imply.

    ``table[p]`` lists the experts EP rank p holds copies of (the same on every rank);
    ``slot_of_expert_E`` maps each expert to the global slot (``p * S + local slot``) this rank
    sends its rows to. The copies train like the experts they copy: their gradients are summed
    with the owner's (:func:`~elastic_moe.parallel.expert_replicas.send_replica_grads`, then
    ``return_replica_grads``) and
    ``optimizer`` runs the owner's AdamW update on them, so they stay equal bit for bit.
    """

    table: list[list[int]]
    slot_of_expert_E: torch.Tensor
    w13_CHD: torch.Tensor  # leaf tensors with requires_grad, not nn.Parameters: no FSDP, no DCP
    w2_CDI: torch.Tensor
    optimizer: torch.optim.Optimizer
    group_index: int  # the param group of the owner's expert weights in the main optimizer

    @property
    def num_slots(self) -> int:
        return len(self.table[0]) if self.table else 0


class ExpertParallelExperts(RoutedExperts):
    """Routed experts sharded over the ``ep`` mesh; a drop-in for ``RoutedExperts``.

    Subclasses ``RoutedExperts`` so ``Transformer.init_weights`` (which draws each rank's
    experts from per-row-block seeded generators) and parameter accounting treat it the same
    way. ``compute_dtype`` (bf16 on GPU) casts the fp32 master
    weights for the expert matmuls; gradients flow back to the fp32 weights.
    """

    def __init__(self, experts: RoutedExperts, ep_mesh: DeviceMesh,
                 expert_replicate_mesh: DeviceMesh | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        if ep_mesh.ndim != 1:
            raise ValueError(f"ep_mesh.ndim={ep_mesh.ndim}: expert parallelism needs a 1-D mesh")
        ep_degree = ep_mesh.size()
        if experts.num_experts % ep_degree != 0:
            raise ValueError(f"expert_parallel_degree={ep_degree}: must divide "
                             f"num_routed_experts={experts.num_experts}")
        self.num_experts = experts.num_experts
        self.backend = experts.backend
        self.ep_degree = ep_degree
        self.num_local_experts = experts.num_experts // ep_degree
        self.ep_rank = ep_mesh.get_local_rank()
        self.ep_group = ep_mesh.get_group()
        self.expert_replicate_group = (expert_replicate_mesh.get_group()
                                       if expert_replicate_mesh is not None
                                       and expert_replicate_mesh.size() > 1 else None)
        self.compute_dtype = compute_dtype
        self.w13 = nn.Parameter(self._shard(experts.w13, ep_mesh))
        self.w2 = nn.Parameter(self._shard(experts.w2, ep_mesh))
        # copies of other ranks' hot experts, set per layout by expert_replicas.assign_replicas
        self.replicas: ExpertReplicas | None = None
        # routed rows this rank's experts (and copies) computed in forwards since the last reset:
        # the rank's expert load (a host count the all-to-all already needs; for benchmarks)
        self.rows_computed = 0

    def _shard(self, full_E: torch.Tensor, ep_mesh: DeviceMesh) -> DTensor:
        start = self.ep_rank * self.num_local_experts
        local_L = full_E.detach()[start:start + self.num_local_experts]
        if local_L.device.type != "meta":
            local_L = local_L.clone()  # own storage: do not keep the full tensor alive
        return DTensor.from_local(local_L, ep_mesh, [Shard(0)], run_check=False)

    def replica_blocks(self, prefix: str) -> list[tuple[str, torch.Tensor, tuple[int, ...],
                                                        tuple[int, ...]]]:
        """(key, block, global shape, offset) of each replica's expert row, keyed as the owner's
        tensor (``model/<fqn>``, ``optim/<fqn>/<moment>``; ``prefix`` is this module's fqn),
        for :class:`~elastic_moe.train.shard_state.ShardLayout`."""
        if self.replicas is None:
            return []
        replicas = self.replicas
        own = replicas.table[self.ep_rank]
        out = []
        for name, param, copy in (("w13", self.w13, replicas.w13_CHD),
                                  ("w2", self.w2, replicas.w2_CDI)):
            fqn = f"{prefix}.{name}" if prefix else name
            state = replicas.optimizer.state[copy]
            for j, expert in enumerate(own):
                offset = (expert,) + (0,) * (copy.dim() - 1)
                out.append((f"model/{fqn}", copy.detach()[j:j + 1], tuple(param.shape), offset))
                out += [(f"optim/{fqn}/{m}", state[m][j:j + 1], tuple(param.shape), offset)
                        for m in MOMENTS]
        return out

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slot weights: its own experts, then its replicas (when it has any)."""
        w13_LHD = self.w13.to_local() if isinstance(self.w13, DTensor) else self.w13
        w2_LDI = self.w2.to_local() if isinstance(self.w2, DTensor) else self.w2
        parts13, parts2 = [w13_LHD], [w2_LDI]
        if self.replicas is not None and self.replicas.num_slots:
            parts13.append(self.replicas.w13_CHD)
            parts2.append(self.replicas.w2_CDI)
        if self.compute_dtype is not None:  # cast, then join: no fp32 copy of the joined slots
            parts13 = [p.to(self.compute_dtype) for p in parts13]
            parts2 = [p.to(self.compute_dtype) for p in parts2]
        if len(parts13) == 1:
            return parts13[0], parts2[0]
        return torch.cat(parts13), torch.cat(parts2)

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                topk_weights_TK: torch.Tensor) -> torch.Tensor:
        top_k = topk_ids_TK.shape[1]
        w13_SHD, w2_SDI = self.local_weights()
        if self.compute_dtype is not None:
            x_TD = x_TD.to(self.compute_dtype)
        num_local, slot_ids_TK = self.num_local_experts, topk_ids_TK
        if self.replicas is not None and self.replicas.num_slots:  # planned only for ep > 1
            num_local += self.replicas.num_slots
            slot_ids_TK = self.replicas.slot_of_expert_E[topk_ids_TK]  # on the weights' device
        order_M, counts_G = kernels.permute_reference(slot_ids_TK, num_local * self.ep_degree)
        x_MD = kernels.gather_reference(x_TD, order_M, top_k)
        if self.ep_degree == 1:
            with torch.profiler.record_function("ep/experts"):
                y_MD = kernels.expert_mlp(x_MD, counts_G, w13_SHD, w2_SDI, self.backend)
        else:
            y_MD = self._dispatch_compute_combine(x_MD, counts_G, w13_SHD, w2_SDI, num_local)
        return _combine(y_MD, order_M, topk_weights_TK)

    def _dispatch_compute_combine(self, x_MD: torch.Tensor, counts_G: torch.Tensor,
                                  w13_LHD: torch.Tensor, w2_LDI: torch.Tensor,
                                  num_local: int) -> torch.Tensor:
        """``counts_G``: rows per global slot (``P * num_local`` of them, rank-major)."""
        num_peers = self.ep_degree
        # Counts first: each rank learns how many rows each peer sends to each local slot.
        send_counts_PL = counts_G.view(num_peers, num_local).contiguous()
        recv_counts_PL = torch.empty_like(send_counts_PL)
        with torch.profiler.record_function("ep/all_to_all"):
            dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.ep_group)
        # One host sync per layer: all_to_all_single needs the split sizes on the host.
        input_splits = send_counts_PL.sum(dim=1).tolist()
        output_splits = recv_counts_PL.sum(dim=1).tolist()
        self.rows_computed += sum(output_splits)
        recv_RD = all_to_all_rows(x_MD, output_splits, input_splits, self.ep_group)
        # Received rows are ordered (source rank, local expert); the expert MLP wants them
        # grouped by local expert. Stable sort keeps each source's rows in order.
        local_ids_PL = torch.arange(num_local, device=x_MD.device).repeat(num_peers)
        expert_of_row_R = torch.repeat_interleave(local_ids_PL, recv_counts_PL.flatten())
        by_expert_R = torch.argsort(expert_of_row_R, stable=True)
        with torch.profiler.record_function("ep/experts"):
            y_sorted_RD = kernels.expert_mlp(recv_RD.index_select(0, by_expert_R),
                                             recv_counts_PL.sum(dim=0), w13_LHD, w2_LDI,
                                             self.backend)
        y_RD = y_sorted_RD.index_select(0, torch.argsort(by_expert_R))
        return all_to_all_rows(y_RD, input_splits, output_splits, self.ep_group)


def _combine(y_MD: torch.Tensor, order_M: torch.Tensor,
             topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """``elastic_moe.kernels.unpermute_reference`` that also takes T = 0 (its ``view(T, K, -1)`` cannot).

    A rank without tokens must still run this, so its backward joins the all-to-alls.
    """
    num_tokens, top_k = topk_weights_TK.shape
    unsorted_MD = torch.empty_like(y_MD)
    unsorted_MD[order_M] = y_MD
    y_TKD = unsorted_MD.view(num_tokens, top_k, y_MD.shape[-1])
    return (y_TKD * topk_weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)


def expert_parallel_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


@torch.no_grad()
def reduce_expert_grads(model: nn.Module) -> None:
    """Sum routed-expert gradients over the ranks holding the same experts.

    FSDP reduces dense gradients itself; expert weights live outside FSDP (sharded over ``ep``,
    replicated over ``expert_replicate``), so their gradients are summed here: one all-reduce
    over a flat buffer for all layers. SUM, not AVG: the loss is already scaled by
    ``1 / data-parallel size`` (and gloo has no AVG). Call once per step, after the last
    micro-batch's backward and before clipping. A no-op without expert parallelism.
    """
    modules = [m for m in expert_parallel_modules(model) if m.expert_replicate_group is not None]
    if not modules:
        return
    group = modules[0].expert_replicate_group
    grads = []
    for module in modules:
        for param in (module.w13, module.w2):
            if param.grad is None:
                param.grad = torch.zeros_like(param)  # keep the collective the same on all ranks
            grad = param.grad
            grads.append(grad.to_local() if isinstance(grad, DTensor) else grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    with torch.profiler.record_function("ep/grad_all_reduce"):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()
