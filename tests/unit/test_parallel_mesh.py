"""Mesh planner: every world size 1..1024, invariants, placement and errors."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from elastic_moe.config import ParallelConfig, debug, deepseek_v3_671b, small
from elastic_moe.parallel.mesh import MeshPlan, estimate_bytes_per_rank, plan_mesh
from elastic_moe.train.step import clip_grad_norm

GPUS_PER_NODE = 8
WORLD_SIZES = range(1, 1025)  # every W the planner is promised for (about 1 s for 3 recipes)
RECIPES = {"debug": debug, "small": small, "deepseek_v3_671b": deepseek_v3_671b}


def _ep_groups(plan: MeshPlan) -> list[list[int]]:
    ep = plan.expert_parallel_degree
    return [list(range(start, start + ep)) for start in range(0, plan.world_size, ep)]


def _check_invariants(plan: MeshPlan, num_experts: int) -> None:
    assert plan.dp_replicate_degree * plan.dp_shard_degree == plan.world_size
    assert plan.dp_shard_degree % plan.expert_parallel_degree == 0
    assert num_experts % plan.expert_parallel_degree == 0
    assert plan.experts_per_rank * plan.expert_parallel_degree == num_experts
    assert plan.expert_replicate_degree * plan.expert_parallel_degree == plan.world_size
    assert math.prod(plan.mesh_shape) == plan.world_size
    assert plan.num_nodes == -(-plan.world_size // plan.gpus_per_node)
    straddles = any(len({r // plan.gpus_per_node for r in group}) > 1
                    for group in _ep_groups(plan))
    assert plan.node_local_ep == (not straddles)
    assert "\n" not in plan.describe()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_world_size_gets_a_node_local_plan(recipe: str) -> None:
    model_cfg = RECIPES[recipe]().model
    num_experts = model_cfg.num_routed_experts
    for world_size in WORLD_SIZES:
        plan = plan_mesh(world_size, GPUS_PER_NODE, model_cfg)
        _check_invariants(plan, num_experts)
        # A node-local plan always exists (ep = 1 at worst), so EP never straddles nodes ...
        assert plan.node_local_ep, plan.describe()
        # ... and the planner takes the largest such ep.
        larger = [d for d in range(plan.expert_parallel_degree + 1, num_experts + 1)
                  if num_experts % d == 0 and plan.dp_shard_degree % d == 0
                  and (world_size <= GPUS_PER_NODE or GPUS_PER_NODE % d == 0)]
        assert not larger, f"W={world_size}: ep {larger} also node-local: {plan.describe()}"
        if world_size > GPUS_PER_NODE and world_size % GPUS_PER_NODE == 0:
            assert plan.dp_shard_degree == GPUS_PER_NODE  # HSDP: shard in node, replicate across
        else:
            assert plan.dp_replicate_degree == 1


def test_v3_shapes() -> None:
    model_cfg = deepseek_v3_671b().model
    plan = plan_mesh(256, 8, model_cfg)
    assert (plan.dp_replicate_degree, plan.dp_shard_degree, plan.expert_parallel_degree) == \
        (32, 8, 8)
    assert plan.expert_group_nodes == ((0,),) * 8  # node-local: every group on the EP node
    # DeepSeek-V3's own layout, EP64 over 8 nodes: one routing group per node.
    plan = plan_mesh(64, 8, model_cfg, ParallelConfig(max_workers=64, expert_parallel_degree=64,
                                                      dp_replicate_degree=1))
    assert plan.expert_group_nodes == tuple((n,) for n in range(8))
    assert not plan.node_local_ep
    # A world size that is not a multiple of the node size: the partial node still holds whole
    # EP groups (ep divides gpus_per_node).
    plan = plan_mesh(12, 8, model_cfg)
    assert plan.expert_parallel_degree == 4 and plan.node_local_ep


def test_memory_budget_moves_ep_across_nodes_only_when_needed() -> None:
    model_cfg = deepseek_v3_671b().model
    prefs = ParallelConfig(max_workers=4096, memory_per_gpu_gib=80)
    with pytest.raises(ValueError, match="memory_per_gpu_gib=80"):
        plan_mesh(64, 8, model_cfg, prefs)
    plan = plan_mesh(256, 8, model_cfg, prefs)
    _check_invariants(plan, model_cfg.num_routed_experts)
    budget = 80 * 2**30
    assert estimate_bytes_per_rank(model_cfg, plan.dp_shard_degree,
                                   plan.expert_parallel_degree) <= budget
    assert not plan.node_local_ep
    # Cross-node only because no node-local degree fits at any dense layout.
    assert estimate_bytes_per_rank(model_cfg, 256, GPUS_PER_NODE) > budget
    # Each routing group's experts sit on few nodes (group-limited routing bounds the fan-out).
    assert all(len(nodes) <= 2 for nodes in plan.expert_group_nodes)
    # The debug model fits anywhere: the budget changes nothing.
    tiny = debug().model
    with_budget = plan_mesh(16, 8, tiny, ParallelConfig(max_workers=16, memory_per_gpu_gib=1))
    without = plan_mesh(16, 8, tiny, ParallelConfig(max_workers=16))
    assert with_budget.mesh_shape == without.mesh_shape


@pytest.mark.parametrize(("world_size", "prefs", "kwargs", "match"), [
    (16, ParallelConfig(max_workers=64, expert_parallel_degree=3), {},
     r"expert_parallel_degree=3: must divide model.num_routed_experts=256; nearest valid: "
     r"\[1, 2, 4, 8\]"),
    (16, ParallelConfig(max_workers=64, expert_parallel_degree=512), {},
     r"more EP ranks than experts"),
    (12, ParallelConfig(max_workers=64, expert_parallel_degree=8), {},
     r"expert_parallel_degree=8: must divide dp_shard=12.*nearest valid: \[2, 4\]"),
    (16, ParallelConfig(max_workers=64, dp_replicate_degree=3), {},
     r"dp_replicate_degree=3: must divide world_size=16; nearest valid: \[1, 2, 4, 8\]"),
    (12, ParallelConfig(min_workers=16, max_workers=32), {},
     r"world_size=12: must be in \[parallel.min_workers=16.*nearest valid size: 16"),
    (12, None, {"global_batch_size": 8},
     r"world_size=12: more workers than sequences.*=8; nearest valid size: 8"),
    (0, None, {}, r"world_size=0: must be positive"),
])
def test_impossible_requests_name_the_rule_and_nearest_sizes(world_size, prefs, kwargs,
                                                            match) -> None:
    with pytest.raises(ValueError, match=match):
        plan_mesh(world_size, 8, deepseek_v3_671b().model, prefs, **kwargs)


def test_uneven_batch_split_is_allowed() -> None:
    plan = plan_mesh(6, 8, debug().model, global_batch_size=16)
    assert plan.world_size == 6


def test_plan_round_trips() -> None:
    plan = plan_mesh(24, 8, small().model)
    assert MeshPlan.from_dict(plan.to_dict()) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_clip_grad_norm_plain_tensors_matches_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params, strict=True):
        c.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(copies, 0.5)
    got = clip_grad_norm(params, 0.5)
    torch.testing.assert_close(got, want)
    for c, p in zip(copies, params, strict=True):
        torch.testing.assert_close(p.grad, c.grad)
    # max_norm = 0: report only, no clipping
    before = [p.grad.clone() for p in params]
    clip_grad_norm(params, 0.0)
    for b, p in zip(before, params, strict=True):
        torch.testing.assert_close(p.grad, b)
