"""What ends a step, and what the group does about it (elastic_moe.train.failure_policy)."""

from __future__ import annotations

import ray
import torch

from elastic_moe.data.shards import BadSampleError
from elastic_moe.train.failure_policy import (
    Action,
    FailurePolicy,
    PeerStepError,
    StepFailure,
    StepReport,
    classify,
    root_cause,
)


def test_classify_separates_lost_peers_from_own_errors():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                        "closed by peer [127.0.0.1]:5018")
    assert classify(gloo) is StepFailure.FAULT
    assert classify(PeerStepError("step 3: another rank's batch failed")) is StepFailure.FAULT
    assert classify(ray.exceptions.RayActorError()) is StepFailure.FAULT
    assert classify(IndexError("index out of range in self")) is StepFailure.ERROR
    assert classify(BadSampleError("shard row 5: token id 3000")) is StepFailure.ERROR
    assert classify(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is StepFailure.ERROR
    assert classify(MemoryError()) is StepFailure.OOM
    assert classify(torch.OutOfMemoryError("CUDA out of memory")) is StepFailure.OOM


def test_classify_looks_inside_a_remote_error():
    @ray.remote
    def bad_reader():
        raise BadSampleError("shard-00003.arrow row 293: token id 3000")

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        try:
            ray.get(bad_reader.remote())
        except Exception as exc:  # Ray's wrapper around the reader's exception
            wrapped = exc
    finally:
        ray.shutdown()
    assert classify(wrapped) is StepFailure.ERROR
    assert isinstance(root_cause(wrapped), BadSampleError)
    assert "row 293" in str(root_cause(wrapped))


def _report(rank: int, step: int, kind: StepFailure) -> StepReport:
    return StepReport(rank, step, kind, f"{kind.value} on rank {rank}")


def test_policy_rebuilds_on_faults_retries_an_error_once_then_stops():
    policy = FailurePolicy()
    assert policy.decide([_report(0, 7, StepFailure.FAULT)]).action is Action.REBUILD
    # an error on rank 1 outranks the faults it causes on its peers
    reports = [_report(0, 7, StepFailure.FAULT), _report(1, 7, StepFailure.ERROR)]
    first = policy.decide(reports)
    assert first.action is Action.RETRY and first.report.rank == 1
    again = policy.decide(reports)
    assert again.action is Action.STOP and again.report.step == 7
    # a different step gets its own retry
    assert policy.decide([_report(0, 9, StepFailure.OOM)]).action is Action.RETRY


def test_oom_advice_names_the_settings_that_fit():
    from elastic_moe.actors.train_worker import fit_advice

    from elastic_moe.config import apply_overrides, debug
    from elastic_moe.parallel.memory import GIB, MemoryBudget, check_memory

    cfg = apply_overrides(debug(), ["train.micro_batch_size=8", "train.global_batch_size=16"])
    estimate = check_memory(cfg, 2, MemoryBudget(1 << 50, 1, "plenty", host=True),
                            device_type="cpu")
    need = estimate.total
    # room for half the activations: a smaller micro-batch fits, the configured one does not
    tight = MemoryBudget(need - estimate.activations // 2, 1, "a tight device", host=True)
    advice = fit_advice(cfg, 2, tight, "cpu")
    assert "not enough memory" in advice and "--set train.micro_batch_size=" in advice, advice
    roomy = MemoryBudget(int(need * 2), 1, "a roomy device", host=True)
    assert "something it does not count ran out" in fit_advice(cfg, 2, roomy, "cpu")
    assert estimate.activations > GIB / 1024  # a real estimate, not zero


def test_failure_budget_is_a_rate_and_names_what_spent_it():
    from elastic_moe.train.failure_policy import Failure, FailureBudget

    budget = FailureBudget(max_failures=2, window_s=3600.0)
    hour = 3600.0
    # one failure every 40 minutes forever: never more than 2 in an hour
    for i in range(10):
        assert budget.spend(Failure(i * 0.67 * hour, 100 * i, [1], "worker_lost")) is None
    # a crash loop: the third within the hour spends it, and the message lists all three
    loop = FailureBudget(max_failures=2, window_s=3600.0)
    assert loop.spend(Failure(0.0, 5, [1], "worker_lost")) is None
    assert loop.spend(Failure(60.0, 9, [0], "worker_lost")) is None
    spent = loop.spend(Failure(120.0, 12, [], "broken_step"))
    assert spent is not None and "3 failures within 3600 s" in spent
    assert "elastic.max_failures=2" in spent and "step 5" in spent and "step 12" in spent
    # window 0: a lifetime count; -1: no limit
    lifetime = FailureBudget(max_failures=1, window_s=0.0)
    assert lifetime.spend(Failure(0.0, 1, [0], "worker_lost")) is None
    assert lifetime.spend(Failure(1e9, 2, [0], "worker_lost")) is not None
    unlimited = FailureBudget(max_failures=-1, window_s=0.0)
    assert all(unlimited.spend(Failure(t, t, [0], "worker_lost")) is None for t in range(50))
