"""Launch-time checks against real Ray: which Ray, dead addresses, capacity, shared storage.

* A stale ``ray_current_cluster`` file (what a crashed ``ray start --head`` leaves) is read by
  Ray's own default ``ray.init()`` -- checked first, so the test is armed -- and ignored by
  :func:`elastic_moe.actors.cluster.init_ray`, which starts its own Ray.
* ``jobs/train.py`` with ``RAY_ADDRESS`` naming a port nobody listens on exits once its
  ``--connect-timeout`` has passed, with an error naming the address.
* (More workers than cores on the embedded Ray, and a console without Ray's noise: the
  resume in test_elastic.py's killed-driver test runs so.)
* On a ``ray.cluster_utils.Cluster``: the capacity wait logs what is missing, gives up with the
  numbers, and returns once a node joins.
* The launch-time facts of each node (memory, binding): the launcher's own node answers in
  the launcher's process, and only the other nodes get a task (and a worker process for it).
* Shared storage: a node started in its own mount namespace, with a tmpfs over the run's
  directory, is a node whose disk really differs; the probe refuses the node-local checkpoint
  directory and sqlite store, naming the node, and accepts them with only shared-disk nodes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from tests.integration.elastic_helpers import ROOT, RUNTIME_ENV
from tests.integration.multiproc import free_port

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _run_python(code: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_stale_current_cluster_file_is_ignored():
    tmp = tempfile.mkdtemp(prefix="emoe-", dir="/tmp")  # short: Ray's socket paths
    # the dead head's port stays bound (not listening: a connection is refused) so that the
    # embedded Ray cannot pick the same port for itself (seen once in CI)
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        dead = f"127.0.0.1:{port}"
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(dead)
        env = dict(os.environ, RAY_TMPDIR=tmp, PYTHONPATH=ROOT)
        env.pop("RAY_ADDRESS", None)
        proc = _run_python(f"""
            import ray
            from ray._private.services import canonicalize_bootstrap_address
            # Ray's default ray.init() would attach to the dead head recorded in the file
            # (127.0.0.1 comes back as this node's IP):
            trap = canonicalize_bootstrap_address(None)
            assert trap.endswith(":{port}"), trap
            from elastic_moe.actors.cluster import init_ray
            connection = init_ray(None, num_cpus=1)
            assert connection.embedded and not connection.address.endswith(":{port}")
            assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
            print("OK", connection.address)
            """, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "OK" in proc.stdout
    finally:
        held.close()
        subprocess.run(["pkill", "-f", tmp], capture_output=True)  # only this test's Ray
        shutil.rmtree(tmp, ignore_errors=True)


def test_dead_ray_address_fails_fast_naming_it(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, RAY_ADDRESS=dead)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "jobs/train.py", "--steps", "2", "--connect-timeout",
                           "2", "--output-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < 15, f"took {elapsed:.0f} s"  # the default window alone is 15 s
    assert f"RAY_ADDRESS (or --ray-address) {dead}: nothing answers at" in proc.stderr
    assert "after 2 s" in proc.stderr
    assert "ray status" in proc.stderr and "unset RAY_ADDRESS" in proc.stderr


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address, runtime_env=RUNTIME_ENV)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_capacity_wait_logs_what_is_missing_and_gives_up(cluster, caplog):
    from elastic_moe.actors.cluster import LaunchError, wait_for_capacity

    caplog.set_level(logging.INFO, logger="elastic_moe.actors.cluster")
    started = time.monotonic()
    with pytest.raises(LaunchError) as exc:
        wait_for_capacity(3, {"CPU": 1}, timeout_s=3, log_every_s=1, poll_s=0.2)
    assert time.monotonic() - started < 10
    assert ("not enough capacity: 3 workers of {CPU: 1} needed, 1 fit after waiting 3 s "
            "(the cluster has 1 node(s), 1 of 1 CPU free)") in str(exc.value)
    assert "--wait-for-capacity SECONDS" in str(exc.value)
    waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waiting) >= 2  # every log_every_s
    assert waiting[0].startswith("waiting for 2 more workers of {CPU: 1}; the cluster has "
                                 "1 node(s), 1 of 1 CPU free")

    # capacity that arrives during the wait ends it
    outcome: dict = {}
    waiter = threading.Thread(target=lambda: outcome.update(capacity=wait_for_capacity(
        3, {"CPU": 1}, timeout_s=60, log_every_s=1, poll_s=0.2)))
    waiter.start()
    time.sleep(2)
    assert waiter.is_alive()
    cluster.add_node(num_cpus=2)  # Cluster wants the main thread
    waiter.join(60)
    capacity = outcome["capacity"]
    assert capacity.workers >= 3 and len(capacity.per_node) == 2


def _job_workers(nodes: list) -> dict[str, list[int]]:
    """Node id -> pids of the worker processes the raylet of each of ``nodes`` (Cluster nodes)
    has started: ``default_worker.py`` until it names itself, then ``ray::<task or IDLE>``.
    Ray's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``; ``agent.py``/``main.py``
    while they import) are not workers."""
    import psutil
    from ray._private import ray_constants

    out: dict[str, list[int]] = {}
    for node in nodes:
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        out[node.node_id] = []
        for kid in psutil.Process(raylet).children():
            try:
                cmd = " ".join(kid.cmdline())
            except psutil.Error:  # exited meanwhile
                continue
            if "default_worker.py" in cmd or (cmd.startswith("ray::") and "Agent" not in cmd):
                out[node.node_id].append(kid.pid)
    return out


def test_the_launchers_own_node_answers_without_a_task(monkeypatch):
    """The launch-time facts of a two-node Cluster (memory, the process groups' binding): the
    node the launcher runs on answers in the launcher's process, the other one through a task.
    Both nodes are this machine, so each answer must equal what this process reads, and an
    interface no node has is refused naming each node. Only the other node's raylet started a
    worker process for them: a task on the launcher's node had one started there at every
    launch."""
    from elastic_moe.actors.node_facts import (
        local_node_memory,
        node_binding,
        nodes_binding,
        nodes_memory,
    )
    from elastic_moe.actors.shared_storage import worker_nodes
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_prestart_worker_first_driver", "0")  # no idle workers up front
    cluster = Cluster()
    try:
        head = cluster.add_node(num_cpus=1)  # the launcher's node
        second = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, runtime_env=RUNTIME_ENV)
        here, other = head.node_id, second.node_id
        assert ray.get_runtime_context().get_node_id() == here
        nodes = worker_nodes({"CPU": 1})
        assert {n.node_id for n in nodes} == {here, other}
        assert _job_workers([head, second]) == {here: [], other: []}
        assert nodes_memory(nodes) == [local_node_memory()] * 2
        assert nodes_binding(nodes, "") == [node_binding("")] * 2
        missing = nodes_binding(nodes, "emoe-none0")
        for node, (ok, text) in zip(nodes, missing, strict=True):
            assert not ok and f"node {node.node_id}" in text and "'emoe-none0'" in text, text
        workers = _job_workers([head, second])
        assert workers[here] == [] and len(workers[other]) >= 1, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def masked_node(cluster, tmp_path):
    """A second node whose processes see a fresh tmpfs over ``tmp_path / "masked"``."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root (a mount namespace for the node)")
    masked = tmp_path / "masked"
    masked.mkdir()
    bin_dir = os.path.dirname(sys.executable)
    name = f"emoe-masked-{os.getpid()}"
    script = (f"mount -t tmpfs none {masked} && exec {bin_dir}/ray start "
              f"--address={cluster.address} --num-cpus=1 --node-name={name} "
              "--disable-usage-stats --block")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    deadline = time.monotonic() + 90
    while sum(n["Alive"] for n in ray.nodes()) < 2:
        assert proc.poll() is None, "the masked node's `ray start` exited"
        assert time.monotonic() < deadline, "the masked node did not join"
        time.sleep(0.5)
    yield masked
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", name], capture_output=True)


