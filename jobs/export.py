"""Export a sharded training checkpoint as a Hugging Face-layout safetensors model.

    python jobs/export.py --checkpoint outputs/debug/checkpoints --output outputs/debug/hf
    python jobs/export.py --checkpoint outputs/debug/checkpoints/step_00000040 --output hf/

``--checkpoint`` is a checkpoint root (its newest committed step is used; ``--step`` picks
another) or one step directory. Runs in one process without a process group, whatever world
size wrote the checkpoint, and streams: only one output shard's tensors are in memory at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python jobs/export.py` from a checkout, without installing: put the checkout on sys.path. Never
# for an installed copy, whose parent folder is site-packages/elastic_moe.
if os.path.isfile(os.path.join(ROOT, "pyproject.toml")) and ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from elastic_moe.checkpoint import (  # noqa: E402
    COMMIT_FILE,
    STATE_FILE,
    Checkpointer,
    CheckpointError,
    step_dir_name,
)
from elastic_moe.config import ModelConfig  # noqa: E402
from elastic_moe.model.hf import write_sharded  # noqa: E402

log = logging.getLogger("export")


def resolve_step_dir(checkpoint: str, step: int | None) -> str:
    if os.path.exists(os.path.join(checkpoint, COMMIT_FILE)):
        if step is not None:
            raise ValueError(f"--step {step}: --checkpoint is already one step directory")
        return checkpoint
    ckpt = Checkpointer(checkpoint, async_save=False)
    committed = ckpt.committed_steps()
    if not committed:
        raise ValueError(f"--checkpoint {checkpoint!r}: no committed checkpoint found there")
    chosen = committed[-1] if step is None else step
    if chosen not in committed:
        raise ValueError(f"--step {step}: not a committed step; committed: {committed}")
    ckpt.verify(chosen)
    return os.path.join(checkpoint, step_dir_name(chosen))


def export(step_dir: str, output: str, dtype: torch.dtype | None = None,
           max_shard_bytes: int = 4 * 1024**3) -> list[str]:
    import torch.distributed.checkpoint as dcp

    with open(os.path.join(step_dir, STATE_FILE)) as f:
        state = json.load(f)
    cfg = ModelConfig(**state["model_config"])
    reader = dcp.FileSystemReader(step_dir)
    metadata = reader.read_metadata()
    shapes = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(meta, "size"):
            shapes[key.removeprefix("model.")] = (tuple(meta.size), meta.properties.dtype)
    if not shapes:
        raise ValueError(f"{step_dir}: no model tensors in the checkpoint metadata")
    if dtype is None:
        dtype = next(d for name, (_, d) in shapes.items() if "e_score" not in name)

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        part = {name: torch.empty(shapes[name][0], dtype=shapes[name][1]) for name in names}
        dcp.load({"model": part}, storage_reader=dcp.FileSystemReader(step_dir), no_dist=True)
        return part

    files = write_sharded(cfg, shapes, fetch, output, dtype, max_shard_bytes)
    log.info("exported step %d from %s to %s (%d shards)", state["step"], step_dir, output,
             len(files))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint root or step directory")
    parser.add_argument("--output", required=True, help="directory for the HF-layout model")
    parser.add_argument("--step", type=int, help="export this committed step (default: newest)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="output dtype (default: as trained)")
    parser.add_argument("--max-shard-gb", type=float, default=4.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        step_dir = resolve_step_dir(args.checkpoint, args.step)
        files = export(step_dir, args.output, getattr(torch, args.dtype) if args.dtype else None,
                       int(args.max_shard_gb * 1024**3))
    except (ValueError, OSError, CheckpointError) as exc:
        parser.error(str(exc))
    print(f"wrote {len(files)} shards to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
