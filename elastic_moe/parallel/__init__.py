"""Parallelism: mesh planning, FSDP2/HSDP for dense weights, expert parallelism for experts.

The training loop (per worker, after ``dist.init_process_group``)::

    plan = plan_mesh(world_size, gpus_per_node, cfg.model, cfg.parallel,
                     global_batch_size=cfg.train.global_batch_size)
    model = setup_model(cfg.model, plan, device, seed=cfg.train.seed,
                        mixed_precision=cfg.train.mixed_precision)
    optimizer = build_optimizer(model, cfg.train)
    metrics = train_step(model, optimizer, my_micro_batches, step, cfg.train, cfg.model,
                         batch_fraction=my_sequences / global_batch)

``train_step`` finishes the expert-gradient reduction (:func:`reduce_expert_grads`) and clips
with a norm computed across every mesh. For comparisons and export, :func:`full_state_dict`
gathers unsharded tensors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elastic_moe.parallel.expert_parallel import (
        ExpertParallelExperts,
        all_to_all_rows,
        reduce_expert_grads,
    )
    from elastic_moe.parallel.fsdp import parallelize
    from elastic_moe.parallel.mesh import MeshPlan, ParallelMeshes, build_mesh, plan_mesh
    from elastic_moe.parallel.setup import full_state_dict, setup_model

# Loaded on first use, so that the torch-free submodules (network) can be imported by processes
# that never load torch (Ray's probe tasks on every node at launch).
_HOMES = {"ExpertParallelExperts": "expert_parallel", "all_to_all_rows": "expert_parallel",
          "reduce_expert_grads": "expert_parallel", "parallelize": "fsdp", "MeshPlan": "mesh",
          "ParallelMeshes": "mesh", "build_mesh": "mesh", "plan_mesh": "mesh",
          "full_state_dict": "setup", "setup_model": "setup"}
__all__ = ["ExpertParallelExperts", "MeshPlan", "ParallelMeshes", "all_to_all_rows",
           "build_mesh", "full_state_dict", "parallelize", "plan_mesh", "reduce_expert_grads",
           "setup_model"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
