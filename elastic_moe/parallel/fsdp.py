"""FSDP2 / HSDP wrapping of the dense weights; routed experts go to expert parallelism.

Per transformer block (and per MTP block, then the root) ``fully_shard`` on the dense mesh:
1-D ``dp_shard`` (FSDP, ZeRO-3) or 2-D ``(dp_replicate, dp_shard)`` (HSDP: shard inside a node,
all-reduce across replicas). Mixed precision follows ``train.mixed_precision``: ``"bf16"`` gathers
parameters in bf16 for compute and reduces gradients in fp32 (fp32 master weights and optimizer
state stay sharded); ``"fp32"`` does everything in fp32. With ``ep > 1`` each ``RoutedExperts`` is replaced by
:class:`~elastic_moe.parallel.expert_parallel.ExpertParallelExperts` and its parameters are
ignored by FSDP; with ``ep = 1`` FSDP shards the experts like any other weight.

Gradient reduction uses SUM, never AVG: gloo has no ``ReduceOp.AVG`` (and FSDP2 would otherwise
pick AVG or PREMUL_SUM), and ``train_step`` already scales the loss by ``1 / data-parallel
size`` (its ``batch_fraction``), so a plain sum gives the gradient of the global-batch mean.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from elastic_moe.model.moe import moe_layers
from elastic_moe.parallel.expert_parallel import ExpertParallelExperts, expert_parallel_modules
from elastic_moe.parallel.mesh import MeshPlan, ParallelMeshes

logger = logging.getLogger(__name__)


def apply_expert_parallel(model: nn.Module, plan: MeshPlan, meshes: ParallelMeshes, *,
                          compute_dtype: torch.dtype | None = None) -> int:
    """Replace every ``RoutedExperts`` with its EP shard; returns how many were replaced."""
    if plan.expert_parallel_degree == 1:
        return 0
    count = 0
    for moe in moe_layers(model):
        moe.experts = ExpertParallelExperts(moe.experts, meshes.ep, meshes.expert_replicate,
                                            compute_dtype=compute_dtype)
        count += 1
    return count


def mixed_precision_dtype(mixed_precision: str) -> torch.dtype | None:
    """The compute dtype of ``train.mixed_precision``: bf16, or None for plain fp32."""
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp32":
        return None
    raise ValueError(f"train.mixed_precision={mixed_precision!r}: must be 'bf16' or 'fp32'")


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """FSDP2 policy: bf16 parameters for compute with fp32 gradient reduction, or all fp32."""
    dtype = mixed_precision_dtype(mixed_precision)
    return MixedPrecisionPolicy(param_dtype=dtype or torch.float32, reduce_dtype=torch.float32)


def parallelize(model: nn.Module, plan: MeshPlan, meshes: ParallelMeshes, *,
                mixed_precision: str) -> nn.Module:
    """Apply expert parallelism and FSDP2/HSDP to a ``Transformer`` in place (meta or real).

    ``mixed_precision`` is ``train.mixed_precision``: ``"bf16"`` (bf16 params for compute, fp32
    reduction; the expert-parallel experts compute in bf16 too) or ``"fp32"``. Returns the same
    module object (now an ``FSDPModule``).
    """
    compute_dtype = mixed_precision_dtype(mixed_precision)
    num_ep = apply_expert_parallel(model, plan, meshes, compute_dtype=compute_dtype)
    ignored = {p for m in expert_parallel_modules(model) for p in m.parameters()}
    mp_policy = mixed_precision_policy(mixed_precision)
    layers = cast(nn.ModuleList, model.layers)
    mtp = cast(nn.ModuleList, model.mtp)
    # MTP: only the block is its own unit; ``shared_head.norm`` is called from the root's
    # forward, outside the MTP module's, so its small params stay with the root unit.
    units: list[nn.Module] = [*layers, *(cast(nn.Module, module.block) for module in mtp)]
    # The root unit comes last: it keeps embedding, final norm and lm_head (shared with MTP).
    for unit in [*units, model]:
        fully_shard(unit, mesh=meshes.dense, mp_policy=mp_policy,
                    ignored_params=ignored or None)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
    logger.debug("parallelized: %d FSDP units on %s, %d MoE layers with EP=%d (%s)",
                 len(units) + 1, meshes.dense, num_ep, plan.expert_parallel_degree,
                 "bf16 params / fp32 reduce" if compute_dtype else "fp32")
    return model
