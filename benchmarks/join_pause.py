"""How long a join stops the group, in steps: the goodput model, node by node.

    python benchmarks/join_pause.py [--joins 4] [--node-cpus 0.6] [--out join_pause-cpu.md]

The same widened debug model and per-node CPU quotas as ``benchmarks/goodput.py`` (each
``ray.cluster_utils.Cluster`` node is a cgroup of ``--node-cpus`` cores), with
``--workers 1:2`` and no spare. Each cycle removes the node of the second member (the group
shrinks to one worker) and adds a new node; its worker starts, warms up, and joins: the join
measured. The pause of a join is the gap between the last step committed before the group
stopped for it and the first step the larger group committed (MLflow commit timestamps), less
one step of the larger group (its median step time, from the steps after the join). The
issue's bar is a pause of at most one step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from goodput import DATA, RUNTIME_ENV, NodeQuotas, _config  # noqa: E402


def run(workdir: str, joins: int, node_cpus: float, steps_between: int, agents: bool) -> dict:
    import ray
    from elastic_moe.actors import coordinator as coordinator_mod
    from elastic_moe.actors.training import run_training
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    steps = (joins + 1) * steps_between * 2 + 10
    cfg = _config(workdir, steps, ["elastic.spares=0", "parallel.min_workers=1"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    quotas = NodeQuotas(node_cpus, agents=agents)
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    for node in nodes:
        quotas.confine(node)
    ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, namespace="elastic-moe")
    name = "join-pause"
    try:
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(result=run_training(
            cfg, name, output_dir=workdir)), daemon=True)
        thread.start()

        def state() -> dict | None:
            try:
                return coordinator_mod.get(name).snapshot()
            except ValueError:
                return None

        cycles = 0
        next_at = None
        while thread.is_alive():
            current = state()
            if current and len(current["workers"]) == 2 and cycles < joins:
                if next_at is None:
                    next_at = current["last_step"] + steps_between
                elif current["last_step"] >= next_at:
                    victim = current["workers"][-1]
                    node = next(n for n in nodes if n.node_id == victim["node_id"])
                    cluster.remove_node(node)
                    nodes.remove(node)
                    nodes.append(cluster.add_node(num_cpus=1))
                    quotas.confine(nodes[-1])
                    cycles += 1
                    next_at = None
            time.sleep(0.05)
        result = out["result"]
        if not result.ok:
            raise RuntimeError(result.error)
        stamps = sorted((m.step, m.timestamp / 1000) for m in MlflowClient(
            result.tracking_uri).get_metric_history(result.mlflow_run_id, "loss"))
        epochs = result.coordinator_state["world_sizes"]
    finally:
        ray.shutdown()
        cluster.shutdown()
        quotas.close()
    at = dict(stamps)
    records = []
    for i, e in enumerate(epochs):
        if e.get("cause") != "scale_up":
            continue
        step = e["restored_step"]  # the last step before the join: the group stopped after it
        end = epochs[i + 1]["restored_step"] if i + 1 < len(epochs) else stamps[-1][0]
        after = [at[s + 1] - at[s] for s in range(step + 2, end) if s in at and s + 1 in at]
        if step not in at or step + 1 not in at or len(after) < 3:
            continue
        step_s = statistics.median(after)
        gap = at[step + 1] - at[step]
        marks = e.get("timings", {})
        origin = marks.get("detected", at[step])
        records.append({"step": step, "gap_s": round(gap, 3), "step_s": round(step_s, 3),
                        "pause_s": round(gap - step_s, 3),
                        "pause_steps": round((gap - step_s) / step_s, 2),
                        "marks": {k: round(v - origin, 3) for k, v in marks.items()}})
    return {"joins": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joins", type=int, default=4)
    parser.add_argument("--node-cpus", type=float, default=0.6)
    parser.add_argument("--steps-between", type=int, default=8,
                        help="steps trained at two workers before each node leaves")
    parser.add_argument("--agents-in-quota", action="store_true",
                        help="put each node's Ray agents in its CPU quota too")
    parser.add_argument("--out", default="join_pause-cpu.md")
    args = parser.parse_args()
    if args.joins < 1 or args.steps_between < 5:
        parser.error("--joins >= 1, --steps-between >= 5")
    from elastic_moe.data.sample_corpus import ensure_prepared

    cfg = _config("/tmp", 20, [])
    ensure_prepared(DATA, cfg.data.tokenizer_vocab_size, cfg.train.seq_len)
    result = run(tempfile.mkdtemp(prefix="join-pause-"), args.joins, args.node_cpus,
                 args.steps_between, args.agents_in_quota)
    joins = result["joins"]
    for j in joins:
        print(json.dumps(j), flush=True)
    if not joins:
        raise SystemExit("join_pause: no join was measured")
    lines = [
        f"# join_pause on CPU ({platform.machine()}, {os.cpu_count()} cores, shared box, no GPU)",
        "",
        f"Goodput model, `--workers 1:2`, no spare, node quotas {args.node_cpus} cores; "
        f"{len(joins)} joins (a node leaves, a new one joins). Pause = commit gap across the "
        "join less one step of the larger group.",
        "",
        "| join at step | gap s | step s (after) | pause s | pause in steps |",
        "|---|---|---|---|---|",
        *(f"| {j['step']} | {j['gap_s']} | {j['step_s']} | {j['pause_s']} | "
          f"{j['pause_steps']} |" for j in joins),
        "",
        f"Median pause: {statistics.median(j['pause_s'] for j in joins):.3f} s = "
        f"{statistics.median(j['pause_steps'] for j in joins):.2f} steps.",
        "",
        "Rebuild marks (s after the group stopped):",
        "```",
        *(json.dumps(j["marks"]) for j in joins),
        "```",
    ]
    path = os.path.join(ROOT, "benchmarks", "results", args.out)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
