"""Checkpoint storage that fails mid-run: nothing half-committed, training goes on, saves resume.

* DCP's failure path, checked rather than assumed: 2 gloo ranks, rank 1's writes of step 2 fail
  with ENOSPC half-way (its writer, handed in by the test). Rank 0 must not commit: no marker,
  no DCP metadata, the committed step 1 kept by retention, the failure a value on both ranks;
  the next save commits and its retention pass removes the partial directory.
* A full disk through the README's CLI (``jobs/train.py``, real Ray, gloo, MLflow): the
  checkpoint directory is a small tmpfs that the test fills with a ballast file after the first
  commit, and empties again once two saves (a save and its retry) have failed.
* The S3 server (a real ``moto_server`` process) stopped (SIGSTOP) in the middle of a save, then
  killed and replaced by a new one on the same port with an empty bucket (moto keeps objects in
  memory). A test writer announces each save and holds it 1.5 s, so the stop lands mid-save.

The reference for both runs is a fault-free CLI run of the same config: checkpoints never change
training, so the final weights must be bit-equal. Every committed checkpoint must verify (sizes
and CRC32 of its manifest), no step dir of the outage may carry a marker, and every step must
appear once in MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from elastic_moe.checkpoint import COMMIT_FILE, Checkpointer, TrainState, step_dir_name
from tests.integration.elastic_helpers import ROOT, data_cache, sqlite_store
from tests.integration.faults import announce_saves, fail_during_save
from tests.integration.multiproc import free_port, launch
from tests.integration.test_checkpoint_reshard import SEED, _build, _step

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STEPS, EVERY = 24, 3
BUCKET = "elastic-moe-outage"


# ----------------------------------------------------------------------------- DCP failure path
def _full_disk_worker(rank: int, world_size: int, root: str) -> None:
    plan, model, optimizer = _build(world_size, SEED, ep=world_size)
    ckpt = Checkpointer(root, keep_last=2, async_save=True,
                        wrap_writer=fail_during_save(step=2, rank=1))
    failures: list[tuple[int, str]] = []
    step2 = Path(root) / step_dir_name(2)
    for step in (1, 2, 3):
        _step(model, optimizer, step - 1, world_size, rank)
        ckpt.save(step, model, optimizer, TrainState(step=step, mesh_plan=plan.to_dict()),
                  on_failure=lambda s, e: failures.append((s, e)))
        error = ckpt.collect()
        if step != 2:
            assert error is None, error
            continue
        assert error is not None and "No space left on device" in str(error), error
        assert ckpt.committed_steps() == [1], "a failed save must leave the committed ones"
        assert not (step2 / COMMIT_FILE).exists() and not (step2 / ".metadata").exists(), (
            f"rank {rank}: rank 0 finished or committed a save that failed on rank 1")
        assert any(p.suffix == ".distcp" for p in step2.iterdir()), "nothing was written"
    assert [s for s, _ in failures] == [2], failures
    assert "rank 1" in failures[0][1], failures  # DCP names the rank whose write failed
    assert ckpt.committed_steps() == [1, 3]
    assert not step2.exists(), "the next commit's retention pass removes the partial save"
    for step in (1, 3):
        ckpt.verify(step)


def test_one_ranks_failed_write_commits_nothing_and_the_next_save_lands(tmp_path) -> None:
    launch(_full_disk_worker, 2, str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------- runs
def _overrides(tmp_path: Path, checkpoint_dir: str) -> list[str]:
    return [f"train.steps={STEPS}", "parallel.min_workers=2", "parallel.max_workers=2",
            f"checkpoint.dir={checkpoint_dir}", f"checkpoint.every_steps={EVERY}",
            "checkpoint.keep_last=3", "checkpoint.storage_timeout_s=1",
            "checkpoint.storage_attempts=1", "train.eval_every=0",
            "elastic.collective_timeout_s=30",
            f"data.cache_dir={data_cache()}",
            f"tracking.tracking_uri={sqlite_store(tmp_path / 'mlflow.db')}"]


def _cli(tmp_path: Path, run_name: str, checkpoint_dir: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    sets = [a for o in _overrides(tmp_path, checkpoint_dir) for a in ("--set", o)]
    return subprocess.Popen(
        [sys.executable, "jobs/train.py", "--run-name", run_name,
         "--output-dir", str(tmp_path / "out"), *sets],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _events(state_path: Path) -> list[dict]:
    try:
        return json.loads(state_path.read_text())["events"]
    except (OSError, ValueError):  # not written yet, or replaced while read
        return []


def _failed_saves(state_path: Path, at_least: int = 1) -> list[dict] | None:
    failed = [e for e in _events(state_path) if e["kind"] == "checkpoint_failed"]
    return failed if len(failed) >= at_least else None


def _wait_for(what: str, predicate, timeout: float = 120.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := predicate()):
            return found
        assert proc is None or proc.poll() is None, f"the run ended while waiting for {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _model_tensors(checkpointer: Checkpointer, step: int) -> dict[str, torch.Tensor]:
    """The full model tensors of a committed checkpoint, read in this process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    url = checkpointer.root.rstrip("/") + "/" + step_dir_name(step)
    for attempt in range(3):  # a loaded box: the S3 server may not take the connection at once
        reader = FsspecReader(url) if "://" in url else FileSystemReader(url)
        state: dict = {}
        try:
            _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(),
                             no_dist=True)
            return state["model"]
        except Exception:
            if attempt == 2 or "://" not in url:
                raise
            time.sleep(2.0)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def fault_free_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp_path = tmp_path_factory.mktemp("reference")
    ckpt_dir = str(tmp_path / "ckpt")
    proc = _cli(tmp_path, "reference", ckpt_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    assert ckpt.latest_step() == STEPS
    return _model_tensors(ckpt, STEPS)


def _check_outcome(events: list[dict], ckpt: Checkpointer, outage: tuple[float, float],
                   weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                   ) -> tuple[list[int], list[int]]:
    """The assertions both outages share; returns (failed steps, committed steps)."""
    failed = [e for e in events if e["kind"] == "checkpoint_failed"]
    commits = [e for e in events if e["kind"] == "checkpoint"]
    failed_steps = [e["step"] for e in failed]
    assert failed, events
    assert all(e["retry_step"] == e["step"] + EVERY for e in failed), failed
    # nothing committed while storage was gone, and no failed step ever committed
    assert not [e for e in commits if outage[0] < e["time"] < outage[1]], (outage, commits)
    assert not set(failed_steps) & {e["step"] for e in commits}, events
    # saves resumed: later commits, up to the final step
    assert [e for e in commits if e["step"] > max(failed_steps)], events
    assert commits[-1]["step"] == STEPS
    # storage trouble is neither a fault nor an error of the run
    assert not [e for e in events if e["kind"] in ("worker_lost", "step_error",
                                                   "stopped_on_error")], events
    committed = ckpt.committed_steps()
    for step in committed:
        ckpt.verify(step)
    assert not set(failed_steps) & set(committed)
    leftovers = [s for s in ckpt._step_dirs() if s not in committed and s < committed[-1]]
    assert not leftovers, f"partial step dirs left behind: {leftovers}"
    assert weights.keys() == reference.keys()
    for name, ref in reference.items():
        assert torch.equal(weights[name], ref), f"{name}: differs from the fault-free run"
    return failed_steps, committed


# ----------------------------------------------------------------------------- full disk
@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "ckpt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow  # ~40 s, plus ~40 s for the fault-free reference run it shares
def test_full_checkpoint_disk_mid_run_through_the_cli(tmp_path, small_tmpfs,
                                                      fault_free_weights) -> None:
    """ENOSPC from the first save after the first commit until its retry has failed too; the
    run goes on and the saves after the ballast is gone commit."""
    state_path = tmp_path / "out" / "disk" / "coordinator.json"
    ballast = small_tmpfs / "ballast"
    proc = _cli(tmp_path, "disk", str(small_tmpfs))
    try:
        _wait_for("the first commit", lambda: [e for e in _events(state_path)
                                               if e["kind"] == "checkpoint"], proc=proc)
        stats = os.statvfs(small_tmpfs)
        free = stats.f_bavail * stats.f_frsize
        full_from = time.time()
        with open(ballast, "wb") as f:  # leave 1 MiB: the next save fails part-way in
            f.write(b"\0" * (free - (1 << 20)))
        # the failed save and its retry at the next due step: the disk stays full for a while
        failed = _wait_for("two checkpoint_failed events",
                           lambda: _failed_saves(state_path, at_least=2), proc=proc)
        ballast.unlink()
        full_until = time.time()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\ndisk full for {full_until - full_from:.1f} s; failed saves at steps "
          f"{[e['step'] for e in failed]}: {failed[0]['error'][:200]}")
    assert proc.returncode == 0, out[-4000:]
    # torch.save reports the short write from inside its zip writer ("unexpected pos"), not as
    # ENOSPC; DCP's exception names every rank whose write failed
    assert "CheckpointException" in failed[0]["error"] and "(RANK " in failed[0]["error"], failed
    assert "NOT SAVED" in out, "the failure is logged loudly on the workers"
    events = json.loads(state_path.read_text())["events"]
    ckpt = Checkpointer(str(small_tmpfs), async_save=False)
    failed_steps, committed = _check_outcome(events, ckpt, (full_from, full_until),
                                             _model_tensors(ckpt, STEPS), fault_free_weights)
    print(f"failed saves at steps {failed_steps}; committed now {committed}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs(client.get_experiment_by_name("elastic-moe").experiment_id)[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps


# ----------------------------------------------------------------------------- S3 server gone
class _Moto:
    """A ``moto_server`` process on a fixed port that the test can stop, kill and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None, "moto_server exited"
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=BUCKET)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL ends a stopped process too
        self.proc.wait(30)


@pytest.fixture
def moto(monkeypatch):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    server = _Moto()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": server.endpoint,
                       "AWS_ENDPOINT_URL": server.endpoint}.items():
        monkeypatch.setenv(key, value)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


# In `make soak`, not `make test`: alone it passes, but in the full suite (two CI runs) the
# read-back of the final checkpoint from the restarted moto server fails to connect after the
# run itself passed; not understood yet.
@pytest.mark.soak
@pytest.mark.slow  # ~50 s, plus ~40 s for the fault-free reference run it shares
def test_s3_server_stopped_mid_save_then_restarted(tmp_path, moto, fault_free_weights) -> None:
    """SIGSTOP of the S3 server while a save is in flight (its writes hang: the save must fail
    in bounded time), then SIGKILL and a new server on the same port: later saves land."""
    ray = pytest.importorskip("ray")
    from elastic_moe.actors.training import run_training

    from elastic_moe.config import apply_overrides, debug

    root = f"s3://{BUCKET}/run"
    cfg = apply_overrides(debug(), _overrides(tmp_path, root))
    signals = tmp_path / "saves"
    signals.mkdir()
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="elastic-moe",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **env}})
    result: dict = {}
    try:
        thread = threading.Thread(target=lambda: result.update(run=run_training(
            cfg, "s3-outage", output_dir=str(tmp_path / "out"),
            wrap_writer=announce_saves(str(signals), delay_s=1.5))), daemon=True)
        thread.start()
        state_path = tmp_path / "out" / "s3-outage" / "coordinator.json"
        first = _wait_for("the first commit", lambda: [
            e for e in _events(state_path) if e["kind"] == "checkpoint"])[0]["step"]
        # the next save after it, announced by rank 0's writer: it is about to write
        victim = first + EVERY
        _wait_for(f"the save of step {victim}",
                  lambda: (signals / f"{step_dir_name(victim)}.rank0").exists(), timeout=60)
        assert moto.proc is not None
        moto.proc.send_signal(signal.SIGSTOP)
        stopped = time.time()
        failed = _wait_for("a checkpoint_failed event", lambda: _failed_saves(state_path),
                           timeout=90)
        failed_after = failed[0]["time"] - stopped
        moto.kill()
        moto.start()  # a new, empty server on the same port: "storage is back"
        back = time.time()
        thread.join(300)
        assert "run" in result, "training did not finish"
        run = result["run"]
    finally:
        ray.shutdown()
    print(f"\nS3 server stopped mid-save of step {victim}: the save failed after "
          f"{failed_after:.1f} s ({failed[0]['error'][:160]}); server back after "
          f"{back - stopped:.1f} s")
    assert run.ok, run.error
    assert run.final_step == STEPS
    assert moto.proc.poll() is None, f"the restarted S3 server exited ({moto.proc.returncode})"
    assert failed[0]["step"] == victim, failed
    assert failed_after < 30.0  # storage_timeout_s=1, 1 attempt: ~5 s of s3fs retries
    events = run.coordinator_state["events"]
    ckpt = Checkpointer(root, async_save=False)
    failed_steps, committed = _check_outcome(events, ckpt, (stopped, back),
                                             _model_tensors(ckpt, STEPS), fault_free_weights)
    print(f"failed saves at steps {failed_steps}; committed in the new bucket {committed}")
    assert all(s > victim for s in committed), committed  # the new server started empty
