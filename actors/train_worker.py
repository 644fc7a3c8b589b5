"""The training worker: a Ray actor per accelerator that keeps its state across membership changes.

One process per rank for the whole run. The worker group (:mod:`elastic_moe.actors.worker_group`) drives it:

- ``join(epoch, sources)``: leave the previous process group, rendezvous in the epoch's new one,
  build the trainer for the epoch's mesh plan and fill it -- from shards that survivors and
  peers hold in memory (``sources``), or from the last committed DCP checkpoint, or fresh;
- ``train()``: run committed steps until the run ends, the group votes a pause (a join), or a
  collective fails (a peer died or was fenced off). It then returns; the process, its imports
  and its state stay;
- ``holdings()`` / ``export(rank, step)``: which committed states it can hand out (its own,
  its wards' copies), and one of them, for the next layout;
- ``ping()``: answered from another thread while ``train()`` runs: liveness (a stopped process
  answers nothing), the step reached, and the metrics of committed steps for MLflow.

Each worker also holds a lease with the coordinator (:mod:`elastic_moe.actors.lease`): a worker
cut off from it for ``elastic.hang_timeout_s``, or told that a newer membership epoch formed
without it, ends its own process. Rank 0 writes a checkpoint's commit marker only once the
coordinator has admitted it for the worker's membership epoch.

The actor is threaded (``max_concurrency``): ``train()`` holds one thread, the control calls run
beside it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
from elastic_moe.actors.coordinator import CoordinatorClient
from elastic_moe.actors.lease import Lease, admit_commit
from elastic_moe.actors.messages import (
    CopyPlan,
    EpochSpec,
    Holdings,
    JoinReport,
    LeaseReply,
    PingReply,
    RestoreSource,
    Status,
    TrainOutcome,
    WorkerInfo,
    WorkerRaised,
)

from elastic_moe.config import Config
from elastic_moe.data.sampler import as_tensors
from elastic_moe.train.failure_policy import StepFailure, StepReport, classify, root_cause

logger = logging.getLogger(__name__)

METRICS_KEPT = 256  # committed steps' metrics a worker keeps until the group has logged them
BROKEN_SAVE_WAIT_S = 1.0  # after a failure, how long an async save in flight may take to end


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What every training worker of a run is given once, at start."""

    cfg: Config
    run_name: str
    checkpoint_dir: str
    coordinator: CoordinatorClient
    data_readers: list[Any]  # data-reader actor handles (batch_at by data position)
    threads_per_worker: int = 1
    sample_log_dir: str | None = None  # audit log of the samples of every committed step
    val_manifest: str | None = None  # held-out data for val_loss every train.eval_every steps
    # ``wrap_model(model, rank, step)`` runs on every rank once its model is built (each
    # membership epoch); ``step()`` is the 1-based step being run. A seam for profilers and
    # instrumentation, and for tests that plant faults in model code from outside.
    wrap_model: Callable[[Any, int, Callable[[], int]], None] | None = None
    # wraps each checkpoint save's DCP storage writer (tests hand in a slow or failing one)
    wrap_writer: Callable[[Any, int], Any] | None = None


@dataclass(slots=True)
class _Progress:
    step: int = -1
    metrics: deque = field(default_factory=lambda: deque(maxlen=METRICS_KEPT))


# what the coordinator's process may unpickle as it is: built-in exceptions with plain
# arguments, and exceptions of these torch-free modules (it matches some by type)
_TORCH_FREE_MODULES = {"builtins", "elastic_moe.parallel.network",
                       "elastic_moe.train.failure_policy", "elastic_moe.actors", "actors", "ray"}
_TORCH_FREE_PACKAGES = ("elastic_moe.actors.", "actors.", "ray.")


