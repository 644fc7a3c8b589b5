"""How long a join waits for a new worker's warm-up to stop, by where the warm-up checks.

A worker that is still warming up when a rebuild takes it stops its warm-up at the next check
(``actors/train_worker._warm_up``), and the whole group waits for that at the rendezvous. This
times that wait in fresh processes (a spare's warm-up is its process's first), each held to
``--cpus`` cores by a CPU cgroup as a goodput benchmark node is, on the goodput benchmark's
model. Two kinds of checks, side by side and alternating:

- ``layers``: a check at every transformer layer's forward and at the backward of its input
  (the checks before this change);
- ``modules``: the same at every module (what ``_warm_up`` does now), so the final norm,
  lm_head and MTP are checked too (the cross-entropy, a function, is not).

Each kind first runs one warm-up to the end; then, for each of ``--trials`` points spread
evenly over that time, a fresh process sets the stop that far into its warm-up, as a join
would. Reported per kind: the wait from the stop to the warm-up's end (median, mean, 90th
percentile, largest) and how many warm-ups ended without stopping::

    python benchmarks/warm_up_stop.py --trials 12 --out benchmarks/results/warm_up_stop-cpu.md

Needs root and a cgroup cpu controller for the quota (as ``goodput.py`` does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

KINDS = ("layers", "modules")


def _child(kind: str, delay: float | None) -> None:
    """One fresh process: the worker's imports, then its warm-up, stopped ``delay`` seconds in
    (None: never). Prints one JSON line."""
    import torch
    from elastic_moe.actors.train_worker import _warm_up
    from goodput import MODEL

    import elastic_moe.train.trainer  # noqa: F401  (a worker imports it before its warm-up)
    from elastic_moe.config import apply_overrides, debug
    from elastic_moe.train import step as step_mod

    torch.set_num_threads(1)
    skipped = _checks_at_layers_only() if kind == "layers" else []
    forward_at: list[float] = []  # when the warm-up's step began (its model built)
    build_optimizer = step_mod.build_optimizer

    def build_and_mark(model, train_cfg):
        optimizer = build_optimizer(model, train_cfg)
        model.register_forward_pre_hook(lambda *_: forward_at.append(time.perf_counter()))
        return optimizer

    step_mod.build_optimizer = build_and_mark
    cfg = apply_overrides(debug(), MODEL)
    stop = threading.Event()
    stopped_at: list[float] = []

    def set_stop() -> None:
        stopped_at.append(time.perf_counter())
        stop.set()

    timer = threading.Timer(delay, set_stop) if delay is not None else None
    started = time.perf_counter()
    if timer is not None:
        timer.start()
    took = _warm_up(torch.device("cpu"), cfg, stop)
    ended = time.perf_counter()
    if timer is not None:
        timer.cancel()
    if kind == "layers" and forward_at and not skipped:
        # the warm-up's hook was renamed or moved: this would measure the new checks
        raise SystemExit("warm_up_stop: no warm-up hook was left out for 'layers'")
    # a stop before the step began waited for imports and a first build that the join pays
    # anyway; one inside the step waited for work that is thrown away
    in_step = bool(stopped_at and forward_at and stopped_at[0] >= forward_at[0])
    print(json.dumps({"kind": kind, "delay": delay, "total_s": ended - started,
                      "step_at": forward_at[0] - started if forward_at else None,
                      "finished": took is not None, "in_step": in_step,
                      "wait_s": ended - stopped_at[0] if stopped_at else None}))


def _checks_at_layers_only() -> list[object]:
    """Make ``_warm_up`` check at the transformer's own layers only (``model.layers``, not
    the MTP blocks), as it did before: its forward pre-hooks on every other module are not
    registered. Returns the modules left out (their class names), filled as the warm-up
    runs."""
    import torch

    from elastic_moe.model.transformer import Transformer

    build, register = Transformer.__init__, torch.nn.Module.register_forward_pre_hook

    def tag_layers(self, *args, **kwargs):
        build(self, *args, **kwargs)
        for layer in self.layers:
            layer.warm_up_checked = True

    skipped: list[object] = []

    def only_layers(module, hook, *args, **kwargs):
        if (getattr(hook, "__name__", "") == "module_entered"
                and not getattr(module, "warm_up_checked", False)):
            skipped.append(type(module).__name__)
            return None
        return register(module, hook, *args, **kwargs)

    Transformer.__init__ = tag_layers  # type: ignore[method-assign]
    torch.nn.Module.register_forward_pre_hook = only_layers  # type: ignore[method-assign]
    return skipped


def _run(group: str, kind: str, delay: float | None) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", kind]
    if delay is not None:
        argv += ["--delay", f"{delay:.4f}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    def enter() -> None:  # in the child, before it execs
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600,
                         preexec_fn=enter, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"warm_up_stop: a {kind} child failed ({out.returncode}):\n"
                         f"{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12,
                        help="stop points per kind, spread evenly over a whole warm-up")
    parser.add_argument("--cpus", type=float, default=0.6,
                        help="the children's CPU quota in cores (the goodput nodes' default)")
    parser.add_argument("--out", default="warm_up_stop-cpu.md")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.delay)
        return
    if args.trials < 1:
        raise SystemExit(f"--trials {args.trials}: need at least 1")
    if not 0 < args.cpus <= os.cpu_count():
        raise SystemExit(f"--cpus {args.cpus}: must be above 0 and at most {os.cpu_count()}")
    started = datetime.datetime.now(datetime.timezone.utc)
    from goodput import NodeQuotas

    quotas = NodeQuotas(args.cpus)
    try:
        group = quotas.add_group()
        full = {kind: _run(group, kind, None)["total_s"] for kind in KINDS}
        print(f"whole warm-ups: {full}", flush=True)
        span = statistics.median(full.values())
        results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for trial in range(args.trials):
            delay = span * (trial + 0.5) / args.trials
            order = KINDS if trial % 2 == 0 else KINDS[::-1]
            for kind in order:
                record = _run(group, kind, delay)
                results[kind].append(record)
                print(f"trial {trial} {kind}: stop at {delay:.2f} s, {record}", flush=True)
    finally:
        quotas.close()
    ended = datetime.datetime.now(datetime.timezone.utc)
    write(results, full, args, started, ended)


def write(results: dict[str, list[dict]], full: dict[str, float], args, started, ended) -> None:
    from parallel_step import _machine

    rows = []
    means = {}
    for kind in KINDS:
        first = sum(r["finished"] for r in results[kind])
        # a warm-up that failed (neither finished nor stopped) has no wait: counted apart
        failed = sum(not r["finished"] and r["wait_s"] is None for r in results[kind])
        for phase, in_step in (("in the step", True), ("before it", False)):
            waits = sorted(r["wait_s"] for r in results[kind]
                           if not r["finished"] and r["wait_s"] is not None
                           and r["in_step"] == in_step)
            if not waits:
                rows.append(f"| {kind} | {phase} | 0 | - | - | - | - |")
                continue
            if in_step:
                means[kind] = statistics.mean(waits)
            p90 = waits[min(len(waits) - 1, int(0.9 * len(waits)))]
            rows.append(f"| {kind} | {phase} | {len(waits)} | {statistics.median(waits):.3f} | "
                        f"{statistics.mean(waits):.3f} | {p90:.3f} | {waits[-1]:.3f} |")
        rows.append(f"| {kind} | ended without stopping | {first} | | | | |")
        if failed:
            rows.append(f"| {kind} | failed (no wait) | {failed} | | | | |")
    steps_at = {kind: statistics.median([r["step_at"] for r in results[kind]
                                         if r["step_at"] is not None] or [float("nan")])
                for kind in KINDS}
    lines = [
        f"# warm_up_stop on {_machine()}",
        "",
        f"The goodput model's warm-up in fresh processes held to {args.cpus} cores; the stop set "
        f"at {args.trials} points spread evenly over a whole warm-up, each kind in turn. Whole "
        "warm-ups: " + ", ".join(f"{kind} {full[kind]:.2f} s" for kind in KINDS) + "; its step "
        "began (imports and first build done) after " + ", ".join(
            f"{kind} {steps_at[kind]:.2f} s" for kind in KINDS) + " (medians). A stop before "
        "the step waits for work a join would do anyway; one inside it waits for work that is "
        "thrown away.",
        "",
        "| checks at | stop landed | stops | median wait s | mean wait s | p90 wait s "
        "| largest wait s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if len(means) == 2:
        lines.append("Mean wait for a stop inside the step, modules / layers: "
                     f"**{means['modules'] / means['layers']:.2f}**")
        lines.append("")
    lines += [f"Run: `python benchmarks/warm_up_stop.py --trials {args.trials} "
              f"--cpus {args.cpus}`, {started:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC.", ""]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
