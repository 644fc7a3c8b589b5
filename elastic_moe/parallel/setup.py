"""Building this rank's parallel model, and gathering it back (see :mod:`elastic_moe.parallel`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from elastic_moe.config import ModelConfig
from elastic_moe.model.transformer import Transformer
from elastic_moe.parallel.fsdp import parallelize
from elastic_moe.parallel.mesh import MeshPlan, ParallelMeshes, build_mesh


def setup_model(model_cfg: ModelConfig, plan: MeshPlan, device: torch.device | str,
                seed: int, *, meshes: ParallelMeshes | None = None,
                mixed_precision: str | None = None, init_weights: bool = True) -> nn.Module:
    """Build, parallelize and initialize the model for this rank.

    Meta-device build -> expert parallelism + FSDP2/HSDP (``world_size > 1``) -> ``to_empty``
    on ``device`` -> ``init_weights(seed)``. Each rank draws only the row blocks of its own
    shards (:mod:`elastic_moe.model.init`), and the values are those of a single-process
    ``Transformer(cfg).init_weights(seed)`` at any world size and EP degree. A checkpoint
    restore or an ``--init-from`` load overwrites them.

    ``plan.world_size == 1`` returns a plain ``Transformer`` (no process group needed).
    ``mixed_precision`` is ``train.mixed_precision`` (``"bf16"`` or ``"fp32"``; FSDP2's parameter
    and reduce dtypes, see :func:`~elastic_moe.parallel.fsdp.mixed_precision_policy`); callers
    without a config get ``"bf16"`` on CUDA and ``"fp32"`` elsewhere. ``meshes`` defaults to
    ``build_mesh(plan, device.type)``; the default process group must be initialized.
    ``init_weights=False`` leaves the parameters as ``to_empty`` made them (uninitialized
    memory) for a restore that overwrites every one of them and checks so; buffers that are
    not training state are still set.
    """
    device = torch.device(device)
    if mixed_precision is None:
        mixed_precision = "bf16" if device.type == "cuda" else "fp32"
    with torch.device("meta"):
        model = Transformer(model_cfg)
    if plan.world_size > 1:
        if not dist.is_initialized() or dist.get_world_size() != plan.world_size:
            actual = dist.get_world_size() if dist.is_initialized() else None
            raise ValueError(f"plan.world_size={plan.world_size}: the default process group "
                             f"has world size {actual}; init it before setup_model")
        meshes = meshes or build_mesh(plan, device.type)
        parallelize(model, plan, meshes, mixed_precision=mixed_precision)
    model.to_empty(device=device)
    if init_weights:
        model.init_weights(seed)
    else:
        model.init_buffers()
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of every parameter and persistent buffer, on every rank.

    Collective: every rank of the model's meshes must call it.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()
            if isinstance(v, torch.Tensor)}
