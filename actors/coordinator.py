"""The run coordinator: one named, detached actor per run; the run's record across restarts.

The elastic worker group (:mod:`elastic_moe.actors.worker_group`) decides membership and drives every
change; the coordinator is where it writes down what must outlive any process: the membership
epoch and world-size history with each epoch's mesh plan, cause, pause and the workers' pids,
the last *committed* DCP checkpoint (a restore from storage never goes back past it) with its
data position, the MLflow run id, the last committed step, and every resize and failure event.
Its state is also written to ``state_path`` on each change, so a coordinator recreated after a
cluster restart (or a resubmitted job with ``--resume``) carries on.

Every membership epoch has a number, handed out here (:meth:`CoordinatorState.open_epoch`, once
per attempt to form a group) and never reused, across launcher restarts too. Checkpoint commits
are accepted only from the newest formed epoch, until it is found broken or a newer one forms
(:meth:`CoordinatorState.admit_commit`
before the commit marker is written, :meth:`CoordinatorState.commit` after): a worker cut off by
a partition, which no signal reaches, can still write to shared storage, and whatever it tries
after the group moved on is refused (``stale_commit_refused``). Workers renew a lease here
(:meth:`CoordinatorState.renew_lease`, :mod:`elastic_moe.actors.lease`); the reply tells an old
member that the group has formed without it.

The actor that holds this record and runs the control loop is
:class:`elastic_moe.actors.run_loop.Coordinator`. Workers and the launcher talk to it through
:class:`CoordinatorClient`, the one place where its methods are called by name over Ray.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from typing import Any, Protocol

import ray
from elastic_moe.actors.messages import LeaseReply

log = logging.getLogger(__name__)

NAMESPACE = "elastic-moe"
HEARTBEAT_PERSIST_S = 5.0


def actor_name(run_name: str) -> str:
    return f"coordinator:{run_name}"


def _locked(method: Any) -> Any:
    """Serialise a :class:`CoordinatorState` method: the actor serves the workers' calls on
    several threads while its control loop runs on another."""

    @functools.wraps(method)
    def locked(self: CoordinatorState, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class CoordinatorState:
    """Plain-Python coordinator logic (the actor wraps it); JSON-serializable state."""

    def __init__(self, run_name: str, state_path: str | None = None) -> None:
        self._lock = threading.RLock()
        self.state_path = state_path
        self._last_saved = 0.0
        self.state: dict[str, Any] = {
            "run_name": run_name,
            # the newest membership epoch's number (opened; formed once in world_sizes)
            "membership_epoch": 0,
            # the newest *formed* membership epoch, and whether it may still commit: it may
            # until the group finds it broken (close_epoch) or a newer epoch forms; a growth
            # rebuild that is still forming lets the old epoch's save in flight commit
            "formed_epoch": 0,
            "epoch_open": False,
            "world_sizes": [],  # [{epoch, world_size, plan, time, cause, restored_step}]
            "committed": None,  # {step, path, data_position, tokens_seen, time}
            "events": [],  # [{time, kind, step, ...}]
            "mlflow_run_id": None,
            "last_step": -1,  # highest step completed by any epoch
            "last_heartbeat": None,
            # the current epoch's workers: [{rank, pid, node_id, name, slot}] (named actors: a
            # restarted coordinator takes them over)
            "workers": [],
            "slots": [],  # the names of the run's placement groups, one per worker slot
            "status": "RUNNING",
            "loop_state": None,  # the control loop's state (messages.LoopState), and since when
            "loop_state_since": None,
            "result": None,  # how the control loop ended (RunResult fields), once it has
        }
        self.loaded_status: str | None = None  # the status in the state file, if there was one
        if state_path and os.path.exists(state_path):
            with open(state_path) as f:
                self.state.update(json.load(f))
            self.loaded_status = self.state["status"]
            self.state["status"] = "RUNNING"

    def _save(self) -> None:
        self._last_saved = time.time()
        if not self.state_path:
            return
        os.makedirs(os.path.dirname(self.state_path) or ".", exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1, default=str)
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------------ membership
    @_locked
    def open_epoch(self) -> int:
        """A new membership epoch is being formed: its number. None of its commits is
        accepted until :meth:`start_epoch`; the formed epoch before it commits until then only
        if it was not closed (a growth rebuild, not a lost member)."""
        self.state["membership_epoch"] += 1
        self._save()
        return int(self.state["membership_epoch"])

    @_locked
    def close_epoch(self, epoch: int) -> None:
        """The group found epoch ``epoch`` broken (a member lost or cut off): its commits are
        refused from now on, so that the restore point read next is final."""
        if epoch == self.state["formed_epoch"] and self.state["epoch_open"]:
            self.state["epoch_open"] = False
            self._save()

    @_locked
    def start_epoch(self, epoch: int, world_size: int, plan: dict[str, Any], restored_step: int,
                    timings: dict[str, float] | None = None, *,
                    workers: list[dict[str, Any]] | None = None,
                    detail: dict[str, Any] | None = None) -> dict[str, Any]:
        """Membership epoch ``epoch`` (from :meth:`open_epoch`) is formed and starts training;
        returns it with its cause and downtime.

        ``timings``: wall-clock marks of the change (detected, rebuilt, ...); ``workers``: the
        members' ranks, pids and nodes; ``detail``: how the state was restored (peers or
        checkpoint), who failed, the pause.
        """
        now = time.time()
        history = self.state["world_sizes"]
        previous = history[-1] if history else None
        if previous is None:
            cause = "resume" if self.state["committed"] else "start"
        elif world_size > previous["world_size"]:
            cause = "scale_up"
        elif world_size < previous["world_size"]:
            cause = "scale_down"
        elif (detail or {}).get("restored_from") == "peers" and (detail or {}).get("failed_pids"):
            cause = "replace"  # lost or evicted members replaced at once (a spare, a new worker)
        else:
            cause = "restart"  # a restart from the checkpoint at unchanged size, or a resubmission
        if epoch != self.state["membership_epoch"]:
            raise ValueError(f"epoch {epoch} cannot start: epoch "
                             f"{self.state['membership_epoch']} is the newest one opened")
        self.state["formed_epoch"] = epoch
        self.state["epoch_open"] = True
        record = {"epoch": epoch, "world_size": world_size, "plan": plan,
                  "time": now, "cause": cause, "restored_step": restored_step,
                  "previous_world_size": previous["world_size"] if previous else None,
                  "steps_redone": max(self.state["last_step"] - restored_step, 0),
                  "downtime_s": (now - self.state["last_heartbeat"]) if (
                      previous and self.state["last_heartbeat"]) else None,
                  "timings": dict(timings or {}),
                  "previous_plan": previous["plan"] if previous else None,
                  "workers": list(workers or []),
                  "last_heartbeat_before": self.state["last_heartbeat"], **(detail or {})}
        history.append(record)
        self.state["workers"] = list(workers or [])
        self.record_event(cause, restored_step, world_size=world_size,
                          previous_world_size=record["previous_world_size"],
                          steps_redone=record["steps_redone"], downtime_s=record["downtime_s"],
                          **(detail or {}))
        return record

    @_locked
    def renew_lease(self, pid: int, epoch: int | None) -> LeaseReply:
        """A worker's lease renewal (:mod:`elastic_moe.actors.lease`). ``epoch``: the last
        membership epoch it joined (None: it has joined none yet). ``retired``: a newer epoch
        has formed without it (it was dropped, e.g. cut off by a partition): it must stop."""
        history = self.state["world_sizes"]
        formed = history[-1]["epoch"] if history else 0
        retired = epoch is not None and epoch < formed and pid not in {
            w["pid"] for w in self.state["workers"]}
        if retired:
            self.record_event("worker_retired", self.state["last_step"], pid=pid, epoch=epoch,
                              membership_epoch=self.state["membership_epoch"])
        return LeaseReply(membership_epoch=self.state["membership_epoch"], retired=retired)

    @_locked
    def heartbeat(self, step: int, first_after_start: bool = False) -> None:
        now = time.time()
        self.state["last_heartbeat"] = now
        self.state["last_step"] = max(self.state["last_step"], step)
        if self.state["world_sizes"]:
            self.state["world_sizes"][-1]["last_step"] = step  # this epoch's own progress
        if first_after_start and self.state["world_sizes"]:
            epoch = self.state["world_sizes"][-1]
            epoch["first_step_time"] = now
            epoch["start_to_first_step_s"] = now - epoch["time"]
        # Every step is a heartbeat: persist the first of an epoch and then at most every few
        # seconds, not a JSON rewrite per step (events and commits persist immediately).
        if first_after_start or now - self._last_saved >= HEARTBEAT_PERSIST_S:
            self._save()

    # ------------------------------------------------------------------ checkpoints
    def _refuse_stale(self, epoch: int, step: int, what: str) -> bool:
        """Whether ``epoch`` may commit now; if not, the refusal is recorded."""
        if epoch == self.state["formed_epoch"] and self.state["epoch_open"]:
            return False
        log.warning("refusing %s of step %d from membership epoch %d (newest formed: %d, %s; "
                    "newest opened: %d)", what, step, epoch, self.state["formed_epoch"],
                    "open" if self.state["epoch_open"] else "closed",
                    self.state["membership_epoch"])
        self.record_event("stale_commit_refused", step, what=what, epoch=epoch,
                          membership_epoch=self.state["membership_epoch"])
        return True

    @_locked
    def admit_commit(self, epoch: int, step: int) -> bool:
        """Rank 0 of ``epoch`` asks before it writes step ``step``'s commit marker: True only
        while ``epoch`` is the current, formed membership epoch and the step is new."""
        if self._refuse_stale(epoch, step, "commit marker"):
            return False
        current = self.state["committed"]
        return current is None or step > current["step"]

    @_locked
    def commit(self, step: int, path: str, data_position: dict[str, Any], tokens_seen: int,
               epoch: int) -> bool:
        """Record a committed checkpoint of membership epoch ``epoch``; only from the current
        epoch, and never backwards."""
        if self._refuse_stale(epoch, step, "commit"):
            return False
        current = self.state["committed"]
        if current is not None and step <= current["step"]:
            log.warning("ignoring commit of step %d: step %d already committed", step,
                        current["step"])
            return False
        self.state["committed"] = {"step": step, "path": path, "data_position": data_position,
                                   "tokens_seen": tokens_seen, "time": time.time(),
                                   "epoch": epoch}
        self.record_event("checkpoint", step, path=path, epoch=epoch)
        return True

    @_locked
    def restore_point(self) -> dict[str, Any] | None:
        return self.state["committed"]

    # ------------------------------------------------------------------ tracking + events
    @_locked
    def record_event(self, kind: str, step: int, **detail: Any) -> None:
        self.state["events"].append({"time": time.time(), "kind": kind, "step": step, **detail})
        self._save()

    @_locked
    def set_mlflow_run_id(self, run_id: str) -> None:
        self.state["mlflow_run_id"] = run_id
        self._save()

    @_locked
    def set_loop_state(self, state: str) -> None:
        """The control loop entered ``state`` (a :class:`~elastic_moe.actors.messages.LoopState`)."""
        self.state["loop_state"], self.state["loop_state_since"] = str(state), time.time()
        self._save()

    @_locked
    def set_slots(self, names: list[str]) -> None:
        """The run's worker slots (placement group names), for a restarted coordinator."""
        self.state["slots"] = list(names)
        self._save()

    @_locked
    def finish(self, status: str, result: dict[str, Any] | None = None) -> None:
        self.state["status"] = status
        self.state["result"] = result
        self.record_event("finish", self.state["last_step"], status=status)

    @_locked
    def snapshot(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.state, default=str))


