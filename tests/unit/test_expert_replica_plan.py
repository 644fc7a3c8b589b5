"""The expert-replica planner and its accounting, against properties checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from elastic_moe.config import apply_overrides, small
from elastic_moe.parallel.expert_replicas import hot_order, plan_replicas, slot_of_expert
from elastic_moe.parallel.mesh import param_counts
from elastic_moe.train.redundancy import redundancy_report


def test_hottest_means_lowest_bias_ties_by_id():
    assert hot_order(torch.tensor([0.0, -0.2, 0.1, -0.2])) == [1, 3, 0, 2]


@pytest.mark.parametrize("num_experts, ep, slots, domains", [
    (8, 4, 2, "aabb"), (8, 4, 1, "aabb"), (16, 4, 3, "abcd"), (8, 2, 4, "ab"),
    (8, 4, 6, "aabb"), (12, 6, 2, "aaabbb"), (8, 4, 2, "aaaa")])
def test_every_rank_gets_its_slots_and_never_its_own_experts(num_experts, ep, slots, domains):
    order = list(reversed(range(num_experts)))
    table = plan_replicas(order, num_experts, ep, slots, list(domains))
    local = num_experts // ep
    want = min(slots, num_experts - local)
    for rank, row in enumerate(table):
        assert len(row) == want and len(set(row)) == want, table
        assert all(e // local != rank for e in row), table


@pytest.mark.parametrize("num_experts, ep, domains", [
    (8, 4, "aabb"), (16, 8, "aaaabbbb"), (12, 6, "aabbcc"), (8, 2, "ab")])
def test_enough_slots_give_every_expert_a_copy_in_another_domain(num_experts, ep, domains):
    local = num_experts // ep
    table = plan_replicas(list(range(num_experts)), num_experts, ep, local, list(domains))
    for e in range(num_experts):
        holders = [r for r in range(ep) if e in table[r]]
        assert any(domains[r] != domains[e // local] for r in holders), (e, table)


def test_spare_slots_go_to_the_hottest_experts():
    # 4 ranks on 2 nodes, 2 experts each, 3 slots: 8 slots make every expert safe, the 4 left
    # go to the hottest experts first (as far as the free slots are on ranks that can take them)
    order = [5, 2, 7, 0, 1, 3, 4, 6]
    table = plan_replicas(order, 8, 4, 3, list("aabb"))
    copies = {e: sum(e in row for row in table) for e in range(8)}
    assert all(copies[e] >= 1 for e in range(8)) and sum(copies.values()) == 12
    assert [copies[e] for e in order[:3]] == [2, 2, 2], copies
    assert [copies[e] for e in order[-3:]] == [1, 1, 1], copies


def test_slots_route_each_expert_to_one_of_its_holders():
    num_experts, ep = 8, 4
    table = plan_replicas(list(range(num_experts)), num_experts, ep, 2, list("aabb"))
    width = num_experts // ep + 2
    used = {}
    for source in range(ep):
        slots = slot_of_expert(table, num_experts, ep, source)
        for e, slot in enumerate(slots):
            rank, index = divmod(slot, width)
            held = index < 2 and rank * 2 + index == e or index >= 2 and table[rank][index - 2] == e
            assert held, (source, e, slot)
            used.setdefault(e, set()).add(rank)
            if rank == source or e in table[source] or e // 2 == source:
                assert rank == source  # a holder computes its own tokens
    # with one copy each, both holders of every expert get some source's tokens
    assert all(len(ranks) == 2 for ranks in used.values()), used


def test_no_copies_without_expert_parallelism_or_slots():
    assert plan_replicas(range(8), 8, 1, 4, ["a"]) == [[]]
    assert plan_replicas(range(8), 8, 4, 0, list("aabb")) == [[], [], [], []]


def test_replicas_remove_the_expert_copies_from_the_accounting():
    # small: 64 experts; 16 workers on 2 nodes of 8, EP over all 16: each expert on one rank
    base = ["parallel.max_workers=16", "parallel.dp_replicate_degree=1",
            "parallel.expert_parallel_degree=16"]
    cfg = apply_overrides(small(), base)
    without = redundancy_report(cfg, 16)
    with_replicas = redundancy_report(apply_overrides(small(), [*base, "parallel.expert_replicas=4"]),
                                      16)
    dense, routed = param_counts(cfg.model)
    dense_local, expert_local = math.ceil(dense / 16), routed // 16
    per_expert = routed // 64
    for rank in without.ranks:  # the buddy copies the dense shard and the 4 experts
        assert rank.held_bytes == 16 * (dense_local + expert_local)
        assert rank.replica_bytes == 0
    for rank in with_replicas.ranks:  # 4 copies of experts owned on the other node: no copy
        assert rank.held_bytes == 16 * dense_local
        assert rank.replica_bytes == 16 * 4 * per_expert
        assert rank.state_bytes == without.ranks[rank.rank].state_bytes
    assert dict(without.losses)["any one node"] and dict(with_replicas.losses)["any one node"]
    assert "expert replicas" in with_replicas.describe()
    # too few slots to cover a rank's 4 experts: the buddy still copies them
    partial = redundancy_report(apply_overrides(small(), [*base, "parallel.expert_replicas=2"]),
                                16)
    # 32 slots, 16 per node: each node's slots take the 16 hottest experts of the other node
    # (ids first while the biases are equal): experts 0-15 (ranks 0-3) and 32-47 (ranks 8-11)
    # get copies. A rank's buddy is the rank at the same position on the other node.
    for rank in partial.ranks:
        covered = rank.rank % 8 < 4  # its ward's experts have copies
        assert rank.held_bytes == 16 * (dense_local + (0 if covered else expert_local)), rank