def test_storage_probe_refuses_a_directory_one_node_cannot_see(masked_node, tmp_path):
    from elastic_moe.actors.cluster import LaunchError
    from elastic_moe.actors.shared_storage import check_shared_storage, worker_nodes

    nodes = worker_nodes({"CPU": 1})
    assert len(nodes) == 2
    checkpoints = str(masked_node / "checkpoints")
    store = f"sqlite:///{masked_node / 'mlflow.db'}"
    with pytest.raises(LaunchError) as exc:
        check_shared_storage(checkpoints, store, "exp", nodes, timeout_s=60)
    message = str(exc.value)
    assert message.startswith("storage is not shared across the cluster's 2 worker nodes")
    assert f"checkpoint.dir={checkpoints!r} is not visible from node" in message
    assert f"tracking.tracking_uri={str(masked_node)!r} is not visible from node" in message
    assert "FileNotFoundError" in message
    assert "s3://" in message and "shared mount" in message  # what to use instead
    assert "sqlite file on the driver's node" in message and "mlflow server" in message
    # exactly one node (the masked one) failed each location
    assert message.count("is not visible from node") == 2
    # the markers were cleaned up on the driver's side
    assert not [p for p in os.listdir(checkpoints) if p.startswith(".elastic-moe-probe-")]

    shared = tmp_path / "shared"  # not under the tmpfs: every node sees the same files
    check_shared_storage(str(shared / "checkpoints"), f"sqlite:///{shared / 'mlflow.db'}",
                         "exp", nodes, timeout_s=60)
