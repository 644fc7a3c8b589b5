"""A straggler on a machine of its own: is it evicted, and does the step time come back?

    python benchmarks/straggler.py [--steps 60] [--slow-at 15] [--slow-factor 4]
        [--node-cpus 0.6] [--repeats 2] [--out straggler-cpu.md]

The goodput benchmark's setting (``benchmarks/goodput.py``): the widened debug model, two
workers and one warm spare (``elastic.spares=1``) on three ``Cluster`` nodes, each node a
machine of its own by a CPU cgroup with a quota of ``--node-cpus`` cores. Once step
``--slow-at`` is committed, one member's node quota is cut to ``1 / --slow-factor`` of it, from
outside, as a throttled host or a noisy neighbour would: that worker runs at a quarter of its
speed by default, and so does the group. The straggler policy runs with the product's
defaults (``elastic.straggler_ratio``, ``elastic.straggler_steps``).

Each repeat runs the same training fault-free and then slowed, side by side, and reports:

- the median step time before the slowdown and after the eviction (from the fourth step after
  the rebuild on), each against the fault-free run's steps of the same range, and while slowed;
- when the straggler was flagged and evicted (steps after the slowdown), with the policy's
  numbers (its slowdown estimate and the step time it expected);
- ETTR of the slowed run against the fault-free one.

Step times leave out the step that follows each checkpoint save (it carries the save's
blocking time in both runs). The spare that starts in the evicted worker's freed slot starts on
the throttled node, so it takes nothing from the members.
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

from benchmarks.goodput import (  # noqa: E402
    DATA,
    EVERY,
    RUNTIME_ENV,
    NodeQuotas,
    _code_version,
    _config,
    write_results,
)


def _gaps(stamps: dict[int, float], first: int, last: int) -> list[float]:
    """Gaps between consecutive committed steps ``first+1 .. last``, without the steps that
    follow a checkpoint save."""
    return [stamps[s] - stamps[s - 1] for s in range(first + 1, last + 1)
            if s - 1 in stamps and s in stamps and (s - 1) % EVERY != 0]


def run_case(workdir: str, name: str, steps: int, slow_at: int | None, factor: float,
             cluster_nodes: list, quotas: NodeQuotas) -> dict:
    """Train; with ``slow_at``, cut the quota of the second member's node to 1/``factor`` once
    that step is committed. Returns the step stamps, the coordinator's record and when."""
    from elastic_moe.actors import coordinator as coordinator_mod
    from elastic_moe.actors.training import run_training
    from mlflow.tracking import MlflowClient

    cfg = _config(workdir, steps, [])
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=run_training(
        cfg, name, output_dir=workdir)), daemon=True)
    thread.start()
    slowed: dict = {}
    while thread.is_alive():
        if slow_at is not None and not slowed:
            try:
                state = coordinator_mod.get(name).snapshot()
            except ValueError:
                state = None
            if state and state["last_step"] >= slow_at and len(state["workers"]) == 2:
                victim = state["workers"][1]
                index = next(i for i, n in enumerate(cluster_nodes)
                             if n.node_id == victim["node_id"])
                quotas.set(index, quotas.cpus / factor)
                slowed = {"step": state["last_step"], "time": time.time(),
                          "pid": victim["pid"]}
                print(f"  slowed pid {victim['pid']} (node {index}) to "
                      f"{quotas.cpus / factor:.3g} cores after step {slowed['step']}",
                      flush=True)
        time.sleep(0.05)
    result = out["result"]
    if not result.ok:
        raise RuntimeError(f"{name}: {result.error}")
    stamps = {m.step: m.timestamp / 1000 for m in MlflowClient(
        result.tracking_uri).get_metric_history(result.mlflow_run_id, "loss")}
    return {"stamps": stamps, "state": result.coordinator_state, "slowed": slowed}


