"""One rank's trainer for one membership epoch, made of small components.

A :class:`Trainer` is built for a mesh plan (setup), filled with state (restore: from peer
shards in memory, from the last committed DCP checkpoint, or fresh), and then runs committed
steps (step), checkpoints when its checkpointer says so (checkpoint), and keeps a peer's copy of
its state current (:mod:`elastic_moe.train.peer_copies`). It knows nothing of Ray: batches come
from a :class:`BatchSource`, and the worker actor around it (``actors/train_worker.py``)
reports to the coordinator.

A step counts only when every rank has voted it done: the vote is the step's last collective,
after the gradient reduction and before ``optimizer.step`` (like torchft's ``should_commit``).
A failure before it leaves parameters, optimizer state and router biases untouched everywhere;
the vote also carries a pause request, so every rank stops after the same step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from elastic_moe.checkpoint import Checkpointer, CheckpointError, TrainState
from elastic_moe.config import Config
from elastic_moe.data.sampler import DataPosition, advance, split_batch
from elastic_moe.model.flops import peak_tflops, training_flops_per_token
from elastic_moe.parallel import MeshPlan, setup_model
from elastic_moe.parallel.expert_replicas import assign_replicas
from elastic_moe.train.compute_probe import ComputeProbe
from elastic_moe.train.elastic import Holdings, effective_batch
from elastic_moe.train.failure_policy import PeerStepError
from elastic_moe.train.lr_schedule import LRSchedule
from elastic_moe.train.peer_copies import PeerCopies, failure_domains
from elastic_moe.train.shard_state import (
    ShardLayout,
    ShardSet,
    ensure_optimizer_state,
    fill_from_shards,
)
from elastic_moe.train.step import StepMetrics, build_optimizer, train_step

logger = logging.getLogger(__name__)

# a pause (a join, a stop) waits at most this long for a checkpoint save in flight to end
PAUSE_DEFER_S = 30.0


class BatchSource(Protocol):
    """This rank's share of each global batch, asked by data position, one request ahead."""

    num_sequences: int
    last_wait_s: float

    def request(self, position: DataPosition) -> None: ...

    def take(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class CommittedStep:
    """What a committed step leaves for reporting (identical global metrics on every rank)."""

    step: int  # steps completed, 1-based like MLflow's step axis
    metrics: dict[str, float]
    skipped: bool = False  # non-finite somewhere: consumed its batch, changed nothing


class Trainer:
    """Setup -> restore -> step / checkpoint / snapshot, for one rank at one membership."""

    def __init__(self, cfg: Config, *, rank: int, plan: MeshPlan, device: torch.device,
                 checkpointer: Checkpointer, batches: BatchSource,
                 init_weights: bool = True) -> None:
        self.cfg, self.rank, self.plan, self.device = cfg, rank, plan, device
        self.world_size = plan.world_size
        self.checkpointer, self.batches = checkpointer, batches
        # ---- setup: the model for this layout (meta build -> parallelize -> materialize);
        # init_weights=False: a restore from shards overwrites (and checks) every tensor
        self.model = setup_model(cfg.model, plan, device, seed=cfg.train.seed,
                                 mixed_precision=cfg.train.mixed_precision,
                                 init_weights=init_weights)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.global_batch, lr_scale = effective_batch(cfg.train, self.world_size,
                                                      cfg.parallel.max_workers)
        self.lr_schedule = LRSchedule.from_config(cfg.train, scale=lr_scale)
        # MFU per accelerator: model FLOPs of the global batch over the step time, split over
        # the ranks; the peak is tracking.peak_tflops, else the device's by name (None on CPU)
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak_tflops = cfg.tracking.peak_tflops or peak_tflops(device)
        self.step = 0
        self.tokens_seen = 0
        self.position = DataPosition(seed=cfg.train.seed)
        self.pause_requested = False
        self.pause_deferred_since: float | None = None
        self.paused = False
        self.current_sample_ids: list[Any] = []  # (epoch, index) of the step being run
        # called with (step index, sample ids, bad sample ids) once this rank's batch is in,
        # before the step's commit vote: a record that outlives a rank killed after voting
        self.on_batch: Callable[[int, list[Any], list[Any]], None] | None = None
        # non-finite steps skipped in a row (every rank counts the same: the vote decides) and
        # the first of them; the worker asks for a rollback at train.max_skipped_steps
        self.skipped_in_row = 0
        self.first_skipped: int | None = None
        self.last_metrics: StepMetrics | None = None
        self.last_committed: CommittedStep | None = None  # the last step's record, once committed
        self.val_batches: list[dict[str, Any]] | None = None
        # committed steps' metrics the launcher has not written down yet (it acknowledges the
        # steps it has): every checkpoint carries them, so a launcher that dies before logging
        # them can still log them when the run is resumed
        self.unlogged_metrics: list[tuple[int, dict[str, float]]] = []
        self.logged_step = 0  # set by the launcher's acknowledgements (another thread)
        # ---- peer copies: this rank's buddy follows its unreplicated blocks; it follows its wards'
        self.peers = PeerCopies(rank, self.world_size)
        self._layout: ShardLayout | None = None
        # ---- this rank's own compute per step (sections without collectives), for stragglers
        from elastic_moe.model.attention import MLA

        self.probe = ComputeProbe([m for m in self.model.modules() if isinstance(m, MLA)],
                                  device)
        # every rank's (compute_s, data wait, stalled_s)
        self.rank_times: list[tuple[float, float, float]] = []

    # ------------------------------------------------------------------ restore
    def _meta(self) -> dict[str, Any]:
        return {"position": self.position.to_dict(), "tokens_seen": self.tokens_seen}

    def _set_counters(self, step: int, position: dict[str, Any] | None, tokens_seen: int) -> None:
        self.step = step
        self.tokens_seen = tokens_seen
        self.position = (DataPosition.from_dict(position) if position
                         else DataPosition(seed=self.cfg.train.seed))

    def restore_from_shards(self, sources: list[ShardSet]) -> None:
        """Fill this layout from shards taken at any layout (survivors' live state, peer copies)."""
        steps = {s.step for s in sources}
        if len(steps) != 1:
            raise ValueError(f"sources from different steps {sorted(steps)}: one step needed")
        fill_from_shards(self.model, self.optimizer, sources)
        meta = sources[0].meta
        self._set_counters(sources[0].step, meta.get("position"), int(meta.get("tokens_seen", 0)))

    def restore_from_checkpoint(self, step: int) -> int:
        """Load the committed checkpoint at ``step`` (older ones when it is unusable); returns the
        step restored."""
        try:
            state = self.checkpointer.restore(self.model, self.optimizer, step=step)
        except CheckpointError as exc:
            logger.error("committed checkpoint step %d unusable (%s); trying older ones", step, exc)
            state = self.checkpointer.restore(self.model, self.optimizer, max_step=step - 1)
        if state is None:
            self._set_counters(0, None, 0)
        else:
            self._set_counters(state.step, state.data_position, state.tokens_seen)
        return self.step

    def init_from_published(self, path: str) -> None:
        """Fill this rank's shards from an HF-layout checkpoint (a new run; only this rank's
        slices are read)."""
        from elastic_moe.model.hf_sharded import load_hf_into

        load_hf_into(self.model, path, self.cfg.model)

    # ------------------------------------------------------------------ validation
    def load_validation(self, manifest: str) -> None:
        """This rank's share of the fixed validation sequences (split by rank, any size)."""
        from elastic_moe.train.evaluate import val_micro_batches

        self.val_batches = val_micro_batches(manifest, self.cfg.train.eval_sequences, self.rank,
                                             self.world_size, self.cfg.train.micro_batch_size)

    def _evaluate(self) -> dict[str, float]:
        """val_loss / val_mtp_loss over the whole validation set (collective; the same value
        at any world size)."""
        from elastic_moe.train.evaluate import evaluate
        from elastic_moe.train.step import autocast_dtype

        assert self.val_batches is not None, "load_validation() first"
        return evaluate(self.model, self.val_batches,
                        amp=autocast_dtype(self.cfg.train, self.device))

    # ------------------------------------------------------------------ peers
    def _own_shards(self) -> ShardSet:
        if self._layout is None:  # once the optimizer has its state: the same tensors after
            self._layout = ShardLayout(self.model, self.optimizer)
        return self._layout.take(rank=self.rank, step=self.step, meta=self._meta())

    def link_peers(self, node_of_rank: list[str]) -> None:
        """Plan and fill this layout's expert replicas, agree on the peer copies of this layout
        and send the buddy its first copy (collective)."""
        ensure_optimizer_state(self.optimizer)
        assign_replicas(self.model, self.optimizer, self.cfg.parallel.expert_replicas,
                        failure_domains(node_of_rank))
        self._layout = ShardLayout(self.model, self.optimizer)  # the replicas are new tensors
        self.peers.link(self.model, self.optimizer, self._layout, node_of_rank=node_of_rank,
                        step=self.step, meta=self._meta(), enabled=self.cfg.elastic.peer_copies)

    def holdings(self) -> Holdings:
        """Which committed step this rank can hand out, for itself and for its wards."""
        return Holdings(rank=self.rank, live=self.step, wards=self.peers.holdings())

    def export(self, rank: int, step: int) -> ShardSet:
        """The shards of ``rank`` (this one or a ward) at committed ``step``."""
        if rank == self.rank and step == self.step:
            return self._own_shards()
        shards = self.peers.find(rank, step)
        if shards is None:
            raise KeyError(f"rank {self.rank} holds no copy of rank {rank} at step {step}")
        return shards

    # ------------------------------------------------------------------ step
    def _any_rank(self, *flags: bool) -> list[bool]:
        """Whether each of ``flags`` is set on any rank (one MAX all-reduce; local alone)."""
        value = torch.tensor([1.0 if flag else 0.0 for flag in flags])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in value.tolist()]

    def _pause_now(self) -> bool:
        """This rank's pause vote: a pause requested, no checkpoint save in flight, and none
        due at the end of the step being voted on (a save would hold up the rebuild: a rank
        leaves its group only once its save has ended), for at most ``PAUSE_DEFER_S`` after the
        request. The vote is the same on every rank: the step and the save interval are."""
        if not self.pause_requested:
            self.pause_deferred_since = None
            return False
        voting_on, final = self.step + 1, self.cfg.train.steps
        save_due = voting_on < final and self.checkpointer.due(voting_on, final)
        if not self.checkpointer.saving() and not save_due:
            return True
        now = time.monotonic()
        if self.pause_deferred_since is None:
            self.pause_deferred_since = now
        return now - self.pause_deferred_since > PAUSE_DEFER_S

    def _vote(self, nonfinite: bool) -> bool:
        """The commit vote: carries the pause request, this rank's non-finite flag and its
        compute, data-wait and stall times (every rank learns everyone's); returns whether the
        step is applied (finite on every rank)."""
        self.peers.forward_grads()  # every copy can follow this step before anyone applies it
        world = self.world_size
        # one MAX all-reduce: the flags, and each rank's times in its own slots (0 elsewhere)
        value = torch.zeros(2 + 3 * world, dtype=torch.float64)
        value[0], value[1] = float(self._pause_now()), float(nonfinite)
        compute, stalled = self.probe.take()
        value[2 + self.rank] = compute
        value[2 + world + self.rank] = self.batches.last_wait_s
        value[2 + 2 * world + self.rank] = stalled
        if dist.is_initialized() and world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        times = value[2:].tolist()
        self.rank_times = list(zip(times[:world], times[world:2 * world], times[2 * world:],
                                   strict=True))
        self.paused, skip = bool(value[0] > 0), bool(value[1] > 0)
        return not skip

    def _take_batch(self) -> dict[str, Any]:
        """This rank's batch, once every rank has its own: a rank whose batch failed (bad data,
        a reader error) says so in one small all-reduce, so its peers end the step at once
        instead of waiting in the step's first collective until the timeout (gloo cannot be
        aborted from outside). The failing rank raises its own error, the others
        :class:`PeerStepError`."""
        batch: dict[str, Any] | None = None
        error: Exception | None = None
        try:
            batch = self.batches.take()
        except Exception as exc:  # raised below, after the peers know
            error = exc
        bad = len(batch.get("bad_samples", [])) if batch is not None else 0
        # one SUM all-reduce: any rank's error, and the sequences left out (data.bad_samples)
        value = torch.tensor([1.0 if error is not None else 0.0, float(bad)])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        if value[0] > 0 and error is None:
            raise PeerStepError(f"step {self.step + 1}: another rank's batch failed")
        if error is not None:
            raise error
        assert batch is not None
        batch["bad_samples_total"] = int(value[1])
        for sample, message in batch.get("bad_samples", []):
            logger.warning("step %d: sample %s left out (data.bad_samples=skip): %s",
                           self.step + 1, tuple(sample), message)
        return batch

    def train_one_step(self) -> CommittedStep:
        """Run and commit one step; the next batch is requested while it runs."""
        self.current_sample_ids = []  # not known until the batch arrives
        batch = self._take_batch()
        self.current_sample_ids = list(batch["sample_ids"])
        if self.on_batch is not None:
            self.on_batch(self.step, self.current_sample_ids,
                          [tuple(s) for s, _ in batch.get("bad_samples", [])])
        position = advance(self.position, self.global_batch, self.batches.num_sequences)
        if self.step + 1 < self.cfg.train.steps:
            self.batches.request(position)
        ids = batch["sample_ids"]
        bad_total = batch.pop("bad_samples_total")
        # the step's loss and gradient are means over the sequences it trains on
        metrics = train_step(self.model, self.optimizer,
                             split_batch(batch, self.cfg.train.micro_batch_size), self.step,
                             self.cfg.train, self.cfg.model,
                             batch_fraction=len(ids) / (self.global_batch - bad_total),
                             commit_vote=self._vote, lr_schedule=self.lr_schedule)
        # committed (applied, or skipped on every rank): everything below is local
        self.step += 1
        self.position = position
        if metrics.skipped:
            self.skipped_in_row += 1
            self.first_skipped = self.first_skipped or self.step
            logger.warning("step %d skipped on every rank: loss %s, grad_norm %s (%d in a row); "
                           "its samples (epoch, index) on rank %d: %s", self.step, metrics.loss,
                           metrics.grad_norm, self.skipped_in_row, self.rank,
                           [tuple(i) for i in ids])
        else:
            self.skipped_in_row, self.first_skipped = 0, None
            self.tokens_seen += metrics.tokens
        # the copies follow: the step's update where it was applied, the counters always
        self.peers.apply(self.optimizer, self.step, self._meta(), update=not metrics.skipped)
        self.last_metrics = metrics
        values = metrics.as_dict()
        tflops = self.flops_per_token * metrics.tokens / max(metrics.seconds, 1e-9) / 1e12
        values["tflops_per_gpu"] = tflops / self.world_size
        values["step_s"] = metrics.seconds
        if self.peak_tflops:
            values["mfu"] = values["tflops_per_gpu"] / self.peak_tflops
        for rank, (compute_s, wait_s, stalled_s) in enumerate(self.rank_times):
            values[f"rank{rank}_compute_s"] = compute_s
            values[f"rank{rank}_data_wait_s"] = wait_s
            values[f"rank{rank}_stalled_s"] = stalled_s
        values.update(bad_samples=bad_total,
                      world_size=self.world_size, ep_degree=self.plan.expert_parallel_degree,
                      tokens_seen=self.tokens_seen, data_wait_s=self.batches.last_wait_s,
                      committed_at=time.time())
        # The step is committed: its record exists before anything below that can fail. The
        # evaluation is a collective, and a peer lost inside it must not take the step's
        # metrics along (the run would log every step but this one). The val losses join the
        # same record when the evaluation completes.
        record = CommittedStep(step=self.step, metrics=values, skipped=metrics.skipped)
        self.last_committed = record
        self.unlogged_metrics.append((self.step, values))
        eval_every = self.cfg.train.eval_every
        if self.val_batches is not None and eval_every and self.step % eval_every == 0:
            values.update(self._evaluate())  # one record per step: val losses ride with it
        return record

    def start_stream(self) -> None:
        self.batches.request(self.position)

    # ------------------------------------------------------------------ checkpoint
    def _unlogged(self) -> list[tuple[int, dict[str, float]]]:
        logged = self.logged_step
        self.unlogged_metrics = [(s, m) for s, m in self.unlogged_metrics if s > logged]
        return list(self.unlogged_metrics)

    def _state_finite(self) -> bool:
        """Whether every parameter, buffer and optimizer tensor of this rank is finite."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for state in self.optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        for tensor in tensors:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                return False
        return True

    def maybe_checkpoint(self, on_commit: Callable[[int, str, TrainState], None] | None,
                         on_failure: Callable[[int, str], None] | None = None,
                         admit: Callable[[int], None] | None = None,
                         force: bool = False) -> str:
        """Save when the checkpointer says it is due (``force``: now, on every rank at the same
        step; a run stopped on request); ``on_commit(step, path, state)`` runs on
        rank 0 once the checkpoint is committed, ``on_failure(step, error)`` on rank 0 once the
        save has failed (storage full, read-only or unreachable: nothing is committed);
        ``admit(step)`` on rank 0 right before the commit marker (raising refuses it).
        Returns "saved", "not_due", or "nonfinite" (a tensor on some rank is not finite:
        nothing is written, so no committed checkpoint ever holds one, and retention never
        trades a finite checkpoint for it).

        A failed save does not stop training: the peer copies stay the recovery source, and the
        next due save (``checkpoint.every_steps`` later, the same step on every rank without
        another collective) is the retry.

        While non-finite steps are being skipped the state is the one before the first of them;
        periodic saves wait, so that retention keeps the checkpoints from before the skipping
        (the rollback's sources) rather than copies of the same state."""
        final = self.step == self.cfg.train.steps
        if not force and (not self.checkpointer.due(self.step, self.cfg.train.steps)
                          or (self.skipped_in_row and not final)):
            return "not_due"
        if self._any_rank(not self._state_finite())[0]:
            logger.error("step %d: a model or optimizer tensor is not finite; the checkpoint is "
                         "not written", self.step)
            return "nonfinite"
        self.checkpointer.collect()  # the previous save; a failure was reported as it happened
        state = TrainState(step=self.step, tokens_seen=self.tokens_seen,
                           data_position=self.position.to_dict(), mesh_plan=self.plan.to_dict(),
                           model_config=dataclasses.asdict(self.cfg.model),
                           extra={"metrics": self._unlogged()})
        committed: Callable[[int, str], None] | None = None
        failed = on_failure if self.rank == 0 else None
        if on_commit is not None and self.rank == 0:
            def callback(step: int, path: str) -> None:
                on_commit(step, path, state)
            committed = callback
        try:
            self.checkpointer.save(self.step, self.model, self.optimizer, state,
                                   on_commit=committed, on_failure=failed,
                                   admit=admit if self.rank == 0 else None)
        except CheckpointError as exc:  # a synchronous save (async_save=False) that failed
            logger.error("%s", exc)
            if failed is not None:
                failed(self.step, str(exc))
        return "saved"

    def skip_to(self, step: int, position: dict[str, Any]) -> None:
        """After a rollback: keep the restored weights but go on from ``step`` at ``position``;
        the batches in between are skipped (they were trained into the state thrown away)."""
        self.step, self.position = step, DataPosition.from_dict(position)
        self.skipped_in_row, self.first_skipped = 0, None
