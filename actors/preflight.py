"""Launch-time checks, run by the launcher before any data reader or training worker starts.

In order: the memory estimate when the budget is known without the cluster's nodes (embedded, or
``parallel.memory_per_gpu_gib`` set); on a cluster, the bounded wait for ``min_workers`` worker
bundles; the memory estimate against the worker nodes' memory otherwise; that every worker node
has the interface the process groups bind to; and on a multi-node cluster the shared-storage
probe. Each refusal is a :class:`~elastic_moe.actors.cluster.LaunchError` whose
message names the numbers and what to change.
"""

from __future__ import annotations

import logging

import ray
from elastic_moe.actors.cluster import (
    Capacity,
    LaunchError,
    RayConnection,
    current_capacity,
    format_bundle,
    wait_for_capacity,
    worker_bundle,
)
from elastic_moe.actors.node_facts import (
    gpu_memory_bytes,
    local_node_memory,
    node_binding,
    nodes_binding,
    nodes_memory,
)
from elastic_moe.actors.shared_storage import NodeInfo, check_shared_storage, worker_nodes

from elastic_moe.config import Config
from elastic_moe.parallel.memory import GIB, MemoryBudget, MemoryEstimate, check_memory

logger = logging.getLogger(__name__)


def check_network(cfg: Config, nodes: list[NodeInfo] | None, timeout_s: float = 60.0) -> None:
    """Every node that may host workers (``nodes``; None: this one, embedded) has the interface
    the process groups bind to (``elastic.network_interface``, or the one holding its Ray
    address). Raises ``LaunchError`` naming the node, the interface and the ones it has."""
    interface = cfg.elastic.network_interface
    if nodes is None:
        found = [node_binding(interface)]
    else:
        found = nodes_binding(nodes, interface, timeout_s)
    for ok, text in found:
        if not ok:
            raise LaunchError(text)
        logger.debug("process groups bind to %s", text)


def memory_budget(cfg: Config, bundle: dict[str, float], connection: RayConnection | None,
                  nodes: list[NodeInfo] | None) -> MemoryBudget | None:
    """What one worker may use; None when unknown (GPU memory not configured nor readable).

    ``connection`` None or embedded: this machine, with one CPU slot per core (at least one per
    ``min_workers``, as :func:`elastic_moe.actors.cluster.init_ray` oversubscribes). On a cluster, the
    ``nodes`` that may host workers (:func:`nodes_memory`: this process answers for its own
    node, a task for each other one).
    """
    if bundle.get("GPU") and cfg.parallel.memory_per_gpu_gib > 0:
        return MemoryBudget(int(cfg.parallel.memory_per_gpu_gib * GIB), 1,
                            "GPU memory (parallel.memory_per_gpu_gib)", host=False)
    if connection is None or connection.embedded:
        facts = [local_node_memory()]
        slots = (connection.num_cpus if connection is not None
                 else max(facts[0].cpus, cfg.parallel.min_workers))
    elif nodes:
        try:
            facts = nodes_memory(nodes)
        except Exception as exc:  # the check is advisory when the nodes cannot say
            logger.warning("memory check skipped: could not read the worker nodes' memory (%s)",
                           exc)
            return None
        slots = 0
    else:
        return None
    if bundle.get("GPU"):
        gpu = min(f.gpu_bytes for f in facts)
        if gpu <= 0:
            return None
        return MemoryBudget(gpu, 1, "GPU memory (nvidia-smi)", host=False)
    # CPU workers share their node's RAM: budget by the node with the least RAM per CPU slot.
    tightest = min(facts, key=lambda f: f.host_bytes / max(f.cpus, 1))
    embedded = connection is None or connection.embedded
    where = "host RAM of this machine" if embedded else "host RAM of a worker node"
    return MemoryBudget(tightest.host_bytes, max(slots or tightest.cpus, 1), where, host=True)


def check_memory_before_ray(cfg: Config) -> MemoryEstimate | None:
    """The embedded run's memory check, before Ray starts or data is prepared (the launcher
    calls it first, so a model that cannot fit is refused in seconds)."""
    bundle = {"GPU": 1.0} if gpu_memory_bytes() > 0 else {"CPU": 1.0}
    budget = memory_budget(cfg, bundle, None, None)
    if budget is None:
        return None
    return _check_memory(cfg, budget, "cuda" if bundle.get("GPU") else "cpu")


def _check_memory(cfg: Config, budget: MemoryBudget, device_type: str,
                  quiet: bool = False) -> MemoryEstimate:
    world_size = cfg.parallel.min_workers
    try:
        estimate = check_memory(cfg, world_size, budget, device_type=device_type)
    except ValueError as exc:
        raise LaunchError(f"{exc} (recipe {cfg.name!r}, --workers "
                          f"{cfg.parallel.min_workers}:{cfg.parallel.max_workers})") from exc
    (logger.debug if quiet else logger.info)(
        "memory check: ~%.1f GiB per worker fits %s", estimate.total / GIB,
        budget.describe(world_size))
    return estimate


def preflight(cfg: Config, connection: RayConnection, *, checkpoint_dir: str,
              tracking_uri: str) -> Capacity:
    """Every launch-time check; returns the capacity found. Raises ``LaunchError``."""
    bundle = worker_bundle()
    device_type = "cuda" if bundle.get("GPU") else "cpu"
    min_workers = cfg.parallel.min_workers
    budget = memory_budget(cfg, bundle, connection, None)
    if budget is not None:  # embedded: check_memory_before_ray logged it already
        _check_memory(cfg, budget, device_type, quiet=connection.embedded)
    if connection.embedded:
        capacity = current_capacity(bundle)
        if capacity.workers < min_workers:  # only with an explicit num_cpus below the workers
            raise LaunchError(f"the embedded Ray has room for {capacity.workers} workers of "
                              f"{format_bundle(bundle)}, --workers asks for at least "
                              f"{min_workers}; lower --workers MIN")
    else:
        capacity = wait_for_capacity(min_workers, bundle, cfg.elastic.capacity_wait_s)
    nodes = worker_nodes(bundle)
    if budget is None and not connection.embedded:
        budget = memory_budget(cfg, bundle, connection, nodes)
        if budget is None and bundle.get("GPU"):
            logger.info("memory check skipped: GPU memory unknown (no nvidia-smi on the nodes); "
                        "set parallel.memory_per_gpu_gib to check it")
        elif budget is not None:
            _check_memory(cfg, budget, device_type)
    check_network(cfg, None if connection.embedded else nodes)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        check_shared_storage(checkpoint_dir, tracking_uri, cfg.tracking.experiment, nodes)
    return capacity
