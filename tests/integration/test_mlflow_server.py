"""Tracking against a real ``mlflow server`` process that serves artifacts over HTTP.

On a cluster, the launcher's control loop logs from the job's driver, so its metrics and artifacts
(expert-load heatmap, summary, resize events) must travel to a tracking server. The test starts
``mlflow server`` on 127.0.0.1 (its own sqlite backend and artifact directory) and drives the
launcher's :class:`~elastic_moe.train.tracking.Tracker` exactly as the training loop does (params,
a metric per step, a resize event, the heatmap, the summary) against ``http://127.0.0.1:<port>``;
it then reads the run back through the server: status, every step's loss, params, and the
artifacts -- downloaded over HTTP and found in the server's artifact directory, which the client
never saw as a path. (A whole ``jobs/train.py`` run against the server took 95 s on a 2-core box;
the launcher-to-tracker wiring is covered by test_job_submit.py with a sqlite store.) """

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from elastic_moe.train.tracking import Tracker, create_run
from tests.integration.multiproc import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    artifacts = tmp_path / "server-artifacts"
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(artifacts)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield uri, artifacts
    os.killpg(proc.pid, 15)  # the server and its uvicorn/gunicorn children
    proc.wait(30)


def test_tracker_logs_metrics_and_artifacts_to_an_mlflow_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, artifact_dir = mlflow_server
    # as the launcher does: create the run with params, then the control loop's tracker resumes it
    run_id = create_run(uri, "elastic-moe", "served", {"model.dim": "64"},
                        {"checkpoint_dir": "s3://bucket/run"})
    tracker = Tracker.open(uri, "elastic-moe", "served", run_id=run_id)
    for step in range(1, 5):
        assert tracker.log_metrics({"loss": 10.0 - step, "world_size": 2.0}, step)
    tracker.log_event("scale_up", 2, world_size=3, previous_world_size=2)
    tracker.set_tags({"last_checkpoint_step": "4"})
    tracker.log_expert_heatmap(np.array([[5, 1, 1, 1], [2, 2, 2, 2]]), 4)
    tracker.log_text(json.dumps({"final_step": 4}), "summary.json")
    assert tracker.finish() == 0  # nothing left unsent

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert run.data.params["model.dim"] == "64"
    assert run.data.tags["last_checkpoint_step"] == "4"
    assert any(k.startswith("event.") and "scale_up" in k for k in run.data.tags)

    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"expert_load", "summary.json", "events"} <= top
    (heatmap,) = client.list_artifacts(run_id, "expert_load")
    assert heatmap.path.endswith(".png") and heatmap.file_size > 1000
    local = client.download_artifacts(run_id, "summary.json", str(tmp_path / "dl"))
    with open(local) as f:
        assert json.load(f)["final_step"] == 4
    stored = [os.path.join(d, f) for d, _, files in os.walk(artifact_dir) for f in files]
    assert any(p.endswith("summary.json") for p in stored)  # the server wrote them
    assert any(p.endswith(".png") for p in stored)


def test_basic_auth_server_as_in_the_docs_refuses_anonymous_clients(tmp_path, monkeypatch):
    """docs/cluster.md's server: MLflow's basic-auth app, admin password from the environment."""
    import urllib.error

    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    port = free_port()
    ini = tmp_path / "mlflow-auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # one password hash per user a minute: each costs seconds on a busy 2-core box
                   "auth_cache_ttl_seconds = 60\n")
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD="admin-pw-1234567",
               MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen(
        [exe, "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # answering, if only to say who may ask
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=5", timeout=30)
        assert anonymous.value.code == 401

        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")  # see auth_cache_ttl_seconds
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-pw-1234567")
        AuthServiceClient(uri).create_user("trainer", "trainer-pw-1234567")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(Exception, match="401|Unauthor|credentials"):
            MlflowClient(uri).search_experiments()

        # the launcher's path, with the credentials the docs pass to the job
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "trainer-pw-1234567")
        run_id = create_run(uri, "elastic-moe", "authed", {"model.dim": "64"}, {})
        tracker = Tracker.open(uri, "elastic-moe", "authed", run_id=run_id)
        for step in (1, 2):
            assert tracker.log_metrics({"loss": 3.0 - step}, step)
        assert tracker.finish() == 0  # nothing left unsent
        client = MlflowClient(uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        history = client.get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
