"""Goodput under repeated faults: ETTR of the live path, the restart path and plain Ray Train.

    python benchmarks/goodput.py [--fault-every 15] [--steps 80] [--cases live/kill ...]

Every side trains the same widened debug model (dim 192, global batch 32 x 128 tokens: compute
dominates the step; measured with two gloo processes pinned one per core, one worker alone
takes 1.6x as long per step as two: 1.31 s against 0.82 s) on a local
multi-node Ray (``ray.cluster_utils.Cluster``: a head with no CPUs and three 1-CPU nodes), two
workers and, for elastic-moe, one warm spare (``elastic.spares=1``). A fault arrives every
``--fault-every`` seconds from the first committed step on:

- **kill**: ``kill -9`` of a member's pid;
- **mixed**: kill, hang (``SIGSTOP`` of a member's pid) and node leave + join (the member's
  ``Cluster`` node removed, a new node added), in turn.

This box has two cores, so each side's two members are pinned from outside, one core each
(``sched_setaffinity`` on their pids, as a harness would give each worker its own machine), and
a worker that is not a member (a spare warming up, a replacement importing torch) runs at nice
19, standing in for its own idle node.

ETTR = (fault-free time for the steps reached) / (elapsed time), with each side's fault-free
step time measured in the same run. A side gets at most ``--budget`` times its fault-free time;
a side that cannot keep up with the faults is measured by the steps it reached by then. Also:
steps redone (committed steps trained again after a restore) and the workers' peak RSS.
Writes benchmarks/results/goodput-cpu.md.
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

RUNTIME_ENV = {"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}}
DATA = os.path.join(ROOT, "outputs", "data")
MODEL = ["model.dim=192", "model.inter_dim=512", "model.moe_inter_dim=192",
         "model.q_lora_rank=96", "model.kv_lora_rank=96", "model.num_heads=6",
         "train.global_batch_size=32", "train.micro_batch_size=16"]
EVERY = 10  # checkpoint interval (steps)


def _config(workdir: str, steps: int, extra: list[str]):
    from elastic_moe.config import apply_overrides, debug

    return apply_overrides(debug(), [
        f"train.steps={steps}", f"checkpoint.every_steps={EVERY}", "parallel.min_workers=1",
        "parallel.max_workers=2",
        "elastic.spares=1", "elastic.max_failures=-1", "elastic.collective_timeout_s=20",
        "elastic.resize_check_s=1", f"data.cache_dir={DATA}",
        f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", *MODEL, *extra])


class Harness:
    """Pins members to cores and puts every other worker of the run at nice 19; records peak
    RSS. ``members()`` gives the current members' pids in rank order."""

    def __init__(self, members, others) -> None:
        self.members, self.others = members, others
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        cores = sorted(os.sched_getaffinity(0))
        while not self.stop.is_set():
            try:
                members = self.members()
                for rank, pid in enumerate(members):
                    _quiet(os.sched_setaffinity, pid, {cores[rank % len(cores)]})
                    _quiet(os.setpriority, os.PRIO_PROCESS, pid, 0)
                for pid in self.others():
                    if pid not in members:
                        _quiet(os.setpriority, os.PRIO_PROCESS, pid, 19)
                for pid in members:
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("VmHWM:"):
                                self.peaks[pid] = int(line.split()[1]) * 1024
            except Exception:
                pass
            self.stop.wait(0.2)


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _run_workers(run_name: str) -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if (a.name or "").startswith(f"{run_name}-worker-") and a.pid]


