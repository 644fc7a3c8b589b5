"""The elastic training service on a real local Ray: failures, resizes, resubmission.

Every test runs real Ray Train V2 worker groups (CPU + gloo) training the debug model, with a
run coordinator, DCP checkpoints and an MLflow sqlite store on disk. Faults are injected by the
training loop's test hooks (process exit, SIGSTOP, exit in the middle of a checkpoint write);
nodes are added and removed with ``ray.cluster_utils.Cluster``.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from tests.integration.elastic_helpers import (
    assert_each_sample_once,
    final_model_tensors,
    tiny_config,
)

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}}


@pytest.fixture
def local_ray():
    ray.init(num_cpus=3, runtime_env=RUNTIME_ENV, include_dashboard=False,
             namespace="elastic-moe")
    yield
    ray.shutdown()


def _num_sequences(cfg) -> int:
    from elastic_moe.data.sample_corpus import ensure_prepared
    from elastic_moe.data.shards import TokenDataset

    return TokenDataset(ensure_prepared(cfg.data.cache_dir, cfg.data.tokenizer_vocab_size,
                                        cfg.train.seq_len)).num_sequences


def _metric_history(result, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    return [(m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, name)]


def _recovery_seconds(epoch) -> float | None:
    if epoch.get("downtime_s") is None or epoch.get("start_to_first_step_s") is None:
        return None
    return epoch["downtime_s"] + epoch["start_to_first_step_s"]


def _kill_data_worker_at(run_name: str, step: int, out: dict, timeout: float = 300) -> None:
    """Kill (restartable) the run's data worker once the coordinator reports ``step``."""
    from actors import coordinator as coordinator_mod

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            coordinator = coordinator_mod.get(run_name)
            worker = ray.get_actor(f"{run_name}-data-0", namespace=coordinator_mod.NAMESPACE)
            last = ray.get(coordinator.snapshot.remote())["last_step"]
        except ValueError:  # not created yet
            last = -1
        if last >= step:
            ray.kill(worker, no_restart=False)
            out["at_step"] = last
            return
        time.sleep(0.05)


def test_killed_worker_recovers_to_the_fault_free_result(local_ray, tmp_path):
    from actors.training import run_training

    steps, batch = 10, 12
    samples = tmp_path / "samples"
    # The data worker is killed too (at step >= 2, before the training worker's fault): Ray
    # restarts it and retries the request in flight, without restarting the training group.
    data_kill: dict = {}
    killer = threading.Thread(target=_kill_data_worker_at, args=("kill-worker", 2, data_kill),
                              daemon=True)
    killer.start()
    faulty = run_training(tiny_config(tmp_path / "a", steps=steps, every=4), "kill-worker",
                          output_dir=str(tmp_path / "a"),
                          faults=[{"step": 6, "rank": 1, "mode": "exit"}],
                          record_samples_dir=str(samples))
    killer.join(timeout=5)
    assert faulty.ok, faulty.error
    assert 2 <= data_kill.get("at_step", -1) < 6, data_kill
    assert faulty.final_step == steps
    epochs = faulty.coordinator_state["world_sizes"]
    assert [e["world_size"] for e in epochs] == [2, 2]
    # restored exactly the last committed checkpoint (step 4), redoing steps 5-6 only
    assert epochs[1]["restored_step"] == 4 and epochs[1]["cause"] == "restart"
    recovery = _recovery_seconds(epochs[1])
    print(f"\nkill worker: recovery (failure -> first step after it) {recovery:.1f} s, "
          f"steps redone {epochs[1]['steps_redone']}")
    assert recovery is not None and recovery > 0

    reference = run_training(tiny_config(tmp_path / "b", steps=steps, every=4), "fault-free",
                             output_dir=str(tmp_path / "b"))
    assert reference.ok, reference.error
    got, want = final_model_tensors(faulty.checkpoint_dir), final_model_tensors(
        reference.checkpoint_dir)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    cfg = tiny_config(tmp_path / "a")
    assert_each_sample_once(str(samples), steps, batch, _num_sequences(cfg))
    # one MLflow run, each step logged once although steps 5-6 ran twice
    steps_logged = [s for s, _ in _metric_history(faulty, "loss")]
    assert steps_logged == list(range(1, steps + 1))
    # the config as params and the run's locations as tags, set once when the run was created
    from mlflow.tracking import MlflowClient

    run = MlflowClient(faulty.tracking_uri).get_run(faulty.mlflow_run_id)
    assert run.data.params["train.steps"] == str(steps)
    assert run.data.tags["checkpoint_dir"] == faulty.checkpoint_dir
    # model TFLOP/s per worker and data waits are logged; no MFU without a known peak (CPU)
    assert all(v > 0 for _, v in _metric_history(faulty, "tflops_per_worker"))
    assert len(_metric_history(faulty, "data_wait_s")) == steps
    assert _metric_history(faulty, "mfu") == []


