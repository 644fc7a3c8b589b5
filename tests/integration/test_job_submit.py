"""`ray job submit` end to end against a real `ray start --head` on this machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.elastic_helpers import ROOT, data_cache, ray_head, sqlite_store
from tests.integration.multiproc import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture
def head():
    """A head node of its own with its dashboard (job submission): (environment, its URL)."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    with ray_head(env, f"--port={free_port()}", f"--dashboard-port={dashboard}", "--num-cpus=3",
                  "--include-dashboard=true",
                  # the agent's default port (52365) is taken when another head runs here
                  f"--dashboard-agent-listen-port={free_port()}"):
        yield env, f"http://127.0.0.1:{dashboard}"


def test_ray_job_submit_trains_and_logs_to_mlflow(head, tmp_path):
    from mlflow.tracking import MlflowClient

    env, address = head
    uri = sqlite_store(tmp_path / 'mlflow.db')
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", ROOT, "--",
         "python", "jobs/train.py", "--steps", "6", "--output-dir", str(tmp_path / "out"),
         "--set", "checkpoint.every_steps=3", "--set", f"data.cache_dir={data_cache()}",
         "--set", f"tracking.tracking_uri={uri}", "--run-name", "submitted"],
        env=env, capture_output=True, text=True, timeout=800)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "run submitted: FINISHED at step 6" in proc.stdout
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("elastic-moe").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    assert os.path.exists(tmp_path / "out" / "submitted" / "checkpoints" / "step_00000006" /
                          "COMMITTED")
