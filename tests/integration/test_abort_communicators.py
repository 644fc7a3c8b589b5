"""Aborting a rank's communicators from another thread while its collective waits on a lost peer.

Real gloo process groups in two spawned processes. Rank 1 plays the lost peer: it never joins
the collective and then exits. Rank 0's main thread is blocked in ``all_reduce``; another thread
calls :func:`abort_communicators`, as ``TrainWorker.abort_group`` does when the worker group
learns a member is gone. On gloo there is nothing to abort (the collective fails when the peer's
socket closes), but the same calls run as on NCCL, and they must not crash, hang or delay that
failure, and must leave the process able to build its next group, which is what a
survivor does next. The NCCL abort itself runs in benchmarks/gpu_service.py on a GPU.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elastic_moe.parallel.comm import SURVIVOR_NCCL_ENV, abort_communicators, survivor_nccl_env
from tests.integration.multiproc import free_port

pytestmark = pytest.mark.integration


def _rank(rank: int, port: int, next_port: int, out: str) -> None:
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timeout)
    dist.new_group([0, 1])  # a second group, as DeviceMesh makes
    if rank == 1:
        time.sleep(3.0)
        os._exit(0)  # the lost peer: gone without a word
    result: dict = {}

    def abort_later() -> None:
        time.sleep(1.0)
        result["aborted"] = abort_communicators()
        result["abort_done_at"] = time.time()

    aborter = threading.Thread(target=abort_later)
    aborter.start()
    started = time.time()
    try:
        dist.all_reduce(torch.ones(4))
        result["collective"] = "returned"
    except Exception as exc:  # the lost peer breaks it
        result["collective"] = f"raised {type(exc).__name__}"
    result["collective_s"] = time.time() - started
    aborter.join()
    # the survivor's own thread leaves the broken group and forms the next one
    try:
        dist.destroy_process_group()
    except Exception as exc:
        result["destroy_error"] = str(exc)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{next_port}", rank=0,
                            world_size=1, timeout=timeout)
    value = torch.full((2,), 3.0)
    dist.all_reduce(value)
    result["next_group_sum"] = value.tolist()
    result["aborted_after_leaving"] = None
    dist.destroy_process_group()
    result["aborted_after_leaving"] = abort_communicators()
    with open(out, "w") as f:
        json.dump(result, f)


def test_abort_from_another_thread_then_the_next_group_works(tmp_path):
    out = str(tmp_path / "rank0.json")
    mp.spawn(_rank, args=(free_port(), free_port(), out), nprocs=2, join=True)
    with open(out) as f:
        result = json.load(f)
    assert result["aborted"] == 0, result  # gloo: nothing to abort, and it must not hurt
    assert result["collective"].startswith("raised"), result
    assert result["collective_s"] < 30, result  # the peer's exit, not the 60 s timeout
    assert "destroy_error" not in result, result
    assert result["next_group_sum"] == [3.0, 3.0]
    assert result["aborted_after_leaving"] == 0  # no group: nothing to abort, no error


def test_survivor_env_overrides_teardown(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # torch's default: tear down
    monkeypatch.delenv("TORCH_NCCL_ENABLE_MONITORING", raising=False)
    changed = survivor_nccl_env()
    assert changed["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    for name, value in SURVIVOR_NCCL_ENV.items():
        assert os.environ[name] == value
    assert survivor_nccl_env() == {}  # already set: nothing changes
