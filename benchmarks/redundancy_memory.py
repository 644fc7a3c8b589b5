"""Host memory held for redundancy: measured RSS on Cluster nodes against ``--describe``.

    python benchmarks/redundancy_memory.py [--steps 6]

Two workers on two 1-CPU nodes of ``ray.cluster_utils.Cluster`` (``parallel.gpus_per_node=1``,
so each worker is its own node and failure domain) train a widened debug model (about 26M
parameters with MTP, so the state stands out from the ~400 MB of a torch process) for ``--steps`` steps,
in four runs:

- dense FSDP over both ranks (``dp_replicate=1``): no block has a replica, so each buddy keeps a
  full copy of its ward; with ``elastic.peer_copies`` on and off;
- HSDP (``dp_replicate=2``): each rank holds the whole model, a replica of the other; nothing
  needs a copy; with peer copies on and off;
- EP 2 over both nodes with ``parallel.expert_replicas=4``: each rank also holds copies of the
  other rank's 4 experts, so the buddy copies only the dense FSDP shard; with peer copies on and
  off, and a third run without the expert copies (their own memory, against ``--describe``'s).

For each layout: the training state per worker and the redundancy bytes ``--describe --workers
2`` computes, what the workers report holding (the epoch record's ``redundancy_bytes``), and the
measured difference of the workers' RSS between the runs with and without copies (median of
the two workers, sampled at the last step). Writes benchmarks/results/redundancy_memory-cpu.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RUNTIME_ENV = {"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}}
DATA = os.path.join(ROOT, "outputs", "data")
WIDE = ["model.dim=512", "model.inter_dim=1024", "model.moe_inter_dim=512",
        "model.q_lora_rank=128", "model.kv_lora_rank=128", "model.num_heads=8",
        "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2"]


def _config(workdir: str, steps: int, layout: list[str]):
    from elastic_moe.config import apply_overrides, debug

    return apply_overrides(debug(), [
        f"train.steps={steps}", "checkpoint.every_steps=1000", "parallel.min_workers=2",
        "parallel.max_workers=2", "parallel.gpus_per_node=1", "elastic.collective_timeout_s=60",
        "elastic.hang_timeout_s=30", "elastic.lease_interval_s=5",
        f"data.cache_dir={DATA}", f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
        *WIDE, *layout])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run(workdir: str, name: str, cfg) -> tuple[list[int], dict]:
    """One run on a fresh 2-node cluster; the workers' RSS at the last step seen, and the first
    epoch's record."""
    import ray
    from elastic_moe.actors import coordinator as coordinator_mod
    from elastic_moe.actors.training import run_training
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, namespace="elastic-moe")
    try:
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(result=run_training(
            cfg, name, output_dir=workdir)), daemon=True)
        thread.start()
        last: list[int] = []
        while thread.is_alive():
            try:
                state = coordinator_mod.get(name).snapshot()
                if state["last_step"] >= cfg.train.steps - 2 and len(state["workers"]) == 2:
                    last = [_rss(w["pid"]) for w in state["workers"]]
            except (ValueError, OSError, KeyError, RuntimeError):  # not yet, or exiting
                pass
            time.sleep(0.1)
        result = out["result"]
        if not result.ok:
            raise RuntimeError(f"{name}: {result.error}")
        if not last:
            raise RuntimeError(f"{name}: no RSS sample near the end of the run")
        return last, result.coordinator_state["world_sizes"][0]
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3 (RSS is sampled near the end)")
    from elastic_moe.data.sample_corpus import ensure_prepared
    from elastic_moe.train.redundancy import redundancy_report

    mib = 2**20
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        ep2 = ["parallel.dp_replicate_degree=1", "parallel.expert_parallel_degree=2"]
        for label, layout in (("FSDP over 2 nodes (dp_replicate=1)",
                               ["parallel.dp_replicate_degree=1"]),
                              ("HSDP, one replica per node (dp_replicate=2)",
                               ["parallel.dp_replicate_degree=2"]),
                              ("EP 2 over 2 nodes, parallel.expert_replicas=4",
                               [*ep2, "parallel.expert_replicas=4"])):
            measured = {}
            runs = [("true", layout), ("false", layout)]
            if "parallel.expert_replicas=4" in layout:
                runs.append(("no-replicas", [*ep2, "parallel.expert_replicas=0"]))
            for key, run_layout in runs:
                copies = "false" if key == "no-replicas" else key
                cfg = _config(workdir, args.steps, [*run_layout, f"elastic.peer_copies={copies}"])
                ensure_prepared(cfg.data.cache_dir, cfg.data.tokenizer_vocab_size,
                                cfg.train.seq_len)
                name = f"mem-{len(rows)}-{key}"
                measured[key] = run(workdir, name, cfg)
                print(f"{label}, {key}: RSS "
                      f"{[round(r / mib) for r in measured[key][0]]} MiB", flush=True)
            cfg = _config(workdir, args.steps, [*layout, "elastic.peer_copies=true"])
            report = redundancy_report(cfg, 2)
            state = max(r.state_bytes for r in report.ranks)
            described = max(r.held_bytes for r in report.ranks)
            reported = measured["true"][1]["redundancy_bytes"]

            def rss_delta(a: str, b: str, measured: dict = measured) -> float:
                return statistics.median(x - y for x, y in zip(
                    sorted(measured[a][0]), sorted(measured[b][0]), strict=True))

            replicas = None
            if "no-replicas" in measured:
                replicas = (max(r.replica_bytes for r in report.ranks),
                            rss_delta("false", "no-replicas"))
            rows.append((label, state, described, reported, rss_delta("true", "false"),
                         replicas))
    lines = [f"# redundancy_memory on CPU ({platform.machine()}, {os.cpu_count()} cores, shared "
             "box, no GPU)", "",
             "Two workers on two 1-CPU `ray.cluster_utils.Cluster` nodes, a widened debug model, "
             f"{args.steps} steps. RSS measured from /proc near the last step, with peer copies "
             "on and off; the difference is the memory held for redundancy.", "",
             "| layout | training state / worker (describe) | held for redundancy (describe) | "
             "held (workers' report) | measured RSS difference | measured / state |",
             "|---|---|---|---|---|---|"]
    for label, state, described, reported, delta, _ in rows:
        lines.append(f"| {label} | {state / mib:.1f} MiB | {described / mib:.1f} MiB | "
                     f"{reported / mib:.1f} MiB | {delta / mib:.1f} MiB | "
                     f"{delta / state:.2f}x |")
    for label, _, _, _, _, replicas in rows:
        if replicas is not None:
            lines += ["", f"{label}: the expert copies' own memory (training state of 4 copies "
                          f"per rank: weights, gradients, 2 Adam moments): `--describe` "
                          f"{replicas[0] / mib:.1f} MiB; measured RSS difference against the "
                          f"same run without copies (peer copies off in both) "
                          f"{replicas[1] / mib:.1f} MiB."]
    lines += ["", "Before update forwarding, each worker held two snapshots of its own state and "
              "two copies of its ward's: 4x the weights and Adam moments, 3x the training state "
              "above, whatever the layout.", "",
              f"Run: `python benchmarks/redundancy_memory.py --steps {args.steps}`."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(ROOT, "benchmarks", "results", "redundancy_memory-cpu.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
