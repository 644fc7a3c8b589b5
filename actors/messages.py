"""What crosses the actor boundary between the control loop and the training workers.

Every call between :mod:`elastic_moe.actors.worker_group` (in the coordinator) and
:class:`elastic_moe.actors.train_worker.TrainWorker` takes and returns one of these types, not a
dict: a field renamed on one side is an error on the other, not a silent ``KeyError`` at the
first failure. The coordinator's lease reply is here too. (The coordinator's run record is a
JSON document, persisted as such: :meth:`CoordinatorState.snapshot`.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from elastic_moe.train.elastic import CopyPlan, Holdings, WardCopy
from elastic_moe.train.failure_policy import StepReport

__all__ = ["CopyPlan", "EpochSpec", "Holdings", "JoinReport", "LeaseReply", "LoopState", "PingReply",
           "RestoreSource", "Status", "TrainOutcome", "WardCopy", "WorkerInfo", "WorkerRaised"]


class Status(str, enum.Enum):
    """How a worker's ``train()`` ended."""

    FINISHED = "finished"  # trained to train.steps
    PAUSED = "paused"  # the vote paused the group at a step boundary (a join, a stop)
    BROKEN = "broken"  # a peer was lost: the step broke
    ERROR = "error"  # the run's own code or data raised
    DIVERGED = "diverged"  # train.max_skipped_steps non-finite steps in a row: roll back


class LoopState(str, enum.Enum):
    """Where the control loop is (the coordinator's record: ``loop_state``)."""

    FORMING = "forming"  # starting workers and forming the first group
    TRAINING = "training"  # the members train; the loop watches them
    RECOVERING = "recovering"  # a member was lost or a step broke: rebuilding
    ROLLING_BACK = "rolling_back"  # non-finite steps in a row: back to a checkpoint
    GROWING = "growing"  # the group paused to take joiners in
    STOPPING = "stopping"  # paused on request: saving the step, then ending
    FINISHED = "finished"
    FAILED = "failed"


class RestoreSource(str, enum.Enum):
    """Where a joining worker's state comes from."""

    SHARDS = "shards"  # the survivors' live state and peer copies
    CHECKPOINT = "checkpoint"  # the last committed DCP checkpoint
    FRESH = "fresh"  # initialised (or published weights: checkpoint.init_from)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Who a worker is: its process, node and named actor."""

    pid: int
    node_id: str
    ip: str  # the node's Ray address: a rank hosting the rendezvous store listens there
    name: str  # the detached actor's name: a restarted coordinator finds it by that


@dataclass(frozen=True, slots=True)
class EpochSpec:
    """One membership epoch as one worker sees it."""

    epoch: int
    rank: int
    world_size: int
    plan: dict[str, Any]  # MeshPlan.to_dict()
    master_addr: str
    master_port: int
    node_of_rank: list[str]  # node id of every rank (buddies go to another node)
    restore: RestoreSource
    checkpoint_step: int | None = None  # with RestoreSource.CHECKPOINT
    # a rollback: after restoring checkpoint_step, go on from this step and data position
    # ({"step": s, "position": DataPosition dict}); the batches in between are skipped
    skip_to: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class JoinReport:
    """What a worker reports once it has joined an epoch."""

    rank: int
    step: int  # the step its state is at
    marks: dict[str, float]  # wall-clock marks of the join (join_start, group_ready, ...)
    copy_bytes_per_step: int  # what it forwards to its buddy every step (gradients)
    redundancy_bytes: int  # host memory it holds for its wards (copies, gradient buffers)
    copied_bytes_by_kind: dict[str, int] = field(default_factory=dict)  # dense / experts
    # rank 0: every rank's copy plan of the layout (what has replicas, what its buddy copies)
    copy_plans: list[CopyPlan] | None = None
    # training state of its expert copies (parallel.expert_replicas): weights, grads, moments
    expert_replica_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PingReply:
    """Liveness, the step reached and the metrics of committed steps the loop has not logged."""

    step: int
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)


@dataclass(slots=True)
class TrainOutcome:
    status: Status
    step: int
    error: str | None = None  # FINISHED too: the final checkpoint could not be written
    expert_loads: Any = None  # numpy [num_moe_layers, E] of the last step (FINISHED only)
    report: StepReport | None = None  # BROKEN and ERROR: why the step ended
    # DIVERGED: the first skipped step and the data position after the last one
    first_skipped: int | None = None
    position: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """The coordinator's answer to a worker's lease renewal."""

    membership_epoch: int  # the newest epoch opened
    retired: bool  # a newer epoch formed without this worker: it must stop


class WorkerRaised(RuntimeError):
    """A worker's call raised an exception of torch (or another library the coordinator does
    not load): sent as this instead, with the type's name in the message, so that reading the
    error never imports torch into the coordinator (seconds, in the middle of a recovery)."""
