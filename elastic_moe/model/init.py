"""Seeded random initialisation that each rank draws only for its own shards.

A tensor's values are a pure function of ``(seed, parameter name, row block)``: dim 0 is cut
into fixed blocks of ``rows_per_block(shape)`` rows (a function of the full shape only), and
block ``b`` is drawn from its own generator, seeded from a hash of ``(seed, fqn, b)``. A rank
holding rows ``[a, z)`` of a tensor (an FSDP2 shard, an expert-parallel shard, or the whole
tensor in one process) draws just the blocks that overlap them. So:

* the full weights are the same for every world size and expert-parallel degree (W = 1, 2, 4
  give identical tensors), and
* time and memory per rank follow its shard size: the only transient is one row block.

FSDP2 and expert parallelism both shard dim 0 (``Shard(0)``); other placements are handled by
slicing the drawn block, so any box-shaped local shard works.

:func:`init_bytes_per_rank` computes, without allocating anything, what each rank of a mesh plan
holds after initialisation (the ``--init-dry-run`` report of ``jobs/train.py``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from elastic_moe.config import ModelConfig
    from elastic_moe.parallel.mesh import MeshPlan

logger = logging.getLogger(__name__)

# Elements drawn per block (1 MiB of fp32). Part of the init definition: changing it changes
# every initial weight.
BLOCK_ELEMENTS = 1 << 18


def rows_per_block(shape: tuple[int, ...] | torch.Size) -> int:
    """Rows of dim 0 per generator block; depends on the full shape only."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, BLOCK_ELEMENTS // max(row, 1))


def block_seed(seed: int, fqn: str, block: int) -> int:
    """A 63-bit generator seed for one row block of one parameter."""
    digest = hashlib.blake2b(f"{seed}/{fqn}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def local_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, local shape) of this rank's part of ``t`` (the whole tensor if plain)."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(offset), tuple(shape)
    return (0,) * t.dim(), tuple(t.shape)


def fill_normal_(dest: torch.Tensor, full_shape: tuple[int, ...], offset: tuple[int, ...],
                 std: float, seed: int, fqn: str) -> torch.Tensor:
    """Write the box ``offset + dest.shape`` of the seeded N(0, std) tensor ``fqn`` into ``dest``.

    Values are drawn in float32 on the CPU one row block at a time and copied straight into
    ``dest`` (any dtype or device): the only transient is one block.
    """
    shape = tuple(dest.shape)
    if math.prod(shape) == 0:
        return dest
    rows = rows_per_block(full_shape)
    lo, hi = offset[0], offset[0] + shape[0]
    inner = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:], strict=True))
    for block in range(lo // rows, (hi - 1) // rows + 1):
        start = block * rows
        count = min(rows, full_shape[0] - start)
        gen = torch.Generator().manual_seed(block_seed(seed, fqn, block))
        values = torch.empty((count, *full_shape[1:]), dtype=torch.float32)
        values.normal_(0.0, std, generator=gen)
        a, z = max(lo, start), min(hi, start + count)
        dest[a - lo:z - lo].copy_(values[(slice(a - start, z - start), *inner)])
    return dest


def draw_normal(full_shape: tuple[int, ...], offset: tuple[int, ...], shape: tuple[int, ...],
                std: float, seed: int, fqn: str) -> torch.Tensor:
    """The box ``offset + shape`` of the seeded N(0, std) tensor ``fqn`` (float32, CPU)."""
    return fill_normal_(torch.empty(shape, dtype=torch.float32), full_shape, offset, std, seed,
                        fqn)


@torch.no_grad()
def seeded_normal_(t: torch.Tensor, std: float, seed: int, fqn: str) -> None:
    """Fill this rank's part of parameter ``fqn`` with its slice of the seeded tensor."""
    if t.device.type == "meta":
        return
    offset, _ = local_box(t)
    local = t.to_local() if isinstance(t, DTensor) else t
    fill_normal_(local.data, tuple(t.shape), offset, std, seed, fqn)


# ---------------------------------------------------------------------------------------------
# dry run: what each rank holds after init, from shapes alone


@dataclass(frozen=True)
class InitReport:
    """Per-rank bytes of initialised parameters and buffers for one mesh plan."""

    world_size: int
    dp_shard_degree: int
    expert_parallel_degree: int
    bytes_per_rank: tuple[int, ...]  # parameters held by each rank (plus replicated buffers)
    transient_bytes: int  # the largest row block drawn at once
    total_bytes: int  # the whole model, for comparison

    def describe(self) -> str:
        gib = 2**30
        most, least = max(self.bytes_per_rank), min(self.bytes_per_rank)
        return (f"init at W={self.world_size} (dp_shard={self.dp_shard_degree}, "
                f"ep={self.expert_parallel_degree}): {most / gib:.2f} GiB on the fullest rank "
                f"({least / gib:.2f} GiB on the emptiest) + {self.transient_bytes / 2**20:.1f} "
                f"MiB transient per drawn block; whole model {self.total_bytes / gib:.1f} GiB")


def _chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of chunk ``index`` when ``torch.chunk`` splits ``rows`` into ``parts`` (FSDP2)."""
    size = -(-rows // parts)
    return max(0, min(size, rows - index * size))


def init_bytes_per_rank(model_cfg: ModelConfig, plan: MeshPlan,
                        dtype: torch.dtype = torch.float32) -> InitReport:
    """What each rank of ``plan`` holds after ``setup_model``; allocates nothing.

    Routed experts are split over ``ep`` ranks (then replicated); with ``ep == 1`` FSDP shards
    them like the dense weights: dim 0 in ``torch.chunk`` pieces over ``dp_shard``.
    """
    from elastic_moe.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    element = torch.empty((), dtype=dtype).element_size()
    per_rank = [0] * plan.world_size
    transient = 0
    total = 0
    ep = plan.expert_parallel_degree
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        total += math.prod(shape) * element
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        transient = max(transient, rows_per_block(shape) * row * 4)
        for rank in range(plan.world_size):
            dp_shard_rank = rank % plan.dp_shard_degree
            if ".experts." in name and ep > 1:
                rows = shape[0] // ep
            else:
                rows = _chunk_rows(shape[0], plan.dp_shard_degree, dp_shard_rank)
            per_rank[rank] += rows * row * element
    buffers = sum(b.numel() * 4 for n, b in model.named_buffers())
    return InitReport(world_size=plan.world_size, dp_shard_degree=plan.dp_shard_degree,
                      expert_parallel_degree=ep,
                      bytes_per_rank=tuple(b + buffers for b in per_rank),
                      transient_bytes=transient, total_bytes=total)
