"""Checkpoint cost: sync save, async save's blocking time, restore with resharding, vs torch.save.

For each model config, ``--world-size`` processes (gloo on CPU, expert parallelism over all of
them) train one step (so Adam's moments exist) and then, ``--repeats`` times each:

* **sync save**: ``Checkpointer(async_save=False).save`` until committed on every rank;
* **async save**: the time ``Checkpointer(async_save=True).save`` blocks the training loop
  (split into building the state dict and DCP's staging + hand-off), then the time until the
  background write is committed (``wait``); the previous save is always finished before the
  timed one starts, so this is the best case of "at most one save in flight";
* **restore, same layout**: ``restore`` into a fresh model at the same world size;

and, in one process afterwards:

* **restore with reshard**: the W-rank checkpoint restored at W=1 (a plain model);
* **torch.save / torch.load**: the same model + optimizer state of a single-process model,
  ``torch.save`` of ``{"model", "optim"}`` state dicts, and ``torch.load`` + ``load_state_dict``.

Times are medians over repeats (per repeat, the slowest rank, since the next collective waits for
it); MB/s uses the checkpoint's bytes on disk. Usage::

    python benchmarks/checkpoint.py --configs debug medium --repeats 5 --out results.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel_step import _report  # noqa: E402  (the benchmarks' shared helpers)

from elastic_moe.checkpoint import Checkpointer, TrainState, step_dir_name  # noqa: E402
from elastic_moe.config import ModelConfig, ParallelConfig, debug  # noqa: E402
from elastic_moe.model.transformer import Transformer  # noqa: E402
from elastic_moe.parallel import plan_mesh, setup_model  # noqa: E402
from elastic_moe.train.step import build_optimizer, train_step  # noqa: E402

SEQ_LEN = 32


def model_config(name: str) -> ModelConfig:
    cfg = debug().model
    if name == "debug":
        return cfg
    if name == "medium":  # ~28M parameters: ~330 MB of model + Adam state, CPU-feasible
        return dataclasses.replace(cfg, vocab_size=8192, dim=256, inter_dim=768, num_layers=4,
                                   num_heads=8, moe_inter_dim=256, num_routed_experts=16,
                                   num_expert_groups=4, q_lora_rank=128, kv_lora_rank=128)
    raise ValueError(f"--configs {name!r}: must be 'debug' or 'medium'")


def _one_step(model, optimizer, model_cfg: ModelConfig, world_size: int) -> None:
    train_cfg = dataclasses.replace(debug().train, seq_len=SEQ_LEN, warmup_steps=0)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, SEQ_LEN + 1),
                           generator=torch.Generator().manual_seed(0))
    train_step(model, optimizer, [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}], 0,
               train_cfg, model_cfg, dp_size=world_size)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _build(model_cfg: ModelConfig, world_size: int, seed: int):
    prefs = ParallelConfig(max_workers=world_size, gpus_per_node=world_size,
                           expert_parallel_degree=world_size)
    plan = plan_mesh(world_size, world_size, model_cfg, prefs)
    model = setup_model(model_cfg, plan, "cpu", seed)
    return model, build_optimizer(model, debug().train)


def _worker(rank: int, world_size: int, port: int, name: str, root: str, repeats: int,
            queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model_cfg = model_config(name)
        model, optimizer = _build(model_cfg, world_size, seed=0)
        _one_step(model, optimizer, model_cfg, world_size)
        times: dict[str, list[float]] = {k: [] for k in (
            "sync_save", "async_block_default", "async_block_cached", "async_state_dict", "stage_copy",
            "async_total", "restore_same")}

        sync = Checkpointer(os.path.join(root, "sync"), keep_last=1, async_save=False)
        for i in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            sync.save(i + 1, model, optimizer, TrainState(step=i + 1))
            times["sync_save"].append(_max_over_ranks(time.perf_counter() - start))

        # The async checkpointer is created once, as in training (its gloo group is reused).
        # "default" stages with DCP's own stager (a fresh deep copy per save), for comparison.
        for variant in ("default", "cached"):
            ckpt = Checkpointer(os.path.join(root, variant), keep_last=1, async_save=True)
            if variant == "default":
                ckpt._stager = None
            for i in range(repeats + 1):  # the first save warms up (and allocates buffers)
                dist.barrier()
                start = time.perf_counter()
                state_dict = Checkpointer._state_dict(model, optimizer)  # that part of save
                state_dict_s = time.perf_counter() - start
                if ckpt._stager is not None and i > 0:
                    start = time.perf_counter()
                    ckpt._stager.stage(state_dict)  # the staging copy alone
                    times["stage_copy"].append(_max_over_ranks(time.perf_counter() - start))
                dist.barrier()
                start = time.perf_counter()
                ckpt.save(i + 1, model, optimizer, TrainState(step=i + 1))
                block = time.perf_counter() - start
                ckpt.wait()
                total = time.perf_counter() - start
                if i > 0:
                    times[f"async_block_{variant}"].append(_max_over_ranks(block))
                    if variant == "cached":
                        times["async_state_dict"].append(_max_over_ranks(state_dict_s))
                        times["async_total"].append(_max_over_ranks(total))
        nbytes = _dir_bytes(os.path.join(root, "cached", step_dir_name(repeats + 1)))

        for _ in range(repeats):
            fresh, fresh_opt = _build(model_cfg, world_size, seed=1)
            dist.barrier()
            start = time.perf_counter()
            Checkpointer(os.path.join(root, "cached"), async_save=False).restore(fresh, fresh_opt)
            times["restore_same"].append(_max_over_ranks(time.perf_counter() - start))
        if rank == 0:
            queue.put({"times": times, "bytes": nbytes,
                       "params": _num_params(model_cfg)})
    finally:
        dist.destroy_process_group()


def _num_params(model_cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(model_cfg).parameters())


def _single_process(name: str, root: str, repeats: int) -> dict[str, list[float]]:
    """Restore the W-rank checkpoint at W=1 (reshard), and the torch.save/load baseline."""
    model_cfg = model_config(name)
    times: dict[str, list[float]] = {"restore_reshard": [], "torch_save": [], "torch_load": []}
    for _ in range(repeats):
        model = Transformer(model_cfg)
        model.init_weights(2)
        optimizer = build_optimizer(model, debug().train)
        start = time.perf_counter()
        state = Checkpointer(os.path.join(root, "cached"), async_save=False).restore(model,
                                                                                 optimizer)
        times["restore_reshard"].append(time.perf_counter() - start)
        assert state is not None
    path = os.path.join(root, "plain.pt")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, path)
        times["torch_save"].append(time.perf_counter() - start)
        start = time.perf_counter()
        loaded = torch.load(path)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optim"])
        times["torch_load"].append(time.perf_counter() - start)
    times["torch_bytes"] = [float(os.path.getsize(path))]
    return times


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load {os.getloadavg()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["debug", "medium"])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for name in args.configs:
        root = tempfile.mkdtemp(prefix=f"ckpt-bench-{name}-", dir=args.dir)
        queue = ctx.SimpleQueue()
        mp.spawn(_worker, args=(args.world_size, _free_port(), name, root, args.repeats, queue),
                 nprocs=args.world_size, join=True)
        result = queue.get()
        times = {**result["times"], **_single_process(name, root, args.repeats)}
        shutil.rmtree(root, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        mb = result["bytes"] / 1e6
        rows.append((name, result["params"], mb, med))
    lines = [f"machine: {_machine()}; W={args.world_size} (gloo, ep={args.world_size}); "
             f"medians of {args.repeats}", "",
             "| config | params | ckpt MB | sync save s (MB/s) | async blocking s | "
             "blocking / sync | of which: state dict s, staging copy s | "
             "async blocking, DCP default staging s (/ sync) | async until committed s | "
             "restore same W s (MB/s) | restore W->1 s (MB/s) | torch.save s (MB/s) | "
             "torch.load s (MB/s) | sync save / torch.save | reshard restore / torch.load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, params, mb, m in rows:
        tmb = m["torch_bytes"] / 1e6

        def rate(seconds: float, size: float = mb) -> str:
            return f"{seconds:.3f} ({size / seconds:.0f})"

        lines.append(
            f"| {name} | {params / 1e6:.1f}M | {mb:.1f} | {rate(m['sync_save'])} | "
            f"{m['async_block_cached']:.3f} | {m['async_block_cached'] / m['sync_save']:.1%} | "
            f"{m['async_state_dict']:.3f}, {m['stage_copy']:.3f} | "
            f"{m['async_block_default']:.3f} ({m['async_block_default'] / m['sync_save']:.1%}) | "
            f"{m['async_total']:.3f} | {rate(m['restore_same'])} | "
            f"{rate(m['restore_reshard'])} | {rate(m['torch_save'], tmb)} | "
            f"{rate(m['torch_load'], tmb)} | {m['sync_save'] / m['torch_save']:.2f}x | "
            f"{m['restore_reshard'] / m['torch_load']:.2f}x |")
    _report(lines, args.out)


if __name__ == "__main__":
    main()
