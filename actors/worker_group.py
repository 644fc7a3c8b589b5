"""The elastic worker group on Ray core: membership, failure detection, live rebuilds, joins.

The group runs in the coordinator's process (:mod:`elastic_moe.actors.run_loop`), not in the
launcher's, and owns the run's training workers
(:class:`elastic_moe.actors.train_worker.TrainWorker`, one per accelerator, each in its own
one-bundle placement group; ranks are ordered node by node). It writes every decision to the
coordinator's record. Workers, slots and data readers are named and detached: they outlive the
coordinator's process, and a restarted coordinator takes them over (:meth:`ElasticGroup.adopt`).

- **Dead worker**: its ``train()`` call fails (Ray saw the process go). Its peers' collectives
  fail within milliseconds on gloo (the connection closes); NCCL's would spin on, so as soon as
  any member is lost or breaks its step, the group aborts the others' communicators
  (``TrainWorker.abort_group``, :mod:`elastic_moe.parallel.comm`) and their blocked step raises.
- **Hung worker** (stopped, deadlocked): it stops answering ``ping`` (served on another thread);
  after ``elastic.hang_timeout_s`` it is fenced off -- killed, so it can never come back with
  stale state -- and its peers' collectives fail at once.
- **Cut-off worker** (a partition): silent like a hung one, but the kill cannot reach its node
  and nothing closes its connections. It is dropped all the same; the survivors' blocked
  collectives end when the group's ``abort_group`` shuts their gloo connections. The worker
  fences itself: it stops when its lease with the coordinator lapses, and nothing it tries
  after the group moved on is accepted (membership epochs are numbered by the coordinator,
  which admits commits only from the current one: :mod:`elastic_moe.actors.lease`). When the
  link heals, its node takes a fresh worker, which joins like any other.
- **Rebuild in place**: the survivors return from ``train()`` with their state in memory. The
  newest committed step of which a copy of every shard survives is chosen
  (:func:`elastic_moe.train.elastic.decide_restore`): survivors hand out their own shards and the
  copies they keep for lost peers. A new mesh plan is made for the new size, every member
  rendezvouses in a new process group and fills its new layout from those shards. No process
  restarts. Only when some shard has no surviving copy is the last committed DCP checkpoint read.
- **Join**: a new worker starts, imports and warms up while the group trains; the group then
  votes a pause at a step boundary, and pauses only for the rebuild.

``elastic.recovery = "restart"`` keeps the old behaviour for comparison: every change restarts
every worker from the last committed checkpoint.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from elastic_moe.actors.coordinator import NAMESPACE, CoordinatorAPI
from elastic_moe.actors.fencing import fence, process_gone
from elastic_moe.actors.messages import (
    CopyPlan,
    EpochSpec,
    Holdings,
    JoinReport,
    LoopState,
    RestoreSource,
    Status,
    TrainOutcome,
    WorkerInfo,
)
from elastic_moe.actors.run_log import RunLog
from elastic_moe.actors.slots import Slots
from elastic_moe.actors.train_worker import TrainWorker, WorkerSpec
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from elastic_moe.config import Config
from elastic_moe.parallel import MeshPlan, plan_mesh
from elastic_moe.parallel.network import NetworkInterfaceError
from elastic_moe.train.elastic import decide_restore
from elastic_moe.train.failure_policy import (
    Action,
    Decision,
    Failure,
    FailureBudget,
    FailurePolicy,
    StepReport,
)
from elastic_moe.train.stragglers import StragglerWatch

logger = logging.getLogger(__name__)

PING_INTERVAL_S = 0.25
STARTUP_GRACE_S = 30.0  # at start, how long workers already starting are waited for
QUICK_RESTARTS = 3  # failed starts in a row restarted at once (then: the resize check)


class TrainingFailed(RuntimeError):
    """The run cannot go on. ``exit_code`` is what ``jobs/train.py`` exits with
    (docs/troubleshooting.md lists them)."""

    exit_code = 1


class FailureBudgetSpent(TrainingFailed):
    """More faults (lost or hung workers) than ``elastic.max_failures`` within
    ``elastic.failure_window_s``."""

    exit_code = 4


class OutOfCapacity(TrainingFailed):
    """Fewer workers than ``--workers MIN`` could be placed in ``elastic.capacity_wait_s``."""

    exit_code = 5


class Diverged(TrainingFailed):
    """Non-finite steps kept coming after ``train.max_rollbacks`` rollbacks, or there was no
    checkpoint from before them to roll back to."""

    exit_code = 6


class FinalCheckpointFailed(TrainingFailed):
    """Every step trained, but the final checkpoint could not be written (storage full,
    read-only or unreachable): the weights of the last steps are not on storage."""

    exit_code = 7


class RunStopped(TrainingFailed):
    """Stopped on request (``jobs/train.py --stop``): the group paused at a step boundary and
    saved that step; ``--resume`` continues from it."""

    exit_code = 8


class StepError(TrainingFailed):
    """A step raised in the workers' own code or data, again after a retry (not a lost peer)."""

    exit_code = 3


class RebuildFault(Exception):
    """Members or joiners were lost (died, or hung and fenced) while the group formed. An
    ordinary fault: the rebuild is retried without them."""

    def __init__(self, lost: list[Member]) -> None:
        super().__init__(f"{len(lost)} worker(s) lost while the group formed")
        self.lost = lost


def _report_detail(report: StepReport, reports: list[StepReport]) -> dict[str, Any]:
    """A step error's fields as a coordinator event records them, with how long after the
    erroring rank its peers' steps ended (``peers_ended_after_s``)."""
    others = [r.at for r in reports if r.rank != report.rank]
    return {"rank": report.rank, "failed_step": report.step, "error": report.error[:2000],
            "sample_ids": [list(i) for i in report.sample_ids],
            "peers_ended_after_s": round(max(others) - report.at, 3) if others else None}