class CoordinatorAPI(Protocol):
    """What the rest of the system asks of the coordinator (blocking calls)."""

    def snapshot(self) -> dict[str, Any]: ...

    def restore_point(self) -> dict[str, Any] | None: ...

    def commit(self, step: int, path: str, data_position: dict[str, Any],
               tokens_seen: int, epoch: int) -> None: ...

    def admit_commit(self, epoch: int, step: int, timeout_s: float) -> bool | None: ...

    def renew_lease(self, pid: int, epoch: int | None,
                    timeout_s: float) -> LeaseReply | None: ...

    def heartbeat(self, step: int, first_after_start: bool = False) -> None: ...

    def open_epoch(self) -> int: ...

    def close_epoch(self, epoch: int) -> None: ...

    def start_epoch(self, epoch: int, world_size: int, plan: dict[str, Any], restored_step: int,
                    timings: dict[str, float] | None = None, *,
                    workers: list[dict[str, Any]] | None = None,
                    detail: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def record_event(self, kind: str, step: int, **detail: Any) -> None: ...

    def set_mlflow_run_id(self, run_id: str) -> None: ...

    def set_slots(self, names: list[str]) -> None: ...

    def set_loop_state(self, state: str) -> None: ...

    def finish(self, status: str, result: dict[str, Any] | None = None) -> None: ...


class CoordinatorClient:
    """The coordinator actor as the workers and the launcher call it: the one thin adapter of
    named remote calls. (The control loop runs in the coordinator's own process and calls
    :class:`CoordinatorState` directly.)

    Reads block; ``commit`` and ``record_event`` are fire-and-forget (they are ordered behind
    each other by Ray's per-caller actor ordering).
    """

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    def snapshot(self) -> dict[str, Any]:
        return ray.get(self.handle.snapshot.remote())

    def commit(self, step: int, path: str, data_position: dict[str, Any],
               tokens_seen: int, epoch: int) -> None:
        self.handle.commit.remote(step, path, data_position, tokens_seen, epoch)

    def admit_commit(self, epoch: int, step: int, timeout_s: float) -> bool | None:
        """The coordinator's verdict, or None when it did not answer within ``timeout_s``."""
        return self._get_within(self.handle.admit_commit.remote(epoch, step), timeout_s)

    def renew_lease(self, pid: int, epoch: int | None,
                    timeout_s: float) -> LeaseReply | None:
        """The coordinator's reply, or None when it did not answer within ``timeout_s``."""
        return self._get_within(self.handle.renew_lease.remote(pid, epoch), timeout_s)

    @staticmethod
    def _get_within(ref: Any, timeout_s: float) -> Any:
        try:
            return ray.get(ref, timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return None

    def record_event(self, kind: str, step: int, **detail: Any) -> None:
        self.handle.record_event.remote(kind, step, **detail)

    def set_mlflow_run_id(self, run_id: str) -> None:
        ray.get(self.handle.set_mlflow_run_id.remote(run_id))


def get(run_name: str) -> CoordinatorClient:
    return CoordinatorClient(ray.get_actor(actor_name(run_name), namespace=NAMESPACE))
