"""The restore-point policy and buddy choice of live recovery (pure functions)."""

from __future__ import annotations

from elastic_moe.train.elastic import Holdings, decide_restore
from elastic_moe.train.shard_state import buddy_of


def _held(live, own, wards=None):
    return Holdings(rank=None, live=live, own=own, wards=wards or {})


def test_buddies_are_on_another_node_when_there_is_one():
    nodes = ["a", "a", "b", "b"]
    assert [buddy_of(r, nodes) for r in range(4)] == [2, 2, 0, 0]
    assert [buddy_of(r, ["a"] * 3) for r in range(3)] == [1, 2, 0]
    assert buddy_of(0, ["a"]) is None


def test_a_lost_rank_comes_from_its_buddy_at_the_newest_common_step():
    # rank 1 lost; rank 2 keeps its copies of steps 6 and 7; survivors are live at 7
    holdings = {0: _held(7, [6, 7], {2: [6, 7]}), 2: _held(7, [6, 7], {1: [6, 7]})}
    decision = decide_restore(3, holdings)
    assert decision.step == 7
    assert decision.holders == {0: 0, 1: 2, 2: 2}


def test_survivors_roll_back_one_step_when_the_lost_copy_is_older():
    # the exchange after step 8 did not reach rank 2: rank 1's newest copy is step 7
    holdings = {0: _held(8, [7, 8], {2: [7, 8]}), 2: _held(8, [7, 8], {1: [6, 7]})}
    decision = decide_restore(3, holdings)
    assert decision.step == 7 and decision.holders[1] == 2


def test_no_copy_left_means_the_checkpoint():
    holdings = {0: _held(7, [6, 7], {2: [6, 7]})}  # ranks 1 and 2 lost; 2 held 1's copy
    decision = decide_restore(3, holdings)
    assert decision.step is None and "[1, 2]" in decision.reason


def test_everyone_alive_restores_the_live_step():
    holdings = {r: _held(5, [4, 5]) for r in range(2)}
    assert decide_restore(2, holdings).step == 5
