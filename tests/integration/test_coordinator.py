"""The coordinator runs the run: training outlives the launcher and the coordinator's process.

A real ``ray start --head`` on this machine; ``jobs/train.py`` is driven as a user drives it,
and processes are killed by pid from outside:

- ``kill -9`` of the launcher at step 15 of 60: MLflow keeps receiving steps while no launcher
  exists; the coordinator's process is then killed too (Ray restarts it, and it takes over the
  live workers); the same command again attaches and exits 0 when the run ends.
- ``kill -9`` of the coordinator's process while the launcher follows, in an HSDP layout: the
  launcher follows the restarted coordinator to the end; two workers that keep each other's
  copies are then killed together, and the restarted coordinator knows the layout's copy plan
  (from the workers), so the replicas restore them from memory instead of the checkpoint.
- ``--stop`` of a live run, then ``--resume``.

Every run must end with every step in MLflow exactly once and no checkpoint read after a
fault; the first one with the workers that started the run (same pids) finishing it in its
one and only membership epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.elastic_helpers import ROOT, data_cache, ray_head, sqlite_store, wait_for
from tests.integration.multiproc import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 60


@pytest.fixture(scope="module")
def head():
    """A head node of its own: (launcher environment, its address)."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{bin_dir}:{os.environ['PATH']}",
               PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    with ray_head(env, f"--port={port}", "--num-cpus=4", "--include-dashboard=false"):
        yield env, f"127.0.0.1:{port}"


def _command(address: str, tmp_path, run_name: str, workers: str = "2",
             extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "jobs", "train.py"), "--ray-address", address,
            "--run-name", run_name, "--steps", str(STEPS), "--workers", workers, *extra,
            "--output-dir", str(tmp_path / "out"),
            "--set", "checkpoint.every_steps=20", "--set", "train.eval_every=0",
            "--set", f"data.cache_dir={data_cache()}",
            "--set", f"tracking.tracking_uri={sqlite_store(tmp_path / 'mlflow.db')}"]


def _record(tmp_path, run_name: str) -> dict:
    path = tmp_path / "out" / run_name / "coordinator.json"
    for _ in range(50):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # not written yet, or being replaced
            time.sleep(0.1)
    raise AssertionError(f"no readable {path}")


def _mlflow_steps(tmp_path) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("elastic-moe")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) <= 1, [r.info.run_name for r in runs]
    return [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] \
        if runs else []


def _logged_step(tmp_path, run_name: str) -> int:
    path = tmp_path / "out" / run_name / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def _kill_coordinator(tmp_path, run_name: str, log: str) -> int:
    pid = _record(tmp_path, run_name)["coordinator_pid"]
    os.kill(pid, signal.SIGKILL)
    restarted = wait_for(lambda: (_record(tmp_path, run_name).get("coordinator_pid") or pid) != pid,
                      60, "restarted coordinator", log)
    assert restarted
    return pid


def _check_one_history(tmp_path, run_name: str, record: dict) -> None:
    # every step in MLflow exactly once
    assert _mlflow_steps(tmp_path) == list(range(1, STEPS + 1))
    # the workers that started the run finished it, in its only membership epoch: nothing
    # was rebuilt, no checkpoint was read
    epochs = record["world_sizes"]
    assert [(e["cause"], e["restored_from"]) for e in epochs] == [("start", "init")], epochs
    kinds = [e["kind"] for e in record["events"]]
    assert "coordinator_restarted" in kinds, kinds
    assert not {"worker_lost", "checkpoint_fallback", "resume"} & set(kinds), kinds
    assert record["status"] == "FINISHED" and record["result"]["ok"], record["result"]
    assert record["loop_state"] == "finished", record["loop_state"]


def test_training_outlives_the_launcher_and_the_coordinator(head, tmp_path):
    env, address = head
    run = "outlives"
    command = _command(address, tmp_path, run)
    first_log = str(tmp_path / "launcher-1.log")
    with open(first_log, "w") as out:
        launcher = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: _logged_step(tmp_path, run) >= 15 or launcher.poll() is not None, 300,
          "step 15", first_log)
    assert launcher.poll() is None, open(first_log).read()[-4000:]
    workers = {w["pid"] for w in _record(tmp_path, run)["workers"]}
    launcher.kill()  # SIGKILL: no cleanup of any kind
    launcher.wait()
    killed_at = max(_mlflow_steps(tmp_path), default=0)
    # no launcher exists: MLflow keeps receiving steps
    wait_for(lambda: max(_mlflow_steps(tmp_path), default=0) >= killed_at + 5, 120,
          "steps in MLflow without a launcher", first_log)
    # and the coordinator's process dies too: Ray restarts it, and it takes over
    _kill_coordinator(tmp_path, run, first_log)
    wait_for(lambda: _logged_step(tmp_path, run) >= killed_at + 10, 120,
          "steps after the coordinator restarted", first_log)
    assert _logged_step(tmp_path, run) < STEPS, "the run ended before the launcher re-attached"
    second_log = str(tmp_path / "launcher-2.log")
    with open(second_log, "w") as out:
        again = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                               timeout=300)
    output = open(second_log).read()
    assert again.returncode == 0, output[-6000:]
    assert f"run {run} is live: attaching to it" in output, output[-6000:]
    assert f"run {run}: FINISHED at step {STEPS}" in output, output[-6000:]
    record = _record(tmp_path, run)
    assert {w["pid"] for w in record["workers"]} == workers
    wait_for(lambda: not any(psutil.pid_exists(p) for p in workers), 30,  # stopped at the end
          "workers stopped", second_log)
    _check_one_history(tmp_path, run, record)


