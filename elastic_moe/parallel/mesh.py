"""Mesh planning: how a world of W workers is split for dense weights and routed experts.

Implements docs/architecture.md "Mesh planning". Every worker is a data-parallel rank (it trains on its own
slice of the global batch). On top of that:

* dense weights (attention, norms, dense FFN, shared experts, embeddings, head) use HSDP:
  ``W = dp_replicate x dp_shard``; parameters are sharded over ``dp_shard`` and replicated over
  ``dp_replicate`` (FSDP2 ``fully_shard`` with a 2-D mesh; plain FSDP when ``dp_replicate = 1``);
* routed experts use expert parallelism: ``ep`` contiguous ranks split the experts
  (``E / ep`` each) and exchange tokens with all-to-all; the ``W / ep`` ranks holding the same
  experts average their gradients (``expert_replicate``).

The device mesh is 3-D, ``(dp_replicate, dp_shard_mod_ep, ep)`` with ``dp_shard =
dp_shard_mod_ep x ep``, so an EP group is a contiguous block of ranks inside one FSDP shard group
and -- when ``ep`` divides the GPUs per node -- inside one node (NVLink inside, network across).
Group-limited routing (DeepSeek-V3 sec. 2.1.2, ``num_limited_groups`` of ``num_expert_groups``)
bounds how many nodes one token's experts live on; :attr:`MeshPlan.expert_group_nodes` records
which node (relative to the EP group's first node) holds each routing group's experts.

The planner is a pure function of (W, GPUs per node, model config, preferences): no process
group, no device, so it is tested for every W from 1 to 1024.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, astuple, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

from elastic_moe.config import ModelConfig, ParallelConfig

logger = logging.getLogger(__name__)

# fp32 master weight + fp32 gradient + two fp32 Adam moments; activations are not counted.
TRAIN_BYTES_PER_PARAM = 16


@dataclass(frozen=True, slots=True)
class MeshPlan:
    """A layout for one world size; picklable, so the coordinator can hand it to workers."""

    world_size: int
    gpus_per_node: int
    num_nodes: int  # ceil(world_size / gpus_per_node); the last node may be partial
    dp_replicate_degree: int  # HSDP replicas of the dense weights
    dp_shard_degree: int  # FSDP shards of the dense weights; dp_replicate x dp_shard = W
    expert_parallel_degree: int  # ranks that split the routed experts; divides dp_shard and E
    num_routed_experts: int
    num_expert_groups: int
    # For each routing group, the nodes (offsets from the EP group's first node) that hold its
    # experts; one node per group when the experts of a group fit on one node.
    expert_group_nodes: tuple[tuple[int, ...], ...]
    node_local_ep: bool  # every EP group lies inside one node
    reason: str  # why these degrees were chosen (one line)

    @property
    def experts_per_rank(self) -> int:
        return self.num_routed_experts // self.expert_parallel_degree

    @property
    def dp_shard_mod_ep_degree(self) -> int:
        return self.dp_shard_degree // self.expert_parallel_degree

    @property
    def expert_replicate_degree(self) -> int:
        """Ranks holding the same experts; their expert gradients are summed."""
        return self.world_size // self.expert_parallel_degree

    @property
    def dp_degree(self) -> int:
        """Data-parallel ranks (every rank trains on its own slice of the global batch)."""
        return self.world_size

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.dp_replicate_degree, self.dp_shard_mod_ep_degree,
                self.expert_parallel_degree)

    def describe(self) -> str:
        hsdp = (f"HSDP {self.dp_replicate_degree}x{self.dp_shard_degree}"
                if self.dp_replicate_degree > 1 else f"FSDP {self.dp_shard_degree}")
        return (f"W={self.world_size} on {self.num_nodes} node(s) x {self.gpus_per_node}: "
                f"dense {hsdp}; EP {self.expert_parallel_degree} "
                f"({self.experts_per_rank} of {self.num_routed_experts} experts/rank, "
                f"{'node-local' if self.node_local_ep else 'across nodes'}, "
                f"x{self.expert_replicate_degree} replicas); {self.reason}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MeshPlan:
        state = dict(state)
        state["expert_group_nodes"] = tuple(tuple(n) for n in state["expert_group_nodes"])
        return cls(**state)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(candidates: list[int], value: int, limit: int = 2) -> list[int]:
    """Up to ``limit`` candidates below and above ``value`` (the 'nearest valid sizes')."""
    below = sorted(c for c in candidates if c < value)[-limit:]
    above = sorted(c for c in candidates if c > value)[:limit]
    return below + above


def _ep_is_node_local(ep: int, world_size: int, gpus_per_node: int) -> bool:
    # EP groups are blocks of `ep` contiguous ranks; such blocks never cross a node boundary
    # iff the block size divides the node size (or everything is one node).
    return world_size <= gpus_per_node or gpus_per_node % ep == 0


def _expert_group_nodes(num_experts: int, num_groups: int, ep: int,
                        gpus_per_node: int) -> tuple[tuple[int, ...], ...]:
    experts_per_rank = num_experts // ep
    experts_per_group = num_experts // num_groups
    out = []
    for group in range(num_groups):
        first, last = group * experts_per_group, (group + 1) * experts_per_group - 1
        first_node = (first // experts_per_rank) // gpus_per_node
        last_node = (last // experts_per_rank) // gpus_per_node
        out.append(tuple(range(first_node, last_node + 1)))
    return tuple(out)


_GIVEN_COUNTS: dict[tuple, tuple[int, int]] = {}


def param_counts(model_cfg: ModelConfig) -> tuple[int, int]:
    """(dense, routed-expert) parameter counts, MTP included (it trains too)."""
    key = astuple(model_cfg)
    return _GIVEN_COUNTS.get(key) or _param_counts_cached(key)


def remember_param_counts(model_cfg: ModelConfig, counts: tuple[int, int]) -> None:
    """Take ``model_cfg``'s :func:`param_counts` as given (counted by another process): the
    coordinator plans layouts without building a model, so it never loads torch."""
    _GIVEN_COUNTS[astuple(model_cfg)] = (int(counts[0]), int(counts[1]))


@functools.lru_cache(maxsize=8)
def _param_counts_cached(key: tuple) -> tuple[int, int]:
    from elastic_moe.model.transformer import count_parameters

    names = [f.name for f in fields(ModelConfig)]
    model_cfg = ModelConfig(**dict(zip(names, key, strict=True)))
    counts = count_parameters(model_cfg)
    routed = ((model_cfg.num_moe_layers + model_cfg.num_mtp_modules)
              * model_cfg.num_routed_experts * 3 * model_cfg.dim * model_cfg.moe_inter_dim)
    return counts.total + counts.mtp - routed, routed


def replica_slots(num_experts: int, ep: int, requested: int) -> int:
    """Expert copies each EP rank holds for ``parallel.expert_replicas = requested``: none
    without expert parallelism, and at most the ``E - E / ep`` experts the rank does not own."""
    return min(max(requested, 0), num_experts - num_experts // ep) if ep > 1 else 0


def estimate_bytes_per_rank(model_cfg: ModelConfig, dp_shard: int, ep: int) -> int:
    """Training-state bytes per rank: dense weights / dp_shard + routed experts / ep."""
    dense, routed = param_counts(model_cfg)
    return TRAIN_BYTES_PER_PARAM * (math.ceil(dense / dp_shard) + math.ceil(routed / ep))


def plan_mesh(world_size: int, gpus_per_node: int, model_cfg: ModelConfig,
              prefs: ParallelConfig | None = None, *,
              global_batch_size: int | None = None) -> MeshPlan:
    """Choose ``dp_replicate x dp_shard`` and the expert-parallel degree for ``world_size``.

    Rules (each violation is a ``ValueError`` naming the value, the rule and the nearest valid
    sizes):

    * ``prefs.min_workers <= world_size <= prefs.max_workers`` when ``prefs`` is given;
    * ``world_size <= global_batch_size`` (when given): every data-parallel rank needs at least
      one sequence (uneven shares are fine, ``train_step`` weights them);
    * dense: ``dp_replicate`` (``prefs.dp_replicate_degree``, or auto: one replica per full node
      when ``world_size`` is a multiple of ``gpus_per_node`` and spans several nodes, so
      parameter all-gathers stay on NVLink; otherwise 1 = plain FSDP) divides ``world_size``;
    * experts: ``ep`` divides ``num_routed_experts`` and ``dp_shard``. Auto picks the largest
      node-local ``ep`` (more ranks per expert set = fewer expert weights per rank, all-to-all
      on NVLink). With ``prefs.memory_per_gpu_gib`` set, an ``ep`` whose training state does not
      fit is skipped, and EP groups spanning nodes are used only when no node-local one fits.
    """
    prefs = prefs or ParallelConfig(min_workers=1, max_workers=max(world_size, 1 << 20),
                                    gpus_per_node=max(gpus_per_node, 1))
    if world_size <= 0:
        raise ValueError(f"world_size={world_size!r}: must be positive")
    if gpus_per_node <= 0:
        raise ValueError(f"gpus_per_node={gpus_per_node!r}: must be positive")
    if not prefs.min_workers <= world_size <= prefs.max_workers:
        nearest = min(max(world_size, prefs.min_workers), prefs.max_workers)
        raise ValueError(f"world_size={world_size}: must be in [parallel.min_workers="
                         f"{prefs.min_workers}, parallel.max_workers={prefs.max_workers}]; "
                         f"nearest valid size: {nearest}")
    if global_batch_size is not None and world_size > global_batch_size:
        # Uneven splits are fine (train_step weights each rank by its share and pads short
        # ranks' micro-batches); a rank without any sequence is not.
        raise ValueError(f"world_size={world_size}: more workers than sequences in "
                         f"train.global_batch_size={global_batch_size}; nearest valid size: "
                         f"{min(global_batch_size, prefs.max_workers)}")
    num_nodes = -(-world_size // gpus_per_node)
    num_experts = model_cfg.num_routed_experts
    reasons = []

    # --- dense weights: HSDP candidates, most preferred first
    if prefs.dp_replicate_degree > 0:
        replicate_options = [prefs.dp_replicate_degree]
        if world_size % prefs.dp_replicate_degree != 0:
            raise ValueError(f"parallel.dp_replicate_degree={prefs.dp_replicate_degree}: must "
                             f"divide world_size={world_size}; nearest valid: "
                             f"{_nearest(_divisors(world_size), prefs.dp_replicate_degree)}")
    elif world_size > gpus_per_node and world_size % gpus_per_node == 0:
        # One replica per node keeps FSDP all-gathers on NVLink; fewer replicas (shards that span
        # nodes) only when the experts need a cross-node EP group that a node cannot hold.
        replicate_options = sorted(_divisors(world_size // gpus_per_node), reverse=True)
    else:
        replicate_options = [1]

    budget = int(prefs.memory_per_gpu_gib * 2**30)

    def fits(dp_shard: int, ep: int) -> bool:
        return budget <= 0 or estimate_bytes_per_rank(model_cfg, dp_shard, ep) <= budget

    errors = []
    for dp_replicate in replicate_options:
        dp_shard = world_size // dp_replicate
        valid_ep = _divisors(math.gcd(num_experts, dp_shard))
        if prefs.expert_parallel_degree > 0:
            ep = prefs.expert_parallel_degree
            if num_experts % ep != 0 or dp_shard % ep != 0:
                rule = (f"must divide model.num_routed_experts={num_experts}"
                        if num_experts % ep != 0 else
                        f"must divide dp_shard={dp_shard} (world_size={world_size} / "
                        f"dp_replicate={dp_replicate})")
                if ep > num_experts:
                    rule += " (more EP ranks than experts)"
                errors.append(f"parallel.expert_parallel_degree={ep}: {rule}; nearest valid: "
                              f"{_nearest(valid_ep, ep)}")
                continue
            if not fits(dp_shard, ep):
                need = estimate_bytes_per_rank(model_cfg, dp_shard, ep) / 2**30
                errors.append(f"parallel.expert_parallel_degree={ep}: needs ~{need:.1f} GiB of "
                              f"training state per rank > parallel.memory_per_gpu_gib="
                              f"{prefs.memory_per_gpu_gib}; larger degrees that fit: "
                              f"{[d for d in valid_ep if d > ep and fits(dp_shard, d)]}")
                continue
            ep_reason = f"ep={ep} requested"
        else:
            local = [d for d in valid_ep if _ep_is_node_local(d, world_size, gpus_per_node)]
            local_fit = [d for d in local if fits(dp_shard, d)]
            remote_fit = [d for d in valid_ep if d not in local and fits(dp_shard, d)]
            if local_fit:
                ep = max(local_fit)
                ep_reason = "largest node-local ep" + (" that fits memory" if budget else "")
            elif remote_fit:
                ep = min(remote_fit)
                ep_reason = "no node-local ep fits memory: smallest cross-node ep that does"
            else:
                need = estimate_bytes_per_rank(model_cfg, dp_shard, max(valid_ep)) / 2**30
                errors.append(f"world_size={world_size}: even ep={max(valid_ep)} with dp_shard="
                              f"{dp_shard} needs ~{need:.1f} GiB of training state per rank > "
                              f"parallel.memory_per_gpu_gib={prefs.memory_per_gpu_gib}; use "
                              f"more workers or raise the budget")
                continue
        if prefs.dp_replicate_degree > 0:
            reasons.append(f"dp_replicate={dp_replicate} requested")
        elif dp_replicate > 1:
            reasons.append("dense shards inside a node, replicas across nodes"
                           if dp_shard == gpus_per_node else
                           f"dense shards span {dp_shard // gpus_per_node} nodes so EP fits")
        else:
            reasons.append("dense weights sharded over all ranks")
        reasons.append(ep_reason)
        break
    else:
        # The last option is the most permissive (largest dp_shard): its reason is the one to fix.
        raise ValueError(errors[-1])
    plan = MeshPlan(
        world_size=world_size, gpus_per_node=gpus_per_node, num_nodes=num_nodes,
        dp_replicate_degree=dp_replicate, dp_shard_degree=dp_shard, expert_parallel_degree=ep,
        num_routed_experts=num_experts, num_expert_groups=model_cfg.num_expert_groups,
        expert_group_nodes=_expert_group_nodes(num_experts, model_cfg.num_expert_groups, ep,
                                               gpus_per_node),
        node_local_ep=_ep_is_node_local(ep, world_size, gpus_per_node),
        reason="; ".join(reasons))
    return plan


@dataclass(frozen=True)
class ParallelMeshes:
    """The meshes one rank uses; all are views of one root mesh over the whole world."""

    dense: DeviceMesh  # FSDP2 mesh: 2-D (dp_replicate, dp_shard) for HSDP, else 1-D dp_shard
    ep: DeviceMesh  # 1-D: ranks that split the routed experts (the all-to-all group)
    expert_replicate: DeviceMesh  # 1-D: ranks holding the same experts (gradient all-reduce)
    full: DeviceMesh  # 3-D (dp_replicate, dp_shard_mod_ep, ep): the whole layout


def build_mesh(plan: MeshPlan, device_type: str) -> ParallelMeshes:
    """Build the named meshes of ``plan`` (``device_type`` ``"cuda"`` or ``"cpu"``).

    The root mesh is ``(dp_replicate, dp_shard)``; ``dp_shard`` is unflattened into
    ``(dp_shard_mod_ep, ep)`` so an EP group is a block of ``ep`` contiguous ranks inside one FSDP
    shard group, and ``expert_replicate`` flattens ``(dp_replicate, dp_shard_mod_ep)``. Needs an
    initialized default process group of ``plan.world_size`` ranks.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type={device_type!r}: must be 'cuda' or 'cpu'")
    root = init_device_mesh(device_type, (plan.dp_replicate_degree, plan.dp_shard_degree),
                            mesh_dim_names=("dp_replicate", "dp_shard"))
    full = root._unflatten(1, (plan.dp_shard_mod_ep_degree, plan.expert_parallel_degree),
                           ("dp_shard_mod_ep", "ep"))
    meshes = ParallelMeshes(
        dense=root if plan.dp_replicate_degree > 1 else root["dp_shard"],
        ep=full["ep"],
        expert_replicate=full["dp_replicate", "dp_shard_mod_ep"]._flatten("expert_replicate"),
        full=full)
    logger.debug("mesh: %s", plan.describe())  # rank 0's loop logs the plan once
    return meshes


def forget_layout_caches() -> None:
    """Drop torch's DTensor sharding caches; call after the last use of the old layout (the
    process group destroyed, its state exported) and before building the meshes of a new
    membership in the same process, on the thread that builds and trains (some caches are
    thread-local).

    DTensor caches sharding decisions keyed by specs whose meshes compare equal when they have the
    same shape and names, whatever process group and rank they were built on. A process that
    rebuilds an equal-looking mesh at a new rank (a survivor renumbered after a peer left) would
    otherwise get the old mesh back from those caches -- with its old coordinate -- and FSDP
    would shard its parameters for the wrong rank.
    """
    import torch
    from torch.distributed.tensor import DTensor, _redistribute
    from torch.distributed.tensor._sharding_prop import LocalLRUCache

    propagator = DTensor._op_dispatcher.sharding_propagator
    # thread-local caches: a new object clears them for every thread, not only the caller's
    propagator.propagate_op_sharding = LocalLRUCache(propagator.propagate_op_sharding_non_cached)
    propagator._propagate_tensor_meta_cached.cache_clear()
    _redistribute._gen_transform_infos.cache_clear()
    clear_native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_native is not None:
        clear_native()
