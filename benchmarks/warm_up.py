"""What a new worker's warm-up saves the join that takes it in: its first layout's build and
its first step, by kind of warm-up.

A worker warms up before it joins (``actors/train_worker._warm_up``): it builds a model and
steps it once in a private one-rank group, so that first-time costs fall outside the join's
pause. This compares three warm-ups, side by side and alternating, each in 2 fresh gloo
processes on the goodput benchmark's model:

- ``1 sequence``: the plain model stepped on one sequence (the CPU warm-up before this change);
- ``sharded, 1 sequence``: the same with the model sharded over the one rank (FSDP, expert
  parallelism), to run the sharded code paths before the join too (tried, not adopted);
- ``the worker's``: what ``_warm_up`` does now (the plain model, one micro-batch of the run's
  shapes).

After the warm-up both processes form a 2-rank group, build the layout (no initial weights, as
a restore does) and take 3 steps. Reported per kind (rank 0, medians over ``--repeats``): the
build, the first and third step, and the minor page faults of the first and third step::

    python benchmarks/warm_up.py --repeats 3 --out benchmarks/results/warm_up-cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from goodput import MODEL  # noqa: E402  (the same model the goodput figures use)
from parallel_step import _free_port, _machine, _rank_micro_batches, _report  # noqa: E402

KINDS = ("1 sequence", "sharded, 1 sequence", "the worker's")


def _one_sequence_warm_up(cfg, sharded: bool) -> None:
    """``_warm_up`` at one sequence, the model sharded over the one rank or not."""
    from elastic_moe.model.transformer import Transformer
    from elastic_moe.parallel import plan_mesh
    from elastic_moe.parallel.fsdp import parallelize
    from elastic_moe.parallel.mesh import build_mesh, forget_layout_caches
    from elastic_moe.train.step import build_optimizer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plan = plan_mesh(1, 1, cfg.model, dataclasses.replace(
            cfg.parallel, min_workers=1, max_workers=1, gpus_per_node=1,
            dp_replicate_degree=1, expert_parallel_degree=0))
        with torch.device("meta"):
            model = Transformer(cfg.model)
        if sharded:
            parallelize(model, plan, build_mesh(plan, "cpu"),
                        mixed_precision=cfg.train.mixed_precision)
        model.to_empty(device="cpu")
        model.init_weights(0)
        optimizer = build_optimizer(model, cfg.train)
        ids = torch.zeros(1, cfg.train.seq_len, dtype=torch.long)
        model(ids, ids).loss.backward()
        optimizer.step()
        del model, optimizer
    finally:
        dist.destroy_process_group()
        forget_layout_caches()


def _worker(rank: int, world_size: int, port: int, kind: str, queue) -> None:
    from elastic_moe.actors.train_worker import _warm_up

    from elastic_moe.config import apply_overrides, debug
    from elastic_moe.parallel import plan_mesh, setup_model
    from elastic_moe.train.step import build_optimizer, train_step

    torch.set_num_threads(1)
    cfg = apply_overrides(debug(), MODEL)
    train_cfg = cfg.train
    started = time.perf_counter()
    if kind == "the worker's":
        _warm_up(torch.device("cpu"), cfg)
    else:
        _one_sequence_warm_up(cfg, sharded=kind.startswith("sharded"))
    warm_up_s = time.perf_counter() - started
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0,
                          timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    plan = plan_mesh(world_size, world_size, cfg.model, cfg.parallel,
                     global_batch_size=train_cfg.global_batch_size)
    started = time.perf_counter()
    model = setup_model(cfg.model, plan, torch.device("cpu"), seed=0, init_weights=False,
                        mixed_precision=train_cfg.mixed_precision)
    optimizer = build_optimizer(model, train_cfg)
    build_s = time.perf_counter() - started
    with torch.no_grad():  # what a restore would write (not timed: a restore copies its own)
        for param in model.parameters():
            param.to_local().normal_(0, 0.02)
    steps, faults = [], []
    for step in range(1, 4):
        micro_batches = _rank_micro_batches(cfg.model, train_cfg.global_batch_size,
                                            train_cfg.seq_len, train_cfg.micro_batch_size,
                                            rank, world_size, step)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        train_step(model, optimizer, micro_batches, step, train_cfg, cfg.model,
                   dp_size=world_size)
        steps.append(time.perf_counter() - started)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    dist.destroy_process_group()
    if rank == 0:
        queue.put({"warm_up_s": warm_up_s, "build_s": build_s, "first_s": steps[0],
                   "third_s": steps[2], "first_faults": faults[0], "third_faults": faults[2]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for repeat in range(args.repeats):
        for kind in KINDS:
            queue = ctx.Queue()
            mp.start_processes(_worker, args=(2, _free_port(), kind, queue), nprocs=2,
                               join=True, start_method="spawn")
            results[kind].append(queue.get(timeout=60))
            print(f"repeat {repeat + 1}, {kind}: {results[kind][-1]}", flush=True)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    lines = [
        "# warm-up kinds: a fresh worker's first layout (CPU)", "",
        f"machine: {_machine()}; 2 gloo processes, 1 thread each",
        f"model: goodput's widened debug model ({' '.join(MODEL)}); both processes warm up "
        f"the same way, then form a 2-rank group; medians of {args.repeats} repeats, kinds "
        "alternating; rank 0's numbers", "",
        "| warm-up | warm-up s | build s | first step s | third step s | first step faults "
        "| third step faults |",
        "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        lines.append(f"| {kind} | {median(kind, 'warm_up_s'):.3f} | {median(kind, 'build_s'):.3f}"
                     f" | {median(kind, 'first_s'):.3f} | {median(kind, 'third_s'):.3f}"
                     f" | {median(kind, 'first_faults'):.0f}"
                     f" | {median(kind, 'third_faults'):.0f} |")
    base, new = KINDS[0], KINDS[-1]
    lines += ["",
              "the worker's / 1 sequence: "
              f"build {median(new, 'build_s') / median(base, 'build_s'):.2f}, "
              f"first step {median(new, 'first_s') / median(base, 'first_s'):.2f}, "
              f"first step over third step {median(new, 'first_s') / median(new, 'third_s'):.2f} "
              f"(against {median(base, 'first_s') / median(base, 'third_s'):.2f}), "
              f"warm-up {median(new, 'warm_up_s') / median(base, 'warm_up_s'):.2f}", "",
              f"Run: `python benchmarks/warm_up.py --repeats {args.repeats}`"]
    _report(lines, args.out)


if __name__ == "__main__":
    main()
