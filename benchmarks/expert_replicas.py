"""Expert load per rank with and without load-driven expert replicas, side by side.

One process per rank on a real gloo group (4 ranks, ``ep = 4``: each expert on one rank; the
ranks are put in two failure domains, ``a a b b``). Both variants start from the same weights
and train the same warm-up steps, so their router biases (the replicas' load signal) are the
same; then each trains the same measured steps, one without copies and one with
``parallel.expert_replicas`` copies per rank (planned from those biases). Reported per variant:

* rows per rank: the routed rows each rank's experts computed per step (forward), as the max
  over ranks / the mean (1.0 = even); the slowest rank's expert work sets the step's pace;
* the expert load (tokens per expert over the global batch, max / mean), the same in both
  (the copies do not change routing, only where a token's expert runs);
* step time (median), on this machine.

Usage::

    python benchmarks/expert_replicas.py --replicas 2 --out benchmarks/results/expert_replicas-cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel_step import _report  # noqa: E402  (the benchmarks' shared helpers)

from elastic_moe.config import apply_overrides, debug  # noqa: E402
from elastic_moe.parallel import plan_mesh, setup_model  # noqa: E402
from elastic_moe.parallel.expert_parallel import expert_parallel_modules  # noqa: E402
from elastic_moe.parallel.expert_replicas import assign_replicas  # noqa: E402
from elastic_moe.train.shard_state import ensure_optimizer_state  # noqa: E402
from elastic_moe.train.step import build_optimizer, train_step  # noqa: E402

WORLD = 4
DOMAINS = ["a", "a", "b", "b"]


def _config(args: argparse.Namespace):
    return apply_overrides(debug(), [
        "parallel.min_workers=1", f"parallel.max_workers={WORLD}", f"parallel.gpus_per_node={WORLD}",
        f"train.global_batch_size={4 * WORLD}", "train.micro_batch_size=4",
        f"train.seq_len={args.seq_len}", f"model.bias_update_speed={args.bias_speed}"])


def _batches(cfg, rank: int, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    # a skewed token distribution (Zipf-like over the vocabulary), like text
    weights = 1.0 / torch.arange(1, cfg.model.vocab_size + 1, dtype=torch.float64)
    return [torch.multinomial(weights, 4 * cfg.train.seq_len, replacement=True,
                              generator=gen).view(4, cfg.train.seq_len) for _ in range(steps)]


def _rank(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = _config(args)
    plan = plan_mesh(WORLD, cfg.parallel.gpus_per_node, cfg.model, cfg.parallel,
                     global_batch_size=cfg.train.global_batch_size)
    warmup = _batches(cfg, rank, args.warmup, seed=1)
    measured = _batches(cfg, rank, args.steps, seed=2)
    results = {}
    for slots in (0, args.replicas):
        model = setup_model(cfg.model, plan, "cpu", seed=0)
        optimizer = build_optimizer(model, cfg.train)
        for step, ids in enumerate(warmup):
            train_step(model, optimizer, [{"input_ids": ids, "labels": ids}], step, cfg.train,
                       cfg.model, batch_fraction=1 / WORLD)
        ensure_optimizer_state(optimizer)
        assign_replicas(model, optimizer, slots, DOMAINS)
        modules = expert_parallel_modules(model)
        spreads, loads, times = [], [], []
        for step, ids in enumerate(measured, start=args.warmup):
            for module in modules:
                module.rows_computed = 0
            dist.barrier()
            start = time.perf_counter()
            metrics = train_step(model, optimizer, [{"input_ids": ids, "labels": ids}], step,
                                 cfg.train, cfg.model, batch_fraction=1 / WORLD)
            times.append(time.perf_counter() - start)
            rows = torch.tensor([float(sum(m.rows_computed for m in modules))])
            every = [torch.zeros(1) for _ in range(WORLD)]
            dist.all_gather(every, rows)
            values = [float(t) for t in every]
            spreads.append(max(values) / (sum(values) / len(values)))
            loads.append(metrics.expert_stats["moe/load_max_over_mean"])
        table = modules[0].replicas.table if modules[0].replicas is not None else []
        results[slots] = (statistics.median(spreads), statistics.median(loads),
                          statistics.median(times), table)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2, help="copies per rank and layer")
    parser.add_argument("--warmup", type=int, default=20, help="steps before measuring")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--bias-speed", type=float, default=1e-3,
                        help="model.bias_update_speed (V3's 1e-3: the balancer acts slowly)")
    parser.add_argument("--out", default="", help="write the markdown table here too")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(args, port, queue), nprocs=WORLD, join=True,
                       start_method="spawn")
    results = queue.get()
    base = results[0]
    lines = [
        "# Expert load per rank with and without expert replicas",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{WORLD} gloo ranks, EP {WORLD} (each expert on one rank), domains "
        f"{''.join(DOMAINS)}; debug model, seq_len {args.seq_len}, Zipf-distributed tokens, "
        f"model.bias_update_speed {args.bias_speed}; {args.warmup} warm-up steps, then "
        f"{args.steps} measured steps per variant on the same batches.",
        f"Command: `python benchmarks/expert_replicas.py --replicas {args.replicas} "
        f"--warmup {args.warmup} --steps {args.steps}`",
        "",
        "| parallel.expert_replicas | rows per rank, max / mean (median over steps) | "
        "expert load max / mean | step s (median) | copies (layer 0, per rank) |",
        "|---|---|---|---|---|"]
    for slots, (spread, load, step_s, table) in results.items():
        lines.append(f"| {slots} | {spread:.3f} | {load:.3f} | {step_s:.3f} | {table or '-'} |")
    spread_after = results[args.replicas][0]
    lines += ["", f"Rows per rank, max / mean: {base[0]:.3f} without copies, {spread_after:.3f} "
                  f"with {args.replicas} per rank (ratio {spread_after / base[0]:.2f}). Step "
                  f"time ratio (with / without): {results[args.replicas][2] / base[2]:.2f}."]
    _report(lines, args.out)


if __name__ == "__main__":
    main()