def test_kill_during_save_and_hung_rank(local_ray, tmp_path):
    from actors.training import run_training

    cfg = tiny_config(tmp_path, steps=9, every=3, extra=["elastic.max_failures=3",
                                                        "elastic.collective_timeout_s=15"])
    result = run_training(cfg, "save-and-hang", output_dir=str(tmp_path),
                          faults=[{"step": 6, "rank": 1, "mode": "exit", "phase": "save"},
                                  {"step": 7, "rank": 0, "mode": "hang"}])
    assert result.ok, result.error
    epochs = result.coordinator_state["world_sizes"]
    # crash while writing step 6: the previous checkpoint (3) is the restore point; then the
    # re-run step 6 commits, and the hung rank at step 7 is detected and recovered from 6
    assert [e["restored_step"] for e in epochs] == [0, 3, 6]
    for epoch in epochs[1:]:
        print(f"\n{epoch['cause']}: recovery {_recovery_seconds(epoch):.1f} s")
    from elastic_moe.checkpoint import Checkpointer

    ckpt = Checkpointer(result.checkpoint_dir, async_save=False)
    assert ckpt.committed_steps()[-1] == 9
    leftovers = [p for p in os.listdir(result.checkpoint_dir)
                 if not os.path.exists(os.path.join(result.checkpoint_dir, p, "COMMITTED"))]
    assert leftovers == []  # the partial save of step 6 was removed


def test_more_failures_than_allowed_fails_clearly(local_ray, tmp_path):
    from mlflow.tracking import MlflowClient

    from actors.training import run_training

    cfg = tiny_config(tmp_path, steps=8, every=2, extra=["elastic.max_failures=1"])
    result = run_training(cfg, "too-many-failures", output_dir=str(tmp_path),
                          faults=[{"step": 2, "rank": 0, "mode": "exit"},
                                  {"step": 3, "rank": 1, "mode": "exit"}])
    assert not result.ok
    assert result.error and "fail" in result.error.lower()
    assert "FAILED" in result.summary()
    run = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FAILED"
    assert result.coordinator_state["status"] == "FAILED"


def test_resubmit_resumes_in_the_same_mlflow_run(local_ray, tmp_path):
    from actors.training import run_training

    first = run_training(tiny_config(tmp_path, steps=4, every=2), "resubmit",
                         output_dir=str(tmp_path))
    assert first.ok, first.error
    with pytest.raises(ValueError, match="--resume"):
        run_training(tiny_config(tmp_path, steps=8, every=2), "resubmit", output_dir=str(tmp_path))
    second = run_training(tiny_config(tmp_path, steps=8, every=2), "resubmit", resume=True,
                          output_dir=str(tmp_path))
    assert second.ok, second.error
    assert second.mlflow_run_id == first.mlflow_run_id
    assert second.coordinator_state["world_sizes"][-1]["restored_step"] == 4
    assert [s for s, _ in _metric_history(second, "loss")] == list(range(1, 9))


def test_nodes_join_and_leave(tmp_path):
    """Capacity below min (waits), nodes join (start, then scale up), a node leaves (scale down)."""
    from ray.cluster_utils import Cluster

    from actors import coordinator as coordinator_mod
    from actors.training import run_training

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = []
    ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, namespace="elastic-moe")
    try:
        cfg = tiny_config(tmp_path, steps=60, every=2, workers=(2, 3),
                          extra=["elastic.max_failures=6"])
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(result=run_training(
            cfg, "join-leave", output_dir=str(tmp_path))))
        runner.start()

        def state():
            try:
                return ray.get(coordinator_mod.get("join-leave").snapshot.remote())
            except ValueError:
                return None

        def wait_for(predicate, timeout=240):
            deadline = time.time() + timeout
            while time.time() < deadline:
                snap = state()
                if snap and predicate(snap):
                    return snap
                time.sleep(1)
            raise AssertionError(f"timed out; last state {state()}")

        # 1 CPU < min_workers=2: the run waits without starting a worker group ...
        time.sleep(20)
        waiting = state()
        assert waiting is not None and waiting["world_sizes"] == [] and waiting["last_step"] == -1
        assert runner.is_alive()
        nodes.append(cluster.add_node(num_cpus=1))  # ... and starts once capacity arrives
        wait_for(lambda s: s["last_step"] >= 4)
        nodes.append(cluster.add_node(num_cpus=1))  # capacity for a third worker
        # ... and 3 workers have trained a few steps of their own before a node is taken away
        wait_for(lambda s: s["world_sizes"] and s["world_sizes"][-1]["world_size"] == 3
                 and s["world_sizes"][-1].get("last_step", -1)
                 >= s["world_sizes"][-1]["restored_step"] + 3)
        cluster.remove_node(nodes.pop(0))  # a node fails: back to 2 workers
        runner.join(600)
        result = outcome["result"]
        assert result.ok, result.error
        sizes = [e["world_size"] for e in result.coordinator_state["world_sizes"]]
        print(f"\nworld sizes: {sizes}")
        assert sizes[0] == 2 and 3 in sizes and sizes[-1] == 2
        logged = dict(_metric_history(result, "world_size"))
        assert set(logged.values()) == {2.0, 3.0}
        assert sorted(logged) == list(range(1, 61))
        plans = [e["plan"] for e in result.coordinator_state["world_sizes"]]
        assert plans[0] != plans[sizes.index(3)]  # the mesh was re-planned at the new size
    finally:
        ray.shutdown()
        cluster.shutdown()
