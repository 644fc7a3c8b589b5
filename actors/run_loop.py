"""The coordinator actor and the control loop it hosts: the run outlives its launcher.

:class:`Coordinator` is the run's detached, restartable actor: the record of
:mod:`elastic_moe.actors.coordinator`, served to the workers, plus :class:`RunHost`, which
runs on a thread of the same process. The loop starts the data readers and the MLflow tracker,
drives the elastic worker group (:class:`elastic_moe.actors.worker_group.ElasticGroup`) to the
end of the run, and records the result. The launcher (``jobs/train.py``,
:func:`elastic_moe.actors.training.run_training`) only starts the run or attaches to it, prints
the loop's log lines as they come (:meth:`ConsoleBuffer.since`) and exits with the run's
outcome. Killing the launcher stops
nothing; running the same command again attaches to the live run.

When the coordinator's process dies, Ray restarts it with the same arguments; the host then
takes over the live workers (:meth:`ElasticGroup.adopt`) instead of starting new ones, and MLflow
gets every step once (the metrics log is replayed, and the tracker drops what MLflow has).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import ray
from elastic_moe.actors.coordinator import NAMESPACE, CoordinatorClient, CoordinatorState, actor_name
from elastic_moe.actors.messages import LoopState

from elastic_moe.config import Config

logger = logging.getLogger(__name__)

# After the run ended, how long the coordinator waits for a launcher to collect the result
# before it ends itself (the result stays in its state file).
LINGER_S = 600.0
CONSOLE_LINES = 20_000  # log records kept for launchers that attach late
LINES_PER_REPLY = 2_000


@dataclass
class Launch:
    """What the coordinator needs to run the run (passed once; Ray keeps it for restarts)."""

    cfg: Config
    run_name: str
    run_dir: str
    checkpoint_dir: str
    manifest: str
    val_manifest: str | None
    tracking_uri: str
    use_gpu: bool
    resume: bool = False
    sample_log_dir: str | None = None
    threads_per_worker: int = 1
    wrap_model: Callable[[Any, int, Callable[[], int]], None] | None = None
    wrap_writer: Callable[[Any, int], Any] | None = None
    # (dense, routed) parameter counts of cfg.model, counted by the launcher (which loads torch
    # for its memory check anyway): the coordinator plans with them and never loads torch
    param_counts: tuple[int, int] | None = None


@dataclass
class RunResult:
    """How the control loop ended (kept in the coordinator's record as a dict)."""

    ok: bool
    final_step: int
    status: str = "FINISHED"  # FINISHED | FAILED | STOPPED (on request: --stop)
    error: str | None = None
    exit_code: int = 0
    mlflow_run_id: str | None = None


@dataclass(frozen=True, slots=True)
class LogLine:
    """One log record of the control loop, as a launcher re-logs it."""

    name: str  # the logger's name
    level: int
    msg: str
    time: float


@dataclass(frozen=True, slots=True)
class Progress:
    """The coordinator's answer to a launcher that follows the run."""

    incarnation: str  # changes when the coordinator restarted: the numbering starts over
    next: int  # ask for the lines from this number on next time
    lines: list[LogLine]
    status: str  # RUNNING | FINISHED | FAILED | STOPPED
    step: int
    result: RunResult | None  # once the loop ended


class ConsoleBuffer(logging.Handler):
    """The control loop's log records, numbered, for the launchers that follow the run.

    A launcher asks for the records after the last one it printed; the numbering starts again
    in a restarted coordinator (a new ``incarnation``), and the launcher then starts over.
    """

    def __init__(self, capacity: int = CONSOLE_LINES) -> None:
        super().__init__(logging.INFO)
        self.incarnation = uuid.uuid4().hex
        self.records: deque[tuple[int, LogLine]] = deque(maxlen=capacity)
        self.next_index = 0
        self.guard = threading.Condition()  # notified with each new record

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # a malformed record is not worth losing the loop over
            return
        item = LogLine(name=record.name, level=record.levelno, msg=msg, time=record.created)
        with self.guard:
            self.records.append((self.next_index, item))
            self.next_index += 1
            self.guard.notify_all()

    def since(self, index: int, incarnation: str | None,
              wait_s: float = 0.0) -> tuple[str, int, list[LogLine]]:
        """(incarnation, the number to ask from next, the lines from ``index`` on). With none
        yet, waits up to ``wait_s`` for the next: a launcher prints each line as it comes
        instead of in bursts, and an idle run is asked no more often."""
        if incarnation != self.incarnation:
            index = 0
        with self.guard:
            self.guard.wait_for(lambda: self.next_index > index, timeout=wait_s)
            lines = [item for i, item in self.records if i >= index][:LINES_PER_REPLY]
            first = next((i for i, _ in self.records if i >= index), self.next_index)
        return self.incarnation, first + len(lines), lines


def _install_console(console: ConsoleBuffer, run_dir: str) -> None:
    """This process's project log goes to the buffer and to ``run_dir/coordinator.log``, not to
    its stderr (which Ray would forward to the first launcher a second time)."""
    from elastic_moe.actors.console import QUIET_LOGGERS

    os.makedirs(run_dir, exist_ok=True)
    to_file = logging.FileHandler(os.path.join(run_dir, "coordinator.log"))
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    project = logging.getLogger("elastic_moe")
    project.setLevel(logging.INFO)
    project.propagate = False
    for handler in (console, to_file):
        project.addHandler(handler)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class RunHost:
    """The control loop of one run, in the coordinator's process (one thread)."""

    def __init__(self, coordinator: Any, launch: Launch) -> None:
        from elastic_moe.parallel.mesh import remember_param_counts

        self.coordinator = coordinator  # the CoordinatorState of this process (thread-safe)
        self.launch = launch
        if launch.param_counts is not None:
            remember_param_counts(launch.cfg.model, launch.param_counts)
        self.console = ConsoleBuffer()
        _install_console(self.console, launch.run_dir)
        self.thread: threading.Thread | None = None
        self.guard = threading.Lock()
        self.released = threading.Event()
        self.group: Any = None
        self.stop_reason: str | None = None
        # set once the loop's own modules are imported (begun early, in the background), and
        # once MLflow's are too
        self.preloaded: threading.Event | None = None
        self.preload_done: threading.Event | None = None

    def start(self, adopt: bool) -> None:
        """Run the loop on its own thread (once). ``adopt``: take over the live workers of a
        coordinator that died, instead of starting the run's workers."""
        with self.guard:
            if self.thread is not None:
                return
            self.thread = threading.Thread(target=self._run, args=(adopt,), daemon=True,
                                           name="control-loop")
            self.thread.start()

    def stop(self, reason: str) -> None:
        """Stop the run at the next step boundary, after saving that step."""
        self.stop_reason = reason
        if self.group is not None:
            self.group.stop_requested = reason

    def release(self) -> None:
        """A launcher has the result: end the coordinator now (its loop's thread does it, or
        this call, in a coordinator restarted after the loop had ended)."""
        self.released.set()
        if self.thread is None:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _run(self, adopt: bool) -> None:
        try:
            result = self._drive(adopt)
        except BaseException as exc:  # the loop's own set-up failed: still record an outcome
            logger.exception("the control loop failed")
            result = RunResult(ok=False, final_step=max(self.coordinator.snapshot()["last_step"],
                                                        0),
                               status="FAILED", error=f"{type(exc).__name__}: {exc}",
                               exit_code=1)
        self.coordinator.finish(result.status, asdict(result))
        self.released.wait(LINGER_S)
        time.sleep(0.5)  # the launcher's last progress reply is on its way
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _drive(self, adopt: bool) -> RunResult:
        # no two threads importing the same graph at once; MLflow may still be loading (only
        # the tracker's own thread needs it, and it imports through the same package first)
        if self.preloaded is not None and not self.preloaded.wait(timeout=120.0):
            logger.warning("the coordinator's imports have taken over 120 s; going on")
        from elastic_moe.actors.data_worker import start_data_workers
        from elastic_moe.actors.run_log import replay_metrics
        from elastic_moe.actors.train_worker import WorkerSpec
        from elastic_moe.actors.worker_group import ElasticGroup, RunStopped

        launch, cfg = self.launch, self.launch.cfg
        data_readers = start_data_workers(
            launch.run_name, launch.manifest, cfg.data.num_workers, cfg.data.prefetch,
            cfg.train.global_batch_size, namespace=NAMESPACE,
            skip_bad=cfg.data.bad_samples == "skip")
        spec = WorkerSpec(cfg=cfg, run_name=launch.run_name,
                          checkpoint_dir=launch.checkpoint_dir,
                          coordinator=CoordinatorClient(ray.get_runtime_context().current_actor),
                          data_readers=data_readers,
                          threads_per_worker=launch.threads_per_worker,
                          sample_log_dir=launch.sample_log_dir, val_manifest=launch.val_manifest,
                          wrap_model=launch.wrap_model, wrap_writer=launch.wrap_writer)
        tracker = self._open_tracker()
        metrics_log = os.path.join(launch.run_dir, "metrics.jsonl")
        logged_step = 0
        if adopt:  # the live workers hold the steps the log lacks: no checkpoint is read
            logged_step = replay_metrics(metrics_log, None, tracker)
        elif launch.resume:  # steps an earlier loop committed but had not sent to MLflow
            # reading them loads torch (the one time this process does, before any worker
            # exists); not while the preload thread still imports MLflow's modules
            if self.preload_done is not None:
                self.preload_done.wait(timeout=120.0)
            from elastic_moe.checkpoint import Checkpointer

            replay_metrics(metrics_log, Checkpointer(launch.checkpoint_dir, async_save=False),
                           tracker)
        group = ElasticGroup(cfg, spec, self.coordinator, tracker, use_gpu=launch.use_gpu,
                             metrics_log=metrics_log)
        group.stop_requested = self.stop_reason
        self.group = group
        started = time.time()
        result = RunResult(ok=True, final_step=0)
        try:
            outcome = group.adopt(logged_step) if adopt else group.run()
            result.final_step = outcome.final_step
            if outcome.expert_loads is not None:
                tracker.log_expert_heatmap(outcome.expert_loads, outcome.final_step)
        except Exception as exc:  # TrainingFailed and friends: report, mark, don't lose state
            result.ok, result.error = False, f"{type(exc).__name__}: {exc}"
            result.exit_code = getattr(exc, "exit_code", 1)
            result.status = "STOPPED" if isinstance(exc, RunStopped) else "FAILED"
            if result.status == "FAILED":
                self.coordinator.set_loop_state(LoopState.FAILED.value)
            logger.log(logging.WARNING if result.status == "STOPPED" else logging.ERROR,
                       "training %s after %.0f s: %s", result.status.lower(),
                       time.time() - started, result.error)
        finally:
            for reader in data_readers:  # they hold no state; a resubmit starts new ones
                ray.kill(reader, no_restart=True)
        snapshot = self.coordinator.snapshot()
        result.final_step = max(snapshot.get("last_step", 0), result.final_step, 0)
        tracker.log_text(_summary_text(snapshot, result.final_step), "summary.json")
        if not result.ok:
            tracker.set_tags({"failure": (result.error or "")[:5000]})
        tracker.finish({"STOPPED": "KILLED"}.get(result.status, result.status),
                       timeout=cfg.tracking.flush_timeout_s)
        result.mlflow_run_id = self.coordinator.snapshot().get("mlflow_run_id") or tracker.run_id
        return result

    def _open_tracker(self) -> Any:
        """The run's MLflow tracker, in this process: the same run across launchers and
        coordinator restarts."""
        from elastic_moe.train.tracking import Tracker, new_run_record

        launch, cfg = self.launch, self.launch.cfg
        tracker = Tracker.open(launch.tracking_uri, cfg.tracking.experiment,
                               cfg.tracking.run_name or launch.run_name,
                               run_id=self.coordinator.snapshot().get("mlflow_run_id"),
                               on_run_id=self.coordinator.set_mlflow_run_id,
                               retry_s=cfg.tracking.retry_s, max_retry_s=cfg.tracking.max_retry_s)
        if tracker.is_new_run:  # the launcher could not create it (store unreachable then)
            params, tags = new_run_record(cfg.flat(), launch.checkpoint_dir, launch.manifest)
            tracker.log_params(params)
            tracker.set_tags(tags)
        return tracker


def _summary_text(snapshot: dict[str, Any], step: int) -> str:
    return json.dumps({"final_step": step, "world_sizes": snapshot["world_sizes"],
                       "events": snapshot["events"], "committed": snapshot["committed"]},
                      indent=1, default=str)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=64)
