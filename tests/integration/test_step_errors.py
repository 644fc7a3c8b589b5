"""Errors are not faults: bad data stops the run at once, through the README's CLI.

The ground truth is planted in the data: one token id past the vocabulary, in the sequence the
sampler hands out at step 3. ``jobs/train.py`` runs on 2 workers (real Ray, gloo, MLflow). The
run must stop with the error's own exit code, name the shard, the row and the value in its last
lines, spend no failure budget (the coordinator records no lost worker, and exactly one retry of
that step), and never train past the step before it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from elastic_moe.config import debug
from elastic_moe.data.sample_corpus import ensure_prepared
from elastic_moe.data.sampler import DataPosition, advance, batch_sample_ids
from elastic_moe.data.shards import BadSampleError, TokenDataset, write_shard
from tests.integration.elastic_helpers import ROOT, data_cache, sqlite_store

pytestmark = pytest.mark.integration

BAD_STEP = 3  # 1-based: the step whose batch holds the bad sequence
BAD_VALUE = 2048 + 952


def _plant_bad_token(src_manifest: str, dst_dir: str) -> tuple[str, str, int]:
    """A copy of the prepared data whose sequence at step BAD_STEP holds BAD_VALUE; returns
    (manifest path, shard path, row)."""
    shutil.copytree(os.path.dirname(src_manifest), dst_dir)
    manifest = os.path.join(dst_dir, os.path.basename(src_manifest))
    cfg = debug()
    data = TokenDataset(manifest)
    position = DataPosition(seed=cfg.train.seed)
    for _ in range(BAD_STEP - 1):
        position = advance(position, cfg.train.global_batch_size, data.num_sequences)
    ids = batch_sample_ids(position, data.num_sequences, cfg.train.global_batch_size, 0, 1)
    index = ids[len(ids) // 2][1]
    offsets = np.concatenate(([0], np.cumsum([s["num_sequences"]
                                              for s in data.manifest["shards"]])))
    shard = int(np.searchsorted(offsets, index, side="right")) - 1
    row = index - int(offsets[shard])
    path = os.path.join(dst_dir, data.manifest["shards"][shard]["path"])
    begin = int(offsets[shard])
    rows = [data.sequence(begin + r) for r in range(int(offsets[shard + 1]) - begin)]
    tokens = np.stack([t for t, _ in rows])
    doc_ids = np.stack([d for _, d in rows])
    starts = np.zeros_like(tokens, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    tokens[row, 5] = BAD_VALUE
    write_shard(path, tokens, starts)
    with pytest.raises(BadSampleError, match=f"row {row} .*token id {BAD_VALUE}"):
        TokenDataset(manifest).sequence(index)
    return manifest, path, row


def test_out_of_vocabulary_token_stops_the_run_with_its_shard_and_row(tmp_path):
    cfg = debug()
    clean = ensure_prepared(data_cache(), cfg.data.tokenizer_vocab_size,
                            cfg.train.seq_len)
    manifest, shard, row = _plant_bad_token(clean, str(tmp_path / "bad-data"))
    out, uri = tmp_path / "out", sqlite_store(tmp_path / 'mlflow.db')
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--steps", "8", "--workers", "2", "--data", manifest,
         "--run-name", "bad", "--output-dir", str(out),
         "--set", f"tracking.tracking_uri={uri}", "--set", "train.eval_every=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - started
    assert (out / "bad" / "coordinator.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((out / "bad" / "coordinator.json").read_text())
    events = state["events"]
    retried = [e for e in events if e["kind"] == "step_error"]
    stopped = [e for e in events if e["kind"] == "stopped_on_error"]
    first_error = retried[0]["time"] if retried else None
    print(f"\nexit {proc.returncode} after {elapsed:.1f} s; "
          f"{stopped[0]['time'] - first_error:.1f} s from the first error to the stop"
          if stopped and first_error else f"\nexit {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    tail = "\n".join(proc.stdout.strip().splitlines()[-8:])
    assert "FAILED" in tail and shard in tail and f"row {row}" in tail, tail
    assert f"token id {BAD_VALUE}" in tail, tail
    # an error, not a fault: one retry of that step, then the stop; nothing lost, no budget
    assert len(retried) == 1 and retried[0]["failed_step"] == BAD_STEP, events
    assert len(stopped) == 1 and stopped[0]["failed_step"] == BAD_STEP, events
    assert not [e for e in events if e["kind"] == "worker_lost"], events
    assert state["last_step"] == BAD_STEP - 1
    assert stopped[0]["time"] - first_error < 30.0
    # the traceback (here the data reader's, as Ray relays it) is printed once, not per attempt
    text = proc.stdout + proc.stderr
    assert text.count("raise BadSampleError(") == 1, text[-6000:]


def test_exception_in_model_code_stops_the_run_and_peers_end_at_once(tmp_path):
    """A bug in model code (planted from outside through ``wrap_model``) raises on rank 1 in the
    middle of the forward of step 4, every time. Rank 0 is then blocked in a collective with it:
    rank 1 closes its connections, so rank 0's step ends within 2 s, not at the 20 s collective
    timeout. The group retries the step once, then stops with exit code 3, the traceback and
    the step's samples, and no failure budget spent."""
    import ray
    from elastic_moe.actors.training import run_training

    from tests.integration.elastic_helpers import tiny_config
    from tests.integration.faults import raise_in_forward

    cfg = tiny_config(tmp_path, steps=8, every=2, extra=["train.eval_every=0"])
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="elastic-moe",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
    try:
        started = time.time()
        result = run_training(cfg, "model-bug", output_dir=str(tmp_path),
                              wrap_model=raise_in_forward(step=4, rank=1))
        elapsed = time.time() - started
    finally:
        ray.shutdown()
    events = result.coordinator_state["events"]
    retried = [e for e in events if e["kind"] == "step_error"]
    stopped = [e for e in events if e["kind"] == "stopped_on_error"]
    print(f"\nstopped after {elapsed:.1f} s; peers ended "
          f"{[e['peers_ended_after_s'] for e in retried + stopped]} s after the raise")
    assert not result.ok and result.exit_code == 3, result.error
    assert "PlantedBug: planted bug in model code at step 4 on rank 1" in result.error
    assert "step 4 failed on rank 1" in result.error and "samples (epoch, index)" in result.error
    assert "register_forward_pre_hook" not in result.error and "in hook" in result.error, \
        result.error  # the worker's own traceback, printed once
    assert len(retried) == 1 and retried[0]["failed_step"] == 4 and retried[0]["rank"] == 1
    assert len(stopped) == 1 and stopped[0]["failed_step"] == 4
    assert len(stopped[0]["sample_ids"]) == cfg.train.global_batch_size // 2, stopped[0]
    for event in retried + stopped:  # the peer's collective ended at once, both times
        assert event["peers_ended_after_s"] is not None
        assert event["peers_ended_after_s"] < 2.0, event
    assert not [e for e in events if e["kind"] == "worker_lost"], events
    assert result.coordinator_state["last_step"] == 3
    assert stopped[0]["time"] - retried[0]["time"] < 30.0


