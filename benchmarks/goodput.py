"""Goodput under repeated faults: ETTR of the live path, the restart path and plain Ray Train.

    python benchmarks/goodput.py [--fault-every 15] [--steps 80] [--repeats N]
        [--cases live/none live/kill ...] [--node-cpus 0.6] [--out goodput-cpu.md]

Every side trains the same widened debug model (dim 192, global batch 32 x 128 tokens: compute
dominates the step) on a local multi-node Ray (``ray.cluster_utils.Cluster``: a head with no
CPUs and three 1-CPU nodes), two workers and, for elastic-moe, one warm spare
(``elastic.spares=1``). A fault arrives every ``--fault-every`` seconds from the first
committed step on:

- **kill**: ``kill -9`` of a member's pid;
- **mixed**: kill, hang (``SIGSTOP`` of a member's pid) and node leave + join (the member's
  ``Cluster`` node removed, a new node added), in turn.

This box has two cores, and three nodes' workers would otherwise share them: a spare warming
up, or a replacement importing torch, would take CPU from the members, and one worker alone
would train as fast as two. So each ``Cluster`` node is made a machine of its own from outside:
its raylet and every process it starts share one CPU cgroup with a quota of ``--node-cpus``
cores (0.6 by default; 1.8 of the box's 2 cores for the three nodes, the rest for the head,
the coordinator and this script). Lost capacity then costs what it would on real machines.

ETTR = (fault-free time for the steps reached) / (elapsed time): the fault-free time of a step
is the side's own fault-free run's elapsed time over its steps (checkpoints included), measured
in the same run. A side gets at most ``--budget`` times its fault-free time; a side that cannot
keep up with the faults is measured by the steps it reached by then. Also: steps redone
(committed steps trained again after a restore) and the workers' peak RSS.
Writes benchmarks/results/goodput-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
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
DEFAULT_CASES = ["live/none", "live/kill", "live/mixed", "restart/kill", "ray-train/none",
                 "ray-train/kill"]


def _baseline(side: str) -> str:
    """The side whose fault-free run gives ``side`` its fault-free time (the restart path is
    elastic-moe too: the live path's)."""
    return "ray-train" if side == "ray-train" else "live"


def _config(workdir: str, steps: int, extra: list[str]):
    from elastic_moe.config import apply_overrides, debug

    return apply_overrides(debug(), [
        f"train.steps={steps}", f"checkpoint.every_steps={EVERY}", "parallel.min_workers=1",
        "parallel.max_workers=2",
        "elastic.spares=1", "elastic.max_failures=-1", "elastic.collective_timeout_s=20",
        "elastic.resize_check_s=1", f"data.cache_dir={DATA}",
        f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", *MODEL, *extra])


class Harness:
    """Records the members' peak RSS. ``members()`` gives the current members' pids; it is
    asked at most once a second (the pids change only at a fault), the RSS read every 0.2 s."""

    def __init__(self, members) -> None:
        self.members = members
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        pids: list[int] = []
        asked = 0.0
        while not self.stop.is_set():
            try:
                if time.time() - asked >= 1.0:
                    pids, asked = self.members(), time.time()
                for pid in pids:
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("VmHWM:"):
                                self.peaks[pid] = int(line.split()[1]) * 1024
            except Exception:
                pass
            self.stop.wait(0.2)


class NodeQuotas:
    """Every ``Cluster`` node as a machine of its own: the node's raylet and every process it
    starts (workers, spares, replacements importing torch) share one CPU cgroup with a quota
    of ``cpus`` cores. A spare warming up on its node then takes nothing from the members on
    theirs, and a lost worker's capacity is lost: one worker alone gets one node's quota.
    The node's Ray agents (dashboard, runtime env) stay outside with the head unless
    ``agents``: they are Ray's own services, which take a sliver of a real machine's cores,
    but inside a 0.6-core quota their periodic work slows every step (0.96 s against 1.2 s
    per step measured) and their start-up on a new node (seconds of imports) lands on the
    joining worker. cgroup v1 (``cpu.cfs_quota_us``) or v2 (``cpu.max``); needs root."""

    def __init__(self, cpus: float, agents: bool = False) -> None:
        v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        base = "/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/cpu"
        if not os.access(base, os.W_OK):
            raise SystemExit(f"goodput: {base} is not writable; the per-node CPU quotas need "
                             "root and a cgroup cpu controller")
        self.v2, self.cpus, self.agents = v2, cpus, agents
        self.root = os.path.join(base, f"elastic-moe-goodput-{os.getpid()}")
        os.makedirs(self.root, exist_ok=True)
        if v2:
            with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                f.write("+cpu")
        self.groups: list[str] = []

    def add_group(self) -> str:
        """A new cgroup with this quota of ``cpus`` cores; its path (write a pid to its
        ``cgroup.procs`` to put a process in it)."""
        path = os.path.join(self.root, f"node-{len(self.groups)}")
        os.makedirs(path, exist_ok=True)
        if not self.v2:
            _write(os.path.join(path, "cpu.cfs_period_us"), "100000")
        self.groups.append(path)
        self.set(len(self.groups) - 1, self.cpus)
        return path

    def confine(self, node) -> None:
        import psutil
        from ray._private import ray_constants

        path = self.add_group()
        raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0]
                                .process.pid)
        # what it started already; later ones inherit the cgroup
        for process in [raylet, *raylet.children(recursive=True)]:
            if not self.agents and _is_agent(process):
                continue
            _quiet(_write, os.path.join(path, "cgroup.procs"), str(process.pid))
        with open(os.path.join(path, "cgroup.procs")) as f:
            if str(raylet.pid) not in f.read().split():
                raise SystemExit(f"goodput: the raylet (pid {raylet.pid}) is not in {path}: "
                                 "the node's workers would run without their CPU quota")

    def set(self, index: int, cpus: float) -> None:
        """Give node ``index`` (in the order confined) a quota of ``cpus`` cores from now on."""
        period = 100_000
        path = self.groups[index]
        if self.v2:
            _write(os.path.join(path, "cpu.max"), f"{int(cpus * period)} {period}")
        else:
            _write(os.path.join(path, "cpu.cfs_quota_us"), str(int(cpus * period)))

    def close(self) -> None:
        parent = os.path.dirname(self.root)
        for path in self.groups:
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids = f.read().split()
            except OSError:
                pids = []
            for pid in pids:
                _quiet(_write, os.path.join(parent, "cgroup.procs"), pid)
            _quiet(os.rmdir, path)
        _quiet(os.rmdir, self.root)


def _is_agent(process) -> bool:
    """One of the node's Ray agents (dashboard, runtime env): by the title Ray gives them, or
    by their script while they start. Not the raylet, whose arguments name both scripts."""
    try:
        argv = process.cmdline()
    except Exception:  # gone meanwhile
        return False
    head = " ".join(argv[:3])
    return head.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")) \
        or "dashboard/agent.py" in head or "runtime_env/agent/main.py" in head


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def run_ours(workdir: str, name: str, side: str, fault: str, steps: int, every_s: float,
             budget_s: float, cluster, nodes: list, quotas: NodeQuotas) -> dict[str, float]:
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
    harness = Harness(members)
    faults: list[tuple[float, str]] = []
    started = None
    kinds = ["kill"] if fault == "kill" else ["kill", "hang", "leave-join"]
    # the coordinator's snapshot is asked only to start the clock and at each fault. Asked
    # every 50 ms (and by the harness every 0.2 s), this script took 0.06-0.11 cores and the
    # coordinator 0.09, outside the nodes' quotas, which leave 0.2 cores of the box; now
    # 0.02-0.05 and 0.06 (CPU time from /proc, 2026-12-08)
    while thread.is_alive():
        if started is None:
            current = state()
            if current and current["last_step"] >= 1:
                started = time.time()
            time.sleep(0.05)
            continue
        now, due = time.time(), started + every_s * (len(faults) + 1)
        if fault == "none" or now - started >= budget_s:
            time.sleep(0.25)
            continue
        if now < due:
            time.sleep(min(0.25, due - now))
            continue
        current = state()
        if current and len(current["workers"]) >= 1:
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
                quotas.confine(nodes[-1])
        else:
            time.sleep(0.05)
    harness.stop.set()
    result = out["result"]
    if not result.ok:
        raise RuntimeError(f"{name}: {result.error}")
    stamps = sorted((m.step, m.timestamp / 1000) for m in MlflowClient(
        result.tracking_uri).get_metric_history(result.mlflow_run_id, "loss"))
    epochs = result.coordinator_state["world_sizes"]
    for e in epochs:  # where each change's pause went, from the fault before it
        marks = e.get("timings", {})
        if "detected" not in marks:
            continue
        fault = max((t for t, _ in faults if t <= marks["detected"]), default=None)
        after = next((t for s, t in stamps if t > marks["rebuilt"]), None)
        origin = fault or marks["detected"]
        print(f"  {e.get('cause')}: " + ", ".join(
            f"{k} {v - origin:.2f}" for k, v in marks.items()) +
            (f", next step logged {after - origin:.2f}" if after else ""), flush=True)
    kill_times = [t for t, _ in faults]
    for i, t0 in enumerate(kill_times):  # the steps between a rebuild and the next fault
        t1 = kill_times[i + 1] if i + 1 < len(kill_times) else float("inf")
        window = [(s, t) for s, t in stamps if t0 < t < t1]
        gaps = [round(b[1] - a[1], 2) for a, b in zip(window[1:], window[2:], strict=False)]
        if gaps:
            print(f"  after fault {i + 1}: steps {window[0][0]}..{window[-1][0]}, gaps {gaps}",
                  flush=True)
    saves = [round(b[1] - a[1], 2) for a, b in zip(stamps, stamps[1:], strict=False)
             if b[0] == a[0] + 1 and a[0] % EVERY == 0]
    print(f"  steps that follow a checkpoint save: gaps {saves}", flush=True)
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

    harness = Harness(members)
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
    parser.add_argument("--node-cpus", type=float, default=0.6,
                        help="CPU quota of each Cluster node (its raylet and every worker on it)")
    parser.add_argument("--agents-in-quota", action="store_true",
                        help="put each node's Ray agents in its CPU quota too (results before "
                             "2026-12-05 were measured so)")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="a side gets at most this many times its fault-free time")
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="goodput-cpu.md",
                        help="the results file, under benchmarks/results/")
    args = parser.parse_args()
    if args.fault_every <= 0 or args.steps < 20 or args.budget < 1 or args.repeats < 1:
        parser.error("--fault-every > 0, --steps >= 20, --budget >= 1, --repeats >= 1")
    for case in args.cases:
        side, _, fault = case.partition("/")
        if side not in ("live", "restart", "ray-train") or fault not in ("none", "kill", "mixed") \
                or (side == "ray-train" and fault == "mixed"):
            parser.error(f"--cases {case}: SIDE/FAULT with SIDE live, restart or ray-train and "
                         "FAULT none, kill or mixed (ray-train: none or kill)")
        baseline = _baseline(side)
        if fault != "none" and f"{baseline}/none" not in args.cases[:args.cases.index(case)]:
            parser.error(f"--cases {case}: needs {baseline}/none before it (its fault-free "
                         "time)")
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "20")
    import ray
    from ray.cluster_utils import Cluster

    from elastic_moe.data.sample_corpus import ensure_prepared

    cfg = _config("/tmp", args.steps, [])
    ensure_prepared(DATA, cfg.data.tokenizer_vocab_size, cfg.train.seq_len)
    workdir = tempfile.mkdtemp(prefix="goodput-")
    results: dict[str, list[dict[str, float]]] = {case: [] for case in args.cases}
    for repeat in range(args.repeats):  # the cases in turn, again: noise shows in the spread
        free_s: dict[str, float] = {}
        for case in args.cases:
            side, fault = case.split("/")
            baseline = _baseline(side)
            # a side's budget: its fault-free time (measured first) times --budget
            budget = args.budget * free_s.get(baseline, 1e9) * args.steps if fault != "none" \
                else 1e9
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            quotas = NodeQuotas(args.node_cpus, agents=args.agents_in_quota)
            nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
            for node in nodes:
                quotas.confine(node)
            ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, namespace="elastic-moe")
            try:
                name = f"{side}-{fault}-{repeat}"
                if side == "ray-train":
                    record = run_ray_train(workdir, name, fault, args.steps, args.fault_every,
                                           budget)
                else:
                    record = run_ours(workdir, name, side, fault, args.steps, args.fault_every,
                                      budget, cluster, nodes, quotas)
            finally:
                ray.shutdown()
                cluster.shutdown()
                quotas.close()
            if fault == "none":  # checkpoints included: the time the same steps take fault-free
                free_s[baseline] = record["elapsed_s"] / record["steps"]
            # against this repeat's own fault-free run, measured minutes apart on the same box
            free = free_s.get(baseline)
            record["free_step_s"] = free or float("nan")
            record["ettr"] = record["steps"] * free / record["elapsed_s"] if free else float("nan")
            results[case].append(record)
            print(case, json.dumps(record), flush=True)
    write_table(results, args)