class Coordinator(CoordinatorState):
    """The coordinator actor (:func:`create`): the run's record
    (:class:`~elastic_moe.actors.coordinator.CoordinatorState`) and, given a ``launch``, its
    control loop (:class:`RunHost`).

    Detached and restartable: Ray restarts it with the same arguments after its process dies;
    the record is read back from ``state_path`` and a loop that was running takes over the live
    workers (:meth:`RunHost.start` with ``adopt``). Threaded: the workers' calls (leases,
    commits, heartbeats) are served while the loop runs.
    """

    def __init__(self, run_name: str, state_path: str | None, launch: Launch) -> None:
        super().__init__(run_name, state_path)
        self.host = RunHost(self, launch)
        with warnings.catch_warnings():  # Ray 2.60 reads a deprecated field inside the property
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        with self._lock:
            # where the loop runs (operators, tests); written with the next change of the record
            self.state["coordinator_pid"] = os.getpid()
        ended = self.loaded_status in ("FINISHED", "FAILED", "STOPPED")
        if restarted and ended:  # Ray restarted it after its run ended: keep the result
            self.state["status"] = self.loaded_status
            return
        self.state["result"] = None  # a new launch (--resume) of an earlier run: a new result
        # the loop's modules load while the launcher runs its checks (then MLflow: 1.4-3 s on a
        # 2-core machine), otherwise paid after start_run
        self.host.preloaded, self.host.preload_done = threading.Event(), threading.Event()
        threading.Thread(target=_preload, args=(self.host.preloaded, self.host.preload_done),
                         name="elastic-moe-preload", daemon=True).start()
        if restarted and self.loaded_status == "RUNNING" and self.state["slots"]:
            logger.warning("coordinator restarted (pid %d): taking over the run's live workers",
                           os.getpid())
            self.record_event("coordinator_restarted", self.state["last_step"], pid=os.getpid())
            self.host.start(adopt=True)

    def start_run(self) -> None:
        """Start the control loop (once; a second call, e.g. from an attaching launcher, does
        nothing)."""
        self.host.start(adopt=False)

    def progress(self, since: int, incarnation: str | None, wait_s: float = 0.0) -> Progress:
        """The control loop's log lines after ``since`` (numbering restarts with each
        ``incarnation``: a restarted coordinator), its step, and its result once it ended.
        ``wait_s``: with no new line and no result yet, wait up to that long for a line."""
        with self._lock:  # first: every line logged before the result is then in the reply
            status, step, result = (self.state["status"], self.state["last_step"],
                                    self.state["result"])
        current, following, lines = self.host.console.since(since, incarnation,
                                                            0.0 if result else wait_s)
        return Progress(incarnation=current, next=following, lines=lines, status=status,
                        step=step, result=RunResult(**result) if result else None)

    def stop(self, reason: str) -> None:
        """Stop the run at the next step boundary, after saving that step (``--stop``)."""
        logger.warning("stop requested: %s", reason)
        self.host.stop(reason)

    def release(self) -> None:
        """A launcher has the result of the finished run: end this actor (no restart)."""
        self.host.release()


