"""The run coordinator: one named, detached actor per run; the run's memory across restarts.

Ray Train V2 restarts the worker group when a worker dies or the cluster grows or shrinks; the
workers themselves keep nothing. The coordinator holds what must survive: the membership epoch
and world-size history, the mesh plan of each epoch, the last *committed* checkpoint (restores
never go back past it: Ray alone may hand out an older checkpoint after an ungraceful kill), the
data position committed with it, the MLflow run id and last logged step, and every resize and
failure event with its time and cause. Its state is also written to ``state_path`` on each
change, so a coordinator recreated after a cluster restart (or a resubmitted job) carries on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import ray

log = logging.getLogger(__name__)

NAMESPACE = "elastic-moe"
HEARTBEAT_PERSIST_S = 5.0


def actor_name(run_name: str) -> str:
    return f"coordinator:{run_name}"


class CoordinatorState:
    """Plain-Python coordinator logic (the actor wraps it); JSON-serializable state."""

    def __init__(self, run_name: str, state_path: str | None = None) -> None:
        self.state_path = state_path
        self._last_saved = 0.0
        self.state: dict[str, Any] = {
            "run_name": run_name,
            "membership_epoch": 0,
            "world_sizes": [],  # [{epoch, world_size, plan, time, cause, restored_step}]
            "committed": None,  # {step, path, data_position, tokens_seen, time}
            "events": [],  # [{time, kind, step, ...}]
            "mlflow_run_id": None,
            "last_step": -1,  # highest step completed by any epoch
            "last_heartbeat": None,
            "faults_injected": [],  # test hooks already fired (never fire twice)
            "status": "RUNNING",
        }
        if state_path and os.path.exists(state_path):
            with open(state_path) as f:
                self.state.update(json.load(f))
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
    def start_epoch(self, world_size: int, plan: dict[str, Any], restored_step: int,
                    timings: dict[str, float] | None = None) -> dict[str, Any]:
        """A worker group (rank 0) starts; returns the new epoch with its cause and downtime.

        ``timings``: rank 0's wall-clock marks (worker_start, setup_done, restore_done) for the
        recovery-time breakdown.
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
        else:
            cause = "restart"  # a failure at unchanged size, or a resubmission
        self.state["membership_epoch"] += 1
        epoch = {"epoch": self.state["membership_epoch"], "world_size": world_size, "plan": plan,
                 "time": now, "cause": cause, "restored_step": restored_step,
                 "previous_world_size": previous["world_size"] if previous else None,
                 "steps_redone": max(self.state["last_step"] - restored_step, 0),
                 "downtime_s": (now - self.state["last_heartbeat"]) if (
                     previous and self.state["last_heartbeat"]) else None,
                 "timings": dict(timings or {}),
                 "last_heartbeat_before": self.state["last_heartbeat"]}
        history.append(epoch)
        self.record_event(cause, restored_step, world_size=world_size,
                          previous_world_size=epoch["previous_world_size"],
                          steps_redone=epoch["steps_redone"], downtime_s=epoch["downtime_s"])
        return epoch

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
    def commit(self, step: int, path: str, data_position: dict[str, Any], tokens_seen: int) -> bool:
        """Record a committed checkpoint; never moves backwards."""
        current = self.state["committed"]
        if current is not None and step <= current["step"]:
            log.warning("ignoring commit of step %d: step %d already committed", step,
                        current["step"])
            return False
        self.state["committed"] = {"step": step, "path": path, "data_position": data_position,
                                   "tokens_seen": tokens_seen, "time": time.time()}
        self.record_event("checkpoint", step, path=path)
        return True

    def restore_point(self) -> dict[str, Any] | None:
        return self.state["committed"]

    def fell_back(self, committed_step: int, restored_step: int, reason: str) -> None:
        """A worker group could not use the committed checkpoint and restored an older one."""
        self.record_event("checkpoint_fallback", restored_step, committed_step=committed_step,
                          reason=reason)

    # ------------------------------------------------------------------ tracking + events
    def record_event(self, kind: str, step: int, **detail: Any) -> None:
        self.state["events"].append({"time": time.time(), "kind": kind, "step": step, **detail})
        self._save()

    def set_mlflow_run_id(self, run_id: str) -> None:
        self.state["mlflow_run_id"] = run_id
        self._save()

    def fault_once(self, key: str) -> bool:
        """True the first time ``key`` is asked for (test fault injection fires once per run)."""
        if key in self.state["faults_injected"]:
            return False
        self.state["faults_injected"].append(key)
        self._save()
        return True

    def finish(self, status: str) -> None:
        self.state["status"] = status
        self.record_event("finish", self.state["last_step"], status=status)

    def snapshot(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.state, default=str))


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Coordinator(CoordinatorState):
    """The Ray actor: ``Coordinator.options(name=actor_name(run), namespace=NAMESPACE, ...)``."""


def get_or_create(run_name: str, state_path: str) -> ray.actor.ActorHandle:
    """The run's coordinator, created (detached, so it outlives the job) if it does not exist."""
    return Coordinator.options(  # type: ignore[attr-defined]
        name=actor_name(run_name), namespace=NAMESPACE, lifetime="detached",
        get_if_exists=True).remote(run_name, state_path)


def get(run_name: str) -> ray.actor.ActorHandle:
    return ray.get_actor(actor_name(run_name), namespace=NAMESPACE)
