"""``--init-from`` cost: peak RSS per rank and wall time of a sharded HF import vs one hf.load.

Writes a random bf16 HF-layout checkpoint of about 1.1 GB (``bench`` config below, several
safetensors shards; generated tensor by tensor, never a whole model in memory), then:

* **W ranks** (gloo, 1 torch thread each, expert parallelism over all of them): what a training
  worker does on ``--init-from``: ``setup_model`` (meta build -> FSDP2 / EP -> per-shard seeded
  init) then ``load_hf_into``; each rank reports the time of both, its peak RSS (``ru_maxrss``)
  above its RSS before the model was built, and the bytes of its shards (fp32);
* **one hf.load** in a fresh process: the whole model built and filled in one process (fp32).

Target per rank: peak RSS above baseline <= 1.25 x (its shards + the largest single tensor of
the checkpoint, in fp32). Usage::

    python benchmarks/init_from.py --world-sizes 1 2 --out benchmarks/results/init_from-cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel_step import _report  # noqa: E402  (the benchmarks' shared helpers)

from elastic_moe.config import ModelConfig, ParallelConfig, debug  # noqa: E402
from elastic_moe.model import hf  # noqa: E402
from elastic_moe.model.hf_sharded import load_hf_into  # noqa: E402
from elastic_moe.model.init import local_box  # noqa: E402
from elastic_moe.model.safetensors_files import CheckpointFiles  # noqa: E402
from elastic_moe.model.transformer import Transformer  # noqa: E402
from elastic_moe.parallel import plan_mesh, setup_model  # noqa: E402
from tests.integration.multiproc import free_port  # noqa: E402  (one port picker for all)

MIB = 2**20


def bench_config() -> ModelConfig:
    """~560M parameters: 1.1 GB in bf16, 2.2 GB as fp32 training weights."""
    return dataclasses.replace(
        debug().model, vocab_size=32000, dim=1024, inter_dim=4096, num_layers=6,
        num_dense_layers=1, num_heads=8, moe_inter_dim=1024, num_routed_experts=24,
        num_shared_experts=1, num_activated_experts=2, num_expert_groups=4, num_limited_groups=2,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, max_seq_len=256, original_seq_len=256, rope_factor=1.0)


def write_checkpoint(cfg: ModelConfig, path: str) -> int:
    """Random bf16 weights in the HF layout, one tensor generated at a time; returns bytes."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()
              if not k.startswith("rope_") and "tokens_per_expert" not in k}
    gen = torch.Generator().manual_seed(0)

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        return {n: torch.randn(shapes[n][0], generator=gen) * 0.02 for n in names}

    hf.write_sharded(cfg, shapes, fetch, path, torch.bfloat16, max_shard_bytes=300 * MIB)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rank_worker(rank: int, world_size: int, port: int, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = bench_config()
    plan = plan_mesh(world_size, world_size, cfg,
                     ParallelConfig(max_workers=world_size, gpus_per_node=world_size))
    baseline = rss_now()
    started = time.perf_counter()
    model = setup_model(cfg, plan, "cpu", seed=0)
    init_s = time.perf_counter() - started
    peak_after_init = peak_rss()
    started = time.perf_counter()
    report = load_hf_into(model, path, cfg)
    load_s = time.perf_counter() - started
    shard = sum(math.prod(local_box(t)[1]) * t.element_size()
                for t in model.state_dict(keep_vars=True).values())
    result = {"rank": rank, "init_s": init_s, "load_s": load_s, "baseline": baseline,
              "peak": peak_rss(), "peak_after_init": peak_after_init, "shard": shard,
              "read": report.bytes_read, "largest_read": report.largest_read_bytes,
              "ep": plan.expert_parallel_degree}
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
    else:
        gathered = [result]
    if rank == 0:
        torch.save(gathered, out)


def _hf_load_worker(_: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    baseline = rss_now()
    started = time.perf_counter()
    model = hf.load(path, dtype=torch.float32)
    seconds = time.perf_counter() - started
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    torch.save({"seconds": seconds, "baseline": baseline, "peak": peak_rss(), "model": size}, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default="", help="checkpoint directory (default: a temp dir)")
    parser.add_argument("--out", default="", help="also write the markdown table here")
    args = parser.parse_args(argv)
    cfg = bench_config()
    tmp = tempfile.mkdtemp(prefix="init_from_bench_")
    path = args.dir or os.path.join(tmp, "hf")
    if not os.path.exists(os.path.join(path, "config.json")):
        started = time.perf_counter()
        size = write_checkpoint(cfg, path)
        print(f"wrote {size / 1e9:.2f} GB to {path} in {time.perf_counter() - started:.0f} s")
    files = CheckpointFiles(path)
    ckpt_bytes = sum(e.end - e.start for e in files.tensors.values())
    largest = max(files.tensors.values(), key=lambda e: math.prod(e.shape))
    largest_fp32 = math.prod(largest.shape) * 4
    rows = []
    for world_size in args.world_sizes:
        out = os.path.join(tmp, f"w{world_size}.pt")
        mp.spawn(_rank_worker, args=(world_size, free_port(), path, out), nprocs=world_size,
                 join=True)
        for r in torch.load(out):
            target = 1.25 * (r["shard"] + largest_fp32)
            used = r["peak"] - r["baseline"]
            rows.append(f"| --init-from W={world_size} (ep={r['ep']}) rank {r['rank']} | "
                        f"{r['init_s']:.1f} + {r['load_s']:.1f} | {r['shard'] / MIB:.0f} | "
                        f"{r['read'] / MIB:.0f} | {used / MIB:.0f} | {target / MIB:.0f} | "
                        f"{used / target:.2f} | {r['peak'] / MIB:.0f} |")
    out = os.path.join(tmp, "hf_load.pt")
    mp.spawn(_hf_load_worker, args=(path, out), nprocs=1, join=True)
    r = torch.load(out)
    used = r["peak"] - r["baseline"]
    target = 1.25 * (r["model"] + largest_fp32)
    rows.append(f"| hf.load (one process, fp32) | {r['seconds']:.1f} | {r['model'] / MIB:.0f} | "
                f"{ckpt_bytes / MIB:.0f} | {used / MIB:.0f} | {target / MIB:.0f} | "
                f"{used / target:.2f} | {r['peak'] / MIB:.0f} |")
    load = os.getloadavg()
    lines = [
        f"checkpoint: {ckpt_bytes / 1e9:.2f} GB bf16 in {len({e.file for e in files.tensors.values()})}"
        f" shards, {sum(math.prod(e.shape) for e in files.tensors.values()) / 1e6:.0f}M "
        f"parameters; largest tensor {largest.name} {largest.shape} = {largest_fp32 / MIB:.0f} "
        "MiB in fp32",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        "",
        "| what | seconds (init + load) | shards MiB (fp32) | read MiB | peak RSS - baseline "
        "MiB | target MiB | ratio | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    _report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
