"""Ray at launch: which Ray to use, whether it answers, and whether it has room for the workers.

* :func:`init_ray` -- the embedded default always starts its own local Ray (``address="local"``),
  so a ``ray_current_cluster`` file left behind by a crashed ``ray start --head`` (or a live
  ``ray start`` on the same machine) never changes what ``jobs/train.py`` does. Only an explicit
  address (``RAY_ADDRESS``, as ``ray job submit`` sets it, or ``--ray-address``) attaches to a
  cluster, and that address is probed first: one that does not answer fails within
  ``connect_timeout_s`` with an error naming it, instead of Ray's own minutes of retries.
* Embedded runs oversubscribe: asking for more workers than this machine has CPU cores starts
  the local Ray with one CPU slot per worker and says so (each worker is then slower; the run
  still works). This is the documented choice (docs/troubleshooting.md).
* :func:`wait_for_capacity` -- on a cluster, wait (bounded) until ``min_workers`` bundles such as
  ``{"GPU": 1}`` fit in the free resources of the live nodes, asking the autoscaler for them and
  logging every ``log_every_s`` what is missing.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import ray

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 15.0


class LaunchError(RuntimeError):
    """The run cannot start as configured; the message says what to change."""


@dataclass(frozen=True, slots=True)
class RayConnection:
    """Which Ray this process uses."""

    embedded: bool  # a local Ray this process started (vs. an existing cluster)
    address: str  # the GCS address
    num_cpus: int  # CPU slots of the embedded Ray (0 on a cluster: see the nodes)
    oversubscribed: bool  # embedded with more CPU slots than cores


def requested_address(explicit: str | None = None) -> str | None:
    """The cluster address to attach to: ``explicit``, else ``$RAY_ADDRESS``; None = embedded."""
    address = explicit or os.environ.get("RAY_ADDRESS") or None
    if address in ("local", ""):
        return None
    return address


def _host_port(address: str) -> tuple[str, int]:
    text = address
    for prefix in ("ray://", "http://", "https://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text.split("/", 1)[0]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise LaunchError(f"Ray address {address!r}: expected host:port (e.g. 10.0.0.5:6379) or "
                          "ray://host:10001")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> str:
    """Resolve ``address`` (``auto`` reads Ray's current-cluster file) and make sure something
    listens there, retrying until ``timeout_s``. Returns the address to pass to ``ray.init``.
    """
    source = ("RAY_ADDRESS (or --ray-address)" if os.environ.get("RAY_ADDRESS") == address
              else "Ray address")
    if address == "auto":
        from ray._private.utils import read_ray_address

        found = read_ray_address()
        if not found:
            raise LaunchError("Ray address 'auto': no running cluster recorded on this machine "
                              "(no ray_current_cluster file); start one with `ray start --head` "
                              "or give its address")
        address = found
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))):
                return address
        except OSError as exc:
            last = exc
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(1.0, left))
    raise LaunchError(
        f"{source} {address}: nothing answers at {host}:{port} after {timeout_s:g} s ({last}). "
        "Check that the head node is up (`ray status --address "
        f"{host}:{port}`), that the port is the GCS port (6379 by default; ray:// client "
        "addresses use 10001) and that no firewall blocks it; give a head node that is still "
        "starting longer with --connect-timeout SECONDS; or unset RAY_ADDRESS to train on "
        "an embedded local Ray")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, min_workers: int = 1,
             namespace: str | None = None, runtime_env: dict[str, Any] | None = None,
             connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
             logging_level: int = logging.WARNING) -> RayConnection:
    """Start an embedded local Ray (``address`` None) or attach to the cluster at ``address``.

    Embedded: ``num_cpus`` slots (default: this machine's cores, raised to ``min_workers`` when
    fewer: oversubscribed, logged as a warning). ``logging_level`` is Ray's own logger level in
    this process (the console filter in ``elastic_moe.actors.console`` handles worker output).
    """
    if ray.is_initialized():
        context = ray.get_runtime_context()
        return RayConnection(embedded=False, address=context.gcs_address, num_cpus=0,
                             oversubscribed=False)
    if address:
        address = check_address(address, connect_timeout_s)
        logger.info("attaching to the Ray cluster at %s", address)
        ray.init(address=address, namespace=namespace, runtime_env=runtime_env,
                 logging_level=logging_level)
        return RayConnection(embedded=False, address=address, num_cpus=0, oversubscribed=False)
    cores = os.cpu_count() or 1
    slots = num_cpus if num_cpus is not None else max(cores, min_workers)
    oversubscribed = slots > cores
    if oversubscribed:
        logger.warning("%d workers on %d CPU cores: the embedded Ray gets %d CPU slots "
                       "(oversubscribed; every step is slower, results are the same)",
                       min_workers, cores, slots)
    logger.info("starting an embedded local Ray (%d CPU slots); set RAY_ADDRESS to use a "
                "cluster", slots)
    # address="local": never the cluster in Ray's ray_current_cluster file, dead or alive.
    # No workers prestarted for the first driver: they start without the job's runtime env, so
    # no actor of the run can use them, and on a small machine their start-up (about 0.7
    # CPU-seconds each, one per CPU slot) competes with the coordinator's and the workers'.
    info = ray.init(address="local", num_cpus=slots, namespace=namespace,
                    runtime_env=runtime_env, include_dashboard=False,
                    logging_level=logging_level,
                    _system_config={"prestart_worker_first_driver": False})
    return RayConnection(embedded=True, address=info.address_info["gcs_address"],
                         num_cpus=slots, oversubscribed=oversubscribed)


# --------------------------------------------------------------------------------- capacity


def worker_bundle() -> dict[str, float]:
    """What one training worker needs: a GPU where the cluster has any, else a CPU."""
    return {"GPU": 1.0} if ray.cluster_resources().get("GPU", 0) > 0 else {"CPU": 1.0}


def format_bundle(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


def bundles_that_fit(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` fit in one node's ``resources``."""
    counts = [math.floor(resources.get(key, 0.0) / need + 1e-9)
              for key, need in bundle.items() if need > 0]
    return min(counts) if counts else 0


@dataclass(frozen=True, slots=True)
class Capacity:
    """Free room for ``bundle`` right now, per node."""

    bundle: dict[str, float]
    per_node: dict[str, int]  # node id -> bundles that fit in its free resources
    totals: dict[str, float]  # the bundle's resources, summed over live nodes (free and busy)
    free: dict[str, float]

    @property
    def workers(self) -> int:
        return sum(self.per_node.values())

    def describe(self) -> str:
        keys = sorted(self.bundle)
        held = ", ".join(f"{self.free.get(k, 0):g} of {self.totals.get(k, 0):g} {k} free"
                         for k in keys)
        return f"{len(self.per_node)} node(s), {held}"


def current_capacity(bundle: dict[str, float]) -> Capacity:
    from ray._private.state import available_resources_per_node, total_resources_per_node

    available = available_resources_per_node()
    totals: dict[str, float] = {}
    for resources in total_resources_per_node().values():
        for key in bundle:
            totals[key] = totals.get(key, 0.0) + float(resources.get(key, 0.0))
    free: dict[str, float] = {}
    for resources in available.values():
        for key in bundle:
            free[key] = free.get(key, 0.0) + float(resources.get(key, 0.0))
    per_node = {node: bundles_that_fit(resources, bundle) for node, resources in available.items()}
    return Capacity(bundle=dict(bundle), per_node=per_node, totals=totals, free=free)


def wait_for_capacity(min_workers: int, bundle: dict[str, float], timeout_s: float,
                      log_every_s: float = 30.0, poll_s: float = 1.0) -> Capacity:
    """Block until ``min_workers`` copies of ``bundle`` fit in the cluster's free resources.

    While waiting, asks the autoscaler for the bundles (``request_resources``; a no-op without
    one) and logs every ``log_every_s`` seconds what is missing. Raises :class:`LaunchError`
    with the numbers when ``timeout_s`` passes first. The request is withdrawn on return: the
    worker group's own placement group keeps the nodes once it exists.
    """
    from ray.autoscaler.sdk import request_resources

    started = time.monotonic()
    capacity = current_capacity(bundle)
    if capacity.workers >= min_workers:
        return capacity
    shape = format_bundle(bundle)
    request_resources(bundles=[dict(bundle)] * min_workers)
    next_log = started
    try:
        while True:
            capacity = current_capacity(bundle)
            if capacity.workers >= min_workers:
                logger.info("capacity for %d workers of %s after %.0f s", min_workers, shape,
                            time.monotonic() - started)
                return capacity
            now = time.monotonic()
            missing = min_workers - capacity.workers
            if now >= started + timeout_s:
                raise LaunchError(
                    f"not enough capacity: {min_workers} workers of {shape} needed, "
                    f"{capacity.workers} fit after waiting {timeout_s:.0f} s (the cluster has "
                    f"{capacity.describe()}). Lower --workers MIN, add nodes (check `ray status` "
                    "and the autoscaler's log for failed launches), or wait longer with "
                    "--wait-for-capacity SECONDS")
            if now >= next_log:
                logger.warning("waiting for %d more worker%s of %s; the cluster has %s "
                               "(%.0f of %.0f s)", missing, "s" if missing > 1 else "", shape,
                               capacity.describe(), now - started, timeout_s)
                next_log = now + log_every_s
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])
