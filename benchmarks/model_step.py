"""Tokens/s, peak memory and MFU of one training step (forward+backward+AdamW) per recipe.

    python benchmarks/model_step.py                 # debug + a 2-layer `small` on this device
    python benchmarks/model_step.py --configs debug small --steps 10
    python benchmarks/model_step.py --out results/model_step --time-limit-s 480 \\
        --expert-backend triton torch              # CUDA: the largest `small` cut, per backend
    python benchmarks/model_step.py --dry-run --out /tmp/model_step   # CPU, tiny, seconds

Each configuration runs in its own subprocess so peak memory (CUDA: max allocated; CPU: peak
RSS) is its own. On CUDA the step runs in bf16 the way the trainer does it at world size 1
(``train.mixed_precision=bf16``: fp32 master weights and Adam state, bf16 autocast inside
``train_step``), and reports MFU against the device's dense bf16 peak.

``small`` on CUDA is "the largest cut that fits": the whole recipe at seq_len 4096 first, then
fewer layers (and a smaller batch) after each ``torch.cuda.OutOfMemoryError``; cuts whose fp32
training state alone exceeds the device memory are skipped without trying. Every run profiles one
extra step with ``torch.profiler`` and lists its top kernels. Results go to ``--out``
(model_step.md / model_step.json, rewritten after each run) and to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    "debug": ("debug", [], 4),
    # the small recipe's layer widths (dim 2048, MLA, expert width 1408, top-6), cut to 2 layers,
    # 16 experts, vocab 32k and no MTP so that fwd+bwd+AdamW fits a 24 GB CPU box
    "small-cut": ("small", ["model.num_layers=2", "model.num_mtp_modules=0",
                            "model.num_routed_experts=16", "model.vocab_size=32000",
                            "train.seq_len=512"], 1),
    "small": ("small", ["train.seq_len=4096"], 2),
}
# `small` has 27 layers; tried from the top until one fits (each MoE layer is ~0.6 B params,
# ~10 GB of fp32 weights + grads + Adam)
LAYER_LADDER = (27, 20, 16, 13, 12, 11, 10, 8, 6, 4, 2)
# Cuts whose fp32 state alone takes more than this share of the device are not tried: the rest
# is too little for seq 4096 activations and logits, and each failed try costs a process start.
STATE_SHARE_MAX = 0.8
TOP_KERNELS = 15
TORCHTITAN_NOTE = ("torchtitan side-by-side: not run (torchtitan is not installed on this device "
                   "and nothing can be downloaded there).")


def _top_kernels(prof: Any, cuda: bool) -> list[dict[str, Any]]:
    """The profiled step's top CUDA kernels by total time (CPU: top ops by self CPU time)."""
    from torch.autograd import DeviceType

    def rows_where(keep: Any, time_of: Any) -> list[dict[str, Any]]:
        rows = [{"name": evt.key[:120], "calls": evt.count, "total_ms": time_of(evt) / 1e3}
                for evt in prof.key_averages() if keep(evt) and time_of(evt) > 0]
        return sorted(rows, key=lambda r: -r["total_ms"])

    if cuda:
        rows = rows_where(lambda e: e.device_type == DeviceType.CUDA,
                          lambda e: e.self_device_time_total)
        if not rows:  # no kernel events recorded: the ops' own device time is the next best
            rows = rows_where(lambda e: True, lambda e: e.self_device_time_total)
            for row in rows:
                row["name"] = "(op) " + row["name"]
    else:
        rows = rows_where(lambda e: True, lambda e: e.self_cpu_time_total)
    step_ms = sum(r["total_ms"] for r in rows)
    for row in rows:
        row["share"] = row["total_ms"] / step_ms if step_ms else 0.0
    return rows[:TOP_KERNELS]


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from elastic_moe.config import apply_overrides, get_recipe
    from elastic_moe.model import Transformer
    from elastic_moe.model.flops import peak_tflops, training_flops_per_token
    from elastic_moe.train.step import build_optimizer, train_step

    cfg = apply_overrides(get_recipe(spec["recipe"]), spec["overrides"])
    batch, steps, deadline = spec["batch"], spec["steps"], spec["deadline"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {
        "config": spec["name"], "device": device.type, "batch": batch, "seq_len": cfg.train.seq_len,
        "num_layers": cfg.model.num_layers, "expert_backend": cfg.model.expert_backend,
        "mixed_precision": cfg.train.mixed_precision, "overrides": spec["overrides"]}
    with torch.device(device):
        model = Transformer(cfg.model)
    model.init_weights(seed=0)
    opt = build_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.train.seq_len + 1), generator=gen)
    micro = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}]
    times: list[float] = []
    step = 0
    for step in range(steps + 2):
        if step >= 3 and time.time() > deadline:  # at least one timed step, then stop early
            break
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = train_step(model, opt, micro, step, cfg.train, cfg.model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # warm-up excluded
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tok = batch * cfg.train.seq_len
    out.update(timed_steps=len(times), median_step_s=median, tokens_per_s=tok / median,
               loss=metrics.loss)
    achieved = training_flops_per_token(cfg.model, cfg.train.seq_len) * tok / median / 1e12
    out["tflops"] = achieved
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        peak = peak_tflops(device)
        out["mfu"] = achieved / peak if peak else None
    else:
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if spec["profile"] and time.time() + 2 * median < deadline:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            train_step(model, opt, micro, step + 1, cfg.train, cfg.model)
            if device.type == "cuda":
                torch.cuda.synchronize()
        out["top_kernels"] = _top_kernels(prof, device.type == "cuda")
    return out


def state_gb(recipe: str, overrides: list[str]) -> float:
    """fp32 weights + grads + two Adam moments of the cut: the floor of its training memory."""
    from elastic_moe.config import apply_overrides, get_recipe
    from elastic_moe.model import count_parameters

    counts = count_parameters(apply_overrides(get_recipe(recipe), overrides).model)
    return 16 * (counts.total + counts.mtp) / 1e9


class Results:
    """Rows so far, rewritten to ``--out`` after every run so a cut-off run keeps its findings."""

    def __init__(self, out: str | None, device: str, header: str) -> None:
        self.out, self.device, self.header = out, device, header
        self.rows: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []

    def table(self) -> str:
        lines = [f"# model_step on {self.device}", "", self.header, "",
                 "| config | layers | backend | batch x seq | median step (s) | tokens/s | "
                 "peak mem (GB) | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
            lines.append(f"| {r['config']} | {r['num_layers']} | {r['expert_backend']} | "
                         f"{r['batch']} x {r['seq_len']} | {r['median_step_s']:.3f} | "
                         f"{r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.2f} | {r['tflops']:.1f} | "
                         f"{mfu} |")
        if self.attempts:
            lines += ["", "Cuts tried (largest first):", ""]
            lines += [f"- {a['config']} layers={a['num_layers']} batch={a['batch']}: {a['result']}"
                      for a in self.attempts]
        for r in self.rows:
            if r.get("top_kernels"):
                lines += ["", f"Top kernels of one profiled step: {r['config']}, {r['num_layers']} "
                          f"layers, backend {r['expert_backend']}", "",
                          "| kernel | calls | total (ms) | share |", "|---|---|---|---|"]
                lines += [f"| `{k['name']}` | {k['calls']} | {k['total_ms']:.2f} | {k['share']:.1%} |"
                          for k in r["top_kernels"]]
        return "\n".join(lines + ["", TORCHTITAN_NOTE])

    def write(self) -> None:
        if not self.out:
            return
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "model_step.md"), "w") as f:
            f.write(self.table() + "\n")
        with open(os.path.join(self.out, "model_step.json"), "w") as f:
            json.dump({"device": self.device, "rows": self.rows, "attempts": self.attempts,
                       "torchtitan": TORCHTITAN_NOTE}, f, indent=2)