def test_stop_saves_the_step_it_stops_at_and_resume_goes_on_from_it(head, tmp_path):
    """``--stop`` ends a live run at a step boundary after saving that step (exit 8, MLflow
    KILLED); ``--resume`` continues from exactly there: no step lost, none redone."""
    from mlflow.tracking import MlflowClient

    env, address = head
    run = "stopped"
    log = str(tmp_path / "launcher.log")
    command = _command(address, tmp_path, run)
    with open(log, "w") as out:
        launcher = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: _logged_step(tmp_path, run) >= 8 or launcher.poll() is not None, 300,
          "step 8", log)
    stop = subprocess.run([*command, "--stop"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert launcher.wait(timeout=120) == 8, open(log).read()[-6000:]
    assert stop.returncode == 8, stop.stdout[-3000:] + stop.stderr[-3000:]
    assert f"run {run}: STOPPED at step" in stop.stdout, stop.stdout[-3000:]
    record = _record(tmp_path, run)
    stopped = next(e for e in record["events"] if e["kind"] == "stopped")
    assert record["status"] == "STOPPED" and 8 <= stopped["step"] < STEPS, stopped
    assert record["loop_state"] == "stopping", record["loop_state"]
    assert record["committed"]["step"] == stopped["step"] == stopped["committed_step"]
    assert os.path.exists(record["committed"]["path"] + "/COMMITTED")
    assert _mlflow_steps(tmp_path) == list(range(1, stopped["step"] + 1))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_info = client.search_runs([client.get_experiment_by_name("elastic-moe").experiment_id])
    assert run_info[0].info.status == "KILLED"

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    record = _record(tmp_path, run)
    assert [(e["restored_from"], e["restored_step"], e["steps_redone"])
            for e in record["world_sizes"]][-1] == ("checkpoint", stopped["step"], 0)
    assert _mlflow_steps(tmp_path) == list(range(1, STEPS + 1))


def test_the_launcher_follows_a_restarted_coordinator_that_restores_from_replicas(head,
                                                                                  tmp_path):
    """Four workers on one node, HSDP (``dp_replicate_degree=2``): every block has a replica
    on another worker, so nothing is copied. The coordinator's process is killed while the
    launcher follows the run; the launcher follows the restarted coordinator to the end. Once
    the restarted one trains on, ranks 0 and 1 are killed together. Each is the other's buddy,
    so no keeper's copy survives: only the copy plan says their blocks live on in ranks 2 and
    3. The plan came with the join reports to the dead coordinator; the new one must ask the
    workers for it, or it falls back to the checkpoint and redoes steps."""
    run = "replicas-after-restart"
    env, address = head
    log = str(tmp_path / "launcher.log")
    command = _command(address, tmp_path, run, workers="2:4",
                       extra=("--set", "parallel.dp_replicate_degree=2",
                              "--set", "elastic.resize_check_s=600"))
    with open(log, "w") as out:
        launcher = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: launcher.poll() is not None or (_logged_step(tmp_path, run) >= 8
                 and _record(tmp_path, run)["world_sizes"][-1]["world_size"] == 4), 300,
                 "step 8 on 4 workers", log)
        assert launcher.poll() is None, open(log).read()[-4000:]
        before = _record(tmp_path, run)
        first = before["world_sizes"][-1]
        assert first["copy_bytes_per_step"] == 0, first  # HSDP: every block has a replica
        _kill_coordinator(tmp_path, run, log)
        resumed_at = _logged_step(tmp_path, run)
        wait_for(lambda: _logged_step(tmp_path, run) >= resumed_at + 3, 120,
                 "steps after the coordinator restarted", log)
        record = _record(tmp_path, run)
        # the restarted coordinator took the group over as it was: no rebuild, same workers
        assert len(record["world_sizes"]) == len(before["world_sizes"]), record["world_sizes"]
        assert {w["pid"] for w in record["workers"]} == {w["pid"] for w in before["workers"]}
        workers = {w["rank"]: w["pid"] for w in record["workers"]}
        epochs_before = len(record["world_sizes"])
        assert record["world_sizes"][-1]["world_size"] == 4, record["world_sizes"]
        killed_at = _logged_step(tmp_path, run)
        for rank in (0, 1):
            os.kill(workers[rank], signal.SIGKILL)
        wait_for(lambda: launcher.poll() is not None
                 or len(_record(tmp_path, run)["world_sizes"]) > epochs_before, 120,
                 "the layout after the two losses", log)
        # it read the survivors' shard manifests and formed the new layout without torch,
        # whose import would have stalled it for seconds in the middle of the recovery
        assert launcher.poll() is None, open(log).read()[-6000:]
        coordinator = _record(tmp_path, run)["coordinator_pid"]
        with open(f"/proc/{coordinator}/maps") as maps:
            assert "libtorch" not in maps.read(), "the coordinator loaded torch"
        assert launcher.wait(timeout=300) == 0, open(log).read()[-6000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = open(log).read()
    assert "restarted; its log follows from the start" in output, output[-6000:]
    assert f"run {run}: FINISHED at step {STEPS}" in output, output[-6000:]
    record = _record(tmp_path, run)
    kinds = [e["kind"] for e in record["events"]]
    assert "coordinator_restarted" in kinds, kinds
    assert "checkpoint_fallback" not in kinds, kinds
    after = record["world_sizes"][epochs_before]  # the layout formed after the two losses
    assert after["world_size"] == 2, record["world_sizes"]
    assert after["restored_from"] == "peers" and after["steps_redone"] == 0, after
    assert after["restored_step"] >= killed_at, (after, killed_at)
    assert _mlflow_steps(tmp_path) == list(range(1, STEPS + 1))
