"""Step time with per-step peer copies: none, and the buddy following every step.

    python benchmarks/peer_copy_overhead.py [--world 2] [--blocks 6] [--steps 5]

``--world`` gloo processes on this machine train the ``debug`` model (FSDP + EP at that size,
one thread each). In interleaved blocks of ``--steps`` steps each, every step is followed by:

- **none**: nothing (``elastic.peer_copies=false``);
- **forwarded**: what training does (``elastic_moe.train.peer_copies``): before the commit vote
  each rank sends its copied parameters' gradients to its buddy and receives its wards'; after
  it, the buddy applies the same AdamW update to each ward's copy.

(Before update forwarding, each rank took a snapshot of its whole state every step and sent it;
the numbers of that scheme are in the git history of the results file.)

Prints the median step time of each and the overhead against none, and writes
benchmarks/results/peer_copy_overhead-cpu.md. The full-system steady state (MLflow step
timestamps of whole runs on a Ray cluster) is in benchmarks/elastic_recovery.py; at this model
size it is within that benchmark's run-to-run noise, which is why this one exists.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("none", "forwarded")


def _worker(rank: int, world: int, blocks: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from elastic_moe.config import apply_overrides, debug
    from elastic_moe.parallel import plan_mesh, setup_model
    from elastic_moe.train.peer_copies import PeerCopies
    from elastic_moe.train.shard_state import ShardLayout
    from elastic_moe.train.step import build_optimizer, train_step

    cfg = apply_overrides(debug(), [f"parallel.max_workers={world}", "parallel.min_workers=1"])
    plan = plan_mesh(world, cfg.parallel.gpus_per_node, cfg.model, cfg.parallel,
                     global_batch_size=cfg.train.global_batch_size)
    model = setup_model(cfg.model, plan, "cpu", seed=0)
    optimizer = build_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(rank)
    rows = cfg.train.global_batch_size // world

    def vote(nonfinite: bool) -> bool:
        peers.forward_grads()
        return not nonfinite

    def one_step(step: int, forward: bool) -> None:
        ids = torch.randint(0, cfg.model.vocab_size, (rows, cfg.train.seq_len), generator=gen)
        batches = [{"input_ids": part, "labels": part}
                   for part in ids.split(cfg.train.micro_batch_size)]
        train_step(model, optimizer, batches, step, cfg.train, cfg.model,
                   batch_fraction=1 / world, commit_vote=vote if forward else None)
        if forward:
            peers.apply(optimizer, step + 1, {})

    layout = ShardLayout(model, optimizer)
    peers = PeerCopies(rank, world)
    peers.link(model, optimizer, layout, node_of_rank=["node"] * world, step=0, meta={})
    one_step(0, True)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    step = 1
    for _ in range(blocks):
        for mode in MODES:  # interleaved: each mode sees the same machine load
            for _ in range(steps):
                dist.barrier()
                start = time.perf_counter()
                one_step(step, mode == "forwarded")
                step += 1
                times[mode].append(time.perf_counter() - start)
    if rank == 0:
        base = statistics.median(times["none"])
        mib = peers.bytes_per_step() / 2**20
        held = peers.nbytes() / 2**20
        state = sum(n * torch.empty(0, dtype=d).element_size()
                    for d, n in layout.sizes.items()) / 2**20
        lines = [f"# peer_copy_overhead on CPU ({platform.machine()}, {os.cpu_count()} cores, "
                 "shared box, no GPU)", "",
                 f"debug model, W={world} gloo processes (one thread each), {blocks} interleaved "
                 f"blocks of {steps} steps per mode; median step time. Each rank sends "
                 f"{mib:.2f} MiB of gradients to its buddy per step and holds {held:.2f} MiB for "
                 f"its ward (its own weights and Adam moments: {state:.2f} MiB).", "",
                 "| peer copies | step s | overhead |", "|---|---|---|"]
        for mode in MODES:
            med = statistics.median(times[mode])
            lines.append(f"| {mode} | {med:.4f} | {med / base - 1:+.1%} |")
        lines += ["", f"Run: `python benchmarks/peer_copy_overhead.py --world {world} "
                  f"--blocks {blocks} --steps {steps}`, torch {torch.__version__}."]
        text = "\n".join(lines) + "\n"
        print(text)
        with open(out, "w") as f:
            f.write(text)


def _entry(rank: int, world: int, port: int, *args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.world < 2 or args.blocks < 1 or args.steps < 1:
        parser.error("--world must be >= 2 (a buddy is needed); --blocks and --steps >= 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(ROOT, "benchmarks", "results", "peer_copy_overhead-cpu.md")
    mp.spawn(_entry, args=(args.world, port, args.blocks, args.steps, out), nprocs=args.world,
             join=True)


if __name__ == "__main__":
    main()
