"""A straggler slowed from outside is flagged, evicted and replaced by the warm spare.

Three slots on a local Ray (two members and ``elastic.spares=1``). Once the run is in its
stride, one member's pid is slowed to a quarter of its speed by a stop/continue duty cycle
(SIGSTOP 150 ms, SIGCONT 50 ms), as a noisy neighbour or a CPU quota would. The straggler
policy sees that rank stall for most of each step, and the steps about 4x as long as they
would be at the other rank's pace, for ``elastic.straggler_steps`` steps; the goodput model
says to evict it (a spare is ready), the spare takes its place from the survivors' memory, and
the step time comes back to about what it was before the slowdown. Read from outside:
the coordinator's events, the epoch record and MLflow's step timestamps and per-rank stalls.

Without a spare, on two workers, a moderately slowed member is flagged but kept: one worker
alone would be slower than the pair with its straggler, and the verdict says so with its
numbers.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import pytest

from tests.integration.elastic_helpers import (
    RUNTIME_ENV,
    local_ray,
    local_ray_per_module,  # noqa: F401 (autouse: shuts the shared local Ray down at the end)
    release_local_ray,
    tiny_config,
)

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.alone, pytest.mark.timeout(900)]

STEPS, SLOW_AT = 90, 30


def _state(name: str) -> dict | None:
    from elastic_moe.actors import coordinator as coordinator_mod

    try:
        return coordinator_mod.get(name).snapshot()
    except ValueError:
        return None


def _duty_cycle(pid: int, stop: threading.Event, stopped_s: float = 0.15,
                running_s: float = 0.05) -> None:
    """Run ``pid`` a quarter of the time until ``stop`` or until it is gone."""
    try:
        while not stop.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stopped_s)
            os.kill(pid, signal.SIGCONT)
            time.sleep(running_s)
    except ProcessLookupError:
        return
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _step_gaps(result, first: int, last: int) -> list[float]:
    from mlflow.tracking import MlflowClient

    stamps = {m.step: m.timestamp / 1000 for m in MlflowClient(result.tracking_uri)
              .get_metric_history(result.mlflow_run_id, "loss")}
    return [stamps[s] - stamps[s - 1] for s in range(first + 1, last + 1)]


def _events(result, kind: str) -> list[dict]:
    return [e for e in result.coordinator_state["events"] if e["kind"] == kind]


def _run_slowed(tmp_path, name: str, steps: int, extra: list[str], stopped_s: float,
                running_s: float):
    """Train two members on a local Ray of 3 CPUs (shared by the module's tests: the third
    slot holds the spare where there is one); once step SLOW_AT is committed, duty-cycle the
    second member's pid (``stopped_s`` stopped, ``running_s`` running) until the run ends.
    Returns (result, victim pid, the step it was slowed at, the members' pids before)."""
    from elastic_moe.actors.training import run_training

    local_ray(3, runtime_env=RUNTIME_ENV, include_dashboard=False, namespace="elastic-moe")
    stop = threading.Event()
    try:
        cfg = tiny_config(tmp_path, steps=steps, every=50, workers=(2, 2),
                          extra=["elastic.max_failures=0", *extra])
        box: dict = {}
        thread = threading.Thread(target=lambda: box.setdefault("result", run_training(
            cfg, name, output_dir=str(tmp_path))), daemon=True)
        thread.start()
        deadline = time.time() + 300
        while time.time() < deadline:
            state = _state(name)
            if state and state["last_step"] >= SLOW_AT:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached the step where a worker is slowed")
        before = {w["pid"] for w in state["workers"]}
        victim = state["workers"][1]["pid"]
        slowed_at = state["last_step"]
        threading.Thread(target=_duty_cycle, args=(victim, stop, stopped_s, running_s),
                         daemon=True).start()
        thread.join(600)
        stop.set()
        result = box.get("result")
        assert result is not None, "training did not finish"
        return result, victim, slowed_at, before
    finally:
        stop.set()
        release_local_ray()


def test_a_slowed_worker_is_evicted_and_the_spare_restores_the_step_time(tmp_path):
    result, victim, slowed_at, before = _run_slowed(
        tmp_path, "slow", STEPS, ["elastic.spares=1", "elastic.straggler_steps=6"],
        stopped_s=0.15, running_s=0.05)
    # max_failures=0: an eviction spends no failure budget, or the run would have failed
    assert result.ok, result.error
    flagged, evicted = _events(result, "straggler"), _events(result, "straggler_evicted")
    assert flagged and flagged[0]["evict"] and flagged[0]["pid"] == victim, flagged
    assert flagged[0]["with_spare"], flagged
    assert [e["pid"] for e in evicted] == [victim], evicted
    assert not _events(result, "worker_lost"), result.coordinator_state["events"]
    epochs = result.coordinator_state["world_sizes"]
    after = epochs[-1]
    assert after["world_size"] == 2 and after["restored_from"] == "peers", after
    pids = {w["pid"] for w in after["workers"]}
    assert victim not in pids and len(pids - before) == 1, (before, pids)  # the spare
    # the step time is back: the steps after the rebuild against those before the slowdown
    rebuilt = after["restored_step"]
    base = statistics.median(_step_gaps(result, 5, slowed_at))
    # every step that ended after the duty cycle began, to the eviction: a worker slowed to a
    # quarter can be evicted 2 steps into it (the policy's 6-step mean crosses 1.5x; CI on a
    # 2-core AMD EPYC box, 2026-12-07), so no step is left out of the window
    assert rebuilt > slowed_at, (rebuilt, slowed_at)  # evicted after the planted slowdown
    slowed = _step_gaps(result, slowed_at, rebuilt)
    slow = statistics.median(slowed)
    back = statistics.median(_step_gaps(result, rebuilt + 3, STEPS))
    print(f"\nstep time: {base:.3f} s before, {slow:.3f} s slowed, {back:.3f} s after the "
          f"spare took over (evicted at step {rebuilt})")
    assert slow > 1.5 * base  # the slowdown was real
    # every rank's own compute and stalls went to MLflow with every step; while it was
    # slowed, the victim's rank stalled for most of the time its steps grew by (the planted
    # duty cycle holds it stopped three quarters of the time), the other rank hardly at all
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    series = {(r, name): {m.step: m.value for m in client.get_metric_history(
        result.mlflow_run_id, f"rank{r}_{name}_s")} for r in range(2)
        for name in ("compute", "stalled")}
    for key, values in series.items():
        assert sorted(values) == list(range(1, STEPS + 1)), key
    window = range(slowed_at + 1, rebuilt + 1)
    grown = sum(gap - base for gap in slowed)
    slow_rank = flagged[0]["rank"]
    stalled = [sum(series[(r, "stalled")][s] for s in window) for r in range(2)]
    print(f"steps {window.start}-{window.stop - 1}: {grown:.3f} s longer than before, "
          f"stalled {stalled} s")
    assert stalled[slow_rank] > 0.5 * grown, (stalled, grown)
    assert stalled[1 - slow_rank] < 0.2 * stalled[slow_rank], stalled
    # back at the pre-slowdown pace, not the slowed one (slow > 1.5x base above): the bound
    # leaves room for this shared 2-core box, where the new spare warming up in the freed slot
    # shares the cores with the members (measured 1.16x in one CI run, 1.0-1.1x in others)
    assert back <= 1.3 * base, (base, back)


def test_without_a_spare_two_workers_keep_a_moderate_straggler_and_log_why(tmp_path):
    """No spare, two workers, one slowed to about two thirds of its speed (stopped 50 ms of
    every 150 ms). The policy flags it (ratio 1.2 here), but one worker alone would take twice
    the straggler-free step time, worse than the straggler costs: the goodput model keeps it,
    and the decision is logged with the numbers behind it. No eviction, no rebuild."""
    steps = 70
    result, victim, _, before = _run_slowed(
        tmp_path, "keep", steps, ["elastic.straggler_ratio=1.2", "elastic.straggler_steps=6"],
        stopped_s=0.05, running_s=0.10)
    assert result.ok, result.error
    flagged = _events(result, "straggler")
    assert flagged, "the slowed worker was never flagged"
    print(f"\nverdicts: {[(v['rank'], v['slowdown'], v['evict']) for v in flagged]}")
    assert not _events(result, "straggler_evicted"), result.coordinator_state["events"]
    for verdict in flagged:
        assert not verdict["evict"] and not verdict["with_spare"], verdict
        assert "no spare" in verdict["reason"] and "keep it" in verdict["reason"], verdict
        # the numbers behind it: without a spare, one rank alone runs at twice the
        # straggler-free step time (step time over the slowdown)
        expected = 2 * verdict["step_s"] / verdict["slowdown"]
        assert abs(verdict["expected_step_s"] - expected) <= 2e-3 * expected + 1e-4, verdict
        assert verdict["expected_step_s"] > 0.9 * verdict["step_s"], verdict
    assert any(v["pid"] == victim for v in flagged), (victim, flagged)
    epochs = result.coordinator_state["world_sizes"]
    assert len(epochs) == 1 and {w["pid"] for w in epochs[0]["workers"]} == before, epochs
