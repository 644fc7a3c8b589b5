"""Fencing a lost or evicted worker off for good; ``elastic_moe.actors.fencing``.

Kept free of torch and of the rest of the project on purpose. A worker on another node is
killed by a Ray task placed on that node, and the process that runs the task imports the module
the task's function lives in. On the node of a lost worker that process is usually new, and it
starts beside the worker that replaces the lost one: importing torch there would take seconds of
that node's CPU from the replacement's start (measured on the CPU box: a kill's fencing task
spent about 3 s importing, and held the replacement's process start back by 1.4 s).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)


def sigkill(pid: int) -> None:
    """SIGKILL a process on this node (a stopped one too: Ray's own kill needs its cooperation)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_kill_pid = ray.remote(num_cpus=0)(sigkill)


def process_gone(exc: BaseException) -> bool:
    """Whether a failed call says the worker's process is gone for good: Ray saw it exit, or
    declared its node dead (a node cut off from the cluster is unreachable for a kill too).
    Not so for an actor that is only unavailable for a while (``ActorUnavailableError``)."""
    # a task's own error that wraps an ActorDiedError (a call it made failed) says nothing
    # about the worker that raised it
    return isinstance(exc, ray.exceptions.ActorDiedError) \
        and not isinstance(exc, ray.exceptions.RayTaskError)


def fence(handle: Any | None, pid: int, node_id: str, *, gone: bool = False) -> None:
    """Make sure a worker is gone for good: it can never rejoin with stale state, and its open
    connections close, so peers blocked on it in a collective fail at once. No ``handle``:
    its named actor is gone already (its pid may belong to another process by now). ``gone``:
    Ray reported the process dead (:func:`process_gone`), so there is nothing to kill and no
    task is sent to its node."""
    if handle is None:
        return
    if not gone:
        if node_id == ray.get_runtime_context().get_node_id():  # our node: no task needed
            sigkill(pid)
        else:
            try:
                _kill_pid.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    node_id, soft=False)).remote(pid)
            except Exception as exc:  # the node is gone: so is the process
                logger.debug("fencing pid %d on %s: %s", pid, node_id, exc)
    try:
        ray.kill(handle, no_restart=True)
    except Exception as exc:
        logger.debug("ray.kill of pid %d: %s", pid, exc)