def _code_version() -> str:
    """The commit the run measured, and whether the tree had changes then."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--", "elastic_moe", "actors", "kernels", "jobs").strip()
    return f"commit {commit}" + (" with uncommitted changes" if dirty else "")


def write_table(results: dict[str, list[dict[str, float]]], args) -> None:
    lines = [f"# goodput on CPU ({platform.machine()}, {os.cpu_count()} cores, shared box, no "
             "GPU)", "",
             f"Widened debug model, 2 workers (+1 warm spare for elastic-moe) on 1-CPU "
             f"`Cluster` nodes, each node's processes held to {args.node_cpus:g} cores by a CPU "
             f"cgroup, {args.steps} steps, checkpoint every {EVERY} steps, a fault every "
             f"{args.fault_every:g} s. ETTR = fault-free time for the steps reached / elapsed "
             f"time (a step's fault-free time: the side's own fault-free run's elapsed time per "
             f"step in the same repeat, checkpoints included; at most {args.budget:g}x that time "
             f"per side). {args.repeats} repeat(s) of the cases in turn: medians, and every "
             f"repeat's ETTR.", "",
             "| side / faults | steps | elapsed s | faults | steps redone | fault-free step s | "
             "ETTR (median) | ETTR (each) | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, records in results.items():
        def median(key: str, records=records) -> float:
            return statistics.median(r[key] for r in records)

        each = ", ".join(f"{r['ettr']:.3f}" for r in records)
        lines.append(f"| {case} | {median('steps'):g} | {median('elapsed_s'):.1f} | "
                     f"{median('faults'):g} | {median('steps_redone'):g} | "
                     f"{median('free_step_s'):.3f} | **{median('ettr'):.3f}** | {each} | "
                     f"{max(r['peak_rss_mib'] for r in records):.0f} |")
    lines += ["", f"Code: {_code_version()}.",
              "", f"Run: `python benchmarks/goodput.py --fault-every {args.fault_every:g} "
              f"--steps {args.steps} --node-cpus {args.node_cpus:g} --repeats {args.repeats}"
              + (f" --cases {' '.join(results)}`." if args.cases != DEFAULT_CASES else "`.")]
    write_results(lines, args.out)


def write_results(lines: list[str], out: str) -> None:
    """Print a results table and write it to ``out`` under benchmarks/results/ (an absolute
    ``out`` is written where it says)."""
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(ROOT, "benchmarks", "results", out), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