def measure(free: dict, slow: dict, steps: int) -> dict:
    """The slowed run against the fault-free one (see the module's docstring)."""
    state, slowed = slow["state"], slow["slowed"]
    if not slowed:
        raise RuntimeError("the run ended before the worker was slowed")
    flagged = [e for e in state["events"] if e["kind"] == "straggler"]
    evicted = [e for e in state["events"] if e["kind"] == "straggler_evicted"]
    at = slowed["step"]
    record = {"slowed_at": at, "flagged": len(flagged), "evicted": len(evicted),
              "verdict": flagged[0] if flagged else None}
    ff, st = free["stamps"], slow["stamps"]
    record["before_s"] = statistics.median(_gaps(st, 3, at))
    record["before_free_s"] = statistics.median(_gaps(ff, 3, at))
    if not evicted:
        record["slowed_s"] = statistics.median(_gaps(st, at + 2, steps))
        return record
    # the layout that followed the eviction: the first one after the slowdown
    rebuilt = next(e["restored_step"] for e in state["world_sizes"][1:]
                   if e["restored_step"] >= at)
    record.update(
        evicted_after_steps=rebuilt - at, rebuilt_at=rebuilt,
        slowed_s=statistics.median(_gaps(st, at + 2, rebuilt)),
        after_s=statistics.median(_gaps(st, rebuilt + 3, steps)),
        after_free_s=statistics.median(_gaps(ff, rebuilt + 3, steps)),
        ettr=(ff[steps] - ff[1]) / (st[steps] - st[1]))
    record["after_vs_free"] = record["after_s"] / record["after_free_s"]
    record["after_vs_before"] = record["after_s"] / record["before_s"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--slow-at", type=int, default=15,
                        help="slow the worker once this step is committed")
    parser.add_argument("--slow-factor", type=float, default=4.0,
                        help="the slowed node keeps 1/FACTOR of its CPU quota")
    parser.add_argument("--node-cpus", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="straggler-cpu.md",
                        help="the results file, under benchmarks/results/")
    args = parser.parse_args()
    if not 5 <= args.slow_at <= args.steps - 30 or args.slow_factor <= 1 or args.repeats < 1:
        parser.error("--slow-at from 5 to --steps - 30 (the policy needs steps to judge, the "
                     "result steps after the eviction), --slow-factor > 1, --repeats >= 1")
    import ray
    from ray.cluster_utils import Cluster

    from elastic_moe.data.sample_corpus import ensure_prepared

    cfg = _config("/tmp", args.steps, [])
    ensure_prepared(DATA, cfg.data.tokenizer_vocab_size, cfg.train.seq_len)
    workdir = tempfile.mkdtemp(prefix="straggler-")
    records = []
    for repeat in range(args.repeats):
        runs = {}
        for case in ("none", "slow"):
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            quotas = NodeQuotas(args.node_cpus)
            nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
            for node in nodes:
                quotas.confine(node)
            ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, namespace="elastic-moe")
            try:
                runs[case] = run_case(workdir, f"straggler-{case}-{repeat}", args.steps,
                                      args.slow_at if case == "slow" else None,
                                      args.slow_factor, nodes, quotas)
            finally:
                ray.shutdown()
                cluster.shutdown()
                quotas.close()
        record = measure(runs["none"], runs["slow"], args.steps)
        records.append(record)
        print(f"repeat {repeat}:", json.dumps(record), flush=True)
    write_table(records, args)


def write_table(records: list[dict], args) -> None:
    def cell(record: dict, key: str, fmt: str = ".3f") -> str:
        value = record.get(key)
        return "-" if value is None else format(value, fmt)

    lines = [f"# straggler on CPU ({platform.machine()}, {os.cpu_count()} cores, shared box, "
             "no GPU)", "",
             f"Goodput model, 2 workers + 1 warm spare on 1-CPU `Cluster` nodes held to "
             f"{args.node_cpus:g} cores each; after step {args.slow_at} one member's node is cut "
             f"to {args.node_cpus / args.slow_factor:.3g} cores (1/{args.slow_factor:g}). "
             f"{args.steps} steps, checkpoint every {EVERY}; straggler policy at the product "
             "defaults. Step times: medians of the gaps between committed steps (the step after "
             "a save left out); `free`: the fault-free run of the same repeat over the same "
             "steps.", "",
             "| repeat | before s (free) | slowed s | flagged, evicted | evicted after steps | "
             "policy: slowdown, expected step s | after s (free) | after / free | "
             "after / before | ETTR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(records):
        verdict = r["verdict"] or {}
        policy = (f"{verdict['slowdown']:.2f}, {verdict['expected_step_s']:.2f}"
                  if verdict else "-")
        lines.append(
            f"| {i} | {r['before_s']:.3f} ({r['before_free_s']:.3f}) | {cell(r, 'slowed_s')} | "
            f"{r['flagged']}, {r['evicted']} | {cell(r, 'evicted_after_steps', 'd')} | "
            f"{policy} | {cell(r, 'after_s')} ({cell(r, 'after_free_s')}) | "
            f"**{cell(r, 'after_vs_free')}** | {cell(r, 'after_vs_before')} | "
            f"{cell(r, 'ettr')} |")
    done = [r for r in records if r.get("after_vs_free") is not None]
    if done:
        lines += ["", f"Median after / free: **{statistics.median(r['after_vs_free'] for r in done):.3f}**; "
                  f"after / before: {statistics.median(r['after_vs_before'] for r in done):.3f} "
                  f"({len(done)} of {len(records)} repeats evicted)."]
    lines += ["", f"Code: {_code_version()}.", "",
              f"Run: `python benchmarks/straggler.py --steps {args.steps} --slow-at "
              f"{args.slow_at} --slow-factor {args.slow_factor:g} --node-cpus "
              f"{args.node_cpus:g} --repeats {args.repeats}`."]
    write_results(lines, args.out)


if __name__ == "__main__":
    main()
