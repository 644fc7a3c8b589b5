"""Fencing a worker off (``elastic_moe.actors.fencing``) on a real two-node
``ray.cluster_utils.Cluster``.

A worker on another node is killed by a Ray task on that node, run by a process that imports
the task's module there. That module must stay light: on the CPU box a fencing task that
imported torch took about 3 s of the node's CPU from the replacement starting beside it, and
held the replacement's process start back by 1.4 s, so a warm spare was often not ready for the
next fault. A worker whose process Ray saw die needs no kill at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_fencing_module_imports_neither_torch_nor_the_trainer():
    code = ("import sys, elastic_moe.actors.fencing; "
            "print(' '.join(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'transformers', 'mlflow') "
            "or m.startswith('elastic_moe.train'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout[:500]}"


def _alive(pid: int) -> bool:
    """Running or stopped (a zombie not yet reaped by its raylet counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_stopped_worker_on_another_node_is_killed_and_a_dead_one_is_only_dropped(
        monkeypatch):
    from elastic_moe.actors import fencing
    from elastic_moe.actors.fencing import fence, process_gone
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    sent: list[int] = []  # pids the kill task was sent for (the real task still runs)
    real = fencing._kill_pid

    class Recording:
        def options(self, **options):  # type: ignore[no-untyped-def]
            task = real.options(**options)

            class Sent:
                def remote(self, pid):  # type: ignore[no-untyped-def]
                    sent.append(pid)
                    return task.remote(pid)

            return Sent()

    monkeypatch.setattr(fencing, "_kill_pid", Recording())

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    node = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        @ray.remote(num_cpus=0)
        class Held:
            def pid(self) -> int:
                return os.getpid()

        place = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
        stopped, killed = (Held.options(scheduling_strategy=place).remote() for _ in range(2))
        stopped_pid, killed_pid = ray.get([stopped.pid.remote(), killed.pid.remote()])
        assert node.node_id != ray.get_runtime_context().get_node_id()

        # a hung worker (SIGSTOP: it answers nothing, Ray's own kill needs its cooperation)
        os.kill(stopped_pid, signal.SIGSTOP)
        with pytest.raises(ray.exceptions.GetTimeoutError):
            ray.get(stopped.pid.remote(), timeout=1.0)
        fence(stopped, stopped_pid, node.node_id)
        deadline = time.time() + 60
        while _alive(stopped_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(stopped_pid), "the stopped worker on the other node still runs"
        assert sent == [stopped_pid], sent

        # a worker whose process died: Ray says so, and fencing it sends nothing to its node.
        # Until Ray has learnt of the death a call may fail as only unavailable (not gone).
        os.kill(killed_pid, signal.SIGKILL)
        deadline, died = time.time() + 60, None
        while (died is None or not process_gone(died)) and time.time() < deadline:
            try:
                ray.get(killed.pid.remote(), timeout=60)
            except ray.exceptions.RayActorError as exc:
                died = exc
            time.sleep(0.2)
        assert died is not None and process_gone(died), repr(died)
        fence(killed, killed_pid, node.node_id, gone=True)
        assert sent == [stopped_pid], f"a kill task was sent for a dead worker: {sent}"
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_an_actor_unavailable_for_a_while_is_not_taken_for_gone():
    from elastic_moe.actors.fencing import process_gone
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    assert process_gone(ActorDiedError())
    assert not process_gone(ActorUnavailableError("unreachable for now", b"\0" * 16))
    assert not process_gone(TimeoutError())
    # a task's own error wrapping an ActorDiedError (a call it made failed) is not its death
    wrapped = ray.exceptions.RayTaskError("f", "traceback", ActorDiedError())
    assert not process_gone(wrapped.as_instanceof_cause())
