"""Recovery time after a killed worker: elastic-moe vs Ray Train's plain restart-from-checkpoint.

    python benchmarks/elastic_recovery.py [--repeats 2]

Both sides train the `debug` model with 2 CPU workers on a local multi-node Ray
(``ray.cluster_utils.Cluster``: a head and two 1-CPU worker nodes), checkpoint every 4 steps and
lose rank 1 (process exit) before step 10. Reported per side (medians over repeats):

- detection: fault -> the first surviving rank raises (gloo connection reset / timeout)
- group restart: detection -> the new group's train function starts
- setup: mesh plan + model build (+ optimizer) in the new group
- restore: checkpoint load (+ reshard)
- first step: restore done -> first completed step
- total: fault -> first completed step after it; steps redone since the last checkpoint

The baseline is the Ray Train idiom: DDP model, rank 0 ``torch.save`` into a
``ray.train.Checkpoint`` passed to ``ray.train.report``, ``ray.train.get_checkpoint()`` on start.
Prints a table and writes benchmarks/results/elastic_recovery-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS, EVERY, FAULT_STEP = 14, 4, 10
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}}


def _cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, namespace="elastic-moe")
    return cluster


def run_ours(workdir: str, run_name: str) -> dict[str, float]:
    from actors.training import run_training
    from elastic_moe.config import apply_overrides, debug

    cfg = apply_overrides(debug(), [
        f"train.steps={STEPS}", f"checkpoint.every_steps={EVERY}", "train.global_batch_size=8",
        "elastic.collective_timeout_s=20", f"data.cache_dir={os.path.join(ROOT, 'outputs', 'data')}",
        f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db"])
    result = run_training(cfg, run_name, output_dir=workdir,
                          faults=[{"step": FAULT_STEP - 1, "rank": 1, "mode": "exit"}])
    if not result.ok:
        raise RuntimeError(result.error)
    state = result.coordinator_state
    events = state["events"]
    fault = next(e["time"] for e in events if e["kind"] == "fault_injected")
    detect = min(e["time"] for e in events if e["kind"] == "worker_error" and e["time"] >= fault)
    epoch = state["world_sizes"][-1]
    marks = epoch["timings"]
    return {"detection": detect - fault, "group_restart": marks["worker_start"] - detect,
            "setup": marks["setup_done"] - marks["worker_start"],
            "restore": marks["restore_done"] - marks["setup_done"],
            "first_step": epoch["first_step_time"] - marks["restore_done"],
            "total": epoch["first_step_time"] - fault, "steps_redone": epoch["steps_redone"]}


def _baseline_train_func(config):
    """Plain Ray Train: DDP + torch.save checkpoints through ray.train.report."""
    import os
    import time

    import ray.train
    import torch
    import torch.distributed as dist

    from elastic_moe.config import debug
    from elastic_moe.model import Transformer
    from elastic_moe.train.step import build_optimizer

    marks = {"worker_start": time.time()}
    log_path = config["log"]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(1)
    cfg = debug()
    model = Transformer(cfg.model)
    model.init_weights(0)
    model = ray.train.torch.prepare_model(model)
    opt = build_optimizer(model, cfg.train)
    marks["setup_done"] = time.time()
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step = state["step"]
    marks["restore_done"] = time.time()
    gen = torch.Generator().manual_seed(rank)
    first = True
    try:
        while step < config["steps"]:
            if step == config["fault_step"] and rank == 1 and not os.path.exists(log_path + ".fault"):
                with open(log_path + ".fault", "w") as f:
                    f.write(str(time.time()))
                os._exit(3)
            for _ in range(config["micro_batches"]):
                x = torch.randint(0, cfg.model.vocab_size, (4, cfg.train.seq_len + 1), generator=gen)
                model(x[:, :-1], x[:, 1:]).loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            if first and rank == 0:
                marks["first_step_time"] = time.time()
                marks["restored_step"] = step - 1
                with open(log_path, "a") as f:
                    f.write(json.dumps(marks) + "\n")
            first = False
            checkpoint = None
            if step % config["every"] == 0:
                tmp = tempfile.mkdtemp()
                if rank == 0:
                    torch.save({"model": model.module.state_dict(), "optim": opt.state_dict(),
                                "step": step}, os.path.join(tmp, "state.pt"))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"step": step}, checkpoint=checkpoint)
    except Exception:
        with open(log_path + ".detect", "a") as f:
            f.write(f"{time.time()}\n")
        raise
    if dist.is_initialized():
        dist.barrier()


def run_baseline(workdir: str, run_name: str) -> dict[str, float]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    log_path = os.path.join(workdir, f"{run_name}.jsonl")
    trainer = TorchTrainer(
        _baseline_train_func,
        train_loop_config={"log": log_path, "steps": STEPS, "every": EVERY,
                           "fault_step": FAULT_STEP - 1, "micro_batches": 1},
        torch_config=TorchConfig(backend="gloo", timeout_s=20),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=run_name, storage_path=os.path.join(workdir, "ray"),
                             failure_config=FailureConfig(max_failures=3)))
    trainer.fit()
    records = [json.loads(line) for line in open(log_path)]
    fault = float(open(log_path + ".fault").read())
    detect = min(float(t) for t in open(log_path + ".detect").read().split())
    marks = records[-1]
    return {"detection": detect - fault, "group_restart": marks["worker_start"] - detect,
            "setup": marks["setup_done"] - marks["worker_start"],
            "restore": marks["restore_done"] - marks["setup_done"],
            "first_step": marks["first_step_time"] - marks["restore_done"],
            "total": marks["first_step_time"] - fault,
            "steps_redone": (FAULT_STEP - 1) - marks["restored_step"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "20")
    import ray

    from elastic_moe.config import debug
    from elastic_moe.data.sample_corpus import ensure_prepared

    cfg = debug()
    ensure_prepared(os.path.join(ROOT, "outputs", "data"), cfg.data.tokenizer_vocab_size,
                    cfg.train.seq_len)
    results: dict[str, list[dict[str, float]]] = {"elastic-moe": [], "ray-train-plain": []}
    workdir = tempfile.mkdtemp(prefix="recovery-")
    cluster = _cluster()
    try:
        for i in range(args.repeats):  # interleaved, so both sides see the same machine load
            results["elastic-moe"].append(run_ours(workdir, f"ours-{i}"))
            results["ray-train-plain"].append(run_baseline(workdir, f"plain-{i}"))
            print(json.dumps({k: v[-1] for k, v in results.items()}, indent=1), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    phases = ["detection", "group_restart", "setup", "restore", "first_step", "total",
              "steps_redone"]
    med = {side: {p: statistics.median(r[p] for r in runs) for p in phases}
           for side, runs in results.items()}
    lines = [f"# elastic_recovery on CPU ({platform.machine()}, {os.cpu_count()} cores, shared)",
             "", f"debug model, 2 workers on a local 2-node Ray cluster, checkpoint every {EVERY} "
             f"steps, rank 1 exits before step {FAULT_STEP}; median of {args.repeats} interleaved "
             "repeats (seconds).", "",
             "| phase | elastic-moe | Ray Train plain | ratio |", "|---|---|---|---|"]
    for p in phases:
        a, b = med["elastic-moe"][p], med["ray-train-plain"][p]
        ratio = f"{a / b:.2f}" if b else "-"
        lines.append(f"| {p} | {a:.2f} | {b:.2f} | {ratio} |")
    lines += ["", "Committed steps lost: 0 by construction (restore = the coordinator's last "
              "committed step; steps after it are redone, not lost).", "",
              "Raw runs:", "```", json.dumps(results, indent=1), "```"]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(ROOT, "benchmarks", "results", "elastic_recovery-cpu.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
