"""MLflow tracker: one run across restarts, each step once, buffering while the store is down."""

import os
import socket
import time

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
    tracker = Tracker.open(f"http://127.0.0.1:{port}", "exp", "run", retry_s=0.05)
    for step in range(1, 4):
        assert tracker.log_metrics({"loss": 1.0}, step)
    started = time.monotonic()
    assert tracker.finish(timeout=1.0) == 3  # reported as unsent, training unaffected
    assert time.monotonic() - started < 5.0  # it tried until its deadline, then gave up


def test_records_are_buffered_until_the_store_appears(tmp_path):
    store_dir = tmp_path / "later"
    store_dir.write_text("a file where the store's directory should be: unusable")
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    tracker = Tracker.open(uri, "exp", "run", retry_s=0.05)
    tracker.log_params({"a": 1})
    for step in range(1, 4):
        tracker.log_metrics({"loss": float(step)}, step)
    assert not tracker.wait_connected(1.0)
    store_dir.unlink()  # the store becomes available
    os.makedirs(store_dir, exist_ok=True)
    assert tracker.wait_connected(30)
    assert tracker.finish(timeout=30) == 0
    assert _history(uri, tracker.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]


class _LostReply:
    """A client whose first metrics write lands but whose reply never comes back (the server
    died after writing): the call raises as a dropped connection does."""

    def __init__(self, client):
        self.client, self.lost = client, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def log_batch(self, run_id, metrics=(), **kwargs):
        self.client.log_batch(run_id, metrics=metrics, **kwargs)
        if metrics and not self.lost:
            self.lost += 1
            raise ConnectionError("connection reset by peer")


def test_a_write_whose_reply_was_lost_is_not_logged_twice(tmp_path, monkeypatch):
    # MLflow's file store keeps an identical resend as a second point (a SQL store drops it)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    tracker = Tracker.open(uri, "exp", "run", retry_s=0.05)
    tracker.log_params({"a": 1})  # connects
    assert tracker.wait_connected(30)
    tracker.client = _LostReply(tracker.client)
    for step in range(1, 4):
        tracker.log_metrics({"loss": float(step), "lr": 0.1 * step}, step)
    assert tracker.finish(timeout=30) == 0
    assert tracker.client.lost == 1
    assert _history(uri, tracker.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [s for s, _ in _history(uri, tracker.run_id, "lr")] == [1, 2, 3]
