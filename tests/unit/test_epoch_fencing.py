"""Membership epochs fence commits; a worker's lease ends it when it is cut off or retired.

The coordinator's rules (:class:`CoordinatorState`), the worker's lease thread and commit
admission (:mod:`elastic_moe.actors.lease`) and the checkpointer's admit hook, without Ray.
"""

import pytest
from elastic_moe.actors.coordinator import CoordinatorState
from elastic_moe.actors.lease import Lease, admit_commit
from elastic_moe.actors.messages import LeaseReply

from elastic_moe.checkpoint import (
    COMMIT_FILE,
    Checkpointer,
    CheckpointError,
    CommitRefused,
    TrainState,
)
from elastic_moe.config import ElasticConfig

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _formed(state: CoordinatorState, pids: list[int]) -> int:
    epoch = state.open_epoch()
    state.start_epoch(epoch, len(pids), {}, 0, workers=[
        {"rank": r, "pid": p, "node_id": "n"} for r, p in enumerate(pids)])
    return epoch


def _events(state: CoordinatorState, kind: str) -> list[dict]:
    return [e for e in state.state["events"] if e["kind"] == kind]


def test_only_the_current_formed_epoch_commits(tmp_path):
    state = CoordinatorState("run", str(tmp_path / "coordinator.json"))
    first = _formed(state, [10, 11])
    assert state.admit_commit(first, 4) and state.commit(4, "p4", {}, 0, first)
    state.close_epoch(first)  # the group found the epoch broken: a cut-off rank 0 tries on
    assert not state.admit_commit(first, 8)
    assert not state.commit(8, "p8", {}, 0, first)
    second = state.open_epoch()  # forming: nobody commits
    assert second == first + 1
    assert not state.admit_commit(second, 8) and not state.admit_commit(first, 8)
    state.start_epoch(second, 1, {}, 4, workers=[{"rank": 0, "pid": 10, "node_id": "n"}])
    assert not state.commit(8, "p8", {}, 0, first)  # the old epoch, after the heal
    assert state.admit_commit(second, 8) and state.commit(8, "p8", {}, 0, second)
    assert not state.admit_commit(second, 8)  # never backwards, never twice
    assert state.state["committed"]["step"] == 8 and state.state["committed"]["epoch"] == second
    refused = _events(state, "stale_commit_refused")
    assert [e["epoch"] for e in refused] == [first, first, second, first, first]
    assert {e["step"] for e in refused} == {8}
    assert [e["step"] for e in _events(state, "checkpoint")] == [4, 8]
    # epoch numbers survive a coordinator recreated from its state file
    again = CoordinatorState("run", str(tmp_path / "coordinator.json"))
    assert again.open_epoch() == second + 1


def test_a_growth_rebuild_lets_the_old_epoch_commit_until_the_new_one_forms(tmp_path):
    """No member was lost: the save the group had in flight when it paused for a joiner
    commits while the new epoch forms (the survivors wait for it before they leave), and
    nothing of the old epoch commits once the new one has formed."""
    state = CoordinatorState("run", str(tmp_path / "coordinator.json"))
    first = _formed(state, [10])
    second = state.open_epoch()  # a joiner is taken in; epoch ``first`` was never closed
    assert state.admit_commit(first, 4) and state.commit(4, "p4", {}, 0, first)
    assert not state.admit_commit(second, 5)  # not formed yet
    state.start_epoch(second, 2, {}, 4, workers=[{"rank": 0, "pid": 10, "node_id": "n"},
                                                 {"rank": 1, "pid": 11, "node_id": "n"}])
    assert not state.admit_commit(first, 8) and not state.commit(8, "p8", {}, 0, first)
    assert state.admit_commit(second, 8)
    assert [e["epoch"] for e in _events(state, "stale_commit_refused")] == [second, first, first]


def test_an_epoch_starts_only_with_the_number_it_was_opened_with():
    state = CoordinatorState("run")
    epoch = state.open_epoch()
    with pytest.raises(ValueError, match="newest one opened"):
        state.start_epoch(epoch - 1, 2, {}, 0)