def _preload(loop_modules: threading.Event, done: threading.Event) -> None:
    """Import what :meth:`RunHost._drive` imports, then set ``loop_modules``, then what the
    tracker imports, then set ``done``. The loop waits for ``loop_modules`` before it imports
    anything (two threads importing overlapping module graphs in different orders can make
    importlib raise a deadlock error), but not for MLflow: the workers are asked for while it
    loads, and the tracker connects in its own thread, which queues the records meanwhile. None
    of these modules imports torch (see docs/architecture.md)."""
    import importlib

    try:
        for name in ("elastic_moe.actors.train_worker", "elastic_moe.actors.worker_group",
                     "elastic_moe.actors.data_worker", "elastic_moe.actors.run_log"):
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - the loop's own import reports it
        done.set()
        return
    finally:
        loop_modules.set()
    try:
        importlib.import_module("mlflow.tracking")
    except Exception:  # noqa: BLE001 - the tracker's own import reports it
        pass
    finally:
        done.set()


def create(run_name: str, state_path: str, launch: Launch) -> Any:
    """Create the run's coordinator with its control loop and return its handle: detached (it
    outlives the launcher), restartable (it takes over the live workers after its process
    dies). A coordinator of the same name that did not answer :func:`find` is replaced.

    It is placed on the launcher's node (the head, as a rule), not on any node with room: a
    coordinator on a worker node that is partitioned away would take the whole run with it, and
    the run could no longer tell a cut-off worker from a cut-off coordinator. The affinity is
    hard: a soft one still put it on another node here (1 of 4 tries, Ray 2.60)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    deadline = time.monotonic() + 30.0
    while True:
        try:
            return Coordinator.options(  # type: ignore[attr-defined]
                name=actor_name(run_name), namespace=NAMESPACE, lifetime="detached",
                scheduling_strategy=here).remote(run_name, state_path, launch)
        except ValueError:  # the name is taken by a stale coordinator: end it first
            if time.monotonic() > deadline:
                raise
            try:
                ray.kill(ray.get_actor(actor_name(run_name), namespace=NAMESPACE),
                         no_restart=True)
            except ValueError:
                pass
            time.sleep(0.2)


def find(run_name: str) -> Any:
    """The coordinator of ``run_name`` whose run is still going (its handle), or None. One
    whose run has ended (it waits for a launcher to collect the result) is not live: a new
    launch replaces it (:func:`create`)."""
    try:
        handle = ray.get_actor(actor_name(run_name), namespace=NAMESPACE)
    except ValueError:
        return None
    try:
        progress = ray.get(handle.progress.remote(0, None), timeout=30)
    except ray.exceptions.RayError:  # gone, or an older recorder-only coordinator
        return None
    return handle if progress.result is None else None
