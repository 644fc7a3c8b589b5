"""Pause per fault: live recovery vs the restart path vs plain Ray Train, side by side.

    python benchmarks/elastic_recovery.py [--repeats 2]

Every run trains the `debug` model on a local multi-node Ray (``ray.cluster_utils.Cluster``: a
head with no CPUs and one 1-CPU node per worker), checkpointing every 5 steps. Faults come from
outside, mid-interval, after step 8:

- **kill**: ``kill -9`` of one worker's pid (2 workers, ``--workers 1:2``);
- **hang**: ``SIGSTOP`` of one worker's pid (2 workers, ``--workers 1:2``);
- **join**: a third 1-CPU node is added (``--workers 2:3``).

Sides: elastic-moe **live** (survivors keep their processes and rebuild in place from peer
copies), elastic-moe **restart** (``elastic.recovery=restart``: every worker restarts from the
last checkpoint, how the project recovered before), and **plain Ray Train** (``TorchTrainer``,
DDP, ``torch.save`` checkpoints through ``ray.train.report``; kill and hang only).

Pause = the time from the last step committed before the fault (for a join: before the group
stopped for it) to the first step committed by the rebuilt group (MLflow step timestamps for
elastic-moe; rank 0's step log for Ray Train). Steps redone = the
last step before the fault minus the step training resumed from. Also measured, fault-free and
interleaved: the median step time with and without per-step peer copies (the steady-state cost
of redundancy), the bytes each worker copies to its buddy per step, and each worker's peak RSS.
Prints a table and writes benchmarks/results/elastic_recovery-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS, EVERY, FAULT_AFTER = 20, 5, 8  # join runs 5 x STEPS, steady state 3 x STEPS
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}}
DATA = os.path.join(ROOT, "outputs", "data")


def _config(workdir: str, workers: tuple[int, int], extra: list[str] | None = None,
            steps: int = STEPS):
    from elastic_moe.config import apply_overrides, debug

    return apply_overrides(debug(), [
        f"train.steps={steps}", f"checkpoint.every_steps={EVERY}", "train.global_batch_size=8",
        f"parallel.min_workers={workers[0]}", f"parallel.max_workers={workers[1]}",
        "elastic.collective_timeout_s=20", "elastic.resize_check_s=1", f"data.cache_dir={DATA}",
        f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", *(extra or [])])


def _rss_watcher(run_name: str, peaks: dict[int, int], stop: threading.Event) -> None:
    from elastic_moe.actors import coordinator as coordinator_mod

    while not stop.is_set():
        try:
            state = coordinator_mod.get(run_name).snapshot()
            for worker in state.get("workers", []):
                with open(f"/proc/{worker['pid']}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peaks[worker["pid"]] = int(line.split()[1]) * 1024
        except Exception:
            pass
        stop.wait(0.5)


def run_ours(workdir: str, name: str, scenario: str, recovery: str, cluster) -> dict[str, float]:
    """One elastic-moe run with one fault; returns pause, steps redone, bytes and memory."""
    from elastic_moe.actors import coordinator as coordinator_mod
    from elastic_moe.actors.training import run_training
    from mlflow.tracking import MlflowClient

    workers = (2, 3) if scenario == "join" else (1, 2)
    copies = "false" if scenario == "steady-nocopy" else "true"
    # a new node registers and its worker starts in a few seconds: leave the join room
    cfg = _config(workdir, workers, [f"elastic.recovery={recovery}",
                                     f"elastic.peer_copies={copies}"],
                  steps=5 * STEPS if scenario == "join"
                  else 3 * STEPS if scenario.startswith("steady") else STEPS)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=run_training(
        cfg, name, output_dir=workdir)), daemon=True)
    thread.start()
    peaks: dict[int, int] = {}
    stop = threading.Event()
    threading.Thread(target=_rss_watcher, args=(name, peaks, stop), daemon=True).start()
    fault_time = None
    if scenario in ("kill", "hang", "join"):
        while True:
            try:
                state = coordinator_mod.get(name).snapshot()
                if state["last_step"] >= FAULT_AFTER and len(state["workers"]) == 2:
                    break
            except ValueError:
                pass
            if not thread.is_alive():
                result = out.get("result")
                raise RuntimeError(f"{name}: ended before the fault: "
                                   f"{result.error if result else 'no result'}")
            time.sleep(0.02)
        fault_time = time.time()
        if scenario == "join":
            added = cluster.add_node(num_cpus=1)
        else:
            os.kill(state["workers"][-1]["pid"], signal.SIGKILL if scenario == "kill"
                    else signal.SIGSTOP)
    thread.join(900)
    stop.set()
    result = out["result"]
    if scenario == "join":
        cluster.remove_node(added)
    if not result.ok:
        raise RuntimeError(f"{name}: {result.error}")
    client = MlflowClient(result.tracking_uri)
    stamps = sorted((m.step, m.timestamp / 1000) for m in client.get_metric_history(
        result.mlflow_run_id, "loss"))
    record: dict[str, float] = {"peak_rss_mib": max(peaks.values(), default=0) / 2**20}
    epochs = result.coordinator_state["world_sizes"]
    record["copy_mib_per_step"] = max(e.get("copy_bytes_per_step", 0) for e in epochs) / 2**20
    if fault_time is None:  # steady state: median step time after warm-up
        gaps = [b[1] - a[1] for a, b in zip(stamps[3:], stamps[4:], strict=False)]
        record["step_s"] = statistics.median(gaps)
        return record
    # the membership change the fault caused; a join happens once the new worker is ready, so
    # its pause is measured from the last step before the group stopped for it. The pause ends
    # at the first step committed after the rebuild (steps in flight at the fault that still
    # committed do not end it).
    change = next(e for e in epochs[1:] if e["time"] > fault_time)
    anchor = fault_time if scenario != "join" else change["timings"]["detected"]
    before = [(s, t) for s, t in stamps if t <= anchor]
    after = [(s, t) for s, t in stamps if t > change["timings"]["rebuilt"]]
    record["pause_s"] = after[0][1] - before[-1][1]
    record["steps_redone"] = max(before[-1][0] - change["restored_step"], 0)
    return record


def _wait_until_idle(timeout: float = 60.0) -> None:
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.2)


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

    rank = ray.train.get_context().get_world_rank()
    with open(f"{config['log']}.pid{rank}", "w") as f:
        f.write(str(os.getpid()))
    torch.set_num_threads(1)
    cfg = debug()
    model = Transformer(cfg.model)
    model.init_weights(0)
    model = ray.train.torch.prepare_model(model)
    opt = build_optimizer(model, cfg.train)
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step = state["step"]
    restored = step
    gen = torch.Generator().manual_seed(rank)
    while step < config["steps"]:
        x = torch.randint(0, cfg.model.vocab_size, (4, cfg.train.seq_len + 1), generator=gen)
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if rank == 0:
            with open(config["log"], "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), "restored": restored,
                                    "pid": os.getpid()}) + "\n")
        checkpoint = None
        if step % config["every"] == 0:
            tmp = tempfile.mkdtemp()
            if rank == 0:
                torch.save({"model": model.module.state_dict(), "optim": opt.state_dict(),
                            "step": step}, os.path.join(tmp, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"step": step}, checkpoint=checkpoint)
    if dist.is_initialized():
        dist.barrier()


def run_baseline(workdir: str, name: str, scenario: str) -> dict[str, float]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    log_path = os.path.join(workdir, f"{name}.jsonl")
    trainer = TorchTrainer(
        _baseline_train_func,
        train_loop_config={"log": log_path, "steps": STEPS, "every": EVERY},
        torch_config=TorchConfig(backend="gloo", timeout_s=20),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=os.path.join(workdir, "ray"),
                             failure_config=FailureConfig(max_failures=3)))
    done = threading.Event()
    fault: dict[str, float] = {}

    def fault_from_outside() -> None:
        while not done.is_set():
            try:
                steps = [json.loads(line) for line in open(log_path)]
            except (OSError, ValueError):
                steps = []
            if steps and steps[-1]["step"] >= FAULT_AFTER:
                pid = int(open(f"{log_path}.pid1").read())
                fault["time"] = time.time()
                os.kill(pid, signal.SIGKILL if scenario == "kill" else signal.SIGSTOP)
                return
            time.sleep(0.02)

    threading.Thread(target=fault_from_outside, daemon=True).start()
    try:
        trainer.fit()
    finally:
        done.set()
    records = [json.loads(line) for line in open(log_path)]
    before = [r for r in records if r["time"] <= fault["time"]]
    # the first step of the restarted group: new processes (a step in flight at the fault does
    # not count). Not the restored step: a restart may find no checkpoint registered yet
    after = [r for r in records if r["time"] > fault["time"] and r["pid"] != before[-1]["pid"]]
    if "time" not in fault or not after:
        raise RuntimeError(f"{name}: the fault did not restart the group (fault {fault})")
    return {"pause_s": after[0]["time"] - before[-1]["time"],
            "steps_redone": max(before[-1]["step"] - after[0]["restored"], 0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these cases, e.g. live/hang restart/kill")
    parser.add_argument("--from-log", help="write the table from the per-run lines an earlier "
                                           "run printed (when a later run of it failed)")
    args = parser.parse_args()
    if args.from_log:
        write_table(_from_log(args.from_log), args.repeats)
        return
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "20")
    import ray
    from ray.cluster_utils import Cluster

    from elastic_moe.config import debug
    from elastic_moe.data.sample_corpus import ensure_prepared

    cfg = debug()
    ensure_prepared(DATA, cfg.data.tokenizer_vocab_size, cfg.train.seq_len)
    cases = [("live", s) for s in ("kill", "hang", "join", "steady", "steady-nocopy")]
    cases += [("restart", s) for s in ("kill", "hang", "join")]
    cases += [("ray-train", s) for s in ("kill", "hang")]
    if args.only:
        cases = [c for c in cases if f"{c[0]}/{c[1]}" in args.only]
    results: dict[str, list[dict[str, float]]] = {f"{a}/{b}": [] for a, b in cases}
    workdir = tempfile.mkdtemp(prefix="recovery-")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, namespace="elastic-moe")
    try:
        for i in range(args.repeats):  # interleaved: every side sees the same machine load
            for side, scenario in cases:
                name = f"{side}-{scenario}-{i}"
                _wait_until_idle()  # the previous run's slots are released asynchronously
                if side == "ray-train":
                    record = run_baseline(workdir, name, scenario)
                else:
                    record = run_ours(workdir, name, scenario, side, cluster)
                results[f"{side}/{scenario}"].append(record)
                print(name, json.dumps(record), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()

    write_table(results, args.repeats)


def _from_log(path: str) -> dict[str, list[dict[str, float]]]:
    """Per-run records from an earlier run's console (``<side>-<scenario>-<i> {json}`` lines)."""
    results: dict[str, list[dict[str, float]]] = {}
    for line in open(path):
        name, _, payload = line.strip().partition(" ")
        if not payload.startswith("{"):
            continue
        side = next((p for p in ("ray-train", "live", "restart") if name.startswith(p + "-")), None)
        if side is None:
            continue
        scenario = name[len(side) + 1:].rsplit("-", 1)[0]
        results.setdefault(f"{side}/{scenario}", []).append(json.loads(payload))
    return results


