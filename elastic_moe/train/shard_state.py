"""A rank's training state as shards with global coordinates: take, move, and refill in memory.

Live recovery (the elastic worker group in ``actors/``) never restarts the survivors and never
reads storage when it can help it. What it needs from the library is here:

* :func:`take_shards` copies this rank's model parameters, persistent buffers and optimizer state
  into a :class:`ShardSet`: per tensor the local block and where it sits in the global tensor
  (DTensor shards of FSDP2 and expert parallelism know their global offset). Nothing collective.
* :func:`fill_from_shards` writes any layout's model and optimizer from shard sets taken at
  another layout (another world size, EP degree, HSDP split): each target block is assembled from
  the overlapping source blocks, and every element must be covered, or it raises naming the
  tensors that are not. Replicas (HSDP, expert replicas) simply overlap.
* :class:`ShardLayout` finds a rank's state tensors and their blocks once per layout; the peer
  copies (:mod:`elastic_moe.train.peer_copies`) are planned over its specs. It also lists the
  rank's expert replicas (:mod:`elastic_moe.parallel.expert_replicas`) as one-expert blocks of
  their owners' tensors (``replica=True``): sources for a restore, never copied themselves.

Per-step accumulators (``tokens_per_expert``) are not state: they are zero between steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# the blocks' descriptions are torch-free: the coordinator, which never loads torch, reads them
from elastic_moe.train.elastic import ShardManifest, ShardSpec

logger = logging.getLogger(__name__)

# Buffers that are zeroed at every step boundary: never carried across a rebuild.
TRANSIENT_BUFFERS = ("tokens_per_expert",)


@dataclass(slots=True)
class ShardSet:
    """One rank's state at one committed step: block specs, their tensors, and the step's
    world-size-free counters (data position, tokens seen)."""

    rank: int
    step: int
    specs: list[ShardSpec]
    tensors: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    # one buffer per dtype that ``tensors`` are views of, when they were taken that way
    flat: dict[torch.dtype, torch.Tensor] | None = None

    def flat_buffers(self) -> dict[torch.dtype, torch.Tensor]:
        return self.flat if self.flat is not None else _flatten(self.tensors)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def manifest(self) -> ShardManifest:
        return ShardManifest(rank=self.rank, step=self.step, specs=list(self.specs),
                             meta=dict(self.meta))

    # Pickled as one byte buffer per dtype: Ray moves numpy buffers without copies, while
    # hundreds of small tensors would each be pickled on their own (torch's reductions even put
    # each storage in shared memory).
    def __getstate__(self) -> dict[str, Any]:
        flat = self.flat_buffers()
        return {"rank": self.rank, "step": self.step, "specs": self.specs, "meta": self.meta,
                "buffers": {str(dtype).removeprefix("torch."): t.contiguous().view(torch.uint8)
                            .numpy() for dtype, t in flat.items()}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import warnings

        self.rank, self.step, self.specs, self.meta = (state["rank"], state["step"],
                                                       state["specs"], state["meta"])
        with warnings.catch_warnings():  # read-only buffers from the object store: never written
            warnings.simplefilter("ignore", UserWarning)
            flat = {getattr(torch, name): torch.from_numpy(buf).view(getattr(torch, name))
                    for name, buf in state["buffers"].items()}
        self.tensors = unflatten(flat, self.specs)
        self.flat = flat


def _local_and_offset(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = tensor.to_local()
        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                          tensor.placements)
        return local, tuple(int(o) for o in offset)
    return tensor, (0,) * tensor.dim()


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None
                  ) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) for every piece of training state, in a fixed order on every rank.

    Keys: ``model/<fqn>`` for parameters and persistent buffers, ``optim/<fqn>/<name>`` for the
    optimizer's per-parameter state (created if the optimizer has not stepped yet).
    """
    persistent = set(model.state_dict().keys())
    out: list[tuple[str, torch.Tensor]] = []
    params = list(model.named_parameters())
    for name, param in params:
        out.append((f"model/{name}", param.data if not isinstance(param, DTensor) else param))
    for name, buf in model.named_buffers():
        if name in persistent and name.rsplit(".", 1)[-1] not in TRANSIENT_BUFFERS:
            out.append((f"model/{name}", buf))
    if optimizer is not None:
        ensure_optimizer_state(optimizer)
        for name, param in params:
            state = optimizer.state.get(param, {})
            for key in sorted(state):
                value = state[key]
                if isinstance(value, torch.Tensor):
                    out.append((f"optim/{name}/{key}", value))
    return out


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW-shaped state (zeros, step 0) if it has none yet, so a state
    can be filled in before the first step."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param in optimizer.state and optimizer.state[param]:
                continue
            optimizer.state[param] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }


class ShardLayout:
    """This rank's state tensors and their block specs, found once per layout: a snapshot is
    then one copy into one buffer per dtype (the parameters, Adam moments and buffers are
    updated in place, so the same tensors hold every step's values)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.specs: list[ShardSpec] = []
        self.locals: list[torch.Tensor] = []
        for key, tensor in state_tensors(model, optimizer):
            local, offset = _local_and_offset(tensor)
            self.specs.append(ShardSpec(key=key, dtype=str(local.dtype).removeprefix("torch."),
                                        shape=tuple(local.shape),
                                        global_shape=tuple(tensor.shape), offset=offset))
            self.locals.append(local.detach())
        for key, block, global_shape, offset in _replica_blocks(model):
            self.specs.append(ShardSpec(key=key, dtype=str(block.dtype).removeprefix("torch."),
                                        shape=tuple(block.shape), global_shape=global_shape,
                                        offset=offset, replica=True))
            self.locals.append(block)
        self.sizes = flat_sizes(self.specs)

    def take(self, *, rank: int, step: int, meta: dict[str, Any] | None = None) -> ShardSet:
        """A CPU copy of the state as it is now (no collectives)."""
        flat = {dtype: torch.empty(n, dtype=dtype) for dtype, n in self.sizes.items()}
        tensors = unflatten(flat, self.specs)
        with torch.no_grad():
            for dst, src in zip(tensors, self.locals, strict=True):
                dst.copy_(src)
        return ShardSet(rank=rank, step=step, specs=list(self.specs), tensors=tensors,
                        meta=dict(meta or {}), flat=flat)


def _replica_blocks(model: nn.Module) -> list[tuple[str, torch.Tensor, tuple[int, ...],
                                                   tuple[int, ...]]]:
    """Every module's expert replicas (modules that have ``replica_blocks``: expert
    parallelism, which this library layer does not import)."""
    out = []
    for name, module in model.named_modules():
        blocks = getattr(module, "replica_blocks", None)
        if callable(blocks):
            out += blocks(name)
    return out


def take_shards(model: nn.Module, optimizer: torch.optim.Optimizer | None, *, rank: int,
                step: int, meta: dict[str, Any] | None = None) -> ShardSet:
    """A CPU copy of this rank's state (no collectives)."""
    return ShardLayout(model, optimizer).take(rank=rank, step=step, meta=meta)


def _overlap(dst: ShardSpec, src: ShardSpec) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    dst_idx, src_idx = [], []
    for d_off, d_len, s_off, s_len in zip(dst.offset, dst.shape, src.offset, src.shape,
                                          strict=True):
        lo, hi = max(d_off, s_off), min(d_off + d_len, s_off + s_len)
        if lo >= hi:
            return None
        dst_idx.append(slice(lo - d_off, hi - d_off))
        src_idx.append(slice(lo - s_off, hi - s_off))
    return tuple(dst_idx), tuple(src_idx)


def needed_sources(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                   manifests: Sequence[ShardManifest]) -> list[int]:
    """Indices into ``manifests`` whose blocks this rank's new layout needs (greedy cover: a
    source already chosen is preferred, so replicas are not fetched twice)."""
    by_key: dict[str, list[tuple[int, ShardSpec]]] = {}
    for index, manifest in enumerate(manifests):
        for spec in manifest.specs:
            by_key.setdefault(spec.key, []).append((index, spec))
    chosen: list[int] = []
    for key, tensor in state_tensors(model, optimizer):
        local, offset = _local_and_offset(tensor)
        target = ShardSpec(key, "", tuple(local.shape), tuple(tensor.shape), offset)
        boxes = [(index, spec, overlap[0]) for index, spec in by_key.get(key, [])
                 if (overlap := _overlap(target, spec)) is not None]
        # chosen sources first, then owners' blocks before expert copies (one copy covers one
        # expert of a block: fetching a whole shard set for it is the last resort), then the
        # rest; take blocks until the target is covered
        boxes.sort(key=lambda c: (c[0] not in chosen, c[1].replica, c[0]))
        cover = _Cover(target, [(spec, dst_box) for _, spec, dst_box in boxes])
        for index, spec, dst_box in boxes:
            if not cover.adds(spec, dst_box):
                continue
            if index not in chosen:
                chosen.append(index)
            if cover.complete():
                break
    return sorted(chosen)