def test_a_member_left_out_of_a_newer_epoch_is_retired():
    state = CoordinatorState("run")
    assert not state.renew_lease(10, None).retired  # a worker that joined nothing yet
    first = _formed(state, [10, 11])
    state.open_epoch()  # 11 is cut off; the group forms again with 10
    assert not state.renew_lease(11, first).retired  # not formed yet: no verdict
    second = state.state["membership_epoch"]
    state.start_epoch(second, 1, {}, 0, workers=[{"rank": 0, "pid": 10, "node_id": "n"}])
    assert not state.renew_lease(10, second).retired
    assert not state.renew_lease(12, None).retired  # a joiner warming up
    reply = state.renew_lease(11, first)  # the link healed
    assert reply == LeaseReply(membership_epoch=second, retired=True)
    assert [e["pid"] for e in _events(state, "worker_retired")] == [11]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_lease_lapses_after_hang_timeout_without_an_answer():
    clock = _Clock()
    replies: list = [LeaseReply(membership_epoch=1, retired=False)]
    lease = Lease(lambda timeout_s: replies.pop(0) if replies else None, hang_timeout_s=3.0,
                  interval_s=1.0, on_end=lambda reason: None, clock=clock)
    assert lease.check() is None and lease.renewed_at == 100.0
    for _ in range(3):  # cut off: no answers, but not yet hang_timeout_s long
        clock.now += 1.0
        assert lease.check() is None
    clock.now += 0.5
    reason = lease.check()
    assert reason is not None and "no ping from the group for 3.5 s" in reason


def test_a_ping_from_the_group_renews_the_lease():
    """A coordinator being restarted answers nothing for a while; the group's pings still
    show the worker is a member."""
    clock = _Clock()
    lease = Lease(lambda timeout_s: None, hang_timeout_s=3.0, interval_s=1.0,
                  on_end=lambda reason: None, clock=clock)
    for _ in range(10):
        clock.now += 1.0
        lease.renewed_by_group()
        assert lease.check() is None
    clock.now += 3.5
    assert lease.check() is not None


def test_a_retired_worker_ends_at_its_first_answer():
    lease = Lease(lambda timeout_s: LeaseReply(membership_epoch=7, retired=True), hang_timeout_s=3.0,
                  interval_s=1.0, on_end=lambda reason: None, clock=_Clock())
    reason = lease.check()
    assert reason is not None and reason.startswith("retired: membership epoch 7")


class _Coordinator:
    def __init__(self, verdict, clock: _Clock | None = None, delay: float = 0.0) -> None:
        self.verdict, self.clock, self.delay = verdict, clock, delay

    def admit_commit(self, epoch: int, step: int, timeout_s: float):
        if self.clock is not None:
            self.clock.now += self.delay
        return self.verdict


def test_commit_admission_refuses_stale_silent_and_late_answers():
    admit_commit(_Coordinator(True), 3, 8, hang_timeout_s=4.0)
    with pytest.raises(CommitRefused, match="epoch 3 may no longer commit step 8"):
        admit_commit(_Coordinator(False), 3, 8, hang_timeout_s=4.0)
    with pytest.raises(CommitRefused, match="did not admit the commit of step 8 within 2 s"):
        admit_commit(_Coordinator(None), 3, 8, hang_timeout_s=4.0)
    clock = _Clock()
    with pytest.raises(CommitRefused, match="came after 2.5 s"):
        admit_commit(_Coordinator(True, clock, delay=2.5), 3, 8, hang_timeout_s=4.0,
                     clock=clock)


def test_a_refused_admission_leaves_no_commit_marker(tmp_path):
    import torch

    model = torch.nn.Linear(2, 2)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, model, None, TrainState(step=1), admit=lambda step: None)

    def refuse(step: int) -> None:
        raise CommitRefused(f"epoch over at step {step}")

    with pytest.raises(CheckpointError, match="epoch over at step 2"):
        ckpt.save(2, model, None, TrainState(step=2), admit=refuse)
    assert ckpt.committed_steps() == [1]
    assert not (tmp_path / "step_00000002" / COMMIT_FILE).exists()


def test_lease_interval_must_fit_several_times_in_hang_timeout():
    ElasticConfig(hang_timeout_s=3.0, lease_interval_s=1.0)
    with pytest.raises(ValueError, match=r"lease_interval_s=2\.0: .*hang_timeout_s / 3"):
        ElasticConfig(hang_timeout_s=3.0, lease_interval_s=2.0)
    with pytest.raises(ValueError, match="lease_interval_s=0"):
        ElasticConfig(lease_interval_s=0)
