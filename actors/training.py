"""Launch an elastic training run: data readers, coordinator, the elastic worker group, MLflow.

The training workers are the project's own Ray actors (:mod:`elastic_moe.actors.train_worker`, one per
accelerator; CPU + gloo without GPUs), each holding its expert-parallel shard of the routed
experts and its FSDP shard of the rest. :class:`elastic_moe.actors.worker_group.ElasticGroup` keeps them
training through failures and joins without restarting the survivors. The MLflow run is created
here, before any worker starts, and this process logs every committed step to it once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from elastic_moe.actors import coordinator as coordinator_mod
from elastic_moe.actors import data_worker as data_worker_mod
from elastic_moe.actors.cluster import RayConnection, init_ray, requested_address
from elastic_moe.actors.coordinator import CoordinatorClient
from elastic_moe.actors.preflight import preflight
from elastic_moe.actors.train_worker import WorkerSpec
from elastic_moe.actors.worker_group import ElasticGroup, replay_metrics

from elastic_moe.config import Config

log = logging.getLogger(__name__)


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

    def summary(self) -> str:
        state = self.coordinator_state
        sizes = " -> ".join(str(w["world_size"]) for w in state.get("world_sizes", []))
        lines = [
            f"run {self.run_name}: {'FINISHED' if self.ok else 'FAILED'} at step {self.final_step}",
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


def _init_ray(num_cpus: int | None, min_workers: int = 1) -> RayConnection:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    address = requested_address()
    # Workers import elastic_moe/actors/kernels from the job's working dir on a cluster. Locally
    # they get the checkout in front of the PYTHONPATH this process has (which can hold the
    # packages themselves, e.g. an image that puts them there): never instead of it.
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    runtime_env = ({"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}
                   if not address else None)
    return init_ray(address, num_cpus=num_cpus, min_workers=min_workers,
                    namespace=coordinator_mod.NAMESPACE, runtime_env=runtime_env)


def run_training(cfg: Config, run_name: str, resume: bool = False, *,
                 output_dir: str = "outputs", sample_log_dir: str | None = None,
                 num_cpus: int | None = None, threads_per_worker: int = 1,
                 wrap_model: Callable[[Any, int, Callable[[], int]], None] | None = None,
                 wrap_writer: Callable[[Any, int], Any] | None = None) -> TrainingResult:
    """Run (or with ``resume`` continue) training; blocks until the run ends.

    ``sample_log_dir``: write an audit log of the samples every committed step consumed.
    ``wrap_model(model, rank, step)``: runs on every worker's model once it is built (see
    :class:`WorkerSpec`).
    ``wrap_writer(writer, step)``: wraps each checkpoint save's DCP storage writer in the
    workers (tests hand in a slow or failing one).
    """
    from elastic_moe.train.tracking import default_tracking_uri

    run_dir = os.path.abspath(os.path.join(output_dir, run_name))
    checkpoint_dir = cfg.checkpoint.dir
    if "://" not in checkpoint_dir and not os.path.isabs(checkpoint_dir):
        checkpoint_dir = os.path.join(run_dir, "checkpoints")
    state_path = os.path.join(run_dir, "coordinator.json")
    if os.path.exists(state_path) and not resume:
        raise ValueError(f"run {run_name!r} already exists in {run_dir}: pass --resume to continue "
                         "it or --run-name NAME for a new run")
    tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri()
    manifest = _prepare_data(cfg)
    from elastic_moe.train.evaluate import validation_manifest

    val_manifest = validation_manifest(cfg, manifest)
    connection = _init_ray(num_cpus, cfg.parallel.min_workers)
    coordinator = coordinator_mod.get_or_create(run_name, state_path)
    preflight(cfg, connection, checkpoint_dir=checkpoint_dir, tracking_uri=tracking_uri)
    snapshot = coordinator.snapshot()
    if not snapshot.get("mlflow_run_id"):
        _create_mlflow_run(coordinator, tracking_uri, cfg, run_name, checkpoint_dir, manifest)
    if resume:
        committed = snapshot.get("committed")
        log.info("resuming run %s from %s", run_name,
                 f"step {committed['step']}" if committed else "the start (nothing committed)")
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    data_readers = data_worker_mod.start_data_workers(
        run_name, manifest, cfg.data.num_workers, cfg.data.prefetch,
        cfg.train.global_batch_size, namespace=coordinator_mod.NAMESPACE,
        skip_bad=cfg.data.bad_samples == "skip")
    spec = WorkerSpec(cfg=cfg, run_name=run_name, checkpoint_dir=checkpoint_dir,
                      coordinator=coordinator, data_readers=data_readers,
                      threads_per_worker=threads_per_worker, sample_log_dir=sample_log_dir,
                      val_manifest=val_manifest, wrap_model=wrap_model,
                      wrap_writer=wrap_writer)
    tracker = _open_tracker(cfg, coordinator, tracking_uri, run_name, checkpoint_dir, manifest)
    os.makedirs(run_dir, exist_ok=True)
    metrics_log = os.path.join(run_dir, "metrics.jsonl")
    if resume:  # steps an earlier launcher committed but had not yet sent to MLflow
        from elastic_moe.checkpoint import Checkpointer

        replay_metrics(metrics_log, Checkpointer(checkpoint_dir, async_save=False), tracker)
    group = ElasticGroup(cfg, spec, coordinator, tracker, use_gpu=use_gpu,
                         metrics_log=metrics_log)
    started = time.time()
    error = None
    exit_code = 0
    final_step = 0
    try:
        outcome = group.run()
        final_step = outcome.final_step
        if outcome.expert_loads is not None:
            tracker.log_expert_heatmap(outcome.expert_loads.numpy(), final_step)
    except Exception as exc:  # TrainingFailed and friends: report, mark, don't lose state
        error = f"{type(exc).__name__}: {exc}"
        exit_code = getattr(exc, "exit_code", 1)
        log.error("training failed after %.0f s: %s", time.time() - started, error)
    finally:
        for reader in data_readers:  # they hold no state; a resubmit starts new ones
            ray.kill(reader)
    ok = error is None
    coordinator.finish("FINISHED" if ok else "FAILED")
    snapshot = coordinator.snapshot()
    tracker.log_text(_summary_text(snapshot, max(snapshot.get("last_step", 0), 0)), "summary.json")
    if not ok:
        tracker.set_tags({"failure": (error or "")[:5000]})
    tracker.finish("FINISHED" if ok else "FAILED", timeout=cfg.tracking.flush_timeout_s)
    return TrainingResult(ok=ok, run_name=run_name, run_dir=run_dir, checkpoint_dir=checkpoint_dir,
                          tracking_uri=tracking_uri, mlflow_run_id=snapshot.get("mlflow_run_id")
                          or tracker.run_id,
                          final_step=max(snapshot.get("last_step", 0), final_step, 0),
                          error=error, coordinator_state=snapshot, exit_code=exit_code)


def _open_tracker(cfg: Config, coordinator: CoordinatorClient, tracking_uri: str, run_name: str,
                  checkpoint_dir: str, manifest: str) -> Any:
    """The run's MLflow tracker, in this process: the same run across resubmissions."""
    from elastic_moe.train.tracking import Tracker, new_run_record

    tracker = Tracker.open(tracking_uri, cfg.tracking.experiment,
                           cfg.tracking.run_name or run_name,
                           run_id=coordinator.snapshot().get("mlflow_run_id"),
                           on_run_id=coordinator.set_mlflow_run_id,
                           retry_s=cfg.tracking.retry_s, max_retry_s=cfg.tracking.max_retry_s)
    if tracker.is_new_run:  # the launcher could not create it (store unreachable then)
        params, tags = new_run_record(cfg.flat(), checkpoint_dir, manifest)
        tracker.log_params(params)
        tracker.set_tags(tags)
    return tracker


def _summary_text(snapshot: dict[str, Any], step: int) -> str:
    import json

    return json.dumps({"final_step": step, "world_sizes": snapshot["world_sizes"],
                       "events": snapshot["events"], "committed": snapshot["committed"]},
                      indent=1, default=str)


def _create_mlflow_run(coordinator: CoordinatorClient, tracking_uri: str, cfg: Config, run_name: str,
                       checkpoint_dir: str, manifest: str) -> None:
    """Open the tracking store and create the run (params, tags) here, once, before any worker
    can touch it.

    A store that cannot be reached now is not fatal: the control loop's tracker (this process)
    creates the run instead, retrying in the background.
    """
    from elastic_moe.train.tracking import create_run, new_run_record

    params, tags = new_run_record(cfg.flat(), checkpoint_dir, manifest)
    try:
        run_id = create_run(tracking_uri, cfg.tracking.experiment,
                            cfg.tracking.run_name or run_name, params, tags)
    except Exception as exc:
        log.warning("MLflow store %s not reachable at launch (%s); the tracker will keep trying",
                    tracking_uri, exc)
        return
    coordinator.set_mlflow_run_id(run_id)
