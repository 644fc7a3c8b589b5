"""The launcher of the partition test: ``jobs/train.py --ray-address``'s run, plus two things the
test needs that the command line does not give.

- The sample audit log (``run_training(sample_log_dir=...)``), to show every sample is used once.
- The run's data reader on the head node. Data readers are placed with Ray's SPREAD strategy,
  so the one reader of a small run may land on the node the test cuts off; every rank would
  then wait on it, which is not the fault under test. It is started here, on this (the head)
  node, under the name the run looks for (``<run>-data-0``), and the run reuses it.

Usage: ``python tests/integration/partition_driver.py RESULT_JSON RUN_NAME OUTPUT_DIR
SAMPLE_DIR KEY=VALUE...`` with ``RAY_ADDRESS`` set; writes the outcome to RESULT_JSON. A run
stopped with ``jobs/train.py --stop`` exits 0 here: the test stops it once it has what it needs.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    import ray
    from elastic_moe.actors import coordinator as coordinator_mod
    from elastic_moe.actors import data_worker
    from elastic_moe.actors.console import configure_console
    from elastic_moe.actors.training import _prepare_data, run_training
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from elastic_moe.config import apply_overrides, debug
    from elastic_moe.data.shards import TokenDataset

    result_path, run_name, output_dir, sample_dir, *overrides = argv
    configure_console()
    cfg = apply_overrides(debug(), overrides)
    manifest = _prepare_data(cfg)
    ray.init(address=os.environ["RAY_ADDRESS"], namespace=coordinator_mod.NAMESPACE)
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    reader = data_worker.DataWorker.options(  # type: ignore[attr-defined]
        name=f"{run_name}-data-0", namespace=coordinator_mod.NAMESPACE, get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, scheduling_strategy=head,
    ).remote(manifest, global_batch_size=cfg.train.global_batch_size,
             prefetch=cfg.data.prefetch, skip_bad=cfg.data.bad_samples == "skip")
    ray.get(reader.info.remote())
    result = run_training(cfg, run_name, output_dir=output_dir, sample_log_dir=sample_dir)
    print(result.summary(), flush=True)
    with open(result_path, "w") as f:
        json.dump({"ok": result.ok, "status": result.status, "error": result.error,
                   "final_step": result.final_step,
                   "checkpoint_dir": result.checkpoint_dir, "run_dir": result.run_dir,
                   "global_batch_size": cfg.train.global_batch_size,
                   "num_sequences": TokenDataset(manifest).num_sequences}, f)
    return 0 if result.ok or result.status == "STOPPED" else 1  # the test stops it (--stop)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
