"""DCP checkpoints on ``s3://`` through s3fs, against a real S3-compatible server process.

The test starts moto's standalone server (``moto_server``) on 127.0.0.1, saves a sharded
checkpoint of the debug model from 2 gloo ranks (expert parallelism over both) to
``s3://<bucket>/run``, and restores it at 3 ranks (the planner's ep=1, uneven FSDP shards) and
in one process. The reference is the full model and optimizer state gathered in memory at save
time (no files): every restore must give bit-equal tensors. The objects must really be in the
bucket (listed through boto3, a client independent of s3fs), with the commit marker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from elastic_moe.checkpoint import COMMIT_FILE, Checkpointer, TrainState
from tests.integration.multiproc import free_port, launch
from tests.integration.test_checkpoint_reshard import _assert_bit_equal, _build, _gather, _step

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BUCKET = "elastic-moe-test"


@pytest.fixture(scope="module")
def s3_server():
    """moto's server on a free port; env points boto3/s3fs (and spawned ranks) at it."""
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, "moto_server exited"
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proc.terminate()
    proc.wait(30)


def _save_worker(rank: int, world_size: int, root: str, ref_path: str) -> None:
    plan, model, optimizer = _build(world_size, seed=5, ep=world_size)
    assert plan.expert_parallel_degree == world_size
    _step(model, optimizer, 0, world_size, rank)
    ckpt = Checkpointer(root, async_save=True)
    ckpt.save(1, model, optimizer, TrainState(step=1, mesh_plan=plan.to_dict()))
    gathered = _gather(model, optimizer)
    ckpt.wait()
    if rank == 0:
        torch.save(gathered, ref_path)


def _restore_worker(rank: int, world_size: int, root: str, ref_path: str) -> None:
    want = torch.load(ref_path)
    plan, model, optimizer = _build(world_size, seed=99)  # other init: values must come from S3
    state = Checkpointer(root, async_save=False).restore(model, optimizer)
    assert state is not None and state.step == 1
    assert state.mesh_plan["world_size"] == 2
    _assert_bit_equal(_gather(model, optimizer), want, f"S3 restore at {plan.describe()}")


def test_s3_checkpoint_round_trip_across_world_sizes(s3_server, tmp_path):
    import boto3

    root = f"s3://{BUCKET}/run"
    ref_path = str(tmp_path / "gathered.pt")
    launch(_save_worker, 2, root, ref_path)

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket=BUCKET, Prefix="run/")["Contents"]]
    assert f"run/step_00000001/{COMMIT_FILE}" in keys
    assert sum(k.endswith(".distcp") for k in keys) >= 2  # every rank wrote its shards
    assert Checkpointer(root, async_save=False).committed_steps() == [1]

    launch(_restore_worker, 3, root, ref_path)  # W=3: ep=1, uneven FSDP shards
    _restore_worker(0, 1, root, ref_path)  # one process, a plain Transformer
