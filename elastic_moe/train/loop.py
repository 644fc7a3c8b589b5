"""The per-worker training function that Ray Train V2 runs on every worker of a group.

Each (re)start of the worker group runs it from the top (DESIGN.md "The flow", step 3): plan the
mesh for this world size -> build the model on the meta device and parallelize it -> restore the
coordinator's last committed checkpoint, resharding to this layout -> stream this rank's share of
each global batch from the run's data-worker actors, asked by the world-size-independent data
position the checkpoint holds (one step ahead, so the next batch is in flight while a step runs)
-> train -> checkpoint (async)
every N steps, rank 0 committing to the coordinator -> MLflow on rank 0.

How a global batch is shared out at each size is in :mod:`elastic_moe.train.elastic`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from elastic_moe.checkpoint import DIE_DURING_SAVE_ENV, Checkpointer, CheckpointError, TrainState
from elastic_moe.config import Config
from elastic_moe.data.sampler import DataPosition, advance, split_batch
from elastic_moe.model.flops import peak_tflops, training_flops_per_token
from elastic_moe.train.elastic import effective_batch
from elastic_moe.train.step import build_optimizer, train_step

log = logging.getLogger(__name__)


def _maybe_inject_fault(faults: list[dict[str, Any]], step: int, rank: int, coordinator: Any,
                        phase: str) -> None:
    """Test hooks, each fired once per run: ``{"step": s, "rank": r, "mode": m, "phase": p}``.

    ``phase="step"`` acts before step ``s`` runs: ``mode="exit"`` ends the process, ``"hang"``
    stops it (SIGSTOP, a hung rank). ``phase="save"`` makes the rank exit half-way through
    writing its shards of the checkpoint taken after step ``s``.
    """
    import ray

    for fault in faults:
        if fault["step"] != step or fault["rank"] != rank or fault.get("phase", "step") != phase:
            continue
        key = f"{fault['mode']}:{phase}:{step}:{rank}"
        if not ray.get(coordinator.fault_once.remote(key)):
            continue
        log.error("test fault %s (%s) on rank %d at step %d", fault["mode"], phase, rank, step)
        ray.get(coordinator.record_event.remote("fault_injected", step, rank=rank,
                                                mode=fault["mode"], phase=phase))
        if phase == "save":
            os.environ[DIE_DURING_SAVE_ENV] = f"{step}:{rank}"
        elif fault["mode"] == "exit":
            os._exit(3)
        elif fault["mode"] == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train V2 per-worker entry point; ``config`` comes from :func:`actors.training.run_training`."""
    import ray
    import ray.train

    from elastic_moe.parallel import plan_mesh, setup_model

    timings = {"worker_start": time.time()}  # recovery-time breakdown, reported by rank 0
    cfg = Config.from_dict(config["cfg"])
    coordinator = config["coordinator"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    # Opening the MLflow run (store, run id, history) is slow: overlap it with setup and restore.
    opening = (ThreadPoolExecutor(1, thread_name_prefix="mlflow-open").submit(
        _open_tracker, cfg, config, coordinator) if rank == 0 else None)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    if torch.cuda.is_available():
        device = torch.device("cuda", ctx.get_local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))

    plan = plan_mesh(world_size, cfg.parallel.gpus_per_node, cfg.model, cfg.parallel,
                     global_batch_size=cfg.train.global_batch_size)
    if rank == 0:
        log.info("mesh plan for %d workers: %s", world_size, plan.describe())
    model = setup_model(cfg.model, plan, device, seed=cfg.train.seed,
                        mixed_precision=cfg.train.mixed_precision)
    optimizer = build_optimizer(model, cfg.train)
    ckpt = Checkpointer(config["checkpoint_dir"], keep_last=cfg.checkpoint.keep_last,
                        keep_every=cfg.checkpoint.keep_every, async_save=cfg.checkpoint.async_save)
    timings["setup_done"] = time.time()

    # ---- restore exactly the coordinator's committed step (never an older one silently)
    committed = ray.get(coordinator.restore_point.remote())
    state: TrainState | None = None
    if committed is not None:
        target = committed["step"]
        try:
            state = ckpt.restore(model, optimizer, step=target)
        except CheckpointError as exc:
            log.error("committed checkpoint step %d unusable (%s); trying older ones", target, exc)
            state = ckpt.restore(model, optimizer, max_step=target - 1)
            if rank == 0:
                coordinator.fell_back.remote(target, state.step if state else 0, str(exc))
    timings["restore_done"] = time.time()
    step = state.step if state else 0
    tokens_seen = state.tokens_seen if state else 0
    position = (DataPosition.from_dict(state.data_position) if state and state.data_position
                else DataPosition(seed=cfg.train.seed))

    global_batch, lr_scale = effective_batch(cfg.train, world_size, cfg.parallel.max_workers)
    train_cfg = dataclasses.replace(cfg.train, lr=cfg.train.lr * lr_scale,
                                    min_lr=cfg.train.min_lr * lr_scale)
    data_workers = config["data_workers"]
    feed = _BatchFeed(data_workers[rank % len(data_workers)], global_batch, rank, world_size)
    feed.request(position)

    tracker = None
    flops_per_token, peak = 0.0, None  # rank 0 logs the model FLOP rate and MFU
    if rank == 0:
        flops_per_token = training_flops_per_token(cfg.model, cfg.train.seq_len)
        peak = cfg.tracking.peak_tflops or peak_tflops(device)
        if lr_scale != 1.0 or cfg.train.resize_policy == "scale_lr":
            log.info("resize policy scale_lr: global batch %d at %d workers, lr x%.3f",
                     global_batch, world_size, lr_scale)
        epoch = ray.get(coordinator.start_epoch.remote(world_size, plan.to_dict(), step, timings))
        assert opening is not None
        tracker = opening.result()
        tracker.log_event(epoch["cause"], step, world_size=world_size, plan=plan.describe(),
                          previous_world_size=epoch["previous_world_size"],
                          steps_redone=epoch["steps_redone"], downtime_s=epoch["downtime_s"])
        log.info("epoch %d (%s): %d workers, continuing at step %d, global batch %d",
                 epoch["epoch"], epoch["cause"], world_size, step, global_batch)
    samples_log = config.get("record_samples_dir")
    faults = list(config.get("faults", []))
    first = True
    last_metrics = None
    try:
        while step < cfg.train.steps:
            _maybe_inject_fault(faults, step, rank, coordinator, "step")
            batch = feed.take()
            position = advance(position, global_batch, feed.num_sequences)
            if step + 1 < cfg.train.steps:
                feed.request(position)  # fetched while this step runs
            ids = batch["sample_ids"]
            metrics = train_step(model, optimizer, split_batch(batch, cfg.train.micro_batch_size),
                                 step, train_cfg, cfg.model,
                                 batch_fraction=len(ids) / global_batch)
            if samples_log:
                _record_samples(samples_log, rank, step, ids)
            step += 1
            tokens_seen += metrics.tokens
            last_metrics = metrics
            if rank == 0:
                assert tracker is not None
                values = metrics.as_dict()
                values.update(world_size=world_size, ep_degree=plan.expert_parallel_degree,
                              tokens_seen=tokens_seen, data_wait_s=feed.last_wait_s)
                # model TFLOP/s per worker; MFU against the accelerator's peak where known
                values["tflops_per_worker"] = (flops_per_token * values["tokens_per_s"]
                                               / world_size / 1e12)
                if peak:
                    values["mfu"] = values["tflops_per_worker"] / peak
                tracker.log_metrics(values, step)
                coordinator.heartbeat.remote(step, first)
                if step % cfg.train.log_freq == 0 or first:
                    log.info("step %d loss %.4f lm %.4f mtp %.4f grad_norm %.3f lr %.2e tok/s %.0f "
                             "load max/mean %.2f", step, metrics.loss, metrics.lm_loss,
                             metrics.mtp_loss, metrics.grad_norm, metrics.lr,
                             values["tokens_per_s"], values.get("moe/load_max_over_mean", 0.0))
            first = False
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.steps:
                _maybe_inject_fault(faults, step, rank, coordinator, "save")
                train_state = TrainState(step=step, tokens_seen=tokens_seen,
                                         data_position=position.to_dict(), mesh_plan=plan.to_dict(),
                                         model_config=dataclasses.asdict(cfg.model))
                on_commit = functools.partial(_commit, coordinator, tracker, state=train_state)
                ckpt.save(step, model, optimizer, train_state,
                          on_commit=on_commit if rank == 0 else None)
                ray.train.report({"step": step, "loss": metrics.loss})
    except Exception as exc:  # when a rank noticed a failure: the "detection" of recovery time
        coordinator.record_event.remote("worker_error", step, rank=rank,
                                        error=f"{type(exc).__name__}: {str(exc)[:300]}")
        raise
    ckpt.wait()
    if rank == 0 and tracker is not None:
        if last_metrics is not None and last_metrics.expert_loads is not None:
            tracker.log_expert_heatmap(last_metrics.expert_loads.numpy(), step)
        snapshot = ray.get(coordinator.snapshot.remote())
        tracker.log_text(_summary_text(snapshot, step), "summary.json")
        tracker.finish("FINISHED")
    if dist.is_initialized():
        dist.barrier()


