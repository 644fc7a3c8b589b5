"""How long a launch takes before training starts: this checkout against another, side by side.

    python benchmarks/launch_time.py --against /tmp/wt_base [--repeats 3] \
        [--out benchmarks/results/launch_time-cpu.md]

Each measurement runs ``jobs/train.py --steps 2 --workers 2`` on the debug recipe (the data
prepared once, in a shared cache; a fresh sqlite MLflow store per run), from one checkout, with
the Python of this one. Two ways in:

- ``embedded``: no address; the launcher starts its own local Ray (as ``make demo`` does);
- ``cluster``: against a ``ray start --head`` (2 CPUs, started for the run, outside the timing,
  with the checkout on its PYTHONPATH), as the tests and a real cluster launch: here the
  launcher's checks run tasks on the nodes.

Per run: the launcher's wall time, and the time from its start to the first committed step
(``metrics.jsonl``). The checkouts alternate; medians and the ratio (this / against) are
printed. ``--against`` is any checkout of the project, e.g. ``git worktree add /tmp/wt_base
07fd727`` for the code before the launch-overhead fixes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def launch(checkout: str, mode: str, workdir: str, data: str) -> dict[str, float]:
    from tests.integration.elastic_helpers import ray_head
    from tests.integration.multiproc import free_port

    out = tempfile.mkdtemp(dir=workdir)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    argv = [sys.executable, "jobs/train.py", "--steps", "2", "--workers", "2", "--run-name", "lt",
            "--output-dir", out, "--set", f"data.cache_dir={data}",
            "--set", f"tracking.tracking_uri=sqlite:///{out}/mlflow.db"]
    head: contextlib.AbstractContextManager = contextlib.nullcontext()
    if mode == "cluster":  # the head's workers import the checkout (its PYTHONPATH)
        env.update(RAY_AUTH_MODE="token", PYTHONPATH=checkout)
        port = free_port()
        head = ray_head(env, f"--port={port}", "--num-cpus=2", "--include-dashboard=false")
        argv += ["--ray-address", f"127.0.0.1:{port}"]
    with head:
        started = time.time()
        proc = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=600)
        wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{checkout} ({mode}) exited {proc.returncode}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    with open(os.path.join(out, "lt", "metrics.jsonl")) as f:
        first = json.loads(f.readline())["time"]
    return {"wall_s": wall, "first_step_s": first - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="another checkout of the project")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["embedded", "cluster"],
                        choices=["embedded", "cluster"])
    parser.add_argument("--out", default=None, help="write the table here (markdown)")
    args = parser.parse_args()
    against = os.path.abspath(args.against)
    workdir = tempfile.mkdtemp(prefix="launch-time-")
    data = os.path.join(workdir, "data")
    launch(ROOT, "embedded", workdir, data)  # prepares the data; not counted
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for mode in args.modes:
            for name, checkout in (("this", ROOT), ("against", against)):
                got = launch(checkout, mode, workdir, data)
                results.setdefault((mode, name), []).append(got)
                print(f"repeat {repeat} {mode:8s} {name:7s} wall {got['wall_s']:6.1f} s, "
                      f"first step at {got['first_step_s']:6.1f} s", flush=True)
    commit = subprocess.run(["git", "-C", against, "log", "-1", "--format=%h"],
                            capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h"],
                          capture_output=True, text=True).stdout.strip()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = ["# launch time: `jobs/train.py --steps 2 --workers 2`, debug recipe",
             "",
             f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
             f"visible, load average at the end {load}; this = {head}, against = {commit}; "
             f"medians of {args.repeats} alternating runs",
             "",
             "| mode | first step this s | first step against s | ratio | wall this s "
             "| wall against s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for mode in args.modes:
        row = []
        for key in ("first_step_s", "wall_s"):
            this = statistics.median(r[key] for r in results[(mode, "this")])
            other = statistics.median(r[key] for r in results[(mode, "against")])
            row += [f"{this:.1f}", f"{other:.1f}", f"{this / other:.2f}"]
        lines.append(f"| {mode} | " + " | ".join(row) + " |")
    lines += ["", f"Run: `python benchmarks/launch_time.py --against <checkout of {commit}> "
              f"--repeats {args.repeats}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
