"""What a node can tell about itself at launch: its memory and the address its process groups
would bind to (:func:`nodes_memory`, :func:`nodes_binding`). The launcher answers for the node
it runs on itself and asks each other worker node with a Ray task.

This module imports neither torch nor the trainer: a task's fresh worker process imports the
module its function lives in, and on a 2-core node importing torch took 5 s of the launch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from elastic_moe.actors.shared_storage import NodeInfo


@dataclass(frozen=True, slots=True)
class NodeMemory:
    host_bytes: int
    cpus: int
    gpu_bytes: int  # smallest GPU on the node; 0 when it has none (or nvidia-smi is missing)


def gpu_memory_bytes() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
        sizes = [int(line) for line in out.split() if line.strip().isdigit()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0
    return min(sizes) * 2**20 if sizes else 0


def local_node_memory() -> NodeMemory:
    import psutil

    return NodeMemory(psutil.virtual_memory().total, os.cpu_count() or 1, gpu_memory_bytes())


def node_binding(interface: str) -> tuple[bool, str]:
    """(True, the binding) of this node's process groups, or (False, why there is none)."""
    from elastic_moe.parallel.network import NetworkInterfaceError, choose_binding

    try:
        return True, choose_binding(ray.util.get_node_ip_address(), interface,
                                    node=ray.get_runtime_context().get_node_id()).describe()
    except NetworkInterfaceError as exc:
        return False, str(exc)


_node_memory = ray.remote(num_cpus=0, max_retries=0)(local_node_memory)
_node_binding = ray.remote(num_cpus=0, max_retries=0)(node_binding)


def _on_each(function: Callable[..., Any], task: Any, nodes: list[NodeInfo], args: tuple,
             timeout_s: float) -> list:
    """``function(*args)`` on each of ``nodes``, in their order: every other node runs
    ``task`` (``function`` as a Ray task) pinned to it, and the node this process runs on
    answers here, while those tasks run. A task there would start a worker process of the job
    (Python, Ray and this module's imports) for facts this process can read itself: a driver
    runs beside the raylet of its own machine. Not under Ray Client (``ray://``), whose driver runs on a
    machine of its own; every node gets a task there."""
    from ray.util.client import ray as client
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = None if client.is_connected() else ray.get_runtime_context().get_node_id()
    refs = {node.node_id: task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    ).remote(*args) for node in nodes if node.node_id != here}
    answers = {here: function(*args)} if any(node.node_id == here for node in nodes) else {}
    answers.update(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
    return [answers[node.node_id] for node in nodes]


def nodes_memory(nodes: list[NodeInfo], timeout_s: float = 60.0) -> list[NodeMemory]:
    """Each node's :class:`NodeMemory`, read on it."""
    return _on_each(local_node_memory, _node_memory, nodes, (), timeout_s)


def nodes_binding(nodes: list[NodeInfo], interface: str,
                  timeout_s: float = 60.0) -> list[tuple[bool, str]]:
    """Each node's :func:`node_binding`, found on it."""
    return _on_each(node_binding, _node_binding, nodes, (interface,), timeout_s)