class _BatchFeed:
    """This rank's stream of batches from a data-worker actor, one request kept in flight."""

    def __init__(self, worker: Any, global_batch: int, rank: int, world_size: int) -> None:
        import ray

        self.worker, self.global_batch = worker, global_batch
        self.rank, self.world_size = rank, world_size
        self.num_sequences = int(ray.get(worker.info.remote())["num_sequences"])
        self.pending: Any = None
        self.last_wait_s = 0.0  # how long the last take() blocked: > 0 means data was late

    def request(self, position: DataPosition) -> None:
        self.pending = self.worker.batch_at.remote(position.to_dict(), self.global_batch,
                                                   self.rank, self.world_size)

    def take(self) -> dict[str, Any]:
        import ray

        if self.pending is None:
            raise RuntimeError("take() without a request(): the feed has nothing in flight")
        started = time.perf_counter()
        batch = ray.get(self.pending)
        self.last_wait_s = time.perf_counter() - started
        self.pending = None
        return batch


def _commit(coordinator: Any, tracker: Any, step: int, path: str, *, state: TrainState) -> None:
    coordinator.commit.remote(step, path, state.data_position, state.tokens_seen)
    if tracker is not None:
        tracker.set_tags({"last_checkpoint": path, "last_checkpoint_step": str(step)})


