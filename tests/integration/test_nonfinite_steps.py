"""Non-finite steps are never applied and never committed, through the real service.

* A NaN planted in one rank's gradient at one step (from outside, through ``wrap_model``): that
  step is skipped on every rank, and the final weights equal a single-process run that never
  applied that batch (an independent reference built here from the library's model, optimizer
  and data pieces), while the rest of the data is consumed exactly once.
* ``train.lr=1e4`` through the README's CLI: the run either recovers by rollback or ends with
  the divergence exit code; no committed checkpoint holds a non-finite value, and MLflow shows
  the skipped steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.integration.elastic_helpers import (
    ROOT,
    assert_each_sample_once,
    audit_records,
    consumed_samples,
    data_cache,
    final_model_tensors,
    single_process_weights,
    sqlite_store,
    tiny_config,
)

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STEPS, NAN_STEP = 8, 5


def _committed_tensors(checkpoint_dir: str) -> dict[int, dict[str, torch.Tensor]]:
    """Every committed checkpoint's model and optimizer tensors, by step."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from elastic_moe.checkpoint import Checkpointer, step_dir_name

    out = {}
    for step in Checkpointer(checkpoint_dir, async_save=False).committed_steps():
        state: dict = {}
        _load_state_dict(state, storage_reader=FileSystemReader(
            os.path.join(checkpoint_dir, step_dir_name(step))),
            planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        out[step] = _flatten(state)
    return out


def _flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items()
                for k, v in _flatten(value, f"{prefix}/{key}").items()}
    return {}


def _metric(result_or_uri, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=result_or_uri).get_metric_history(run_id, key)
    return {m.step: m.value for m in history}


def test_nan_gradient_on_one_rank_skips_that_step_everywhere(tmp_path):
    from elastic_moe.actors.training import run_training

    from tests.integration.faults import nan_gradient

    cfg = tiny_config(tmp_path, steps=STEPS, every=2,
                      extra=["train.eval_every=0", "train.mixed_precision=fp32"])
    samples = str(tmp_path / "samples")
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="elastic-moe",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
    try:
        result = run_training(cfg, "nan-grad", output_dir=str(tmp_path),
                              sample_log_dir=samples, wrap_model=nan_gradient(NAN_STEP, rank=1))
    finally:
        ray.shutdown()
    assert result.ok, result.error
    events = result.coordinator_state["events"]
    skipped = [e for e in events if e["kind"] == "step_skipped"]
    assert [e["step"] for e in skipped] == [NAN_STEP], events
    # no lost worker, no rebuild: the vote did it
    assert not [e for e in events if e["kind"] in ("worker_lost", "step_error", "rollback")]
    # MLflow: the skipped step is marked and counted
    marked = _metric(result.tracking_uri, result.mlflow_run_id, "step_skipped")
    assert sorted(s for s, v in marked.items() if v == 1.0) == [NAN_STEP], marked
    counted = _metric(result.tracking_uri, result.mlflow_run_id, "skipped_steps")
    assert counted[STEPS] == 1.0 and counted[NAN_STEP - 1] == 0.0, counted
    # the data: every sample of the stream exactly once, the skipped step's marked as such
    from elastic_moe.data.sample_corpus import ensure_prepared
    from elastic_moe.data.shards import TokenDataset

    # the run's training data (the cache also holds the held-out validation set)
    manifest = ensure_prepared(cfg.data.cache_dir, cfg.data.tokenizer_vocab_size,
                               cfg.train.seq_len)
    data = TokenDataset(manifest)
    assert_each_sample_once(samples, STEPS, cfg.train.global_batch_size, data.num_sequences)
    flags = {}
    for rec in audit_records(samples):
        if rec["kind"] == "committed":
            flags[rec["step"]] = flags.get(rec["step"], False) or rec["skipped"]
    assert sorted(s + 1 for s, f in flags.items() if f) == [NAN_STEP], flags
    assert len(consumed_samples(samples)[NAN_STEP - 1]) == cfg.train.global_batch_size
    # the weights: equal to a run that never applied that batch, unlike one that did
    final = final_model_tensors(result.checkpoint_dir)
    skipped_ref = single_process_weights(cfg, skip_step=NAN_STEP)
    full_ref = single_process_weights(cfg)
    scale = max(float(v.abs().max()) for v in skipped_ref.values() if v.is_floating_point())
    diff_skip = max(float((final[k] - v).abs().max()) for k, v in skipped_ref.items()
                    if v.is_floating_point())
    diff_full = max(float((final[k] - v).abs().max()) for k, v in full_ref.items()
                    if v.is_floating_point())
    print(f"\nmax |run - reference that skipped step {NAN_STEP}| = {diff_skip:.2e}; "
          f"vs the reference that applied it: {diff_full:.2e} (max |w| {scale:.2f})")
    assert diff_skip <= 5e-5 * scale, diff_skip  # W=2 vs W=1 sums: measured 6e-6
    assert diff_full > 100 * max(diff_skip, 1e-7), (diff_full, diff_skip)
    # nothing non-finite was ever committed
    for step, tensors in _committed_tensors(result.checkpoint_dir).items():
        for name, value in tensors.items():
            assert bool(torch.isfinite(value).all()), f"step {step}: {name}"


def test_huge_learning_rate_never_commits_a_non_finite_checkpoint(tmp_path):
    """``--set train.lr=1e4`` through the CLI: the loss blows up within a few steps. Every
    committed checkpoint (read back from disk, model and optimizer) is finite, MLflow counts
    the skipped steps, and the run either recovers by rollback or exits 6 naming the
    divergence."""
    from elastic_moe.checkpoint import Checkpointer

    out, uri = tmp_path / "out", sqlite_store(tmp_path / 'mlflow.db')
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--steps", "16", "--workers", "2", "--run-name", "lr",
         "--output-dir", str(out), "--set", f"tracking.tracking_uri={uri}",
         "--set", "train.eval_every=0", "--set", "train.lr=1e4",
         "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep_last=20",
         "--set", f"data.cache_dir={data_cache()}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    text = proc.stdout + proc.stderr
    state = json.loads((out / "lr" / "coordinator.json").read_text())
    events = state["events"]
    kinds = [e["kind"] for e in events]
    print(f"\nexit {proc.returncode}; {kinds.count('step_skipped')} steps skipped, "
          f"{kinds.count('rollback')} rollbacks")
    assert proc.returncode in (0, 6), text[-4000:]
    if proc.returncode == 6:
        assert "Diverged: training diverged" in "\n".join(proc.stdout.splitlines()[-6:])
    else:
        assert "rollback" in kinds, kinds  # recovered, so it must have rolled back
    assert "step_skipped" in kinds, kinds
    # no committed checkpoint holds a non-finite value (model, Adam moments, router biases)
    checkpoint_dir = str(out / "lr" / "checkpoints")
    committed = _committed_tensors(checkpoint_dir)
    assert committed, "nothing was committed"
    for step, tensors in committed.items():
        bad = [n for n, v in tensors.items() if v.is_floating_point()
               and not bool(torch.isfinite(v).all())]
        assert not bad, f"checkpoint step {step}: non-finite {bad[:5]}"
    for step in committed:
        Checkpointer(checkpoint_dir, async_save=False).verify(step)
    # MLflow shows every skipped step, and the running count
    run_id = state["mlflow_run_id"]
    marked = _metric(uri, run_id, "step_skipped")
    skipped_steps = sorted(e["step"] for e in events if e["kind"] == "step_skipped")
    assert sorted(s for s, v in marked.items() if v == 1.0) == skipped_steps
    assert max(_metric(uri, run_id, "skipped_steps").values()) == len(skipped_steps)