def run_ours(workdir: str, name: str, side: str, fault: str, steps: int, every_s: float,
             budget_s: float, cluster, nodes: list) -> dict[str, float]:
    from elastic_moe.actors import coordinator as coordinator_mod
    from elastic_moe.actors.training import run_training
    from mlflow.tracking import MlflowClient

    cfg = _config(workdir, steps, [f"elastic.recovery={side}"])

    def state() -> dict | None:
        try:
            return coordinator_mod.get(name).snapshot()
        except ValueError:
            return None

    def members() -> list[int]:
        current = state()
        return [w["pid"] for w in current["workers"]] if current else []

    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=run_training(
        cfg, name, output_dir=workdir)), daemon=True)
    thread.start()
    harness = Harness(members, lambda: _run_workers(name))
    faults: list[tuple[float, str]] = []
    started = None
    kinds = ["kill"] if fault == "kill" else ["kill", "hang", "leave-join"]
    while thread.is_alive():
        current = state()
        if current and current["last_step"] >= 1 and started is None:
            started = time.time()
        if started is not None and fault != "none" and len(current["workers"]) >= 1 \
                and time.time() - started < budget_s \
                and time.time() >= started + every_s * (len(faults) + 1):
            kind = kinds[len(faults) % len(kinds)]
            victim = current["workers"][-1]
            faults.append((time.time(), kind))
            if kind == "kill":
                _quiet(os.kill, victim["pid"], signal.SIGKILL)
            elif kind == "hang":
                _quiet(os.kill, victim["pid"], signal.SIGSTOP)
            else:
                node = next((n for n in nodes if n.node_id == victim["node_id"]), None)
                if node is not None:
                    cluster.remove_node(node)
                    nodes.remove(node)
                nodes.append(cluster.add_node(num_cpus=1))
        time.sleep(0.05)
    harness.stop.set()
    result = out["result"]
    if not result.ok:
        raise RuntimeError(f"{name}: {result.error}")
    stamps = sorted((m.step, m.timestamp / 1000) for m in MlflowClient(
        result.tracking_uri).get_metric_history(result.mlflow_run_id, "loss"))
    epochs = result.coordinator_state["world_sizes"]
    return _record(stamps, started or stamps[0][1], budget_s, len(faults),
                   sum(e.get("steps_redone", 0) for e in epochs), harness.peaks)


def _record(stamps: list[tuple[int, float]], started: float, budget_s: float, faults: int,
            redone: int, peaks: dict[int, int]) -> dict[str, float]:
    """Progress from the first committed step: the step reached within the budget and the
    time it took. Step times: median gap between consecutive steps."""
    first = stamps[0]
    within = [(s, t) for s, t in stamps if t - first[1] <= budget_s]
    last = within[-1]
    # a run that did not finish within its budget is measured by the steps it had by then
    finished = stamps[-1][1] - first[1] <= budget_s
    gaps = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False) if b[0] == a[0] + 1]
    return {"steps": last[0] - first[0],
            "elapsed_s": last[1] - first[1] if finished else budget_s,
            "median_step_s": statistics.median(gaps), "faults": faults,
            "steps_redone": redone, "peak_rss_mib": max(peaks.values(), default=0) / 2**20}


def _ray_train_func(config):
    """Plain Ray Train: DDP over the same model, torch.save checkpoints via ray.train.report."""
    import os
    import time

    import ray.train
    import torch

    from elastic_moe.config import apply_overrides, debug
    from elastic_moe.model import Transformer
    from elastic_moe.train.step import build_optimizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    with open(f"{config['log']}.pid{rank}", "w") as f:
        f.write(str(os.getpid()))
    torch.set_num_threads(1)
    cfg = apply_overrides(debug(), config["model"])
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
    rows = cfg.train.global_batch_size // world
    while step < config["steps"]:
        x = torch.randint(0, cfg.model.vocab_size, (rows, cfg.train.seq_len + 1), generator=gen)
        for part in x.split(cfg.train.micro_batch_size):
            model(part[:, :-1], part[:, 1:]).loss.backward()
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