class _Cover:
    """Which elements of a target block its source blocks (``boxes``: each block's overlap with
    the target) cover, as they are taken one by one. Blocks of one layout are disjoint or
    identical (replicas), which counting handles. An expert copy (one row of its owner's block)
    overlaps its owner's block: with copies among the blocks, covered rows are marked (copies
    and the expert blocks they overlap span every trailing dim), or elements when some block
    does not."""

    def __init__(self, target: ShardSpec,
                 boxes: Sequence[tuple[ShardSpec, tuple[slice, ...]]]) -> None:
        self.target = target
        self.count = 0
        self.seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        self.mask: torch.Tensor | None = None
        self.rows = False  # the mask is over dim 0 only
        if any(spec.replica for spec, _ in boxes):
            self.rows = len(target.shape) > 0 and all(
                b.start == 0 and b.stop == n
                for _, box in boxes for b, n in zip(box[1:], target.shape[1:], strict=True))
            self.mask = torch.zeros(target.shape[:1] if self.rows else target.shape,
                                    dtype=torch.bool)

    def adds(self, spec: ShardSpec, dst_box: tuple[slice, ...]) -> bool:
        """Take ``spec`` (its overlap ``dst_box``); False if it adds nothing."""
        if (spec.offset, spec.shape) in self.seen:
            return False
        self.seen.add((spec.offset, spec.shape))
        if self.mask is None:
            self.count += _box_numel(dst_box)
            return True
        region = self.mask[dst_box[0]] if self.rows else self.mask[dst_box]  # a view
        if bool(region.all()):
            return False
        region.fill_(True)
        return True

    def covered(self) -> int:
        if self.mask is None:
            return self.count
        marked = int(self.mask.sum())
        return marked * math.prod(self.target.shape[1:]) if self.rows else marked

    def complete(self) -> bool:
        return self.covered() >= self.target.numel


def _box_numel(box: tuple[slice, ...]) -> int:
    n = 1
    for s in box:
        n *= s.stop - s.start
    return n


@torch.no_grad()
def fill_from_shards(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     sources: Iterable[ShardSet]) -> None:
    """Overwrite this rank's state from blocks taken at any layout; every element must be
    covered. Overlapping blocks (replicas) hold equal values, so any cover is exact."""
    blocks: dict[str, list[tuple[ShardSpec, torch.Tensor]]] = {}
    for source in sources:
        for spec, tensor in zip(source.specs, source.tensors, strict=True):
            blocks.setdefault(spec.key, []).append((spec, tensor))
    missing: list[str] = []
    for key, tensor in state_tensors(model, optimizer):
        local, offset = _local_and_offset(tensor)
        target = ShardSpec(key, "", tuple(local.shape), tuple(tensor.shape), offset)
        known = blocks.get(key, [])
        if known and tuple(known[0][0].global_shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: source shape {known[0][0].global_shape} != "
                             f"{tuple(tensor.shape)} (a different model config)")
        # Every overlapping block holds equal values (replicas of the same state): copy each
        # distinct block once, and check that the target is covered.
        overlaps = [(spec, src, overlap) for spec, src in known
                    if (overlap := _overlap(target, spec)) is not None]
        cover = _Cover(target, [(spec, overlap[0]) for spec, _, overlap in overlaps])
        for spec, src, (dst_box, src_box) in overlaps:
            if cover.adds(spec, dst_box):
                local[dst_box].copy_(src[src_box])
        covered = cover.covered()
        if covered != target.numel:
            missing.append(f"{key} ({target.numel - covered} of {target.numel} elements of the "
                           f"block {target.shape} at {target.offset}; sources have "
                           f"{sorted((s.offset, s.shape) for s, _ in known)})")
    if missing:
        raise ValueError(f"state not covered by the sources: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    for module in model.modules():
        for name in TRANSIENT_BUFFERS:
            buf = getattr(module, name, None)
            if isinstance(buf, torch.Tensor):
                buf.zero_()


def _flatten(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t.reshape(-1))
    return {dtype: torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
            for dtype, parts in groups.items()}


def unflatten(flat: dict[torch.dtype, torch.Tensor], specs: Sequence[ShardSpec]
               ) -> list[torch.Tensor]:
    cursors = dict.fromkeys(flat, 0)
    out = []
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        start = cursors[dtype]
        out.append(flat[dtype][start:start + spec.numel].view(spec.shape))
        cursors[dtype] = start + spec.numel
    return out


def flat_sizes(specs: Sequence[ShardSpec]) -> dict[torch.dtype, int]:
    sizes: dict[torch.dtype, int] = {}
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        sizes[dtype] = sizes.get(dtype, 0) + spec.numel
    return sizes
