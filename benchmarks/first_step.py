"""What the first step of a new layout costs, and how much of it is the optimizer.

Every rebuild (a kill, a join) builds a new layout in the surviving processes and a fresh one in
a promoted spare, with DTensor's sharding caches emptied (``forget_layout_caches``). Its first
step is slower than the ones after it. This runs 2 gloo processes on the goodput benchmark's
model, rebuilds the layout ``--rebuilds`` times in each (caches dropped, as a worker does), and
times the first and second step after each rebuild with torch's AdamW over the DTensor
parameters and with :class:`~elastic_moe.train.step.ShardLocalAdamW` (the project's optimizer),
alternating, in one run. Rank 0's medians and ratios are printed::

    python benchmarks/first_step.py --rebuilds 5 --out benchmarks/results/first_step-cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from goodput import MODEL  # noqa: E402  (the same model the goodput figures use)
from parallel_step import _free_port, _machine, _rank_micro_batches  # noqa: E402

VARIANTS = ("torch AdamW", "ShardLocalAdamW")


def _optimizer(variant: str, model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    from elastic_moe.train.step import build_optimizer

    optimizer = build_optimizer(model, train_cfg)
    if variant == "torch AdamW":  # the same groups and settings, through DTensor
        optimizer = torch.optim.AdamW(optimizer.param_groups, lr=train_cfg.lr,
                                      betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8,
                                      foreach=False)
    return optimizer


def _worker(rank: int, world_size: int, port: int, args, queue) -> None:
    from elastic_moe.config import apply_overrides, debug
    from elastic_moe.parallel import plan_mesh, setup_model
    from elastic_moe.parallel.mesh import forget_layout_caches
    from elastic_moe.train.step import train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # one process group throughout: a new model and meshes per rebuild, the caches dropped
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = apply_overrides(debug(), MODEL)
    train_cfg = cfg.train
    plan = plan_mesh(world_size, world_size, cfg.model, cfg.parallel,
                     global_batch_size=train_cfg.global_batch_size)

    def micro_batches(step: int):
        return _rank_micro_batches(cfg.model, train_cfg.global_batch_size, train_cfg.seq_len,
                                   train_cfg.micro_batch_size, rank, world_size, step)

    times: dict[str, dict[str, list[float]]] = {
        v: {"first": [], "second": [], "optimizer first": [], "optimizer second": []}
        for v in VARIANTS}
    for rebuild in range(args.rebuilds + 1):  # rebuild 0 warms the process up, not counted
        for variant in VARIANTS:
            forget_layout_caches()  # what a worker does before it builds a new layout
            model = setup_model(cfg.model, plan, torch.device("cpu"), seed=0)
            optimizer = _optimizer(variant, model, train_cfg)
            opt_times: list[float] = []
            inner = optimizer.step

            def timed_step(*a, inner=inner, opt_times=opt_times, **k):
                start = time.perf_counter()
                out = inner(*a, **k)
                opt_times.append(time.perf_counter() - start)
                return out

            optimizer.step = timed_step
            for step, key in enumerate(("first", "second")):
                dist.barrier()
                start = time.perf_counter()
                train_step(model, optimizer, micro_batches(step), step, train_cfg, cfg.model,
                           dp_size=plan.dp_degree)
                if rebuild:
                    times[variant][key].append(time.perf_counter() - start)
            if rebuild:
                times[variant]["optimizer first"].append(opt_times[0])
                times[variant]["optimizer second"].append(opt_times[1])
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rebuilds", type=int, default=5)
    parser.add_argument("--out", default="", help="also write the markdown table here")
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(2, _free_port(), args, queue), nprocs=2, join=True)
    times = queue.get()
    med = {v: {k: statistics.median(x) for k, x in t.items()} for v, t in times.items()}
    ours, theirs = med["ShardLocalAdamW"], med["torch AdamW"]
    lines = [
        f"machine: {_machine()}; 2 gloo processes, 1 thread each",
        f"model: goodput's widened debug model ({' '.join(MODEL)}); medians of {args.rebuilds} "
        "rebuilds per optimizer, alternating, DTensor caches dropped before each",
        "",
        "| optimizer | first step s | second step s | first - second s | optimizer.step first s "
        "| optimizer.step second s |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        m = med[variant]
        lines.append(f"| {variant} | {m['first']:.3f} | {m['second']:.3f} | "
                     f"{m['first'] - m['second']:.3f} | {m['optimizer first']:.3f} | "
                     f"{m['optimizer second']:.3f} |")
    lines += ["", f"first step, ShardLocalAdamW / torch AdamW: "
                  f"{ours['first'] / theirs['first']:.2f}; second step: "
                  f"{ours['second'] / theirs['second']:.2f}; optimizer.step first: "
                  f"{ours['optimizer first'] / theirs['optimizer first']:.2f}, second: "
                  f"{ours['optimizer second'] / theirs['optimizer second']:.2f}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# first step after a rebuild\n\n{text}\n\nRun: `python benchmarks/"
                    f"first_step.py --rebuilds {args.rebuilds}`\n")


if __name__ == "__main__":
    main()
