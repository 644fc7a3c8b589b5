"""MLflow tracking for a run that outlives its worker groups.

The launcher's control loop logs, in the driver process: params once (the flattened config),
metrics every committed step, an event per resize or failure, checkpoint paths, and at the end an
expert-load heatmap and a summary. One MLflow run spans every restart: the run id lives in the
coordinator, and steps at or below the last logged step (re-executed after a restore) are not
logged again. Logging never blocks or fails training: records go to a queue that a background
thread flushes with retries; when the tracking server is unreachable they stay buffered and are
retried, and whatever is still unsent at the end is reported.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def default_tracking_uri(cwd: str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` or a sqlite store in the working directory (absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + os.path.abspath(os.path.join(cwd or os.getcwd(), "mlflow.db"))


def _fail_fast_http() -> None:
    """An unreachable server fails a call at once; our callers retry (or skip) it themselves."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _param_values(params: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:6000] for k, v in params.items()}  # MLflow's limit on a param value


def new_run_record(flat_config: dict[str, Any], checkpoint_dir: str,
                   manifest: str) -> tuple[dict[str, str], dict[str, str]]:
    """``(params, tags)`` a run gets once, when it is created: the flattened config, and where
    its checkpoints and data are."""
    return (_param_values(flat_config),
            {"checkpoint_dir": checkpoint_dir, "manifest": manifest})


def create_run(tracking_uri: str, experiment: str, run_name: str,
               params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> str:
    """Create ``run_name`` in ``experiment`` (made if missing) with ``params`` and ``tags``;
    returns the run id.

    The launcher calls this before any worker starts: the first client to open a fresh sqlite
    store runs its schema migrations, and a worker killed half-way through them (a planted or real
    failure early in the run) would leave a store that no later client can open.
    """
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    _fail_fast_http()
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_id = str(client.create_run(exp_id, run_name=run_name).info.run_id)
    client.log_batch(run_id, params=[Param(k, v) for k, v in (params or {}).items()],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    return run_id


@dataclass
class _Record:
    kind: str  # "metrics" | "params" | "tags" | "text" | "artifact"
    payload: Any
    step: int = 0
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))


