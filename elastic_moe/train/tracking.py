"""MLflow tracking for a run that outlives its worker groups.

The launcher's control loop logs, in the driver process: params once (the flattened config),
metrics every committed step, an event per resize or failure, checkpoint paths, and at the end an
expert-load heatmap and a summary. One MLflow run spans every restart: the run id lives in the
coordinator, and steps at or below the last logged step (re-executed after a restore) are not
logged again. Logging never blocks or fails training: records go to a queue that a background
thread sends, in order, one at a time. When the tracking server is unreachable (down, restarting,
cut off) they stay buffered and the thread retries with a growing pause until it answers again,
however long that takes; at the end of the run it keeps trying for ``tracking.flush_timeout_s``
and reports what is still unsent (the run's ``metrics.jsonl`` holds every step regardless).

Each step's metrics reach the run once. A send whose reply was lost (the server died after its
write landed) is in doubt: before sending it again the thread reads which of its metrics the run
already holds at that step, and sends only the others. A SQL store would drop an identical
resend by itself (a metric's key includes its timestamp, fixed when the step committed); a file
store would not.
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

logger = logging.getLogger(__name__)


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

    The coordinator's tracker calls this once, for a new run (workers never open the store): the
    first client to open a fresh sqlite store runs its schema migrations, and a process killed
    half-way through them would leave a store that no later client can open.
    """
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    _fail_fast_http()
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_id = str(client.create_run(exp_id, run_name=run_name).info.run_id)
    if params or tags:
        client.log_batch(run_id, params=[Param(k, v) for k, v in (params or {}).items()],
                         tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    return run_id


@dataclass
class _Record:
    kind: str  # "metrics" | "params" | "tags" | "text" | "artifact" | "status" (the last)
    payload: Any
    step: int = 0
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))


class Tracker:
    """Buffered, retrying MLflow logger for the launcher's control loop. Create with :meth:`open`.

    ``retry_s``, ``max_retry_s``: a failed send is retried after ``retry_s``, then ``2 * retry_s``
    and so on, never more than ``max_retry_s`` apart (``tracking.retry_s`` / ``max_retry_s``).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str,
                 run_id: str | None = None, last_logged_step: int = -1,
                 on_run_id: Callable[[str], None] | None = None,
                 retry_s: float = 2.0, max_retry_s: float = 30.0) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.is_new_run = run_id is None
        self.on_run_id = on_run_id
        self.client: Any = None
        self.last_logged_step = last_logged_step
        self.history_max_step = -1  # newest step already in the run (read when connecting)
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._queue: queue.Queue[_Record | None] = queue.Queue()
        self._pending: list[_Record] = []
        self._failures = 0  # failed sends in a row
        self._unreachable_since = 0.0  # time.time() of the first of them
        self._in_doubt = False  # the first pending record was sent and its reply lost
        self._terminated = False  # the run's final status reached the server
        self._deadline: float | None = None  # set by finish(): give up retrying then
        self._wake = threading.Event()  # cuts a retry pause short (finish)
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None,
             last_logged_step: int = -1, on_run_id: Callable[[str], None] | None = None,
             retry_s: float = 2.0, max_retry_s: float = 30.0) -> Tracker:
        """Resume ``run_id`` (the same run across restarts) or create a run in ``experiment``.

        Returns at once: connecting (and creating the run, reported through ``on_run_id``) happens
        in the background thread and is retried like any other record, so a tracking server that
        is down at start-up costs nothing but a delay in the dashboard. Metrics of steps the run
        already holds (re-executed after a restore) are dropped when sent, so each step is logged
        once; ``last_logged_step`` gates steps in this process.
        """
        _fail_fast_http()
        return cls(tracking_uri, experiment, run_name, run_id, last_logged_step, on_run_id,
                   retry_s, max_retry_s)

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
        """Send what is buffered, then mark the run ``status``, trying for at most ``timeout``
        seconds; returns the number of records left unsent (the status not counted: a run that
        could not be marked stays RUNNING in the UI, and an error line says so)."""
        self._deadline = time.monotonic() + timeout
        self._queue.put(_Record("status", status))
        self._queue.put(None)
        self._wake.set()  # a server back up during a long retry pause: try it now
        self._thread.join(timeout + 1.0)  # one send in flight may finish after the deadline
        unsent = [*self._pending, *(r for r in self._take_queued() if r is not None)]
        left = sum(r.kind != "status" for r in unsent)
        if not self._terminated:
            logger.error("could not mark MLflow run %s %s (tracking server %s unreachable); it "
                         "stays RUNNING in the MLflow UI", self.run_id, status, self.tracking_uri)
        if left:
            logger.error("MLflow: %d records could not be sent in %.0f s (tracking server %s "
                         "unreachable); every step's metrics are in the run's metrics.jsonl",
                         left, timeout, self.tracking_uri)
        return left

    # ------------------------------------------------------------------ background sender
    def _send(self, record: _Record) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if record.kind == "metrics":
            if record.step <= self.history_max_step:
                return  # logged by an earlier worker group before the restore
            metrics = [Metric(k, float(v), record.timestamp_ms, record.step)
                       for k, v in record.payload.items()]
            if self._in_doubt:
                metrics = self._not_in_run(metrics, record.step)
            self._in_doubt = True  # until the server says it has them
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics)
            self._in_doubt = False
        elif record.kind == "params":  # params, tags, texts and artifacts: a resend overwrites
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
        elif record.kind == "status":
            self.client.set_terminated(self.run_id, status=record.payload)
            self._terminated = True

    def _not_in_run(self, metrics: list[Any], step: int) -> list[Any]:
        """The ``metrics`` of ``step`` that the run does not hold yet. Steps are sent in order,
        so a key whose newest step in the run (what MLflow keeps as its latest value) is ``step``
        or later got this step's value already."""
        run = self.client.get_run(self.run_id)
        newest = {m.key: m.step for m in run.to_proto().data.metrics}
        return [m for m in metrics if newest.get(m.key, -1) < step]

    def _drain(self) -> None:
        closing = False
        while True:
            if not self._pending and not closing:
                item = self._queue.get()  # nothing to retry: sleep until there is work
                if item is None:
                    closing = True
                else:
                    self._pending.append(item)
            for item in self._take_queued():  # keep order: everything queued behind
                if item is None:
                    closing = True
                else:
                    self._pending.append(item)
            if not self._pending or self._past_deadline():
                return
            try:
                if self.client is None:
                    self._connect()
                self._send(self._pending[0])
            except Exception as exc:
                self._failed(exc)
                continue
            self._pending.pop(0)
            if self._failures:
                logger.info("MLflow reachable again after %.0f s; sending %d buffered records",
                            time.time() - self._unreachable_since, len(self._pending))
                self._failures = 0

    def _take_queued(self) -> list[_Record | None]:
        items: list[_Record | None] = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _failed(self, exc: Exception) -> None:
        """Count a failed send and pause before the next try (cut short by :meth:`finish`)."""
        if not self._failures:
            self._unreachable_since = time.time()
        self._failures += 1
        if self._failures in (1, 10) or self._failures % 100 == 0:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            logger.warning("MLflow unreachable (%s); %d records buffered, retrying; training "
                           "goes on", reason, len(self._pending))
        pause = min(self.retry_s * self._failures, self.max_retry_s)
        if self._deadline is not None:
            pause = min(pause, max(self._deadline - time.monotonic(), 0.0))
        self._wake.wait(pause)
        self._wake.clear()