OOM = 3  # the child's exit code for torch.cuda.OutOfMemoryError


def child(spec: dict[str, Any], env: dict[str, str], timeout: float) -> tuple[str, Any]:
    """("ok", row) | ("oom", message) | ("error", message) of one run in its own process."""
    if timeout < 5:
        return "error", "skipped: --time-limit-s reached"
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                              capture_output=True, text=True, env=env,
                              timeout=None if math.isinf(timeout) else timeout)
    except subprocess.TimeoutExpired:
        return "error", f"ran past the {timeout:.0f} s left of --time-limit-s"
    if proc.returncode == OOM:
        return "oom", proc.stdout.strip().splitlines()[-1][:300]
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return "error", (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
    return "ok", json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up")
    parser.add_argument("--out", help="directory for model_step.md / model_step.json")
    parser.add_argument("--time-limit-s", type=float, default=float("inf"),
                        help="bound on the whole script: runs stop early and what was measured "
                             "is written")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, the debug recipe, 2 timed steps: checks the script in seconds")
    parser.add_argument("--expert-backend", nargs="+", default=None, metavar="NAME",
                        help="model.expert_backend per run (e.g. triton torch); one row each")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. model.expert_backend=torch")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        try:
            print(json.dumps(run_one(spec)))
        except Exception as exc:
            import torch

            if isinstance(exc, torch.cuda.OutOfMemoryError):
                print(json.dumps({"oom": str(exc).splitlines()[0]}))
                raise SystemExit(OOM) from None
            raise
        return
    deadline = time.time() + args.time_limit_s
    env = dict(os.environ)
    # fewer fragmentation OOMs at the edge of what fits
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run checks the CPU path even on a GPU box
    import torch

    on_gpu = torch.cuda.is_available() and not args.dry_run
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    device = torch.cuda.get_device_name() if on_gpu else cpu
    steps = 2 if args.dry_run else args.steps
    configs = args.configs or (["debug"] if args.dry_run else
                               ["debug", "small"] if on_gpu else ["debug", "small-cut"])
    backends = args.expert_backend or [None]
    header = (f"torch {torch.__version__}; median of up to {steps} steps after 2 warm-up; "
              f"fwd+bwd+AdamW; train.mixed_precision as the recipe sets it on CPU, bf16 autocast "
              f"with fp32 master weights on CUDA; MFU = model FLOPs/s over the device's dense "
              f"bf16 peak.")
    results = Results(args.out, device, header)
    total_mem = torch.cuda.get_device_properties(0).total_memory / 1e9 if on_gpu else None
    for name in configs:
        recipe, base, batch = CONFIGS[name]
        base = list(base) + (["train.mixed_precision=bf16"] if on_gpu else []) + list(args.set)
        cuts: list[tuple[int | None, int]] = [(None, batch)]
        if name == "small" and on_gpu:
            cuts = [(layers, b) for layers in LAYER_LADDER for b in (batch, 1) if b <= batch]
            cuts = list(dict.fromkeys(cuts))
        chosen = None
        for index, backend in enumerate(backends):
            overrides = base + ([f"model.expert_backend={backend}"] if backend else [])
            # the first backend finds the cut; the others run the same cut, to compare
            for layers, b in ([chosen] if index and chosen else cuts):
                over = overrides + ([f"model.num_layers={layers}"] if layers else [])
                attempt = {"config": name, "num_layers": layers, "batch": b, "backend": backend}
                if total_mem and state_gb(recipe, over) > STATE_SHARE_MAX * total_mem:
                    results.attempts.append({**attempt, "result": f"skipped: fp32 training state "
                                             f"{state_gb(recipe, over):.0f} GB > device "
                                             f"{total_mem:.0f} GB"})
                    continue
                spec = {"name": name, "recipe": recipe, "overrides": over, "batch": b,
                        "steps": steps, "deadline": deadline, "profile": not args.no_profile}
                status, value = child(spec, env, deadline - time.time())
                results.attempts.append({**attempt, "result": status if status == "ok"
                                         else f"{status}: {value}"})
                results.write()
                if status == "ok":
                    results.rows.append(value)
                    chosen = (layers, b)
                    results.write()
                    break
                if status == "error":  # not a size problem: smaller cuts would fail the same way
                    break
    table = results.table()
    print(table)
    tag = "gpu-" + torch.cuda.get_device_name().split()[-1].lower() if on_gpu else "cpu"
    if not args.dry_run:
        os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
        with open(os.path.join(ROOT, "benchmarks", "results", f"model_step-{tag}.md"), "w") as f:
            f.write(table + "\n")
    if not results.rows:
        raise SystemExit("model_step.py: no configuration ran (see the attempts above)")


if __name__ == "__main__":
    main()