def write_table(results: dict[str, list[dict[str, float]]], repeats: int) -> None:
    def med(key: str, field: str) -> float:
        values = [r[field] for r in results.get(key, []) if field in r]
        return statistics.median(values) if values else float("nan")

    lines = [f"# elastic_recovery on CPU ({platform.machine()}, {os.cpu_count()} cores, shared "
             "box, no GPU)", "",
             f"debug model on a local Ray cluster of 1-CPU nodes, checkpoint every {EVERY} steps, "
             f"fault after step {FAULT_AFTER} (mid-interval); median of {repeats} "
             "interleaved repeats. Pause = last step committed before the fault (a join: before "
             "the group stopped for it) -> first step committed by the rebuilt group.", "",
             "| fault | live: pause s | live: steps redone | restart: pause s | restart: "
             "redone | Ray Train: pause s | Ray Train: redone | restart / live | Ray Train / "
             "live |", "|---|---|---|---|---|---|---|---|---|"]
    for scenario in ("kill", "hang", "join"):
        live, restart = med(f"live/{scenario}", "pause_s"), med(f"restart/{scenario}", "pause_s")
        plain = med(f"ray-train/{scenario}", "pause_s") if scenario != "join" else float("nan")
        lines.append(
            f"| {scenario} | {live:.2f} | {med(f'live/{scenario}', 'steps_redone'):.0f} | "
            f"{restart:.2f} | {med(f'restart/{scenario}', 'steps_redone'):.0f} | "
            + (f"{plain:.2f} | {med(f'ray-train/{scenario}', 'steps_redone'):.0f} | "
               if scenario != "join" else "- | - | ")
            + f"{restart / live:.1f}x | " + (f"{plain / live:.1f}x |" if scenario != "join"
                                            else "- |"))
    with_copies, without = med("live/steady", "step_s"), med("live/steady-nocopy", "step_s")
    lines += ["", "Steady state, 2 workers, fault-free (median step time):", "",
              "| peer copies every step | no peer copies | overhead |", "|---|---|---|",
              f"| {with_copies:.3f} s | {without:.3f} s | {100 * (with_copies / without - 1):+.1f}% |",
              "", f"Copied to the buddy per worker per step: "
              f"{med('live/steady', 'copy_mib_per_step'):.1f} MiB (parameters, Adam moments, "
              "router biases). Peak RSS per worker: "
              f"{med('live/steady', 'peak_rss_mib'):.0f} MiB with copies, "
              f"{med('live/steady-nocopy', 'peak_rss_mib'):.0f} MiB without.", "",
              "Raw runs:", "```", json.dumps(results, indent=1), "```"]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(ROOT, "benchmarks", "results", "elastic_recovery-cpu.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
