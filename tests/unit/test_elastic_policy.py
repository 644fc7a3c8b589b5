"""The restore-point policy, the buddy choice and the copy plan of live recovery (pure)."""

from __future__ import annotations

import pytest

from elastic_moe.train.elastic import Holdings, WardCopy, decide_restore
from elastic_moe.train.peer_copies import buddies, plan_copies
from elastic_moe.train.shard_state import ShardSpec


def _held(live, wards=None):
    return Holdings(rank=None, live=live, wards=wards or {})


def test_buddies_are_on_the_next_node_one_ward_each():
    nodes = ["a", "a", "b", "b"]
    assert buddies(nodes) == [2, 3, 0, 1]
    # nodes of 8 ranks: no rank keeps more than one ward (the old ring gave rank 8 all of them)
    nodes = ["a"] * 8 + ["b"] * 8 + ["c"] * 8
    keepers = buddies(nodes)
    assert sorted(keepers) == list(range(24))
    assert all(nodes[k] != nodes[r] for r, k in enumerate(keepers))
    assert buddies(["a"] * 3) == [1, 2, 0]
    assert buddies(["a"]) == [None]


def _spec(key, offset):
    return ShardSpec(key, "float32", (2,), (4,), (offset,))


def test_the_copy_plan_leaves_out_blocks_replicated_on_another_node():
    # HSDP over two nodes: ranks 0 and 2 hold one dense half, 1 and 3 the other; the expert
    # block of rank 1 exists nowhere else
    specs = [[_spec("model/w", 0)], [_spec("model/w", 2), _spec("model/e", 0)],
             [_spec("model/w", 0)], [_spec("model/w", 2)]]
    plans = plan_copies(specs, ["a", "a", "b", "b"])
    assert [p.copied for p in plans] == [(), (1,), (), ()]
    assert plans[0].replicated_on == ((2,),) and plans[1].replicated_on == ((3,),)
    # the same blocks with both replicas on one node: a node loss takes both, so both are copied
    plans = plan_copies(specs, ["a", "b", "a", "b"])
    assert [p.copied for p in plans] == [(0,), (0, 1), (0,), (0,)]


def test_a_lost_rank_comes_from_its_keeper_at_the_live_step():
    holdings = {0: _held(7, {2: WardCopy(7)}), 2: _held(7, {1: WardCopy(7)})}
    decision = decide_restore(3, holdings)
    assert decision.step == 7
    assert decision.holders == {0: 0, 1: 2, 2: 2}


def test_a_copy_counts_only_with_a_live_replica_of_what_it_leaves_out():
    # rank 1's copy (on rank 2) leaves out blocks that rank 3 holds; rank 0 keeps rank 3's copy
    ones = WardCopy(7, replicated_on=((3,),))
    alive = {0: _held(7, {3: WardCopy(7)}), 2: _held(7, {1: ones}), 3: _held(7)}
    decision = decide_restore(4, alive)
    assert decision.step == 7 and decision.holders == {0: 0, 1: 2, 2: 2, 3: 3}
    assert "replicas" in decision.reason
    # ranks 1 and 3 lost: rank 3's own blocks come from its copy, but the blocks rank 1's copy
    # left out had their only other holder in rank 3's live state
    lost_both = {0: _held(7, {3: WardCopy(7)}), 2: _held(7, {1: ones})}
    assert decide_restore(4, lost_both).step is None


def test_no_copy_left_means_the_checkpoint():
    holdings = {0: _held(7, {2: WardCopy(7)})}  # ranks 1 and 2 lost; 2 held 1's copy
    decision = decide_restore(3, holdings)
    assert decision.step is None and "[1, 2]" in decision.reason


def test_survivors_at_different_steps_mean_the_checkpoint():
    # a rank lost inside the commit vote: rank 0 applied step 8, rank 2 did not
    holdings = {0: _held(8, {2: WardCopy(8)}), 2: _held(7, {1: WardCopy(7)})}
    assert decide_restore(3, holdings).step is None


def test_everyone_alive_restores_the_live_step():
    holdings = {r: _held(5) for r in range(2)}
    assert decide_restore(2, holdings).step == 5


def test_with_the_copy_plan_a_fully_replicated_rank_needs_no_keeper():
    # HSDP over three nodes (ranks 0,1 | 2,3 | 4,5): ranks 0, 2, 4 hold one half, 1, 3, 5 the
    # other; nothing is copied. Rank 0 and its keeper (rank 2) lost: rank 4 still holds it
    specs = [[ShardSpec("model/w", "float32", (2,), (4,), (2 * (r % 2),))] for r in range(6)]
    plans = plan_copies(specs, ["a", "a", "b", "b", "c", "c"])
    assert all(not p.copied for p in plans) and plans[0].replicated_on == ((2, 4),)
    alive = {r: _held(9) for r in (1, 3, 4, 5)}
    assert decide_restore(6, alive).step is None  # the keepers' word is gone with them
    decision = decide_restore(6, alive, plans)
    assert decision.step == 9 and decision.holders == {1: 1, 3: 3, 4: 4, 5: 5}
    # every holder of one half lost: nothing holds it
    assert decide_restore(6, {r: _held(9) for r in (1, 3, 5)}, plans).step is None


@pytest.mark.parametrize("old,new", [(2, 2), (1, 2), (2, 3), (3, 2), (4, 3), (5, 8), (8, 5)])
def test_the_early_pull_guesses_the_old_ranks_whose_fsdp_rows_a_new_rank_needs(old, new):
    """Against FSDP2's own cut: ``torch.chunk`` of the rows in rank order. For every new rank,
    the guess is exactly the old ranks whose rows overlap its rows (rows a multiple of both
    sizes, so the chunks are even)."""
    import torch
    from elastic_moe.actors.train_worker import _likely_sources

    rows = torch.arange(old * new * 3)
    old_chunks = [set(c.tolist()) for c in rows.chunk(old)]
    for rank, chunk in enumerate(rows.chunk(new)):
        wanted = [k for k, held in enumerate(old_chunks) if held & set(chunk.tolist())]
        assert list(_likely_sources(rank, new, old)) == wanted, (rank, wanted)
