"""Tokens/s and peak memory of one model forward+backward (+ AdamW step) per recipe.

    python benchmarks/model_step.py                 # debug + a 2-layer `small` on this device
    python benchmarks/model_step.py --configs debug small --steps 10

Each configuration runs in its own subprocess so peak memory (CUDA: max allocated; CPU: peak
RSS) is its own. On CUDA it also reports MFU against the device's dense bf16 peak. Prints a
table and writes benchmarks/results/model_step-<device>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    "debug": ("debug", [], 4),
    # the small recipe's layer widths (dim 2048, MLA, expert width 1408, top-6), cut to 2 layers,
    # 16 experts, vocab 32k and no MTP so that fwd+bwd+AdamW fits a 24 GB CPU box
    "small-cut": ("small", ["model.num_layers=2", "model.num_mtp_modules=0",
                            "model.num_routed_experts=16", "model.vocab_size=32000",
                            "train.seq_len=512"], 1),
    "small": ("small", ["train.seq_len=4096"], 1),
}


def run_one(name: str, steps: int) -> dict:
    import torch

    from elastic_moe.config import apply_overrides, get_recipe
    from elastic_moe.model import Transformer
    from elastic_moe.model.flops import peak_tflops, training_flops_per_token
    from elastic_moe.train.step import build_optimizer, train_step

    recipe, overrides, batch = CONFIGS[name]
    cfg = apply_overrides(get_recipe(recipe), overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device):
        model = Transformer(cfg.model)
    model.init_weights(seed=0)
    opt = build_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.train.seq_len + 1), generator=gen)
    micro = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}]
    times = []
    for step in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, opt, micro, step, cfg.train, cfg.model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # warm-up excluded
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tok = batch * cfg.train.seq_len
    out = {"config": name, "device": device.type, "batch": batch, "seq_len": cfg.train.seq_len,
           "median_step_s": median, "tokens_per_s": tok / median}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        peak = peak_tflops(device)
        achieved = training_flops_per_token(cfg.model, cfg.train.seq_len) * tok / median / 1e12
        out["tflops"] = achieved
        out["mfu"] = achieved / peak if peak else None
    else:
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps)))
        return
    import torch

    on_gpu = torch.cuda.is_available()
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    device = torch.cuda.get_device_name() if on_gpu else cpu
    configs = args.configs or (["debug", "small"] if on_gpu else ["debug", "small-cut"])
    rows = []
    for name in configs:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{name}: benchmark subprocess failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    header = "| config | batch x seq | median step (s) | tokens/s | peak mem (GB) | TFLOP/s | MFU |"
    lines = [f"# model_step on {device}", "", f"torch {torch.__version__}; median of "
             f"{args.steps} steps after 2 warm-up; fwd+bwd+AdamW; CPU runs fp32, CUDA bf16 autocast.",
             "", header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        tflops = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        lines.append(f"| {r['config']} | {r['batch']} x {r['seq_len']} | {r['median_step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.2f} | {tflops} | {mfu} |")
    table = "\n".join(lines)
    print(table)
    tag = "gpu-" + torch.cuda.get_device_name().split()[-1].lower() if on_gpu else "cpu"
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", f"model_step-{tag}.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