class Tracker:
    """Buffered, retrying MLflow logger for the launcher's control loop. Create with :meth:`open`."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str,
                 run_id: str | None = None, last_logged_step: int = -1,
                 on_run_id: Callable[[str], None] | None = None,
                 retry_seconds: float = 2.0) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.is_new_run = run_id is None
        self.on_run_id = on_run_id
        self.client: Any = None
        self.last_logged_step = last_logged_step
        self.history_max_step = -1  # newest step already in the run (read when connecting)
        self.retry_seconds = retry_seconds
        self._queue: queue.Queue[_Record | None] = queue.Queue()
        self._pending: list[_Record] = []
        self._failures = 0
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None,
             last_logged_step: int = -1, on_run_id: Callable[[str], None] | None = None,
             retry_seconds: float = 2.0) -> Tracker:
        """Resume ``run_id`` (the same run across restarts) or create a run in ``experiment``.

        Returns at once: connecting (and creating the run, reported through ``on_run_id``) happens
        in the background thread and is retried like any other record, so a tracking server that
        is down at start-up costs nothing but a delay in the dashboard. Metrics of steps the run
        already holds (re-executed after a restore) are dropped when sent, so each step is logged
        once; ``last_logged_step`` gates steps in this process.
        """
        _fail_fast_http()
        return cls(tracking_uri, experiment, run_name, run_id, last_logged_step, on_run_id,
                   retry_seconds)

    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is None:
            self.run_id = create_run(self.tracking_uri, self.experiment, self.run_name)
            if self.on_run_id is not None:
                self.on_run_id(self.run_id)
        else:
            client.update_run(self.run_id, status="RUNNING")
            history = client.get_metric_history(self.run_id, "loss")
            self.history_max_step = max((m.step for m in history), default=-1)
        self.client = client
        self._connected.set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # ------------------------------------------------------------------ logging API
    def log_params(self, params: dict[str, Any]) -> None:
        self._queue.put(_Record("params", _param_values(params)))

    def log_metrics(self, metrics: dict[str, float], step: int,
                    timestamp: float | None = None) -> bool:
        """Queue metrics for ``step`` (``timestamp``: when the step committed, default now);
        False (nothing queued) if this process logged the step already."""
        if step <= self.last_logged_step:
            return False
        self.last_logged_step = step
        record = _Record("metrics", dict(metrics), step)
        if timestamp is not None:
            record.timestamp_ms = int(timestamp * 1000)
        self._queue.put(record)
        return True

    def log_event(self, kind: str, step: int, **detail: Any) -> None:
        """A resize/failure/restore event: a tag, a JSON artifact and an ``event`` metric."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        body = {"kind": kind, "step": step, "time": time.time(), **detail}
        self._queue.put(_Record("text", (json.dumps(body, indent=1, default=str),
                                         f"events/{stamp}_{kind}_step{step}.json")))
        self._queue.put(_Record("tags", {f"event.{stamp}.{kind}": json.dumps(body, default=str)}))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._queue.put(_Record("text", (text, artifact_file)))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._queue.put(_Record("artifact", (local_path, artifact_path)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue.put(_Record("tags", dict(tags)))

    def log_expert_heatmap(self, loads_LE: Any, step: int) -> None:
        """Per-layer expert load (fraction of tokens) as a PNG artifact."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        loads = np.asarray(loads_LE, dtype=float)
        frac = loads / np.maximum(loads.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(max(4, loads.shape[1] * 0.25), 1 + loads.shape[0] * 0.4))
        im = ax.imshow(frac * loads.shape[1], aspect="auto", cmap="viridis")
        ax.set_xlabel("routed expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert load / mean, step {step}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = os.path.join(tempfile.mkdtemp(), f"expert_load_step{step}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        self.log_artifact(path, "expert_load")

    def finish(self, status: str = "FINISHED", timeout: float = 30.0) -> int:
        """Flush (bounded by ``timeout``) and mark the run; returns records left unsent."""
        self._queue.put(None)
        self._thread.join(timeout)
        left = len(self._pending) + self._queue.qsize()
        try:
            if self.client is None:
                raise RuntimeError("never connected to the tracking server")
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # the run stays RUNNING in the UI; say so
            log.error("could not mark MLflow run %s %s: %s", self.run_id, status, exc)
        if left:
            log.error("MLflow: %d records could not be sent (tracking server unreachable)", left)
        return left

    # ------------------------------------------------------------------ background sender
    def _send(self, record: _Record) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if record.kind == "metrics":
            if record.step <= self.history_max_step:
                return  # logged by an earlier worker group before the restore
            metrics = [Metric(k, float(v), record.timestamp_ms, record.step)
                       for k, v in record.payload.items()]
            self.client.log_batch(self.run_id, metrics=metrics)
        elif record.kind == "params":
            items = [Param(k, v) for k, v in record.payload.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        elif record.kind == "tags":
            tags = [RunTag(k, v) for k, v in record.payload.items()]
            self.client.log_batch(self.run_id, tags=tags)
        elif record.kind == "text":
            self.client.log_text(self.run_id, *record.payload)
        elif record.kind == "artifact":
            self.client.log_artifact(self.run_id, *record.payload)

    def _drain(self) -> None:
        closing = False
        while True:
            if not self._pending:
                item = self._queue.get()  # nothing to retry: sleep until there is work
                if item is None:
                    return
                self._pending.append(item)
            while True:  # keep order: take everything queued behind the pending records
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    self._pending.append(item)
            try:
                if self.client is None:
                    self._connect()
                self._send(self._pending[0])
                self._pending.pop(0)
                self._failures = 0
            except Exception as exc:
                self._failures += 1
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    log.warning("MLflow unreachable (%s); %d records buffered, retrying",
                                exc, len(self._pending))
                if closing:
                    return
                time.sleep(min(self.retry_seconds * self._failures, 30.0))
            if closing and not self._pending:
                return
