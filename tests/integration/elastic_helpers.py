"""Shared pieces of the elastic-service tests: configs, sample accounting, checkpoint reads."""

from __future__ import annotations

import glob
import json
import os

import torch

from elastic_moe.config import Config, apply_overrides, debug


def tiny_config(tmp_path, steps: int = 12, every: int = 4, workers: tuple[int, int] = (2, 2),
                extra: list[str] | None = None) -> Config:
    """The debug recipe, shortened, with everything written under ``tmp_path``."""
    return apply_overrides(debug(), [
        f"train.steps={steps}", f"checkpoint.every_steps={every}", "checkpoint.keep_last=10",
        f"parallel.min_workers={workers[0]}", f"parallel.max_workers={workers[1]}",
        "train.global_batch_size=12", "train.micro_batch_size=4", "train.warmup_steps=2",
        "elastic.collective_timeout_s=20", "elastic.resize_check_s=2",
        "elastic.hang_timeout_s=4",
        f"data.cache_dir={tmp_path.parent / 'data-cache'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *(extra or []),
    ])


def consumed_samples(directory: str) -> dict[int, list[tuple[int, int]]]:
    """Samples consumed per step, from the workers' audit logs (``worker-<pid>.jsonl``).

    A step may have run more than once (re-done after a failure): the execution of the latest
    membership epoch counts, its ranks' shares in rank order.
    """
    per_step: dict[int, dict[int, dict[int, list[tuple[int, int]]]]] = {}
    for path in glob.glob(os.path.join(directory, "worker-*.jsonl")):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                by_epoch = per_step.setdefault(rec["step"], {})
                # sequences left out by data.bad_samples=skip were consumed too
                by_epoch.setdefault(rec["epoch"], {})[rec["rank"]] = [
                    tuple(i) for i in rec["ids"] + rec.get("bad", [])]
    out = {}
    for step, by_epoch in per_step.items():
        shares = by_epoch[max(by_epoch)]
        out[step] = [i for rank in sorted(shares) for i in shares[rank]]
    return out


def assert_each_sample_once(directory: str, steps: int, global_batch: int, num_sequences: int,
                            seed: int = 0) -> None:
    from elastic_moe.data.sampler import DataPosition, stream_samples

    per_step = consumed_samples(directory)
    assert sorted(per_step) == list(range(steps)), f"steps logged: {sorted(per_step)}"
    seen = [i for step in range(steps) for i in per_step[step]]
    assert len(seen) == len(set(seen)), "a sample was consumed twice in committed steps"
    expected = stream_samples(DataPosition(seed=seed), 0, steps * global_batch, num_sequences)
    assert seen == expected, "consumed samples differ from the stream (lost or reordered)"


def final_model_tensors(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Full model tensors of the newest committed checkpoint, read in this process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from elastic_moe.checkpoint import Checkpointer, step_dir_name

    step = Checkpointer(checkpoint_dir, async_save=False).latest_step()
    assert step is not None, f"no committed checkpoint in {checkpoint_dir}"
    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(
        os.path.join(checkpoint_dir, step_dir_name(step))), planner=_EmptyStateDictLoadPlanner(),
        no_dist=True)
    return {k: v for k, v in state["model"].items()}
