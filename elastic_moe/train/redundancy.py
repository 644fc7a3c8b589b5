"""What the peer copies cost and cover, for any recipe and world size, from shapes alone.

``jobs/train.py --describe --workers W`` prints it. The accounting uses the same planners the
workers run: the mesh plan (:func:`elastic_moe.parallel.mesh.plan_mesh`) says which blocks each
rank holds and where their replicas are, and :func:`~elastic_moe.train.peer_copies.plan_copies`
and :func:`~elastic_moe.train.peer_copies.buddies` say what each buddy copies. The losses are
checked with the restore policy itself (:func:`~elastic_moe.train.elastic.decide_restore`).

Per rank the dense weights are one FSDP block (``dense / dp_shard``, replicated over
``dp_replicate``); the routed experts are one block too: with ``ep = 1`` FSDP-sharded like the
dense weights, with ``ep > 1`` an expert-parallel shard (``E / ep`` experts) held identically by
the ``W / ep`` ranks of its expert-replicate group. Small replicated tensors (router biases, Adam
step counts) are left out. With ``parallel.expert_replicas`` each rank also holds copies of
other ranks' experts (one block per expert, planned by
:func:`~elastic_moe.parallel.expert_replicas.plan_replicas` as at the start of a run, when the
router biases are all equal, so the same copies in every layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elastic_moe.config import Config
from elastic_moe.parallel.expert_replicas import plan_replicas
from elastic_moe.parallel.mesh import TRAIN_BYTES_PER_PARAM, MeshPlan, param_counts, plan_mesh
from elastic_moe.train.elastic import CopyPlan, Holdings, WardCopy, decide_restore
from elastic_moe.train.peer_copies import buddies, failure_domains, plan_copies
from elastic_moe.train.shard_state import ShardSpec

COPY_BYTES_PER_PARAM = 16  # fp32 weight + two Adam moments + the forwarded gradient's buffer
GRAD_BYTES_PER_PARAM = 4  # what travels per step for each copied parameter
OLD_BYTES_PER_PARAM = 4 * 12  # before: two own snapshots + two copies per ward, weights+moments


@dataclass(frozen=True, slots=True)
class RankRedundancy:
    rank: int
    state_bytes: int  # training state: fp32 weights, gradients, two Adam moments
    held_bytes: int  # host memory held for the wards this rank keeps
    sent_bytes_per_step: int  # gradients forwarded to its buddy each step
    wards: int
    replica_bytes: int = 0  # training state of its expert replicas (copies of others' experts)


@dataclass(frozen=True, slots=True)
class RedundancyReport:
    recipe: str
    plan: MeshPlan
    ranks: list[RankRedundancy]
    losses: list[tuple[str, bool]]  # (scenario, survived without storage)
    replicated_fraction: float  # of one rank's training state, held identically in another domain

    def describe(self) -> str:
        gib = 2**30
        state = max(r.state_bytes for r in self.ranks)
        held = max(r.held_bytes for r in self.ranks)
        sent = max(r.sent_bytes_per_step for r in self.ranks)
        replicas = max(r.replica_bytes for r in self.ranks)
        plan = self.plan
        lines = [
            f"{self.recipe} at W={plan.world_size} ({plan.num_nodes} node(s) of "
            f"{plan.gpus_per_node}): {plan.describe()}",
            "per worker (the largest over the ranks):",
            f"  training state (fp32 weights, gradients, 2 Adam moments): {state / gib:10.3f} GiB",
            f"  held for redundancy (buddy copies of the blocks without a replica in another "
            f"failure domain, with their gradient buffers): {held / gib:.3f} GiB = "
            f"{held / max(state, 1):.2f}x the training state",
            f"  replicated in another failure domain (no copy needed): "
            f"{self.replicated_fraction:.0%} of the training state",
            f"  copied per step (gradients to the buddy): {sent / gib:.3f} GiB",
            f"  expert replicas (parallel.expert_replicas, training state of the copies; their "
            f"gradients go to and from their owners each step): {replicas / gib:.3f} GiB = "
            f"{replicas / max(state, 1):.2f}x the training state",
            f"  before (two own snapshots + two copies per ward): "
            f"{OLD_BYTES_PER_PARAM * state / TRAIN_BYTES_PER_PARAM / gib:.3f} GiB",
            "losses survived without reading storage:"]
        lines += [f"  {what}: {'yes' if ok else 'no (the last committed checkpoint)'}"
                  for what, ok in self.losses]
        return "\n".join(lines)


def _blocks(plan: MeshPlan, dense: int, routed: int,
            replicas: list[list[int]]) -> list[list[ShardSpec]]:
    dense_local = math.ceil(dense / plan.dp_shard_degree)
    ep = plan.expert_parallel_degree
    shards = plan.dp_shard_degree if ep == 1 else ep
    expert_local = math.ceil(routed / shards)
    per_expert = routed // plan.num_routed_experts
    out = []
    for rank in range(plan.world_size):
        dense_index = rank % plan.dp_shard_degree
        expert_index = rank % shards
        out.append([
            ShardSpec("dense", "float32", (dense_local,), (dense_local * plan.dp_shard_degree,),
                      (dense_index * dense_local,)),
            ShardSpec("experts", "float32", (expert_local,), (expert_local * shards,),
                      (expert_index * expert_local,)),
            *[ShardSpec("experts", "float32", (per_expert,), (expert_local * shards,),
                        (e * per_expert,), replica=True) for e in replicas[rank % ep]]])
    return out


def _survives(lost: set[int], plans: list[CopyPlan], keeper: list[int | None]) -> bool:
    world = len(plans)
    holdings = {r: Holdings(rank=r, live=1, wards={}) for r in range(world) if r not in lost}
    for ward, k in enumerate(keeper):
        if k is not None and k in holdings:
            holdings[k].wards[ward] = WardCopy(1, plans[ward].replicated_on)
    return decide_restore(world, holdings, plans).step is not None


def redundancy_report(cfg: Config, world_size: int) -> RedundancyReport:
    plan = plan_mesh(world_size, cfg.parallel.gpus_per_node, cfg.model, cfg.parallel,
                     global_batch_size=cfg.train.global_batch_size)
    dense, routed = param_counts(cfg.model)
    nodes = [f"node{r // plan.gpus_per_node}" for r in range(world_size)]
    ep = plan.expert_parallel_degree
    table = plan_replicas(list(range(plan.num_routed_experts)), plan.num_routed_experts, ep,
                          cfg.parallel.expert_replicas, failure_domains(nodes)[:ep])
    specs = _blocks(plan, dense, routed, table)
    plans = plan_copies(specs, nodes)
    keeper: list[int | None] = list(buddies(nodes)) if cfg.elastic.peer_copies \
        else [None] * world_size
    ranks = []
    for rank in range(world_size):
        own = sum(s.numel for s in specs[rank] if not s.replica)
        copied = sum(specs[rank][i].numel for i in plans[rank].copied) \
            if keeper[rank] is not None else 0
        wards = [w for w, k in enumerate(keeper) if k == rank]
        held = sum(specs[w][i].numel for w in wards for i in plans[w].copied)
        replica = sum(s.numel for s in specs[rank] if s.replica)
        ranks.append(RankRedundancy(rank, TRAIN_BYTES_PER_PARAM * own,
                                    COPY_BYTES_PER_PARAM * held, GRAD_BYTES_PER_PARAM * copied,
                                    len(wards), TRAIN_BYTES_PER_PARAM * replica))
    own0 = sum(s.numel for s in specs[0] if not s.replica)
    replicated = 1.0 - sum(specs[0][i].numel for i in plans[0].copied) / max(own0, 1)
    losses = _losses(plan, nodes, plans, keeper)
    return RedundancyReport(cfg.name, plan, ranks, losses, replicated)


def _losses(plan: MeshPlan, nodes: list[str], plans: list[CopyPlan],
            keeper: list[int | None]) -> list[tuple[str, bool]]:
    by_node: dict[str, set[int]] = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, set()).add(rank)
    order = list(by_node)
    out = []
    if len(order) == 1:  # one node: the failure domain is the worker
        world = plan.world_size
        out.append(("any one worker", all(_survives({r}, plans, keeper) for r in range(world))))
        if world >= 3:
            out.append(("two neighbouring workers (a rank and its buddy)",
                        _survives({0, 1}, plans, keeper)))
        if world >= 4:
            out.append(("two workers that are not neighbours", _survives({0, 2}, plans, keeper)))
        return out
    out.append(("any one node", all(_survives(by_node[n], plans, keeper) for n in order)))
    if len(order) >= 3:
        out.append(("two neighbouring nodes in the buddy ring",
                    _survives(by_node[order[0]] | by_node[order[1]], plans, keeper)))
    if len(order) >= 4:
        out.append(("two nodes that are not neighbours",
                    _survives(by_node[order[0]] | by_node[order[2]], plans, keeper)))
    return out
