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

:func:`elastic_moe.parallel.memory.init_bytes_per_rank` computes, without allocating anything,
what each rank of a mesh plan holds after initialisation (the ``--init-dry-run`` report of
``jobs/train.py``).
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch
from torch.distributed.tensor import DTensor

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