def _open_tracker(cfg: Config, config: dict[str, Any], coordinator: Any) -> Any:
    """The run's MLflow tracker: the same run across restarts, params logged once."""
    import ray

    from elastic_moe.train.tracking import Tracker, new_run_record

    snapshot = ray.get(coordinator.snapshot.remote())
    tracker = Tracker.open(config["tracking_uri"], cfg.tracking.experiment,
                           cfg.tracking.run_name or config["run_name"],
                           run_id=snapshot.get("mlflow_run_id"),
                           on_run_id=lambda run_id: ray.get(
                               coordinator.set_mlflow_run_id.remote(run_id)))
    if tracker.is_new_run:  # the launcher could not create it (store unreachable then)
        params, tags = new_run_record(cfg.flat(), config["checkpoint_dir"], config["manifest"])
        tracker.log_params(params)
        tracker.set_tags(tags)
    return tracker


def _record_samples(directory: str, rank: int, step: int, ids: list[tuple[int, int]]) -> None:
    """Test bookkeeping: which samples each rank consumed at each (possibly re-run) step."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}.jsonl"), "a") as f:
        f.write(f'{{"step": {step}, "time": {time.time()}, "ids": {[list(i) for i in ids]}}}\n')


def _summary_text(snapshot: dict[str, Any], step: int) -> str:
    import json

    return json.dumps({"final_step": step, "world_sizes": snapshot["world_sizes"],
                       "events": snapshot["events"], "committed": snapshot["committed"]},
                      indent=1, default=str)
