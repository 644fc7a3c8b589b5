"""Launch an elastic training run, or attach to a live one, and follow it to its end.

The run is driven by its coordinator (:mod:`elastic_moe.actors.coordinator`, hosting the control
loop of :mod:`elastic_moe.actors.run_loop`), a detached actor: this process checks the launch,
prepares the data, creates the MLflow run and the coordinator, and then only prints the
coordinator's log lines and returns the outcome. It can die without stopping training; the
same call again attaches. The training workers are the project's own Ray actors
(:mod:`elastic_moe.actors.train_worker`, one per accelerator; CPU + gloo without GPUs).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from elastic_moe.actors import coordinator as coordinator_mod
from elastic_moe.actors import run_loop
from elastic_moe.actors.cluster import (
    DEFAULT_CONNECT_TIMEOUT_S,
    RayConnection,
    init_ray,
    requested_address,
)
from elastic_moe.actors.coordinator import CoordinatorClient
from elastic_moe.actors.preflight import preflight

from elastic_moe.config import Config
from elastic_moe.parallel.mesh import param_counts

log = logging.getLogger(__name__)

FOLLOW_POLL_S = 10.0  # how long one progress request may take before the launcher says so
FOLLOW_WAIT_S = 0.5  # how long the coordinator holds a progress request for the next line


@dataclass
class TrainingResult:
    ok: bool
    run_name: str
    run_dir: str
    checkpoint_dir: str
    tracking_uri: str
    mlflow_run_id: str | None
    final_step: int
    error: str | None = None
    coordinator_state: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0  # jobs/train.py's exit status (docs/troubleshooting.md)
    status: str = ""  # FINISHED | FAILED | STOPPED; empty: from ``ok``

    def summary(self) -> str:
        state = self.coordinator_state
        sizes = " -> ".join(str(w["world_size"]) for w in state.get("world_sizes", []))
        lines = [
            f"run {self.run_name}: {self.status or ('FINISHED' if self.ok else 'FAILED')} at "
            f"step {self.final_step}",
            f"  world sizes:  {sizes or '-'}",
            f"  checkpoints:  {self.checkpoint_dir}",
            f"  MLflow:       {self.tracking_uri}  (run id {self.mlflow_run_id})",
            f"  dashboard:    mlflow ui --backend-store-uri {self.tracking_uri}",
        ]
        if self.error:  # the traceback, if any, was logged once above: the headline here
            lines += [f"  error:        {line}" if i == 0 else f"                {line}"
                      for i, line in enumerate(self.error.splitlines()[:2])]
        return "\n".join(lines)


def _prepare_data(cfg: Config) -> str:
    from elastic_moe.data.sample_corpus import ensure_prepared
    from elastic_moe.data.shards import TokenDataset

    if cfg.data.manifest:
        manifest = os.path.abspath(cfg.data.manifest)
        if not os.path.exists(manifest):
            raise ValueError(f"data.manifest={cfg.data.manifest!r}: no such file (run "
                             "jobs/prepare_data.py first)")
    else:
        log.info("preparing the bundled sample corpus under %s", cfg.data.cache_dir)
        manifest = ensure_prepared(cfg.data.cache_dir, cfg.data.tokenizer_vocab_size,
                                   cfg.train.seq_len)
    dataset = TokenDataset(manifest)
    if dataset.seq_len != cfg.train.seq_len:
        raise ValueError(f"train.seq_len={cfg.train.seq_len}: the data in {manifest} is packed "
                         f"to seq_len {dataset.seq_len}")
    if dataset.vocab_size > cfg.model.vocab_size:
        hint = (f"; prepare the data with the model's tokenizer: jobs/prepare_data.py "
                f"--tokenizer {cfg.checkpoint.init_from.rstrip('/')}/tokenizer.json"
                if cfg.checkpoint.init_from else "")
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer "
                         f"vocab ({dataset.vocab_size}) of {manifest}{hint}")
    if dataset.num_sequences < cfg.train.global_batch_size:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size}: more than the "
                         f"{dataset.num_sequences} sequences in {manifest}")
    return manifest


def _init_ray(num_cpus: int | None, min_workers: int = 1,
              connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> RayConnection:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    address = requested_address()
    # Workers import elastic_moe/actors/kernels from the job's working dir on a cluster. Locally
    # they get the checkout in front of the PYTHONPATH this process has (which can hold the
    # packages themselves, e.g. an image that puts them there): never instead of it.
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    runtime_env = ({"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}
                   if not address else None)
    return init_ray(address, num_cpus=num_cpus, min_workers=min_workers,
                    namespace=coordinator_mod.NAMESPACE, runtime_env=runtime_env,
                    connect_timeout_s=connect_timeout_s)


def run_training(cfg: Config, run_name: str, resume: bool = False, *,
                 output_dir: str = "outputs", sample_log_dir: str | None = None,
                 num_cpus: int | None = None, threads_per_worker: int = 1,
                 wrap_model: Callable[[Any, int, Callable[[], int]], None] | None = None,
                 wrap_writer: Callable[[Any, int], Any] | None = None,
                 attach_to: str | None = None,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> TrainingResult:
    """Start the run (with ``resume``: continue it from its last committed checkpoint) in its
    coordinator, or attach to it if it is live; follow it and return how it ended.
    ``attach_to``: a run to attach to instead, if it is live (the launcher was given no run
    name: the newest running run of the recipe).

    The control loop runs in the coordinator (:mod:`elastic_moe.actors.run_loop`), so this
    process can die without stopping training; calling this again with the same run attaches.
    ``sample_log_dir``: write an audit log of the samples every committed step consumed.
    ``wrap_model(model, rank, step)``: runs on every worker's model once it is built (see
    :class:`WorkerSpec`).
    ``wrap_writer(writer, step)``: wraps each checkpoint save's DCP storage writer in the
    workers (tests hand in a slow or failing one).
    ``connect_timeout_s``: how long a Ray address (``RAY_ADDRESS``) may take to answer.
    """
    connection = None
    if attach_to:
        connection = _init_ray(num_cpus, cfg.parallel.min_workers, connect_timeout_s)
        live = run_loop.find(attach_to)
        if live is not None:
            log.info("run %s is live: attaching to it (the newest running %s run; give "
                     "--run-name for a new one)", attach_to, cfg.name)
            return _follow(live, **_paths(cfg, attach_to, output_dir))
    where = _paths(cfg, run_name, output_dir)
    run_dir, checkpoint_dir, state_path, tracking_uri = (
        where["run_dir"], where["checkpoint_dir"], where["state_path"], where["tracking_uri"])
    if os.path.exists(state_path) or resume:  # the run may be live: attach to it
        connection = connection or _init_ray(num_cpus, cfg.parallel.min_workers, connect_timeout_s)
        live = run_loop.find(run_name)
        if live is not None:
            log.info("run %s is live: attaching to it (its coordinator drives it; stopping "
                     "this launcher stops nothing)", run_name)
            return _follow(live, **where)
        if os.path.exists(state_path) and not resume:
            raise ValueError(f"run {run_name!r} already exists in {run_dir} and is not running: "
                             "pass --resume to continue it or --run-name NAME for a new run")
    manifest = _prepare_data(cfg)
    from elastic_moe.train.evaluate import validation_manifest

    val_manifest = validation_manifest(cfg, manifest)
    connection = connection or _init_ray(num_cpus, cfg.parallel.min_workers, connect_timeout_s)
    launch = run_loop.Launch(cfg=cfg, run_name=run_name, run_dir=run_dir,
                             checkpoint_dir=checkpoint_dir, manifest=manifest,
                             val_manifest=val_manifest, tracking_uri=tracking_uri,
                             use_gpu=bool(ray.cluster_resources().get("GPU", 0)), resume=resume,
                             sample_log_dir=sample_log_dir,
                             threads_per_worker=threads_per_worker, wrap_model=wrap_model,
                             wrap_writer=wrap_writer, param_counts=param_counts(cfg.model))
    # the coordinator exists (and answers --stop, attaches) while the checks wait for capacity;
    # it writes nothing until the run starts, and a refused launch ends it
    handle = run_loop.create(run_name, state_path, launch)
    try:
        preflight(cfg, connection, checkpoint_dir=checkpoint_dir, tracking_uri=tracking_uri)
    except BaseException:
        ray.kill(handle, no_restart=True)
        raise
    # the coordinator's tracker creates the MLflow run (or reopens the record's), so this
    # process never imports MLflow: 4-7 s of a launch on a 2-core machine
    if resume:
        committed = CoordinatorClient(handle).snapshot().get("committed")
        log.info("resuming run %s from %s", run_name,
                 f"step {committed['step']}" if committed else "the start (nothing committed)")
    ray.get(handle.start_run.remote())
    return _follow(handle, **where)


def _paths(cfg: Config, run_name: str, output_dir: str) -> dict[str, str]:
    """Where run ``run_name`` keeps its record, checkpoints and metrics."""
    from elastic_moe.train.tracking import default_tracking_uri

    run_dir = os.path.abspath(os.path.join(output_dir, run_name))
    checkpoint_dir = cfg.checkpoint.dir
    if "://" not in checkpoint_dir and not os.path.isabs(checkpoint_dir):
        checkpoint_dir = os.path.join(run_dir, "checkpoints")
    return {"run_name": run_name, "run_dir": run_dir, "checkpoint_dir": checkpoint_dir,
            "tracking_uri": cfg.tracking.tracking_uri or default_tracking_uri(),
            "state_path": os.path.join(run_dir, "coordinator.json")}


def stop_training(cfg: Config, run_name: str, *, output_dir: str = "outputs",
                  reason: str = "jobs/train.py --stop",
                  connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> TrainingResult:
    """Ask the live run ``run_name`` to stop at its next step boundary, after saving that
    step; follow it to its end. Raises ValueError when the run is not live."""
    _init_ray(None, cfg.parallel.min_workers, connect_timeout_s)
    live = run_loop.find(run_name)
    if live is None:
        raise ValueError(f"--stop: run {run_name!r} is not running on this Ray cluster "
                         "(give --ray-address, or the run has ended)")
    ray.get(live.stop.remote(reason))
    log.info("run %s: stop requested; it stops after its current step, once that is saved",
             run_name)
    return _follow(live, **_paths(cfg, run_name, output_dir))


def _follow(handle: Any, *, run_name: str, run_dir: str, checkpoint_dir: str,
            tracking_uri: str, state_path: str) -> TrainingResult:
    """Print the coordinator's log lines as they come (through this process's loggers of the
    same names) until the run ends; then release the coordinator and return the result."""
    index, incarnation = 0, None
    waiting_since: float | None = None
    while True:
        try:
            reply = ray.get(handle.progress.remote(index, incarnation, FOLLOW_WAIT_S),
                            timeout=FOLLOW_POLL_S)
        except ray.exceptions.GetTimeoutError:  # busy, or restarting after its process died
            waiting_since = waiting_since or time.time()
            log.warning("the coordinator of run %s has not answered for %.0f s; waiting",
                        run_name, time.time() - waiting_since)
            continue
        except ray.exceptions.RayActorError as exc:  # gone for good: what its record says
            return _from_record(state_path, run_name=run_name, run_dir=run_dir,
                                checkpoint_dir=checkpoint_dir, tracking_uri=tracking_uri,
                                gone=str(exc).splitlines()[0])
        waiting_since = None
        if incarnation is not None and reply.incarnation != incarnation:
            log.warning("the coordinator of run %s restarted; its log follows from the start",
                        run_name)
        incarnation = reply.incarnation
        for line in reply.lines:
            logging.getLogger(line.name).log(line.level, "%s", line.msg)
        index = reply.next
        if reply.result is not None and not reply.lines:
            break
    result = reply.result
    snapshot = ray.get(handle.snapshot.remote())
    handle.release.remote()
    return TrainingResult(ok=result.ok, run_name=run_name, run_dir=run_dir,
                          checkpoint_dir=checkpoint_dir, tracking_uri=tracking_uri,
                          mlflow_run_id=result.mlflow_run_id or snapshot.get("mlflow_run_id"),
                          final_step=result.final_step, error=result.error,
                          coordinator_state=snapshot, exit_code=result.exit_code,
                          status=result.status)


def _from_record(state_path: str, *, gone: str, **where: Any) -> TrainingResult:
    """The result a coordinator that is gone left in its state file."""
    where.pop("state_path", None)
    snapshot: dict[str, Any] = {}
    if os.path.exists(state_path):
        with open(state_path) as f:
            snapshot = json.load(f)
    result = snapshot.get("result")
    if result is None:
        return TrainingResult(ok=False, mlflow_run_id=snapshot.get("mlflow_run_id"),
                              final_step=max(snapshot.get("last_step", 0), 0),
                              error=f"the run's coordinator is gone ({gone}) and recorded no "
                                    "result: continue the run with --resume",
                              coordinator_state=snapshot, exit_code=1, **where)
    return TrainingResult(ok=result["ok"], mlflow_run_id=result["mlflow_run_id"],
                          final_step=result["final_step"], error=result["error"],
                          coordinator_state=snapshot, exit_code=result["exit_code"],
                          status=result["status"], **where)


