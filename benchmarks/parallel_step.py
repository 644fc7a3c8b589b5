"""Step time of the parallel training step and where it goes, at several world sizes.

Runs one process per rank (gloo on CPU, NCCL on CUDA when ``--device cuda``) on the same global
batch (strong scaling), times ``train_step`` without a profiler, then profiles one step for the
breakdown:

* attention / experts: forward + backward wall time of the MLA and routed-expert modules
  (module hooks; experts include the expert all-to-all, which is also reported alone);
* all-to-all: ``ep/all_to_all`` ranges (counts + rows, forward and backward);
* FSDP collectives: FSDP2's ``FSDP::all_gather*`` and ``FSDP::post_backward_reduce`` ranges plus
  the expert-gradient all-reduce (``ep/grad_all_reduce``).

Numbers are rank 0's, in ms per optimizer step; the profiled step runs slower than the timed
ones (profiler overhead), so read the breakdown as shares. Usage::

    python benchmarks/parallel_step.py --world-sizes 1 2 4 --out results.md
"""

from __future__ import annotations

import argparse
import dataclasses
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

from elastic_moe.config import ParallelConfig, debug  # noqa: E402
from elastic_moe.model.attention import MLA  # noqa: E402
from elastic_moe.model.moe import RoutedExperts  # noqa: E402
from elastic_moe.parallel import plan_mesh, setup_model  # noqa: E402
from elastic_moe.train.step import build_optimizer, train_step  # noqa: E402

# (world size, gpus per node, ep): FSDP with ep = world, and HSDP 2x2 with ep = 2.
LAYOUTS = {1: [(1, 1)], 2: [(2, 2)], 4: [(4, 4), (2, 2)]}


class ModuleTimer:
    """Forward + backward wall time of every module of a type (CPU: ops are synchronous)."""

    def __init__(self, model: torch.nn.Module, kind: type) -> None:
        self.total = 0.0
        self._start: dict[int, float] = {}
        for module in model.modules():
            if isinstance(module, kind):
                module.register_forward_pre_hook(self._begin)
                module.register_forward_hook(self._end)
                module.register_full_backward_pre_hook(self._begin)
                module.register_full_backward_hook(self._end)

    def _begin(self, module, *_):
        self._sync()
        self._start[id(module)] = time.perf_counter()

    def _end(self, module, *_):
        self._sync()
        self.total += time.perf_counter() - self._start.pop(id(module))

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


def _batch(model_cfg, rows: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (rows, seq_len + 1), generator=gen)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def _rank_micro_batches(model_cfg, global_batch: int, seq_len: int, micro: int, rank: int,
                        world_size: int, step: int) -> list[dict[str, torch.Tensor]]:
    """Rank ``rank``'s share of step ``step``'s global batch (:func:`_batch`, seeded by the
    step): its contiguous rows, in micro-batches of ``micro`` rows."""
    per_rank = global_batch // world_size
    batch = _batch(model_cfg, global_batch, seq_len, seed=step)
    mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    return [{k: v[i:i + micro] for k, v in mine.items()} for i in range(0, per_rank, micro)]


def _profiled_ms(prof, needles: tuple[str, ...]) -> float:
    total = 0.0
    for event in prof.key_averages():
        if any(n in event.key for n in needles):
            total += event.cpu_time_total / 1e3  # cpu_time_total is in microseconds
    return total


def _worker(rank: int, world_size: int, port: int, args, layout, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if world_size > 1:
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank,
                                world_size=world_size)
    cfg = debug()
    model_cfg = cfg.model
    train_cfg = dataclasses.replace(cfg.train, seq_len=args.seq_len,
                                    global_batch_size=args.global_batch, warmup_steps=0)
    gpus_per_node, ep = layout
    prefs = ParallelConfig(max_workers=world_size, gpus_per_node=gpus_per_node,
                           expert_parallel_degree=ep)
    plan = plan_mesh(world_size, gpus_per_node, model_cfg, prefs,
                     global_batch_size=args.global_batch)
    model = setup_model(model_cfg, plan, device, seed=0)
    optimizer = build_optimizer(model, train_cfg)
    per_rank = args.global_batch // world_size
    micro = min(args.micro_batch, per_rank)

    def micro_batches(step: int):
        return _rank_micro_batches(model_cfg, args.global_batch, args.seq_len, micro, rank,
                                   world_size, step)

    times = []
    for step in range(args.warmup + args.steps):
        if world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        train_step(model, optimizer, micro_batches(step), step, train_cfg, model_cfg,
                   dp_size=plan.dp_degree)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    attention, experts = ModuleTimer(model, MLA), ModuleTimer(model, RoutedExperts)
    if world_size > 1:
        dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        train_step(model, optimizer, micro_batches(0), 0, train_cfg, model_cfg,
                   dp_size=plan.dp_degree)
        profiled = time.perf_counter() - start
    if rank == 0:
        queue.put({
            "world_size": world_size, "layout": plan.describe().split(";")[0],
            "dense": ("none (1 process)" if world_size == 1 else
                      f"HSDP {plan.dp_replicate_degree}x{plan.dp_shard_degree}"
                      if plan.dp_replicate_degree > 1 else f"FSDP {plan.dp_shard_degree}"),
            "ep": plan.expert_parallel_degree,
            "step_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "profiled_ms": 1e3 * profiled, "attention_ms": 1e3 * attention.total,
            "experts_ms": 1e3 * experts.total,
            "a2a_ms": _profiled_ms(prof, ("ep/all_to_all",)),
            "fsdp_ms": _profiled_ms(prof, ("FSDP::all_gather", "FSDP::post_backward_reduce",
                                           "ep/grad_all_reduce")),
        })
    if world_size > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _report(lines: list[str], out: str | None) -> None:
    """Print a benchmark's result lines, and write them to the file ``out`` too when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores visible, load average at the end {load}, "
            f"torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="", help="also write the markdown table here")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    rows = []
    for world_size in args.world_sizes:
        for layout in LAYOUTS.get(world_size, [(world_size, world_size)]):
            queue = ctx.SimpleQueue()
            mp.spawn(_worker, args=(world_size, _free_port(), args, layout, queue),
                     nprocs=world_size, join=True)
            rows.append(queue.get())
            print(rows[-1], flush=True)

    base = rows[0]["step_ms"]
    lines = [
        f"machine: {_machine()}; device {args.device}; {args.threads} thread(s)/rank",
        f"model: debug recipe; global batch {args.global_batch} x {args.seq_len} tokens "
        f"(strong scaling), micro-batch {args.micro_batch}; median of {args.steps} steps after "
        f"{args.warmup} warm-up",
        "",
        "| W | dense | EP | step ms (median) | min ms | time vs W=1 | profiled step ms | attention "
        "fwd+bwd | experts fwd+bwd (incl. a2a) | all-to-all | FSDP + expert grad collectives |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world_size']} | {r['dense']} | {r['ep']} | {r['step_ms']:.1f} | "
            f"{r['min_ms']:.1f} | {r['step_ms'] / base:.2f}x | {r['profiled_ms']:.1f} | "
            f"{r['attention_ms']:.1f} | {r['experts_ms']:.1f} | {r['a2a_ms']:.1f} | "
            f"{r['fsdp_ms']:.1f} |")
    _report(lines, args.out)


if __name__ == "__main__":
    main()