def _torch_free(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return ((module in _TORCH_FREE_MODULES or module.startswith(_TORCH_FREE_PACKAGES))
            and all(isinstance(a, str | int | float | bool | type(None)) for a in exc.args))


@contextlib.contextmanager
def _torch_free_errors() -> Iterator[None]:
    """Around a call the coordinator makes: an exception the coordinator could not unpickle
    without importing torch (a gloo or store error in a join, a CheckpointError, a KeyError
    holding a tensor) is raised as :class:`WorkerRaised` instead, with the type's name in its
    message; the original stays in the traceback text Ray sends along."""
    try:
        yield
    except Exception as exc:
        if not _torch_free(exc):
            raise WorkerRaised(f"{type(exc).__qualname__}: {exc}") from exc
        raise


def _for_coordinator(method: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`_torch_free_errors` around every call of ``method``. (``export``, under
    ``ray.method(num_returns=2)``, returned a single ref with it in a test here, so it uses the
    context manager itself.)"""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _torch_free_errors():
            return method(*args, **kwargs)

    return call


class _Feed:
    """This rank's stream of batches from a data reader, one request kept in flight."""

    def __init__(self, reader: Any, global_batch: int, rank: int, world_size: int,
                 num_sequences: int | None = None) -> None:
        self.reader, self.global_batch = reader, global_batch
        self.rank, self.world_size = rank, world_size
        self.num_sequences = num_sequences if num_sequences is not None \
            else int(ray.get(reader.info.remote())["num_sequences"])
        self.pending: Any = None
        self.last_wait_s = 0.0

    def request(self, position: Any) -> None:
        self.pending = self.reader.batch_at.remote(position.to_dict(), self.global_batch,
                                                   self.rank, self.world_size)

    def take(self) -> dict[str, Any]:
        if self.pending is None:
            raise RuntimeError("take() without a request(): the feed has nothing in flight")
        started = time.perf_counter()
        batch = ray.get(self.pending)
        self.last_wait_s = time.perf_counter() - started
        self.pending = None
        return as_tensors(batch)


@ray.remote(max_concurrency=5, max_restarts=0)
class TrainWorker:
    @_for_coordinator  # a creation error reaches the coordinator too
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s [worker %(process)d] %(name)s: %(message)s")
        # the heavy imports happen here, off the critical path of a join
        import torch

        import elastic_moe.train.trainer  # noqa: F401

        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            from elastic_moe.parallel.comm import survivor_nccl_env

            survivor_nccl_env()  # before any process group: a lost peer must not end this one
            gpu_ids = ray.get_gpu_ids()
            self.device = torch.device("cuda", 0 if not gpu_ids else 0)
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(max(1, spec.threads_per_worker))
        # Every torch call runs on this one thread: DTensor keeps thread-local sharding caches
        # that must be dropped between memberships (forget_layout_caches), and only the thread
        # that trains can drop its own. Control calls (ping, holdings) run beside it.
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="torch")
        self.trainer: Any = None
        self.epoch: EpochSpec | None = None
        self.progress = _Progress()
        self.lock = threading.Lock()
        # the membership epoch whose process group this process is in (None: none); guarded by
        # group_lock so that an abort meant for one epoch can never reach the next one's group
        self.group_epoch: int | None = None
        self.group_lock = threading.Lock()
        from elastic_moe.parallel.comm import GlooLinks

        self.gloo_links = GlooLinks()  # what to close when this rank's own step raises
        self.joining: EpochSpec | None = None  # the epoch whose join is in progress
        self.store_socket: socket.socket | None = None  # free_port()'s, until a join takes it
        self.training: tuple[int | None, Any] | None = None  # (epoch, future) of train()
        elastic = spec.cfg.elastic
        self.lease = Lease(self._renew_lease, hang_timeout_s=elastic.hang_timeout_s,
                           interval_s=elastic.lease_interval_s, on_end=self._end_lease)
        self.lease.start()
        # pay the first-build costs in the background, while the group trains without this
        # worker: it is ready to join once its imports are done (a spare that a lost member
        # needs now is worth more cold than missing), and a join that comes first stops the
        # warm-up (see :meth:`join`); the coordinator asks :meth:`warmed_up` before it pauses
        # the group for a worker that only adds capacity
        self.warm_up_stop = threading.Event()
        self.warm_up = self.torch_thread.submit(_warm_up, self.device, spec.cfg,
                                                self.warm_up_stop)
        # and the first call to each data reader (its connection; the corpus size it reports)
        self.reader_sequences: dict[int, int] = {}
        try:
            infos = ray.get([r.info.remote() for r in spec.data_readers], timeout=30.0)
            self.reader_sequences = {i: int(info["num_sequences"])
                                     for i, info in enumerate(infos)}
        except Exception as exc:  # an optimisation only: the join asks again
            logger.warning("data readers not reached while warming up: %s", exc)

    def _renew_lease(self, timeout_s: float) -> LeaseReply | None:
        epoch = self.epoch.epoch if self.epoch is not None else None
        return self.spec.coordinator.renew_lease(os.getpid(), epoch, timeout_s=timeout_s)

    def _end_lease(self, reason: str) -> None:
        """The lease is over: this worker is no member of the group any more. End the
        process, the only stop that also ends a checkpoint write in flight and frees the
        node's slot for a fresh worker; its connections close with it."""
        logger.error("worker pid %d stops itself: %s", os.getpid(), reason)
        try:  # peers still reachable see the connections close at once
            self.gloo_links.shut_down()
        finally:
            os._exit(75)  # EX_TEMPFAIL: the node may take a fresh worker

    # ------------------------------------------------------------------ identity
    def info(self) -> WorkerInfo:
        ctx = ray.get_runtime_context()
        return WorkerInfo(pid=os.getpid(), node_id=ctx.get_node_id(),
                          ip=ray.util.get_node_ip_address(), name=ctx.get_actor_name())

    def free_port(self) -> int:
        """A port on the node's Ray address for the rendezvous store this rank will host,
        listening from now on (so the others never find it closed); the join hands the socket
        to the store. A later call closes an unused earlier one."""
        from elastic_moe.parallel.network import listen

        with self.lock:
            if self.store_socket is not None:
                self.store_socket.close()
            self.store_socket = listen(ray.util.get_node_ip_address())
            return int(self.store_socket.getsockname()[1])

    def _take_store_socket(self, port: int) -> socket.socket | None:
        """The socket :meth:`free_port` opened, if it listens on ``port``."""
        with self.lock:
            sock, self.store_socket = self.store_socket, None
        if sock is not None and sock.getsockname()[1] != port:
            sock.close()
            return None
        return sock

    # ------------------------------------------------------------------ membership
    @_for_coordinator
    def warmed_up(self) -> float | None:
        """Returns once the warm-up is over: its seconds, or None when it was stopped by a join
        or skipped. Blocks a concurrency slot until then."""
        return self.warm_up.result()

    @_for_coordinator
    def join(self, epoch: EpochSpec, sources: list[Any] | None = None) -> JoinReport:
        """Enter ``epoch``: new process group, new layout, state filled in. ``sources``: the
        (manifest, shards ref) of every rank of the previous layout, with restore="shards".
        A warm-up still running stops at its next module or phase, and the join runs after it
        on the torch thread."""
        self.warm_up_stop.set()
        return self.torch_thread.submit(self._join, epoch, sources).result()

    def _join(self, epoch: EpochSpec, sources: list[Any] | None) -> JoinReport:
        self.joining = epoch
        try:
            return self._join_epoch(epoch, sources, {"join_start": time.time()})
        finally:
            self.joining = None

    def _join_epoch(self, epoch: EpochSpec, sources: list[Any] | None,
                    marks: dict[str, float]) -> JoinReport:
        from elastic_moe.checkpoint import Checkpointer
        from elastic_moe.parallel import MeshPlan
        from elastic_moe.parallel.comm import init_world_group
        from elastic_moe.parallel.expert_replicas import replica_state_bytes
        from elastic_moe.parallel.mesh import forget_layout_caches
        from elastic_moe.parallel.network import (
            bind_process_groups,
            choose_binding,
            rendezvous_store,
        )
        from elastic_moe.storage import storage_options
        from elastic_moe.train.shard_state import needed_sources
        from elastic_moe.train.trainer import Trainer

        cfg = self.spec.cfg
        # pull the old layout's shards this rank most likely needs while the group forms and
        # the model is built; what the built layout needs beyond them comes after
        likely = _likely_sources(epoch.rank, epoch.world_size,
                                 1 + max((m.rank for m, _ in sources or []), default=-1))
        prefetched = _prefetch([ref for manifest, ref in sources or []
                                if manifest.rank in likely])
        self._leave_group()
        marks["left"] = time.time()
        # the last layout's staging buffers, unless its save is still writing from them
        staging = self.trainer.checkpointer.handover() if self.trainer is not None else None
        # exports of the old layout since the group broke have cached its (equal-looking) mesh
        forget_layout_caches()
        timeout = datetime.timedelta(seconds=cfg.elastic.collective_timeout_s)
        # never the hostname's address: raises NetworkInterfaceError, a setting to fix
        binding = choose_binding(ray.util.get_node_ip_address(), cfg.elastic.network_interface,
                                 node=ray.get_runtime_context().get_node_id())
        bind_process_groups(binding)
        logger.info("rank %d, epoch %d: process groups bind to %s", epoch.rank, epoch.epoch,
                    binding.describe())
        with self.group_lock:
            self.gloo_links.opening()
            listening = self._take_store_socket(epoch.master_port) if epoch.rank == 0 \
                else None
            store = rendezvous_store(epoch.master_addr, epoch.master_port,
                                     is_master=epoch.rank == 0, world_size=epoch.world_size,
                                     timeout=timeout, listening=listening)
            init_world_group(self.device, store=store, rank=epoch.rank,
                             world_size=epoch.world_size, timeout=timeout)
            self.group_epoch = epoch.epoch
        marks["group_ready"] = time.time()
        plan = MeshPlan.from_dict(epoch.plan)
        ckpt = Checkpointer(self.spec.checkpoint_dir, keep_last=cfg.checkpoint.keep_last,
                            keep_every=cfg.checkpoint.keep_every,
                            async_save=cfg.checkpoint.async_save,
                            every_steps=cfg.checkpoint.every_steps,
                            wrap_writer=self.spec.wrap_writer,
                            storage_options=storage_options(
                                self.spec.checkpoint_dir, cfg.checkpoint.storage_timeout_s,
                                cfg.checkpoint.storage_attempts),
                            staging=staging)
        marks["checkpointer"] = time.time()
        readers = self.spec.data_readers
        reader = epoch.rank % len(readers)
        feed = _Feed(readers[reader], cfg.train.global_batch_size, epoch.rank, epoch.world_size,
                     self.reader_sequences.get(reader))
        marks["feed"] = time.time()
        trainer = Trainer(cfg, rank=epoch.rank, plan=plan, device=self.device, checkpointer=ckpt,
                          batches=feed, init_weights=epoch.restore is not RestoreSource.SHARDS)
        feed.global_batch = trainer.global_batch
        if self.spec.wrap_model is not None:
            self.spec.wrap_model(trainer.model, epoch.rank, lambda: trainer.step + 1)
        if self.spec.sample_log_dir:
            trainer.on_batch = functools.partial(self._log_batch, epoch)
        marks["built"] = time.time()
        if epoch.restore is RestoreSource.SHARDS:
            assert sources is not None
            manifests = [m for m, _ in sources]
            wanted = needed_sources(trainer.model, trainer.optimizer, manifests)
            refs = [sources[i][1] for i in wanted]
            fetched = prefetched.result() if prefetched is not None else {}
            rest = [ref for ref in refs if ref not in fetched]
            fetched.update(zip(rest, ray.get(rest), strict=True))
            shard_sets = [fetched[ref] for ref in refs]
            del fetched
            marks["fetched"] = time.time()
            trainer.restore_from_shards(shard_sets)
            del shard_sets
            marks["filled"] = time.time()
        elif epoch.restore is RestoreSource.CHECKPOINT and epoch.checkpoint_step is not None:
            trainer.restore_from_checkpoint(epoch.checkpoint_step)
            if epoch.skip_to is not None:
                trainer.skip_to(epoch.skip_to["step"], epoch.skip_to["position"])
        elif cfg.checkpoint.init_from:  # a new run from published weights
            trainer.init_from_published(cfg.checkpoint.init_from)
        if self.spec.val_manifest and cfg.train.eval_every:
            trainer.load_validation(self.spec.val_manifest)
        marks["restored"] = time.time()
        trainer.link_peers(epoch.node_of_rank)
        self.gloo_links.collect(store_port=epoch.master_port)  # every group of the layout exists
        marks["linked"] = time.time()
        with self.lock:
            self.trainer, self.epoch = trainer, epoch
            self.progress.step = trainer.step
        logger.info("rank %d joined epoch %d in %.2f s (%s)", epoch.rank, epoch.epoch,
                    marks["linked"] - marks["join_start"],
                    ", ".join(f"{k} +{v - marks['join_start']:.2f}" for k, v in marks.items()))
        return JoinReport(rank=epoch.rank, step=trainer.step, marks=marks,
                          copy_bytes_per_step=trainer.peers.bytes_per_step(),
                          redundancy_bytes=trainer.peers.nbytes(),
                          copied_bytes_by_kind=trainer.peers.nbytes_by_kind(),
                          copy_plans=trainer.peers.plans if epoch.rank == 0 else None,
                          expert_replica_bytes=replica_state_bytes(trainer.model))

    def _leave_group(self, checkpoint_wait_s: float = 10.0) -> None:
        """Leave the current process group, letting an async save in flight finish first
        (for at most ``checkpoint_wait_s``)."""
        import torch.distributed as dist

        if self.trainer is not None:
            _wait_bounded(self.trainer.checkpointer, checkpoint_wait_s)
        with self.group_lock:
            self.group_epoch = None
            if dist.is_initialized():
                from elastic_moe.parallel.mesh import forget_layout_caches

                try:
                    dist.destroy_process_group()
                except Exception as exc:  # a broken group may complain while going away
                    logger.warning("destroying the previous process group: %s", exc)
                forget_layout_caches()

    # ------------------------------------------------------------------ training
    @_for_coordinator
    def train(self) -> TrainOutcome:
        """Committed steps until finished, paused by a vote, or broken by a failed peer."""
        with self.lock:
            epoch = self.epoch.epoch if self.epoch is not None else None
            future = self.torch_thread.submit(self._train)
            self.training = (epoch, future)
        return future.result()

    @_for_coordinator
    def take_over(self, epoch: int) -> TrainOutcome:
        """The outcome of this worker's ``train()`` in membership epoch ``epoch``: the call in
        progress (or already returned), or a new one if the epoch's was never made. How a
        restarted coordinator takes over a worker its predecessor was driving."""
        with self.lock:
            current = self.epoch.epoch if self.epoch is not None else None
            if current != epoch:
                raise RuntimeError(f"take_over({epoch}): this worker is in membership epoch "
                                   f"{current}")
            training = self.training
        if training is None or training[0] != epoch:
            return self.train()
        return training[1].result()

    def _train(self) -> TrainOutcome:
        trainer = self.trainer
        if trainer is None or self.epoch is None:
            raise RuntimeError("train() before join(): the worker has no layout")
        cfg = self.spec.cfg
        epoch = self.epoch
        trainer.pause_requested = False
        trainer.paused = False
        try:
            if epoch.skip_to is not None and trainer.step >= cfg.train.steps:
                self._checkpoint(epoch, trainer)  # rolled back at the last step: save that
            else:
                trainer.start_stream()
            first = time.perf_counter()
            while trainer.step < cfg.train.steps:
                committed = trainer.train_one_step()
                if first is not None:  # what the first step of a layout costs
                    logger.info("rank %d: first step of epoch %d took %.2f s", epoch.rank,
                                epoch.epoch, time.perf_counter() - first)
                    first = None
                self._record(epoch, committed, trainer.skipped_in_row)
                if trainer.skipped_in_row >= cfg.train.max_skipped_steps:
                    return TrainOutcome(Status.DIVERGED, trainer.step,
                                        first_skipped=trainer.first_skipped,
                                        position=trainer.position.to_dict())
                self._checkpoint(epoch, trainer)
                if trainer.paused:
                    return TrainOutcome(Status.PAUSED, trainer.step)
            final = trainer.checkpointer.collect()  # reported as it happened (_on_save_failed)
            loads = trainer.last_metrics.expert_loads if trainer.last_metrics else None
            # numpy: the coordinator that receives it never loads torch
            loads = loads.detach().cpu().numpy() if loads is not None else None
            return TrainOutcome(Status.FINISHED, trainer.step, expert_loads=loads,
                                error=str(final) if final is not None else None)
        except Exception as exc:  # kept as a report; the group's failure policy decides
            ended = time.time()
            # a step committed before the failure (inside its evaluation, say) is recorded still
            self._record(epoch, trainer.last_committed, trainer.skipped_in_row)
            kind = classify(exc)
            if kind is not StepFailure.FAULT:
                return self._step_error(epoch, trainer, exc, kind, ended)
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            logger.warning("rank %d: step %d broken (%s)", epoch.rank, trainer.step + 1, error)
            self._end_broken_step(trainer)
            return TrainOutcome(Status.BROKEN, trainer.step, error=error, report=StepReport(
                epoch.rank, trainer.step + 1, kind, error, at=ended))

    def _record(self, epoch: EpochSpec, committed: Any, skipped_in_row: int) -> None:
        """Everything a committed step leaves behind, once per step (a step already recorded is
        left alone): its metrics for the group to log, its sample audit record, and on rank 0
        the event of a step the vote skipped."""
        with self.lock:
            if committed is None or committed.step <= self.progress.step:
                return
            self.progress.step = committed.step
            self.progress.metrics.append((committed.step, committed.metrics))
        if self.spec.sample_log_dir:
            self._log_audit({"kind": "committed", "step": committed.step - 1,
                             "epoch": epoch.epoch, "rank": epoch.rank,
                             "skipped": committed.skipped})
        if committed.skipped and epoch.rank == 0:
            self.spec.coordinator.record_event(
                "step_skipped", committed.step, loss=committed.metrics["loss"],
                grad_norm=committed.metrics["grad_norm"], in_a_row=skipped_in_row)

    def _checkpoint(self, epoch: EpochSpec, trainer: Any, force: bool = False) -> str:
        # bound to the epoch now: an async save commits later, maybe after the next join
        admit = functools.partial(admit_commit, self.spec.coordinator, epoch.epoch,
                                  hang_timeout_s=self.spec.cfg.elastic.hang_timeout_s)
        outcome = trainer.maybe_checkpoint(functools.partial(self._on_commit, epoch.epoch),
                                           self._on_save_failed, admit, force=force)
        if outcome == "nonfinite" and epoch.rank == 0:
            self.spec.coordinator.record_event("checkpoint_not_saved", trainer.step,
                                               reason="a model or optimizer tensor is not finite")
        return outcome

    @_for_coordinator
    def checkpoint_now(self) -> str:
        """After the group paused to stop: save the current step on every rank (they call this
        together) and wait until it is committed or failed. Returns "saved", "nonfinite", or
        "committed" (the periodic save in flight was of this very step: nothing more to do;
        every rank learns that from the same commit outcome, so all skip alike)."""
        def save() -> str:
            if self.trainer is None or self.epoch is None:
                raise RuntimeError("checkpoint_now() before join(): the worker has no state")
            checkpointer = self.trainer.checkpointer
            checkpointer.collect()  # the save in flight first: never two saves of one step
            if checkpointer.last_committed == self.trainer.step:
                return "committed"
            outcome = self._checkpoint(self.epoch, self.trainer, force=True)
            checkpointer.wait()
            return outcome

        return self.torch_thread.submit(save).result()

    def _end_broken_step(self, trainer: Any) -> None:
        """After a step broke, for a fault or an error alike: close this rank's connections (gloo)
        and abort its communicators (NCCL), then leave the group. Its peers may still wait in a
        collective for *this* rank -- it raised, or with three or more ranks it is a survivor
        another survivor waits on -- and would otherwise wait out the collective timeout (leaving
        a gloo group closes nothing)."""
        from elastic_moe.parallel.comm import abort_communicators

        # A save in flight may still complete (every peer alive: this rank's own error); it
        # cannot without a lost peer, and a rank whose save waits in a collective for a peer
        # whose own save already failed would hold up the rebuild: wait briefly, then close
        _wait_bounded(trainer.checkpointer, BROKEN_SAVE_WAIT_S)
        with self.group_lock:
            closed, aborted = self.gloo_links.shut_down(), abort_communicators()
        logger.warning("closed %d gloo connection(s) and aborted %d NCCL communicator(s) so "
                       "that the peers' step ends now", closed, aborted)
        self._leave_group(checkpoint_wait_s=0.0)

    def _step_error(self, epoch: EpochSpec, trainer: Any, exc: Exception,
                    kind: StepFailure, raised_at: float) -> TrainOutcome:
        """This rank's own code or data raised: end its part of the group and report it. Its
        peers learn of it from the batch check (``Trainer._take_batch``) when the batch failed,
        and otherwise from the closed connections (``_end_broken_step``)."""
        cause = root_cause(exc)  # a data reader's own exception, not Ray's wrapper
        error = f"{type(cause).__name__}: {str(cause)[:1000]}"
        # a remote error's text is its remote traceback; a local one's is the stack here
        trace = str(exc) if cause is not exc else traceback.format_exc()
        step = trainer.step + 1
        logger.error("rank %d: step %d raised %s", epoch.rank, step, error)
        self._end_broken_step(trainer)
        return TrainOutcome(Status.ERROR, trainer.step, error=error, report=StepReport(
            epoch.rank, step, kind, error, trace,
            [tuple(i) for i in trainer.current_sample_ids],
            _memory_report(self.device, self.spec.cfg, epoch) if kind is StepFailure.OOM
            else "", at=raised_at))

    def _on_commit(self, epoch: int, step: int, path: str, state: Any) -> None:
        self.spec.coordinator.commit(step, path, state.data_position, state.tokens_seen, epoch)

    def _on_save_failed(self, step: int, error: str) -> None:
        """Rank 0, when a save has failed on every rank (nothing was committed): a loud event.
        Training goes on; the next due save retries."""
        cfg = self.spec.cfg
        every = cfg.checkpoint.every_steps
        retry = min((step // every + 1) * every, cfg.train.steps) if step < cfg.train.steps \
            else None  # the final save: the run ends without it (FinalCheckpointFailed)
        logger.error("checkpoint at step %d NOT SAVED (%s); %s", step, error,
                     f"training goes on with peer copies as the recovery source; the save at "
                     f"step {retry} retries" if retry else "it was the final one")
        self.spec.coordinator.record_event("checkpoint_failed", step, error=error[:2000],
                                           checkpoint_dir=self.spec.checkpoint_dir,
                                           retry_step=retry)

    def _log_batch(self, epoch: EpochSpec, step: int, ids: list[Any], bad: list[Any]) -> None:
        """Audit record of the samples this rank's share of step ``step`` (0-based) consumes, in
        stream order: ``ids`` (trained, or skipped with the step) and ``bad`` (left out by
        data.bad_samples). Written before the step's commit vote, so a step every rank voted
        for has every rank's record even when a rank dies right after voting; the
        ``committed`` record that follows the commit says which epoch's execution counted."""
        self._log_audit({"kind": "taken", "step": step, "epoch": epoch.epoch,
                         "rank": epoch.rank, "world_size": epoch.world_size,
                         "ids": [list(i) for i in ids], "bad": [list(i) for i in bad]})

    def _log_audit(self, record: dict[str, Any]) -> None:
        directory = self.spec.sample_log_dir
        assert directory is not None
        os.makedirs(directory, exist_ok=True)
        record["time"] = time.time()
        with open(os.path.join(directory, f"worker-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ control (other threads)
    def ping(self, since_step: int = 0) -> PingReply:
        """Liveness, the step reached and the committed metrics after ``since_step`` (the
        launcher has written down every step up to it)."""
        self.lease.renewed_by_group()
        if self.trainer is not None:
            self.trainer.logged_step = max(self.trainer.logged_step, since_step)
        with self.lock:
            metrics = [(s, m) for s, m in self.progress.metrics if s > since_step]
            return PingReply(step=self.progress.step, metrics=metrics)

    def abort_group(self, epoch: int) -> int:
        """Abort this process's communicators of membership epoch ``epoch`` (a peer is lost), so
        that a collective blocked on the lost peer returns now: on NCCL it would otherwise spin
        until the timeout. Its gloo connections are shut down too: a peer cut off by a
        partition closes none of them, and the collective would wait for the full
        ``collective_timeout_s``. Runs beside ``train()``; the torch thread then sees its step
        break and leaves the group itself. Returns how many process groups were aborted."""
        from elastic_moe.parallel.comm import abort_communicators

        with self.group_lock:
            if self.group_epoch != epoch:  # already left it, or already in a later epoch
                return 0
            closed, aborted = self.gloo_links.shut_down(), abort_communicators()
        logger.warning("epoch %d: aborted %d process group(s) and closed %d gloo connection(s) "
                       "after a lost peer", epoch, aborted, closed)
        return aborted

    def abort_join(self, epoch: int) -> int:
        """A member of membership epoch ``epoch`` died while the group formed: end this
        worker's join now (it may be waiting in the rendezvous store for the dead member until
        the timeout). The join then raises and this worker keeps the state it had. Runs beside
        ``join()``; returns how many connections were shut down."""
        joining = self.joining
        if joining is None or joining.epoch != epoch:
            return 0
        closed = self.gloo_links.shut_down_rendezvous(joining.master_port)
        closed += self.gloo_links.shut_down()
        logger.warning("epoch %d: join aborted (a member was lost while the group formed); "
                       "%d connection(s) closed", epoch, closed)
        return closed

    def request_pause(self) -> int:
        """Ask the group to stop after the current step (carried by the commit vote)."""
        if self.trainer is not None:
            self.trainer.pause_requested = True
        return self.progress.step

    @_for_coordinator
    def holdings(self) -> Holdings:
        if self.trainer is None:
            return Holdings(rank=None, live=None)
        return self.trainer.holdings()

    @_for_coordinator
    def copy_plans(self, epoch: int) -> list[CopyPlan] | None:
        """The copy plan of membership epoch ``epoch`` (every rank holds the same one), for a
        restarted coordinator; ``None`` if this worker holds another layout or none."""
        with self.lock:
            trainer, current = self.trainer, self.epoch
        if trainer is None or current is None or current.epoch != epoch:
            return None
        return trainer.peers.plans or None

    @ray.method(num_returns=2)
    def export(self, rank: int, step: int) -> tuple[Any, Any]:
        with _torch_free_errors():
            shards = self.torch_thread.submit(self.trainer.export, rank, step).result()
            return shards.manifest(), shards


def _memory_report(device: Any, cfg: Config, epoch: EpochSpec) -> str:
    """What this worker used and had when it ran out of memory, and the settings that the
    launch-time memory estimate says would fit in what it had."""
    import psutil
    import torch

    from elastic_moe.parallel.memory import MemoryBudget

    host = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    text = (f"worker rank {epoch.rank} pid {os.getpid()}: host memory {rss / 2**30:.1f} GiB "
            f"resident of {host.total / 2**30:.1f} GiB ({host.available / 2**30:.1f} GiB "
            "available)")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        text += (f"; {device}: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak "
                 f"allocated, {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use")
        budget = MemoryBudget(total, 1, f"{device}", host=False)
    else:  # the node's RAM, shared by this membership's workers on the node
        sharing = max(1, epoch.node_of_rank.count(epoch.node_of_rank[epoch.rank]))
        budget = MemoryBudget(host.total, sharing, "host RAM of this node", host=True)
    return text + "; " + fit_advice(cfg, epoch.world_size, budget, device.type)


def fit_advice(cfg: Config, world_size: int, budget: Any, device_type: str) -> str:
    """The launch-time memory check's verdict for ``budget``: the settings that fit, or (when
    the estimate says it fits) that the estimate missed what ran out."""
    from elastic_moe.parallel.memory import check_memory

    try:
        estimate = check_memory(cfg, world_size, budget, device_type=device_type)
    except ValueError as exc:
        return str(exc)
    return (f"the memory estimate ({estimate.describe()}) fits {budget.describe(world_size)}, "
            "so something it does not count ran out: lower train.micro_batch_size or "
            "train.seq_len, or add workers")


def _likely_sources(rank: int, world_size: int, old_world_size: int) -> range:
    """The old ranks whose share of the rank order overlaps ``rank``'s share of the new one:
    the ranks whose FSDP rows (dim-0 chunks in rank order) a rank of the new layout needs.
    The same rank number for an unchanged size (a spare taking a lost member's place); one or
    two neighbours when the size changes. A guess to start pulling early: the built layout
    decides (``needed_sources``)."""
    if old_world_size <= 0:
        return range(0)
    low = rank * old_world_size // world_size
    high = ((rank + 1) * old_world_size - 1) // world_size
    return range(low, min(high, old_world_size - 1) + 1)


def _prefetch(refs: list[Any]) -> Future | None:
    """``{ref: value}`` of ``refs``, pulled on a thread of its own (None: nothing to pull)."""
    if not refs:
        return None
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    future = pool.submit(lambda: dict(zip(refs, ray.get(refs), strict=True)))
    pool.shutdown(wait=False)  # its thread ends with the pull; the join reads the future
    return future


class _WarmUpStopped(Exception):
    """A join came first: the warm-up gives the torch thread back."""


def _warm_up(device: Any, run_cfg: Config, stop: threading.Event) -> float | None:
    """Build, step and drop a model once on the torch thread, in a private one-rank group.
    Returns its seconds, or None when ``stop`` was set first (checked between phases and at
    every module, forward and backward) or it failed.

    A fresh process's first model build costs about a second more than the next one (measured
    on the CPU box: 0.80 s, then 0.03 s), and its first step at the run's shapes costs more than
    the next one (first use of the kernels for those shapes, the first touch of its activation
    memory): both would otherwise fall inside the pause of the join that takes this worker in.
    The run's own model, unsharded, at one micro-batch of the run's shapes, when its training
    state fits in a quarter of the free memory (:func:`_warm_up_config`); otherwise the tiny
    debug model, so a worker of a model that only fits when sharded still warms up the rest.
    Best effort."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from elastic_moe.parallel import plan_mesh, setup_model
    from elastic_moe.parallel.comm import init_world_group
    from elastic_moe.parallel.mesh import forget_layout_caches
    from elastic_moe.train.step import build_optimizer

    def check(*_: Any) -> None:
        if stop.is_set():
            raise _WarmUpStopped

    def module_entered(_module: Any, args: tuple[Any, ...]) -> None:
        check()
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(check)  # the backward reaches this module's input

    started = time.time()
    cfg, shape = _warm_up_config(run_cfg, device)
    try:
        check()
        init_world_group(device, store=dist.HashStore(), rank=0, world_size=1, timeout=None)
        try:
            plan = plan_mesh(1, 1, cfg.model, dataclasses.replace(
                cfg.parallel, min_workers=1, max_workers=1, gpus_per_node=1,
                dp_replicate_degree=1, expert_parallel_degree=0))
            model = setup_model(cfg.model, plan, device, seed=0,
                                mixed_precision=cfg.train.mixed_precision)
            check()
            optimizer = build_optimizer(model, cfg.train)
            # every module, not only the layers: the final norm, lm_head and MTP ran between
            # two checks before, and a join landing there waited up to 0.8 s (mean 0.38 s) on
            # a 0.6-core node (`benchmarks/results/warm_up_stop-cpu.md`). The cross-entropy is
            # a function, not a module: it and the lm_head's backward still run unchecked
            for module in model.modules():
                module.register_forward_pre_hook(module_entered)
            ids = torch.zeros(*shape, dtype=torch.long, device=device)
            model(ids, ids).loss.backward()
            check()
            optimizer.step()
            del model, optimizer, ids
        finally:
            dist.destroy_process_group()
            forget_layout_caches()
    except _WarmUpStopped:
        logger.info("warm-up stopped after %.2f s: a join came first", time.time() - started)
        return None
    except Exception as exc:  # an optimisation only: the real join builds what it needs
        logger.warning("warm-up skipped: %s", exc)
        return None
    took = time.time() - started
    logger.info("warmed up in %.2f s (model dim %d, batch %s)", took, cfg.model.dim, shape)
    return took


def _warm_up_config(run_cfg: Config, device: Any) -> tuple[Config, tuple[int, int]]:
    """The model and (batch, tokens) shape the warm-up runs: the run's model at one
    micro-batch when its unsharded training state fits in a quarter of the free memory of
    ``device``, else the tiny debug model at (1, 16).

    A full micro-batch on a CPU too: kernels there are not chosen per shape, but a process's
    first step at the run's shapes touches its activation memory for the first time. After a
    warm-up of one sequence, a fresh worker's first step took about 87,000 page faults and 1.36x
    the time of its third (the goodput model on the CPU box, ``benchmarks/warm_up.py``), and
    the whole group waited for it."""
    import psutil
    import torch

    from elastic_moe.config import debug
    from elastic_moe.parallel.mesh import estimate_bytes_per_rank

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    if estimate_bytes_per_rank(run_cfg.model, 1, 1) <= free // 4:
        return run_cfg, (run_cfg.train.micro_batch_size, run_cfg.train.seq_len)
    return debug(), (1, 16)


def _wait_bounded(checkpointer: Any, seconds: float) -> None:
    """Let an in-flight async save finish or fail (its peers are gone), but not forever."""
    done = threading.Event()

    def run() -> None:
        try:
            checkpointer.wait()
        except Exception as exc:
            logger.warning("in-flight checkpoint abandoned: %s", exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(seconds):
        logger.warning("in-flight checkpoint still busy after %.0f s; leaving it", seconds)