def test_skip_mode_leaves_the_bad_sequence_out_and_counts_it(tmp_path):
    """The same planted token with ``data.bad_samples=skip``: the run finishes, step 3 trains on
    the other sequences of its batch, MLflow counts one bad sample at step 3 (none elsewhere),
    and the log names the shard and row once."""
    from mlflow.tracking import MlflowClient

    cfg = debug()
    clean = ensure_prepared(data_cache(), cfg.data.tokenizer_vocab_size,
                            cfg.train.seq_len)
    manifest, shard, row = _plant_bad_token(clean, str(tmp_path / "bad-data"))
    out, uri = tmp_path / "out", sqlite_store(tmp_path / 'mlflow.db')
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--steps", "5", "--workers", "2", "--data", manifest,
         "--run-name", "skip", "--output-dir", str(out), "--set", "data.bad_samples=skip",
         "--set", f"tracking.tracking_uri={uri}", "--set", "train.eval_every=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    state = json.loads((out / "skip" / "coordinator.json").read_text())
    assert state["last_step"] == 5
    history = MlflowClient(tracking_uri=uri).get_metric_history(state["mlflow_run_id"],
                                                                 "bad_samples")
    counts = {m.step: m.value for m in history}
    assert counts == {1: 0.0, 2: 0.0, BAD_STEP: 1.0, 4: 0.0, 5: 0.0}, counts
    named = [line for line in text.splitlines() if "left out (data.bad_samples=skip)" in line]
    assert named and f"{shard} row {row}" in named[0] and f"token id {BAD_VALUE}" in named[0]
    assert not [e for e in state["events"] if e["kind"] in ("step_error", "worker_lost")]
