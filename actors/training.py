"""Launch an elastic training run: data, coordinator, Ray Train V2 worker group, MLflow.

The training workers are Ray Train V2 ``TorchTrainer`` workers (Ray actors, one per accelerator;
CPU + gloo without GPUs), each holding its expert-parallel shard of the routed experts and its
FSDP shard of the rest. ``ScalingConfig(num_workers=(min, max))`` makes the group elastic: Ray
Train restarts it at a new size when nodes fail or capacity appears, and every restart runs
:func:`elastic_moe.train.loop.train_func` from the coordinator's last committed checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, cast

import ray

from actors import coordinator as coordinator_mod
from actors import data_worker as data_worker_mod
from actors.cluster import RayConnection, init_ray, requested_address
from actors.preflight import preflight
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
        if self.error:
            lines.append(f"  error:        {self.error}")
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
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer "
                         f"vocab ({dataset.vocab_size}) of {manifest}")
    if dataset.num_sequences < cfg.train.global_batch_size:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size}: more than the "
                         f"{dataset.num_sequences} sequences in {manifest}")
    return manifest


def _init_ray(num_cpus: int | None, min_workers: int = 1) -> RayConnection:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    address = requested_address()
    # Workers import elastic_moe/actors/kernels from the job's working dir on a cluster; locally
    # the checkout is on sys.path already.
    runtime_env = {"env_vars": {"PYTHONPATH": root}} if not address else None
    return init_ray(address, num_cpus=num_cpus, min_workers=min_workers,
                    namespace=coordinator_mod.NAMESPACE, runtime_env=runtime_env)


def run_training(cfg: Config, run_name: str, resume: bool = False, *,
                 output_dir: str = "outputs", faults: list[dict[str, Any]] | None = None,
                 record_samples_dir: str | None = None, num_cpus: int | None = None,
                 threads_per_worker: int = 1) -> TrainingResult:
    """Run (or with ``resume`` continue) training; blocks until the run ends."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from elastic_moe.train.loop import train_func
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
    connection = _init_ray(num_cpus, cfg.parallel.min_workers)
    coordinator = coordinator_mod.get_or_create(run_name, state_path)
    preflight(cfg, connection, checkpoint_dir=checkpoint_dir, tracking_uri=tracking_uri)
    snapshot = cast(dict[str, Any], ray.get(coordinator.snapshot.remote()))
    if not snapshot.get("mlflow_run_id"):
        _create_mlflow_run(coordinator, tracking_uri, cfg, run_name, checkpoint_dir, manifest)
    if resume:
        committed = snapshot.get("committed")
        log.info("resuming run %s from %s", run_name,
                 f"step {committed['step']}" if committed else "the start (nothing committed)")

    # A hung rank stops answering Ray Train's health polls too: give up on it as quickly as the
    # collectives do (Ray's default is 10 minutes). Read by the controller, which Ray Train
    # starts with the driver's environment.
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S",
                          str(cfg.elastic.collective_timeout_s))
    # The controller notices a dead worker at its next poll (default every 2 s).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Before restarting, Ray Train asks every worker to destroy its process group and waits for
    # all of them (30 s by default); a hung rank never answers. Healthy ranks answer in ms.
    _propagate_to_controller("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "3")
    use_gpu = bool(ray.cluster_resources().get("GPU", 0)) and cfg.parallel.max_workers > 0
    low, high = cfg.parallel.min_workers, cfg.parallel.max_workers
    scaling = ScalingConfig(num_workers=(low, high) if high > low else low, use_gpu=use_gpu,
                            resources_per_worker=None if use_gpu else {"CPU": 1},
                            elastic_resize_monitor_interval_s=cfg.elastic.resize_check_s)
    data_workers = data_worker_mod.start_data_workers(
        run_name, manifest, cfg.data.num_workers, cfg.data.prefetch,
        cfg.train.global_batch_size, namespace=coordinator_mod.NAMESPACE)
    loop_config = {
        "cfg": dataclasses.asdict(cfg), "coordinator": coordinator, "manifest": manifest,
        "data_workers": data_workers,
        "checkpoint_dir": checkpoint_dir, "tracking_uri": tracking_uri, "run_name": run_name,
        "faults": faults or [], "record_samples_dir": record_samples_dir,
        "threads_per_worker": threads_per_worker,
    }
    trainer = TorchTrainer(
        train_func, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                 timeout_s=int(cfg.elastic.collective_timeout_s)),
        scaling_config=scaling,
        run_config=RunConfig(name=run_name, storage_path=os.path.join(run_dir, "ray"),
                             failure_config=FailureConfig(max_failures=cfg.elastic.max_failures)),
    )
    started = time.time()
    error = None
    try:
        trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: report, mark, don't lose state
        error = f"{type(exc).__name__}: {exc}"
        log.error("training failed after %.0f s: %s", time.time() - started, error)
    finally:
        for worker in data_workers:  # they hold no state; a resubmit starts new ones
            ray.kill(worker)
    ok = error is None
    ray.get(coordinator.finish.remote("FINISHED" if ok else "FAILED"))
    snapshot = ray.get(coordinator.snapshot.remote())
    run_id = snapshot.get("mlflow_run_id")
    if not ok and run_id:
        _mark_mlflow_failed(tracking_uri, run_id, error or "")
    return TrainingResult(ok=ok, run_name=run_name, run_dir=run_dir, checkpoint_dir=checkpoint_dir,
                          tracking_uri=tracking_uri, mlflow_run_id=run_id,
                          final_step=max(snapshot.get("last_step", 0), 0), error=error,
                          coordinator_state=snapshot)


def _propagate_to_controller(name: str, default: str) -> None:
    """Set ``name`` (unless the user did) for the Ray Train controller too.

    The controller is an actor that gets only the driver variables Ray Train lists for
    propagation; ``TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S`` is read there but not listed (Ray 2.60).
    """
    os.environ.setdefault(name, default)
    try:
        from ray.train.v2._internal import constants
    except ImportError:  # another Ray layout: the variable then only reaches this process
        log.warning("cannot hand %s to the Ray Train controller in this Ray version", name)
        return
    constants.ENV_VARS_TO_PROPAGATE.add(name)


def _create_mlflow_run(coordinator: Any, tracking_uri: str, cfg: Config, run_name: str,
                       checkpoint_dir: str, manifest: str) -> None:
    """Open the tracking store and create the run (params, tags) here, once, before any worker
    can touch it.

    A store that cannot be reached now is not fatal: rank 0's tracker creates the run instead,
    retrying in the background.
    """
    from elastic_moe.train.tracking import create_run, new_run_record

    params, tags = new_run_record(cfg.flat(), checkpoint_dir, manifest)
    try:
        run_id = create_run(tracking_uri, cfg.tracking.experiment,
                            cfg.tracking.run_name or run_name, params, tags)
    except Exception as exc:
        log.warning("MLflow store %s not reachable at launch (%s); rank 0 will keep trying",
                    tracking_uri, exc)
        return
    ray.get(coordinator.set_mlflow_run_id.remote(run_id))


def _mark_mlflow_failed(tracking_uri: str, run_id: str, error: str) -> None:
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        client.set_tag(run_id, "failure", error[:5000])
        client.set_terminated(run_id, status="FAILED")
    except Exception as exc:
        log.error("could not mark MLflow run %s FAILED: %s", run_id, exc)
