"""The run's log of committed steps: the metrics file, MLflow, and the console's step lines.

Each committed step's metrics are appended to ``outputs/<run>/metrics.jsonl`` *before* MLflow
gets them, so a control loop that dies with records still queued loses none:
:func:`replay_metrics` sends them when the run is resumed or its coordinator restarted (the
tracker drops what MLflow already has).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from elastic_moe.config import Config

logger = logging.getLogger(__name__)

PER_RANK_METRICS_UP_TO = 64  # above, MLflow gets no rank<r>_* series (a few per rank per step)


class RunLog:
    """Where the control loop writes every committed step down, once and in order."""

    def __init__(self, cfg: Config, tracker: Any, coordinator: Any,
                 metrics_log: str | None) -> None:
        self.cfg, self.tracker, self.coordinator = cfg, tracker, coordinator
        self.metrics_log = metrics_log
        self.logged_step = 0  # the last step written down
        self.last_log_step = 0  # the last step given a console line
        self.skipped_steps = 0  # non-finite steps skipped so far (MLflow: skipped_steps)

    def write(self, records: list[tuple[int, dict[str, float]]]
              ) -> list[tuple[int, dict[str, float]]]:
        """Write down the committed steps after ``logged_step``, in order: the metrics log
        first, then MLflow, the coordinator's heartbeat and every ``train.log_freq``-th step
        line. Returns the steps written now. Per-rank times (``rank<r>_*``) go to MLflow only
        up to ``PER_RANK_METRICS_UP_TO`` ranks."""
        written = []
        for step, values in sorted(records, key=lambda r: r[0]):
            if step <= self.logged_step:
                continue
            self.logged_step = step
            written.append((step, values))
            values = dict(values)
            if values.get("world_size", 0) > PER_RANK_METRICS_UP_TO:
                values = {k: v for k, v in values.items() if not k.startswith("rank")}
            committed_at = values.pop("committed_at", None)
            if values.get("step_skipped"):
                self.skipped_steps += 1
                logger.warning("step %d skipped: loss %s, grad_norm %s (not finite)", step,
                               values["loss"], values["grad_norm"])
            values["skipped_steps"] = self.skipped_steps
            if self.metrics_log:
                with open(self.metrics_log, "a") as f:
                    f.write(json.dumps({"step": step, "time": committed_at, "values": values})
                            + "\n")
            self.tracker.log_metrics(values, step, timestamp=committed_at)
            self.coordinator.heartbeat(step, first_after_start=False)
            log_freq = self.cfg.train.log_freq
            if step % log_freq == 0 or step - self.last_log_step > log_freq or step == 1:
                self.last_log_step = step
                logger.info("step %d loss %.4f lm %.4f mtp %.4f grad_norm %.3f lr %.2e tok/s %.0f "
                            "workers %d load max/mean %.2f", step, values["loss"],
                            values["lm_loss"], values["mtp_loss"], values["grad_norm"],
                            values["lr"], values["tokens_per_s"], values["world_size"],
                            values.get("moe/load_max_over_mean", 0.0))
            if "val_loss" in values:
                logger.info("step %d val_loss %.4f val_mtp_loss %.4f", step, values["val_loss"],
                            values["val_mtp_loss"])
        return written


def replay_metrics(metrics_log: str, checkpointer: Any | None, tracker: Any) -> int:
    """Queue the steps an earlier control loop committed, in order: from its metrics log, and
    from the committed checkpoints (each holds every step the loop had not acknowledged writing
    down when it was taken; no ``checkpointer``: the log alone, as when a restarted coordinator
    takes over live workers, which still hold the rest). The tracker drops steps the MLflow run
    already has. Returns the last step found."""
    records: dict[int, tuple[dict[str, float], float | None]] = {}
    for step in checkpointer.committed_steps() if checkpointer is not None else []:
        for saved_step, values in checkpointer.train_state(step).extra.get("metrics", []):
            values = dict(values)
            records[int(saved_step)] = (values, values.pop("committed_at", None))
    if os.path.exists(metrics_log):
        with open(metrics_log) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # the last line of a launcher killed mid-write
                    continue
                records.setdefault(int(record["step"]), (record["values"], record["time"]))
    for step in sorted(records):
        values, committed_at = records[step]
        tracker.log_metrics(values, step, timestamp=committed_at)
    return max(records, default=0)
