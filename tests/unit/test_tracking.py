"""MLflow tracker: one run across restarts, each step once, buffering while the store is down."""

import os
import socket

import numpy as np
from mlflow.tracking import MlflowClient

from elastic_moe.train.tracking import Tracker


def _history(uri, run_id, name="loss"):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, name)]


def test_new_run_then_resume_logs_each_step_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = []
    first = Tracker.open(uri, "exp", "run", on_run_id=ids.append)
    first.log_params({"model.dim": 64})
    for step in range(1, 6):
        first.log_metrics({"loss": 10.0 - step}, step)
    first.log_event("scale_up", 3, world_size=3, previous_world_size=2)
    first.log_expert_heatmap(np.array([[5, 1, 1, 1], [2, 2, 2, 2]]), 5)
    assert first.finish() == 0
    assert ids == [first.run_id]
    # a restored worker group re-executes steps 4-5 (different values) and goes on to 7
    second = Tracker.open(uri, "exp", "run", run_id=first.run_id)
    for step in range(4, 8):
        second.log_metrics({"loss": 100.0 + step}, step)
    assert second.finish() == 0
    assert _history(uri, first.run_id) == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 5.0),
                                           (6, 106.0), (7, 107.0)]
    client = MlflowClient(uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.dim"] == "64"
    assert any(k.startswith("event.") and "scale_up" in k for k in run.data.tags)
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"events", "expert_load"} <= artifacts


def test_unreachable_server_neither_blocks_nor_crashes(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = Tracker.open(f"http://127.0.0.1:{port}", "exp", "run", retry_seconds=0.05)
    for step in range(1, 4):
        assert tracker.log_metrics({"loss": 1.0}, step)
    assert tracker.finish(timeout=5) == 3  # reported as unsent, training unaffected


def test_records_are_buffered_until_the_store_appears(tmp_path):
    store_dir = tmp_path / "later"
    store_dir.write_text("a file where the store's directory should be: unusable")
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    tracker = Tracker.open(uri, "exp", "run", retry_seconds=0.05)
    tracker.log_params({"a": 1})
    for step in range(1, 4):
        tracker.log_metrics({"loss": float(step)}, step)
    assert not tracker.wait_connected(1.0)
    store_dir.unlink()  # the store becomes available
    os.makedirs(store_dir, exist_ok=True)
    assert tracker.wait_connected(30)
    assert tracker.finish(timeout=30) == 0
    assert _history(uri, tracker.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]