@dataclass(eq=False)
class Member:
    handle: Any
    slot: int
    info: WorkerInfo
    rank: int = -1
    last_reply: float = field(default_factory=time.time)
    ping_ref: Any = None
    ping_sent: float = 0.0
    gone: bool = False  # Ray reported its process dead: fencing it needs no kill
    warm_ref: Any = None  # a joiner's warmed_up() call, until it answers

    def fence_off(self) -> None:
        """Make sure this worker is gone for good (:func:`elastic_moe.actors.fencing.fence`)."""
        fence(self.handle, self.info.pid, self.info.node_id, gone=self.gone)


@dataclass
class GroupResult:
    final_step: int
    expert_loads: Any = None


class ElasticGroup:
    """Owns the workers of one run; :meth:`run` trains to the end or raises TrainingFailed."""

    def __init__(self, cfg: Config, spec: WorkerSpec, coordinator: CoordinatorAPI,
                 tracker: Any, *, use_gpu: bool, metrics_log: str | None = None) -> None:
        """``metrics_log``: a JSONL file each committed step's metrics are appended to before
        MLflow gets them, so a launcher killed with records still queued loses none
        (:func:`replay_metrics` sends them when the run is resumed)."""
        self.cfg, self.spec, self.coordinator, self.tracker = cfg, spec, coordinator, tracker
        self.run_log = RunLog(cfg, tracker, coordinator, metrics_log)
        self.bundle = {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}
        self.use_gpu = use_gpu
        self.slots = Slots(spec.run_name, self.bundle, coordinator.set_slots)
        self.members: list[Member] = []
        self.joiners: list[Member] = []  # started, warming up or ready, not yet in the group
        self.pending_joiners: dict[Any, tuple[Any, int]] = {}  # info ref -> (handle, slot)
        self.failed_starts = 0  # workers in a row that died before they answered
        self.plan: MeshPlan | None = None
        # the layout's copy plan (rank 0 reports it once the group has formed); None after a
        # coordinator restart, when the keepers' copies tell what they leave out
        self.copy_plans: list[CopyPlan] | None = None
        self.epoch = 0
        self.failure_budget = FailureBudget(cfg.elastic.max_failures,
                                            cfg.elastic.failure_window_s)
        self.failure_policy = FailurePolicy()
        self.rollbacks = 0
        self.last_resize_check = time.time()
        self.stop_requested: str | None = None  # why the run is to stop (jobs/train.py --stop)
        self.loop_state: LoopState | None = None
        self.stragglers = StragglerWatch(cfg.elastic.straggler_ratio,
                                         cfg.elastic.straggler_steps)
        self.to_evict: Member | None = None  # a straggler the goodput model says to evict
        self.evicted: list[Member] = []  # evicted by policy: not a fault, no budget spent
        self.last_rebuild_s = 2.0  # the last rebuild's pause: what an eviction costs

    @property
    def logged_step(self) -> int:
        """The last step written down (metrics log, MLflow)."""
        return self.run_log.logged_step

    # ------------------------------------------------------------------ capacity
    def _free_slots(self) -> list[int]:
        used = {m.slot for m in self.members + self.joiners}
        used |= {slot for _, slot in self.pending_joiners.values()}
        return [i for i in self.slots.ready() if i not in used]

    def _start_worker(self, slot: int) -> tuple[Any, Any]:
        options: dict[str, Any] = {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.slots[slot], 0),
            "num_cpus": self.bundle["CPU"],
            # named and detached: it outlives the coordinator's process (adopt)
            "name": f"{self.spec.run_name}-worker-{uuid.uuid4().hex[:8]}",
            "namespace": NAMESPACE, "lifetime": "detached"}
        if self.use_gpu:
            options["num_gpus"] = 1
        handle = TrainWorker.options(**options).remote(self.spec)  # type: ignore[attr-defined]
        return handle, handle.info.remote()

    def _spawn_joiners(self) -> None:
        """Start workers in free slots, up to the maximum and ``elastic.spares`` more; they warm
        up in the background."""
        room = (self.cfg.parallel.max_workers + self.cfg.elastic.spares - len(self.members)
                - len(self.joiners) - len(self.pending_joiners))
        for slot in self._free_slots()[:max(room, 0)]:
            handle, info_ref = self._start_worker(slot)
            self.pending_joiners[info_ref] = (handle, slot)
            logger.info("capacity for another worker (slot %d): starting it", slot)

    def _collect_joiners(self, timeout: float = 0.0) -> None:
        """Take in the started workers that answered. One that died while starting (killed,
        or its node lost) is started again in its slot at once, up to
        ``QUICK_RESTARTS`` failed starts in a row; after that its slot waits for the next
        resize check (``elastic.resize_check_s``), so a worker that cannot start (a bug in its
        start-up) is not started again and again."""
        if not self.pending_joiners:
            return
        ready, _ = ray.wait(list(self.pending_joiners), num_returns=len(self.pending_joiners),
                            timeout=timeout)
        restart = False
        for ref in ready:
            handle, slot = self.pending_joiners.pop(ref)
            try:
                info = ray.get(ref)
            except Exception as exc:  # it died while starting: its slot is free again
                self.failed_starts += 1
                restart = self.failed_starts <= QUICK_RESTARTS
                logger.warning("a new worker failed to start (%d in a row): %s; %s",
                               self.failed_starts, exc,
                               "starting another in its slot" if restart else
                               "its slot waits for the next resize check")
                continue
            self.failed_starts = 0
            self.joiners.append(Member(handle, slot, info, warm_ref=handle.warmed_up.remote()))
        if restart and self.loop_state not in (LoopState.STOPPING, LoopState.FINISHED,
                                               LoopState.FAILED):
            self._spawn_joiners()

    @staticmethod
    def _warm(member: Member) -> bool:
        """Whether ``member`` is done warming up (or gone: its loss is found elsewhere)."""
        if member.warm_ref is not None:
            done, _ = ray.wait([member.warm_ref], timeout=0)
            if not done:
                return False
            member.warm_ref = None
        return True

    def _wait_for_minimum(self) -> None:
        low = self.cfg.parallel.min_workers
        started = time.time()
        deadline = started + self.cfg.elastic.capacity_wait_s
        last_log = started
        while True:
            self.slots.replace_lost()
            self._spawn_joiners()
            self._collect_joiners(timeout=0.5)
            have = len(self.members) + len(self.joiners)
            if have >= low:
                return
            now = time.time()
            if now > deadline:
                raise OutOfCapacity(
                    f"waited {self.cfg.elastic.capacity_wait_s:.0f} s for {low} workers of "
                    f"{self.bundle}; only {have} could be placed (cluster resources "
                    f"{ray.cluster_resources()}); add nodes or lower --workers")
            if now - last_log >= 30.0:
                last_log = now
                logger.info("waiting for %d more worker(s) of %s; the cluster has %s available",
                            low - have, self.bundle, ray.available_resources())

    # ------------------------------------------------------------------ the run
    def run(self) -> GroupResult:
        """Start the run's workers, form the first group (from the last committed checkpoint,
        or fresh) and train to the end."""
        self._enter(LoopState.FORMING)
        self.slots.open(self.cfg.parallel.max_workers + self.cfg.elastic.spares)
        try:
            self.slots.ready(timeout=5.0)  # let the slots the cluster can place now get placed
            self._wait_for_minimum()
            self._spawn_joiners()
            self._collect_joiners(timeout=STARTUP_GRACE_S)  # those still starting, briefly
            committed = self.coordinator.restore_point()
            start_step = committed["step"] if committed else 0
            self._form_from_storage(survivors=[], sources=None,
                                   restore=RestoreSource.CHECKPOINT if committed else RestoreSource.FRESH,
                                   checkpoint_step=start_step if committed else None,
                                   cause_detail={"restored_from":
                                                 "checkpoint" if committed else "init"},
                                   marks={"detected": time.time()}, restored_step=start_step)
            return self._loop()
        finally:
            self._shutdown()

    def adopt(self, logged_step: int) -> GroupResult:
        """Take over a run whose coordinator's process died: the record's slots and members
        (named actors) are found again, and the members go on with the state they hold; no
        checkpoint is read. ``logged_step``: the last step the metrics log holds.

        A member that is gone is a lost worker like any other. If the coordinator died while
        a group was forming, the joins in progress are aborted and the group is rebuilt from
        the members' live state. Joiners and spares are not taken over (they are stopped, and
        replacements start)."""
        snap = self.coordinator.snapshot()
        self.run_log.logged_step = self.run_log.last_log_step = logged_step
        self.slots.find(snap["slots"])
        self.plan = MeshPlan.from_dict(snap["world_sizes"][-1]["plan"])
        members, lost = [], []
        for worker in snap["workers"]:
            try:
                handle = ray.get_actor(worker["name"], namespace=NAMESPACE)
            except ValueError:  # a named actor is gone only once it died
                handle = None
            member = Member(handle, worker["slot"],
                            WorkerInfo(pid=worker["pid"], node_id=worker["node_id"],
                                       ip=worker["ip"], name=worker["name"]),
                            rank=worker["rank"])
            (members if handle is not None else lost).append(member)
        self._stop_strays({m.info.name for m in members})
        self.members = members + lost
        logger.info("took over %d live worker(s) of membership epoch %d at step %d%s",
                    len(members), snap["formed_epoch"], logged_step,
                    f"; lost meanwhile: pids {[m.info.pid for m in lost]}" if lost else "")
        try:
            if snap["epoch_open"] and snap["formed_epoch"] == snap["membership_epoch"]:
                self.epoch = snap["formed_epoch"]
                self.copy_plans = self._ask_copy_plans(members)
                return self._loop(self._train_epoch(take_over=True, lost=lost))
            # it died while a group formed: the members keep the state they had
            aborts = [m.handle.abort_join.remote(snap["membership_epoch"]) for m in members]
            ray.wait(aborts, num_returns=len(aborts), timeout=5.0)
            self.epoch = snap["formed_epoch"]
            self._recover({}, lost, count_failure=False)
            return self._loop()
        finally:
            self._shutdown()

    def _ask_copy_plans(self, members: list[Member]) -> list[CopyPlan] | None:
        """The formed layout's copy plan, from the first member that answers: the dead
        coordinator had it from the join reports. Without it a lost rank whose blocks all
        have replicas still needs a keeper's copy, and losing it with its keeper means the
        checkpoint."""
        assert self.plan is not None
        if not self.cfg.elastic.peer_copies or self.plan.world_size < 2:
            return None
        for member in members:
            try:
                plans = ray.get(member.handle.copy_plans.remote(self.epoch), timeout=5.0)
            except ray.exceptions.RayError as exc:  # lost or busy: the next one may answer
                logger.debug("copy plan from pid %s: %s", member.info.pid, exc)
                continue
            if plans is not None and len(plans) == self.plan.world_size:
                return plans
        logger.warning("no member reported the copy plan of epoch %d: a restore trusts only "
                       "the keepers' copies", self.epoch)
        return None

    def _stop(self, step: int) -> RunStopped:
        """Every member paused after ``step``: save it (unless it is committed already) and
        end the run."""
        self._enter(LoopState.STOPPING)
        committed = self.coordinator.restore_point()
        if committed is None or committed["step"] < step:
            logger.info("stopping at step %d (%s): saving it", step, self.stop_requested)
            refs = [m.handle.checkpoint_now.remote() for m in self.members]
            try:
                ray.get(refs, timeout=self.cfg.elastic.collective_timeout_s
                        + self.cfg.checkpoint.storage_timeout_s)
            except Exception as exc:  # what was committed before still stands
                logger.error("the checkpoint of step %d on stopping failed: %s", step, exc)
        committed = self.coordinator.restore_point()
        last = committed["step"] if committed else None
        self.coordinator.record_event("stopped", step, reason=self.stop_requested,
                                      committed_step=last)
        return RunStopped(f"stopped on request ({self.stop_requested}) after step {step}; the "
                          f"last committed checkpoint is step {last}: continue with --resume")

    def _enter(self, state: LoopState) -> None:
        """The loop's explicit state, in the coordinator's record (operators, tests)."""
        self.loop_state = state
        self.coordinator.set_loop_state(state.value)

    def _stop_strays(self, keep: set[str]) -> None:
        """Stop this run's named workers that are not in ``keep`` (joiners and spares of a
        coordinator that died: they hold no state)."""
        prefix = f"{self.spec.run_name}-worker-"
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != NAMESPACE or not entry["name"].startswith(prefix) \
                    or entry["name"] in keep:
                continue
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE), no_restart=True)
            except Exception as exc:  # gone meanwhile
                logger.debug("stopping %s: %s", entry["name"], exc)

    def _loop(self, first: tuple[dict[Member, TrainOutcome], list[Member]] | None = None
              ) -> GroupResult:
        """Train epoch after epoch, recovering and growing between them, to the end.
        ``first``: the outcome of an epoch already trained (a take-over)."""
        while True:
            self._enter(LoopState.TRAINING)
            outcomes, failed = first if first is not None else self._train_epoch()
            first = None
            if outcomes and all(o.status is Status.FINISHED for o in outcomes.values()) \
                    and not failed:
                final = max(o.step for o in outcomes.values())
                unsaved = next((o.error for o in outcomes.values() if o.error), None)
                if unsaved:
                    committed = self.coordinator.restore_point()
                    raise FinalCheckpointFailed(
                        f"trained to step {final}, but its checkpoint was not written "
                        f"({unsaved}); the last committed checkpoint is step "
                        f"{committed['step'] if committed else None}: free or restore the "
                        "checkpoint storage and resume with --resume")
                loads = next((o.expert_loads for o in outcomes.values()
                              if o.expert_loads is not None), None)
                self._enter(LoopState.FINISHED)
                return GroupResult(final, loads)
            if self.stop_requested and outcomes and not failed \
                    and all(o.status is Status.PAUSED for o in outcomes.values()):
                raise self._stop(max(o.step for o in outcomes.values()))
            if not failed and outcomes \
                    and any(o.status is Status.DIVERGED for o in outcomes.values()):
                self._roll_back(outcomes)
            elif failed or any(o.status in (Status.BROKEN, Status.ERROR) for o in outcomes.values()):
                reports = [o.report for o in outcomes.values() if o.report is not None]
                decision = self.failure_policy.decide(reports)
                if decision.action is Action.STOP:
                    raise self._stop_on_error(decision, reports)
                if decision.report is not None:
                    self._record_step_error(decision, reports)
                # an error is retried without spending the failure budget; a worker that
                # died is a fault whatever else happened
                # an evicted straggler is no fault, and neither are its peers' steps that
                # broke because it was fenced
                faults = [m for m in failed if m not in self.evicted]
                evicted = len(faults) < len(failed)
                self._recover(outcomes, failed, count_failure=bool(faults) or (
                    decision.action is Action.REBUILD and not evicted))
            else:
                self._grow(outcomes)

    def _train_epoch(self, take_over: bool = False, lost: list[Member] | None = None
                     ) -> tuple[dict[Member, TrainOutcome], list[Member]]:
        """Run ``train()`` on every member until all return; detect dead and hung members.
        ``take_over``: the members are already training (a restarted coordinator), and
        ``lost`` of them are gone."""
        lost = list(lost or [])
        refs = {(m.handle.take_over.remote(self.epoch) if take_over
                 else m.handle.train.remote()): m for m in self.members if m not in lost}
        outcomes: dict[Member, TrainOutcome] = {}
        failed: list[Member] = lost
        broken_since: float | None = time.time() if lost else None
        pause_sent = False
        aborts: dict[Any, Member] = {}  # abort_group calls sent (once, when the step broke)
        slots_checked = 0.0
        hang = self.cfg.elastic.hang_timeout_s
        for m in self.members:
            m.last_reply, m.ping_ref = time.time(), None
        while refs:
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PING_INTERVAL_S)
            for ref in done:
                member = refs.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    logger.warning("worker rank %d (pid %s) died: %s", member.rank,
                                   member.info.pid, str(exc).splitlines()[0][:200])
                    member.gone = process_gone(exc)
                    failed.append(member)
                    broken_since = broken_since or time.time()
                    continue
                except ray.exceptions.RayTaskError as exc:
                    if not take_over:
                        raise
                    logger.warning("worker rank %d (pid %s) cannot be taken over: %s",
                                   member.rank, member.info.pid,
                                   str(exc).splitlines()[-1][:200])
                    failed.append(member)
                    broken_since = broken_since or time.time()
                    continue
                outcomes[member] = outcome
                if outcome.status in (Status.BROKEN, Status.ERROR):
                    broken_since = broken_since or time.time()
            self._ping_all([m for m in refs.values()], since=self.logged_step)
            now = time.time()
            evict, self.to_evict = self.to_evict, None
            if evict is not None and broken_since is None and evict in refs.values():
                logger.warning("evicting straggler rank %d (pid %s); its slot gets a new worker",
                               evict.rank, evict.info.pid)
                self.coordinator.record_event("straggler_evicted", self.logged_step,
                                              rank=evict.rank, pid=evict.info.pid)
                evict.fence_off()
                refs.pop(next(r for r, m in refs.items() if m is evict))
                failed.append(evict)
                self.evicted.append(evict)
                broken_since = now
            if failed and now - slots_checked >= 1.0:  # a node may have gone with the worker
                slots_checked = now
                self.slots.replace_lost()
            for ref, member in list(refs.items()):
                silent = now - member.last_reply
                # hung: no answer at all; or, answering, still in train() long after its peers
                # broke off (its own collective timeout should have ended that step)
                stuck = broken_since is not None and now - broken_since > (
                    self.cfg.elastic.collective_timeout_s + hang)
                if silent > hang or stuck:
                    logger.warning("worker rank %d (pid %s) %s: fencing it off", member.rank,
                                   member.info.pid, f"silent for {silent:.1f} s"
                                   if silent > hang else "did not leave a broken step")
                    member.fence_off()
                    refs.pop(ref)
                    failed.append(member)
                    broken_since = broken_since or now
            if broken_since is not None and not aborts:
                # the rest may be blocked in a collective with the lost member: on NCCL it
                # never returns by itself, so abort their communicators now
                # (those that already left their broken step answer 0: nothing left to abort)
                targets = [*refs.values(), *(m for m, o in outcomes.items()
                                             if o.status is Status.BROKEN)]
                aborts = {member.handle.abort_group.remote(self.epoch): member
                          for member in targets}
            if broken_since is None and not pause_sent \
                    and (self.stop_requested or self._growth_ready()):
                for member in refs.values():
                    member.handle.request_pause.remote()
                pause_sent = True
        survivors = [m for m in self.members if m not in failed]
        if aborts:
            self._record_aborts(aborts)
        self._ping_all(survivors, since=self.logged_step, wait=2.0)  # answers still in flight
        self._ping_all(survivors, since=self.logged_step, wait=2.0)  # the last metrics
        return outcomes, failed

    def _record_aborts(self, aborts: dict[Any, Member]) -> None:
        """Which members' communicators were aborted (0 groups: the member had already left
        its group, as on gloo, where the lost peer's closed socket is faster)."""
        done, _ = ray.wait(list(aborts), num_returns=len(aborts), timeout=2.0)
        groups: dict[int, int] = {}
        for ref in done:
            try:
                groups[aborts[ref].rank] = int(ray.get(ref))
            except ray.exceptions.RayError:  # lost meanwhile: the rebuild finds out
                continue
        ranks = sorted(groups)
        self.coordinator.record_event("communicators_aborted", self.logged_step,
                                      epoch=self.epoch, ranks=ranks,
                                      groups=[groups[r] for r in ranks])

    def _usable_plan(self, available: int) -> MeshPlan | None:
        """The plan for the largest world size, at most ``available`` and
        ``parallel.max_workers``, that the mesh planner accepts (a fixed ``dp_replicate_degree``
        or ``expert_parallel_degree`` must divide it); ``None`` if none from
        ``parallel.min_workers`` up does."""
        par = self.cfg.parallel
        for world in range(min(available, par.max_workers), par.min_workers - 1, -1):
            try:
                return plan_mesh(world, par.gpus_per_node, self.cfg.model, par,
                                 global_batch_size=self.cfg.train.global_batch_size)
            except ValueError:
                continue
        return None

    def _growth_ready(self) -> bool:
        now = time.time()
        if now - self.last_resize_check >= self.cfg.elastic.resize_check_s:
            self.last_resize_check = now
            self.slots.replace_lost()
            self._spawn_joiners()
        self._collect_joiners()
        # spares wait outside a full group; a joiner pauses the group only if it has room, once
        # it is warm (the pause then holds no first build), and only for a size the layout
        # allows (two joiners, not one, when dp_replicate=2)
        warm = [j for j in self.joiners if self._warm(j)]
        if not warm or len(self.members) >= self.cfg.parallel.max_workers:
            return False
        usable = self._usable_plan(len(self.members) + len(warm))
        return usable is not None and usable.world_size > len(self.members)

    # ------------------------------------------------------------------ metrics
    def _ping_all(self, members: list[Member], since: int, wait: float = 0.0) -> None:
        now = time.time()
        for m in members:
            if m.ping_ref is None:
                m.ping_ref, m.ping_sent = m.handle.ping.remote(since), now
        refs = {m.ping_ref: m for m in members if m.ping_ref is not None}
        if not refs:
            return
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait)
        for ref in done:
            member = refs[ref]
            member.ping_ref = None
            try:
                reply = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            member.last_reply = time.time()
            for step, values in self.run_log.write(reply.metrics):
                self._watch_stragglers(step, values)

    def _watch_stragglers(self, step: int, values: dict[str, float]) -> None:
        """Feed a committed step's per-rank compute times to the straggler policy; flag a
        persistent straggler (with the numbers) and mark it for eviction when the goodput model
        says so."""
        world = int(values.get("world_size", 0))
        compute = [values.get(f"rank{r}_compute_s") for r in range(world)]
        stalled = [float(values.get(f"rank{r}_stalled_s", 0.0)) for r in range(world)]
        if world != len(self.members) or any(c is None for c in compute):
            return
        self._collect_joiners()
        # a worker starting or warming up here competes with the ranks for the CPUs
        if self.pending_joiners or not all(self._warm(j) for j in self.joiners):
            self.stragglers.pause()
            return
        verdict = self.stragglers.observe(
            [float(c) for c in compute if c is not None], float(values.get("step_s", 0.0)),
            steps_left=self.cfg.train.steps - step, spare_ready=bool(self.joiners),
            pause_s=self.last_rebuild_s, stalled_by_rank=stalled)
        if verdict is None:
            return
        member = next((m for m in self.members if m.rank == verdict.rank), None)
        logger.warning("straggler: %s (pid %s)", verdict.reason,
                       member.info.pid if member else "?")
        detail = {**verdict.detail(), "pid": member.info.pid if member else None}
        self.coordinator.record_event("straggler", step, **detail)
        self.tracker.log_event("straggler", step, **detail)
        if verdict.evict and member is not None:
            self.to_evict = member

    # ------------------------------------------------------------------ membership changes
    def _stop_on_error(self, decision: Decision, reports: list[StepReport]) -> StepError:
        report = decision.report
        assert report is not None
        self.coordinator.record_event("stopped_on_error", self.logged_step,
                                      **_report_detail(report, reports))
        samples = ", ".join(f"({e}, {i})" for e, i in report.sample_ids) or "not known"
        lines = [f"step {report.step} failed on rank {report.rank} with an error in the run's "
                 f"own code or data, again after a retry (not a lost worker; no failure budget "
                 f"spent): {report.error}",
                 f"samples (epoch, index) of that step on that rank: {samples}"]
        if report.memory:
            lines.append(report.memory)
        if report.traceback:
            lines.append(report.traceback.rstrip())
        return StepError("\n".join(lines))

    def _record_step_error(self, decision: Decision, reports: list[StepReport]) -> None:
        report = decision.report
        assert report is not None
        logger.warning("step %d raised on rank %d (%s): %s", report.step, report.rank,
                       report.kind.value, decision.reason)
        self.coordinator.record_event("step_error", self.logged_step,
                                      error_kind=report.kind.value,
                                      **_report_detail(report, reports))

    def _recover(self, outcomes: dict[Member, TrainOutcome], failed: list[Member],
                 count_failure: bool = True) -> None:
        detected = time.time()
        self._enter(LoopState.RECOVERING)
        # no commit of the broken epoch from now on (a cut-off member may still try one), so
        # that the restore point read below is final
        self.coordinator.close_epoch(self.epoch)
        ranks = [m.rank for m in failed if m not in self.evicted]
        lost = [m for m in failed if m not in self.evicted]
        if lost:
            logger.warning("lost worker(s) rank %s (pids %s) at step %d; rebuilding", ranks,
                           [m.info.pid for m in lost], self.logged_step)
            self.coordinator.record_event("worker_lost", self.logged_step, ranks=ranks,
                                          pids=[m.info.pid for m in lost])
        elif not failed:  # every member is alive: a broken step (an error, or a broken link)
            logger.warning("step %d broke with every worker alive; rebuilding the group",
                           self.logged_step + 1)
        for member in failed:
            member.fence_off()
        self.slots.replace_lost()
        if count_failure:
            spent = self.failure_budget.spend(Failure(
                detected, self.logged_step, ranks, "worker_lost" if lost else "broken_step"))
            if spent:
                raise FailureBudgetSpent(spent)
        survivors = [m for m in self.members if m not in failed]
        if self.cfg.elastic.recovery == "restart":
            self._restart_all(survivors, detected)
            return
        self._restore_live(survivors, detected, failed, regrow=bool(failed))

    def _restore_live(self, survivors: list[Member], detected: float, failed: list[Member],
                      regrow: bool = False, reason: str | None = None,
                      take_warming: bool = True) -> None:
        """Rebuild from the survivors' live state and peer copies (the checkpoint only when
        some shard has no copy left). A member or joiner lost meanwhile is dropped and the
        restore decided again from who is left: a fault during recovery is an ordinary fault.
        ``regrow``: start replacements for lost members at once. ``take_warming``: joiners
        still warming up may join (after a loss; not for a join that only adds capacity)."""
        while True:
            holdings: dict[int, Holdings] = {}
            refs = {m.handle.holdings.remote(): m for m in survivors}
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=5.0)
            for ref in done:
                try:
                    holdings[refs[ref].rank] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    refs[ref].gone = process_gone(exc)
            lost_now = [m for m in survivors if m.rank not in holdings]
            for member in lost_now:
                member.fence_off()
            survivors = [m for m in survivors if m.rank in holdings]
            assert self.plan is not None  # a live restore follows a formed layout
            decision = decide_restore(self.plan.world_size, holdings, self.copy_plans)
            self._collect_joiners()
            self.members = survivors
            if regrow:  # a replacement warms up in a freed slot while the group trains
                self._spawn_joiners()  # and joins at the next step boundary
            if decision.step is None:
                logger.error("RESTORING FROM THE LAST COMMITTED CHECKPOINT: %s", decision.reason)
                self._from_checkpoint(survivors, detected, decision.reason, failed)
                return
            logger.info("restore point: %s", decision.reason)
            try:
                sources = self._export(survivors, decision.holders, decision.step)
                self._form_epoch(survivors=survivors, sources=sources, restore=RestoreSource.SHARDS,
                                 marks={"detected": detected}, restored_step=decision.step,
                                 take_warming=take_warming,
                                 cause_detail={"restored_from": "peers",
                                               "reason": reason or decision.reason,
                                               "failed_ranks": [m.rank for m in failed],
                                               "failed_pids": [m.info.pid for m in failed]})
                return
            except RebuildFault as fault:
                self._lost_while_forming(fault)
                survivors = [m for m in survivors if m not in fault.lost]
                regrow = True

    def _lost_while_forming(self, fault: RebuildFault) -> None:
        """Record workers lost during a rebuild. Not spent from the failure budget: the
        rebuild is one recovery, and a joiner that dies while starting held no state."""
        pids = [m.info.pid for m in fault.lost]
        logger.warning("worker(s) pid %s lost while the group formed; rebuilding without them",
                       pids)
        self.coordinator.record_event("lost_while_forming", self.logged_step, pids=pids)
        self.slots.replace_lost()

    def _roll_back(self, outcomes: dict[Member, TrainOutcome]) -> None:
        """``train.max_skipped_steps`` non-finite steps in a row (the vote makes every rank see
        the same ones): restore the newest committed checkpoint from before them and skip the
        batches since (PaLM, sec. 5.1), or fail when the rollback budget is spent."""
        from elastic_moe.storage import committed_steps

        self._enter(LoopState.ROLLING_BACK)
        detected = time.time()
        diverged = next(o for o in outcomes.values() if o.status is Status.DIVERGED)
        first, step = diverged.first_skipped or diverged.step, diverged.step
        committed = committed_steps(self.spec.checkpoint_dir)
        # a checkpoint at first - 1 holds the very state the skipped steps started from
        target = max((c for c in committed if c < first - 1), default=None)
        self.rollbacks += 1
        limit = self.cfg.train.max_rollbacks
        what = (f"{step - first + 1} non-finite steps in a row (steps {first}-{step}, "
                f"train.max_skipped_steps={self.cfg.train.max_skipped_steps})")
        if self.rollbacks > limit or target is None:
            self.coordinator.record_event("diverged", step, first_skipped=first,
                                          rollbacks=self.rollbacks - 1)
            raise Diverged(f"training diverged: {what}, and " + (
                f"{limit} rollback(s) already spent (train.max_rollbacks)" if target is not None
                else f"no committed checkpoint from before step {first - 1} to roll back to"))
        logger.error("ROLLING BACK: %s; restoring checkpoint step %d and skipping the batches "
                     "of steps %d-%d", what, target, target + 1, step)
        self.coordinator.record_event("rollback", step, first_skipped=first, to_step=target,
                                      skipped_batches=[target + 1, step])
        self._form_from_storage(survivors=list(self.members), sources=None, restore=RestoreSource.CHECKPOINT,
                               checkpoint_step=target,
                               skip_to={"step": step, "position": diverged.position},
                               marks={"detected": detected}, restored_step=target,
                               cause_detail={"restored_from": "checkpoint", "reason": "rollback"})

    def _grow(self, outcomes: dict[Member, TrainOutcome]) -> None:
        detected = time.time()
        self._enter(LoopState.GROWING)
        if self.cfg.elastic.recovery == "restart":
            self._restart_all(list(self.members), detected)
            return
        self._restore_live(list(self.members), detected, [], reason="join", take_warming=False)

    def _export(self, survivors: list[Member], holders: dict[int, int], step: int
                ) -> list[tuple[Any, Any]]:
        by_rank = {m.rank: m for m in survivors}
        exporters = [by_rank[holders[rank]] for rank in sorted(holders)]
        pairs = [m.handle.export.remote(rank, step)
                 for m, rank in zip(exporters, sorted(holders), strict=True)]
        manifests = []
        for member, pair in zip(exporters, pairs, strict=True):
            try:
                manifests.append(ray.get(pair[0], timeout=max(60.0, self.cfg.elastic
                                                               .collective_timeout_s)))
            except (ray.exceptions.RayActorError, TimeoutError) as exc:  # the holder is gone
                raise RebuildFault([member]) from exc
        return [(manifest, pair[1]) for manifest, pair in zip(manifests, pairs, strict=True)]

    def _form_from_storage(self, **form: Any) -> None:
        """:meth:`_form_epoch` for a restore from the checkpoint (or a fresh start), retried
        without the workers lost while the group formed."""
        while True:
            try:
                self._form_epoch(**form)
                return
            except RebuildFault as fault:
                self._lost_while_forming(fault)
                form["survivors"] = [m for m in form["survivors"] if m not in fault.lost]

    def _from_checkpoint(self, survivors: list[Member], detected: float, reason: str,
                         failed: list[Member]) -> None:
        committed = self.coordinator.restore_point()
        self._record_fallback(self.logged_step, reason=reason)
        self._form_from_storage(survivors=survivors, sources=None,
                               restore=RestoreSource.CHECKPOINT if committed else RestoreSource.FRESH,
                               checkpoint_step=committed["step"] if committed else None,
                               marks={"detected": detected},
                               restored_step=committed["step"] if committed else 0,
                               cause_detail={"restored_from": "checkpoint", "reason": reason,
                                             "failed_ranks": [m.rank for m in failed]})

    def _record_fallback(self, step: int, **detail: Any) -> None:
        """A restore from an older state than wanted, in the coordinator's record and MLflow."""
        self.coordinator.record_event("checkpoint_fallback", step, **detail)
        self.tracker.log_event("checkpoint_fallback", step, **detail)

    def _restart_all(self, survivors: list[Member], detected: float) -> None:
        """``recovery="restart"``: every worker is replaced and reads the last checkpoint."""
        for member in survivors:
            ray.kill(member.handle, no_restart=True)
        self.members = []
        self.joiners = []
        self._from_checkpoint([], detected, "recovery=restart", [])

    def _form_epoch(self, *, survivors: list[Member], sources: list[Any] | None,
                    restore: RestoreSource,
                    marks: dict[str, float], restored_step: int,
                    cause_detail: dict[str, Any], checkpoint_step: int | None = None,
                    skip_to: dict[str, Any] | None = None, take_warming: bool = True) -> None:
        """Choose members and plan, rendezvous everyone in a new group, fill the new layout.
        Warm joiners first; those still warming up only with ``take_warming`` (their join
        stops the warm-up and pays the first build itself)."""
        if len(survivors) + len(self.joiners) < self.cfg.parallel.min_workers:
            self.members = survivors
            self._wait_for_minimum()
        warm = [j for j in self.joiners if self._warm(j)]
        warming = [j for j in self.joiners if j not in warm]
        held = [] if take_warming else warming
        available = list(survivors) + warm + (warming if take_warming else [])
        # the largest size the layout allows (fixed parallel degrees rule some out); without
        # any, plan_mesh names the rule
        plan = self._usable_plan(len(available)) or plan_mesh(
            min(len(available), self.cfg.parallel.max_workers), self.cfg.parallel.gpus_per_node,
            self.cfg.model, self.cfg.parallel, global_batch_size=self.cfg.train.global_batch_size)
        world = plan.world_size
        members = available[:world]
        # survivors left out (a size the layout rules out) wait as joiners: their state is
        # in the exported sources, and they hold no rank until a layout takes them in
        for left_out in available[world:len(survivors)]:
            left_out.rank = -1
        self.joiners = available[world:] + held
        # node by node: ranks of one node are contiguous (EP groups stay inside a node)
        members.sort(key=lambda m: (m.info.node_id, m.rank if m.rank >= 0 else 1 << 30))
        old_plan = self.plan
        self.epoch = self.coordinator.open_epoch()  # numbered by the coordinator, never reused
        joiners = [m for m in members if m not in survivors]
        try:
            joined = self._rendezvous(members, plan, restore=restore, sources=sources,
                                      checkpoint_step=checkpoint_step, skip_to=skip_to)
        except RebuildFault as fault:  # joiners still alive wait for the next try
            self.joiners = [j for j in joiners if j not in fault.lost] + self.joiners
            raise
        for rank, member in enumerate(members):  # old ranks stay until the new layout exists
            member.rank = rank
        self.members = members
        self.plan = plan
        self.copy_plans = next((j.copy_plans for j in joined if j.copy_plans), None)
        marks["rebuilt"] = time.time()
        for key in ("join_start", "left", "group_ready", "built", "restored", "linked"):
            marks[key] = max(j.marks[key] for j in joined)
        logger.debug("rebuild marks: %s", {k: round(v - marks["detected"], 3)
                                           for k, v in marks.items()})
        pause_s = marks["rebuilt"] - marks["detected"]
        self.last_rebuild_s = pause_s
        self.stragglers.reset()  # ranks are renumbered
        step = joined[0].step
        if checkpoint_step is not None and skip_to is None \
                and step < checkpoint_step:  # the workers said why
            reason = (f"committed checkpoint step {checkpoint_step} unusable; restored step "
                      f"{step}")
            logger.error("%s", reason)
            self._record_fallback(step, committed_step=checkpoint_step, reason=reason)
        workers = [{"rank": m.rank, "pid": m.info.pid, "node_id": m.info.node_id,
                    "ip": m.info.ip, "name": m.info.name, "slot": m.slot} for m in members]
        detail = {**cause_detail, "rebuild_s": round(pause_s, 3),
                  "old_plan": old_plan.describe() if old_plan else None,
                  "new_plan": plan.describe(),
                  "copy_bytes_per_step": max(j.copy_bytes_per_step for j in joined),
                  "redundancy_bytes": max(j.redundancy_bytes for j in joined),
                  "expert_replica_bytes": max(j.expert_replica_bytes for j in joined),
                  "copied_bytes_by_kind": {
                      kind: sum(j.copied_bytes_by_kind.get(kind, 0) for j in joined)
                      for kind in ("dense", "experts")}}
        epoch = self.coordinator.start_epoch(self.epoch, world, plan.to_dict(), step, marks,
                                             workers=workers, detail=detail)
        self.tracker.log_event(epoch["cause"], step, world_size=world,
                               previous_world_size=epoch["previous_world_size"],
                               steps_redone=epoch["steps_redone"], **detail)
        logger.info("epoch %d (%s): %d workers at step %d (%s), rebuilt in %.2f s; plan %s",
                    self.epoch, epoch["cause"], world, step, cause_detail.get("restored_from"),
                    pause_s, plan.describe())

    def _rendezvous(self, members: list[Member], plan: MeshPlan, *, restore: RestoreSource,
                    sources: list[Any] | None, checkpoint_step: int | None,
                    skip_to: dict[str, Any] | None) -> list[JoinReport]:
        """Every member joins membership epoch ``self.epoch``; returns their join reports.

        A member that dies or stops answering meanwhile (a kill during recovery, a joiner that
        crashes while it starts) raises :class:`RebuildFault`, after the others' joins were
        aborted (they would wait in the rendezvous for it until the timeout): the caller
        retries without it. A join that raises in a live worker with nobody lost is an error in
        our code or setup, not a fault: the run stops with it.
        """
        master = members[0]
        try:
            port = ray.get(master.handle.free_port.remote(), timeout=self.cfg.elastic.hang_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            logger.warning("worker pid %s lost before the group formed: %s", master.info.pid,
                           str(exc).splitlines()[0][:200])
            raise RebuildFault([master]) from exc
        nodes = [m.info.node_id for m in members]
        refs = {}
        for rank, member in enumerate(members):
            spec = EpochSpec(epoch=self.epoch, rank=rank, world_size=len(members),
                             plan=plan.to_dict(), master_addr=master.info.ip,
                             master_port=port, node_of_rank=nodes, restore=restore,
                             checkpoint_step=checkpoint_step, skip_to=skip_to)
            refs[member.handle.join.remote(spec, sources)] = member
        deadline = time.time() + max(120.0, self.cfg.elastic.collective_timeout_s * 2)
        reports: dict[Member, JoinReport] = {}
        errors: dict[Member, BaseException] = {}
        lost: list[Member] = []
        pending = dict(refs)
        abort_sent = False
        for member in members:
            member.last_reply, member.ping_ref = time.time(), None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=PING_INTERVAL_S)
            for ref in done:
                member = pending.pop(ref)
                try:
                    reports[member] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # the process is gone
                    logger.warning("worker pid %s lost while the group formed: %s",
                                   member.info.pid, str(exc).splitlines()[0][:200])
                    member.gone = process_gone(exc)
                    lost.append(member)
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, NetworkInterfaceError):  # a setting: no retry
                        raise TrainingFailed(str(cause)) from exc
                    errors[member] = exc
            self._ping_all(list(pending.values()), since=self.logged_step)
            now = time.time()
            for ref, member in list(pending.items()):
                if now - member.last_reply > self.cfg.elastic.hang_timeout_s or now > deadline:
                    logger.warning("worker pid %s silent while the group formed: fencing it off",
                                   member.info.pid)
                    member.fence_off()
                    pending.pop(ref)
                    lost.append(member)
            if (lost or errors) and pending and not abort_sent:
                # the rest wait in the rendezvous (or a collective) for the lost member
                for member in pending.values():
                    member.handle.abort_join.remote(self.epoch)
                abort_sent = True
        if lost:
            for member in lost:
                member.fence_off()
            raise RebuildFault(lost)
        if errors:
            member, exc = next(iter(errors.items()))
            raise TrainingFailed(f"rebuilding the group at {len(members)} workers failed on "
                                 f"worker pid {member.info.pid}: {exc}") from exc
        return [reports[m] for m in members]

    # ------------------------------------------------------------------ teardown
    def _shutdown(self) -> None:
        for member in self.members + self.joiners:
            try:
                ray.kill(member.handle, no_restart=True)
            except Exception:
                pass
        for handle, _ in self.pending_joiners.values():
            ray.kill(handle, no_restart=True)
        self.slots.remove_all()