def run_ray_train(workdir: str, name: str, fault: str, steps: int, every_s: float,
                  budget_s: float) -> dict[str, float]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    log_path = os.path.join(workdir, f"{name}.jsonl")
    trainer = TorchTrainer(
        _ray_train_func,
        train_loop_config={"log": log_path, "steps": steps, "every": EVERY, "model": MODEL},
        torch_config=TorchConfig(backend="gloo", timeout_s=20),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=os.path.join(workdir, "ray"),
                             failure_config=FailureConfig(max_failures=-1)))

    def records() -> list[dict]:
        try:
            return [json.loads(line) for line in open(log_path)]
        except (OSError, ValueError):
            return []

    def members() -> list[int]:
        pids = []
        for rank in range(2):
            try:
                pids.append(int(open(f"{log_path}.pid{rank}").read()))
            except (OSError, ValueError):
                pass
        return pids

    harness = Harness(members, lambda: [])
    done = threading.Event()
    faults: list[float] = []

    def inject() -> None:
        started = None
        while not done.is_set():
            seen = records()
            if seen and started is None:
                started = time.time()
            if started is not None and fault != "none" and time.time() - started < budget_s \
                    and time.time() >= started + every_s * (len(faults) + 1):
                faults.append(time.time())
                _quiet(os.kill, members()[-1], signal.SIGKILL)
            time.sleep(0.05)

    threading.Thread(target=inject, daemon=True).start()
    try:
        trainer.fit()
    finally:
        done.set()
        harness.stop.set()
    seen = records()
    # a step's newest execution counts (steps before a restore were trained again)
    stamps: dict[int, float] = {}
    redone = 0
    for record in seen:
        if record["step"] in stamps:
            redone += 1
        stamps.setdefault(record["step"], record["time"])
    ordered = sorted(stamps.items())
    return _record(ordered, ordered[0][1], budget_s, len(faults), redone, harness.peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fault-every", type=float, default=15.0)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--budget", type=float, default=3.0,
                        help="a side gets at most this many times its fault-free time")
    parser.add_argument("--cases", nargs="*", default=[
        "live/none", "live/kill", "live/mixed", "restart/kill", "ray-train/none",
        "ray-train/kill"])
    args = parser.parse_args()
    if args.fault_every <= 0 or args.steps < 20 or args.budget < 1:
        parser.error("--fault-every > 0, --steps >= 20, --budget >= 1")
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "20")
    import ray
    from ray.cluster_utils import Cluster

    from elastic_moe.data.sample_corpus import ensure_prepared

    cfg = _config("/tmp", args.steps, [])
    ensure_prepared(DATA, cfg.data.tokenizer_vocab_size, cfg.train.seq_len)
    workdir = tempfile.mkdtemp(prefix="goodput-")
    results: dict[str, dict[str, float]] = {}
    free_s: dict[str, float] = {}
    for case in args.cases:
        side, fault = case.split("/")
        baseline = "ray-train" if side == "ray-train" else "live"
        # a side's budget: its fault-free time (measured first) times --budget
        budget = args.budget * free_s.get(baseline, 1e9) * args.steps if fault != "none" \
            else 1e9
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
        ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, namespace="elastic-moe")
        try:
            name = f"{side}-{fault}"
            if side == "ray-train":
                record = run_ray_train(workdir, name, fault, args.steps, args.fault_every,
                                       budget)
            else:
                record = run_ours(workdir, name, side, fault, args.steps, args.fault_every,
                                  budget, cluster, nodes)
        finally:
            ray.shutdown()
            cluster.shutdown()
        if fault == "none":
            free_s[side] = record["median_step_s"]
        results[case] = record
        print(case, json.dumps(record), flush=True)
    write_table(results, free_s, args)


def write_table(results: dict[str, dict[str, float]], free_s: dict[str, float], args) -> None:
    lines = [f"# goodput on CPU ({platform.machine()}, {os.cpu_count()} cores, shared box, no "
             "GPU)", "",
             f"Widened debug model, 2 workers pinned one per core (+1 warm spare for "
             f"elastic-moe), {args.steps} steps, checkpoint every {EVERY} steps, a fault every "
             f"{args.fault_every:g} s. ETTR = fault-free time for the steps reached / elapsed "
             f"time (each side's fault-free step time from its own fault-free run; at most "
             f"{args.budget:g}x that time per side).", "",
             "| side / faults | steps | elapsed s | faults | steps redone | fault-free step s | "
             "ETTR | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for case, r in results.items():
        side = case.split("/")[0]
        free = free_s.get("ray-train" if side == "ray-train" else "live")
        ettr = r["steps"] * free / r["elapsed_s"] if free else float("nan")
        lines.append(f"| {case} | {r['steps']} | {r['elapsed_s']:.1f} | {r['faults']} | "
                     f"{r['steps_redone']} | {free:.3f} | {ettr:.3f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    lines += ["", f"Run: `python benchmarks/goodput.py --fault-every {args.fault_every:g} "
              f"--steps {args.steps}`."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(ROOT, "benchmarks", "results", "goodput-cpu.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
