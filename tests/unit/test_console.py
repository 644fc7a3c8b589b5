"""The console filter: Ray's known noise out, the project's own lines in (lines as Ray prints
them, captured from a demo run of jobs/train.py)."""

from __future__ import annotations

import pytest
from elastic_moe.actors.console import NOISY_ACTORS, _filtered_printer, is_noise

RAY_NOISE = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
    "Continuing to monitor.",
    "[2026-11-24 11:09:28,605 E 5363 5444] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'daf08c589a5831d5238527df01000000' has constructor arguments in "
    "the object store and max_restarts > 0. If the arguments in the object store go out of scope",
    "Requesting resources: {'CPU': 1} * 2",
    "Attempting to start training worker group of size 2 with the following resources: "
    "[{'CPU': 1}] * 2",
    "Started training worker group of size 2: ",
    "- (ip=192.0.2.2, pid=5541) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 6}, "
    "validation=False) from rank 1",
    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "generated new fontManager",
]
OURS = [
    "step 1 loss 9.9274 lm 7.6386 mtp 7.6292 grad_norm 0.612 lr 6.00e-04 tok/s 2768 load max/mean "
    "1.34",
    "mesh plan for 2 workers: W=2 on 1 node(s) x 2: dense FSDP 2; EP 2 (4 of 8 experts/rank, "
    "node-local, x1 replicas); dense weights sharded over all ranks; largest node-local ep",
    "epoch 2 (scale_up): 3 workers, continuing at step 8, global batch 8",
    "checkpoint committed: /tmp/out/debug/checkpoints/step_00000006 (4 files)",
    "run debug-20261124-110908: FINISHED at step 6",
    "training failed after 12 s: TrainingFailedError: worker group failed",
    "Traceback (most recent call last):",  # a real failure's traceback stays
]


@pytest.mark.parametrize("line", RAY_NOISE)
def test_known_ray_noise_is_dropped(line: str) -> None:
    assert is_noise(line)


@pytest.mark.parametrize("line", OURS)
def test_project_lines_and_real_errors_are_kept(line: str) -> None:
    assert not is_noise(line)


def test_stream_filter_keeps_other_lines_of_a_batch_and_drops_noisy_actors() -> None:
    printed: list[dict] = []
    printer = _filtered_printer(lambda data, *args, **kwargs: printed.append(data))
    printer({"actor_name": "RayTrainWorker", "pid": 1, "is_err": True,
             "lines": [RAY_NOISE[6], OURS[0]]}, False)
    printer({"actor_name": "TrainController", "pid": 2, "is_err": True,
             "lines": [RAY_NOISE[2], RAY_NOISE[3]]}, False)  # nothing left: nothing printed
    (noisy,) = NOISY_ACTORS
    printer({"actor_name": noisy, "pid": 3, "is_err": True,
             "lines": ["Exception in thread PlacementGroupCleanerMonitor:",
                       "Traceback (most recent call last):",
                       "ConnectionError: Found multiple active Ray instances"]}, False)
    assert printed == [{"actor_name": "RayTrainWorker", "pid": 1, "is_err": True,
                        "lines": [OURS[0]]}]


def test_a_follower_gets_each_line_when_it_is_logged_not_at_its_next_poll():
    """The coordinator holds a launcher's progress request that finds no new line until one is
    logged, or until ``wait_s`` has passed: lines reach the console one by one as they come."""
    import logging
    import threading
    import time

    from elastic_moe.actors.run_loop import ConsoleBuffer

    console = ConsoleBuffer()
    log = logging.getLogger("elastic_moe.tests.console_wait")
    log.propagate, log.level = False, logging.INFO
    log.addHandler(console)
    try:
        incarnation, following, lines = console.since(0, None)
        assert (following, lines) == (0, [])
        started = time.monotonic()  # nothing logged: back after wait_s, with nothing
        assert console.since(0, incarnation, wait_s=0.3)[2] == []
        assert time.monotonic() - started >= 0.25
        timer = threading.Timer(0.2, log.info, args=("step 1",))
        started = time.monotonic()
        timer.start()
        _, following, lines = console.since(0, incarnation, wait_s=30)
        took = time.monotonic() - started
        assert [line.msg for line in lines] == ["step 1"] and following == 1
        assert 0.15 <= took < 10, took  # woken by the line, not by the 30 s
        log.info("step 2")  # a line already there: no wait
        started = time.monotonic()
        _, following, lines = console.since(1, incarnation, wait_s=30)
        assert [line.msg for line in lines] == ["step 2"] and following == 2
        assert time.monotonic() - started < 5
    finally:
        log.removeHandler(console)
