"""Fill an already-parallelized model from an HF-layout checkpoint, each rank reading its slices.

``jobs/train.py --init-from PATH`` starts training from published weights. Every rank builds its
model the usual way (meta device -> FSDP2 / expert parallelism -> ``init_weights``), then calls
:func:`load_hf_into`, which

1. reads ``config.json``, the index and every shard's header (no tensor data) and decides, the
   same way on every rank, whether the checkpoint fits the model: unknown tensors, missing ones,
   an architecture other than the model's, truncated or absent files are one clear error;
2. for each of this rank's parameters, reads only the rows of dim 0 that its FSDP or
   expert-parallel shard holds (byte ranges of the safetensors files, in chunks of at most
   ``chunk_bytes``), dequantizes FP8 block-quantized weights on the way, and copies them in.

No process holds more than its shards plus one chunk. Checkpoints written by ``transformers``
usually say ``num_nextn_predict_layers: 1`` but carry no MTP weights: such MTP modules keep
their fresh (seeded) initialisation, with one warning naming them. Torchtitan does the same job
with DCP's Hugging Face storage reader and a per-model key adapter; here the adapter is
:mod:`elastic_moe.model.hf_adapter` and the reader is :mod:`elastic_moe.model.safetensors_files`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from elastic_moe.config import ModelConfig
from elastic_moe.model.hf_adapter import config_from_hf, hf_to_ours
from elastic_moe.model.init import local_box
from elastic_moe.model.safetensors_files import CheckpointFiles, HFCheckpointError

logger = logging.getLogger(__name__)

# ModelConfig fields that are training choices, not architecture: not in config.json, free to
# override with --set when training from published weights.
TRAINING_CHOICES = ("expert_backend", "init_std", "bias_update_speed", "seq_aux_alpha")
_SKIP_BUFFERS = ("rope_cos", "rope_sin", "tokens_per_expert")
_CHUNK_BYTES = 64 << 20


@dataclass
class LoadReport:
    """What :func:`load_hf_into` did on this rank."""

    path: str
    tensors_read: int = 0  # HF tensors (or slices of them) read by this rank
    bytes_read: int = 0  # bytes read from storage by this rank
    largest_read_bytes: int = 0  # the largest single read (the transient beside the shards)
    fresh: list[str] = field(default_factory=list)  # our tensors left at their fresh init
    seconds: float = 0.0


def hf_config_to_model_config(path: str, **training_choices: Any) -> ModelConfig:
    """The :class:`ModelConfig` of the HF checkpoint at ``path`` (its ``config.json``).

    ``training_choices`` sets the fields config.json does not describe (:data:`TRAINING_CHOICES`);
    anything else is rejected.
    """
    bad = sorted(set(training_choices) - set(TRAINING_CHOICES))
    if bad:
        raise ValueError(f"model.{bad[0]}: comes from {path}/config.json and cannot be overridden "
                         f"with --init-from; only {list(TRAINING_CHOICES)} can")
    cfg = config_from_hf(CheckpointFiles.read_config(path))
    return dataclasses.replace(cfg, **training_choices)


def _check_architecture(model_cfg: ModelConfig, hf_cfg: ModelConfig, path: str) -> None:
    for f in dataclasses.fields(ModelConfig):
        if f.name in TRAINING_CHOICES:
            continue
        ours, theirs = getattr(model_cfg, f.name), getattr(hf_cfg, f.name)
        if ours != theirs:
            raise ValueError(f"model.{f.name}={ours!r} but {path}/config.json gives {theirs!r}: "
                             "the model must be built from the checkpoint's config "
                             "(hf_config_to_model_config)")


@dataclass(frozen=True, slots=True)
class _Piece:
    """One HF tensor and the part of one of our tensors it fills."""

    hf_name: str
    target: str
    index: tuple[Any, ...]  # () = the whole tensor; (expert,) or (expert, rows) = one expert
    scale_name: str | None  # FP8: the weight_scale_inv tensor


def _slot(index: tuple[Any, ...]) -> Any:
    if not index:
        return "all"
    return (index[0], index[1].start) if len(index) > 1 else (index[0],)


def _plan(files: CheckpointFiles, model_cfg: ModelConfig,
          shapes: dict[str, tuple[int, ...]]) -> tuple[list[_Piece], list[str]]:
    """Pieces to read, and our tensors with no data at all (MTP modules only; else an error)."""
    quant = files.config.get("quantization_config")
    pieces: list[_Piece] = []
    unknown: list[str] = []
    errors: list[str] = []
    covered: dict[str, int] = defaultdict(int)
    slots: dict[str, set[Any]] = defaultdict(set)
    for hf_name, entry in files.tensors.items():
        if quant is not None and hf_name.endswith("_scale_inv"):
            continue
        try:
            target = hf_to_ours(model_cfg, hf_name)
        except KeyError:
            unknown.append(hf_name)
            continue
        if target is None:  # a known redundant copy (released MTP layers' embedding and head)
            continue
        if target.name not in shapes:
            unknown.append(hf_name)
            continue
        dest = torch.empty(shapes[target.name], device="meta")[target.index]
        if tuple(dest.shape) != entry.shape:
            errors.append(f"{hf_name}: shape {entry.shape} does not fit {target.name}"
                          f"{list(target.index) if target.index else ''} {tuple(dest.shape)}")
            continue
        slot = _slot(target.index)
        if slot in slots[target.name]:
            errors.append(f"{hf_name}: a second tensor for the same part of {target.name}")
            continue
        slots[target.name].add(slot)
        covered[target.name] += dest.numel()
        scale = None
        if entry.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = hf_name + "_scale_inv"
            if quant is None or scale not in files.tensors:
                errors.append(f"{hf_name}: FP8 weight without {scale} (or without "
                              "quantization_config.weight_block_size in config.json)")
                continue
        pieces.append(_Piece(hf_name, target.name, target.index, scale))
    missing = sorted(n for n, s in shapes.items() if covered[n] < math.prod(s))
    fresh = []
    for depth in range(model_cfg.num_mtp_modules):
        prefix = f"mtp.{depth}."
        module = [n for n in shapes if n.startswith(prefix)]
        if all(covered[n] == 0 for n in module):  # the whole module is absent: init fresh
            fresh += module
    missing = [n for n in missing if n not in fresh]
    lines = []
    if unknown:
        lines.append(f"{len(unknown)} unknown tensors (not part of this architecture): "
                     f"{unknown[:20]}" + (" ..." if len(unknown) > 20 else ""))
    if missing:
        lines.append(f"{len(missing)} missing tensors (no data for them in the checkpoint): "
                     f"{missing[:20]}" + (" ..." if len(missing) > 20 else ""))
    lines += errors[:20]
    if lines:
        raise ValueError(f"{files.path}: checkpoint does not match its config.json; "
                         + "; ".join(lines))
    return pieces, fresh


def _dequantize(files: CheckpointFiles, piece: _Piece, rows: torch.Tensor, lo: int,
                hi: int) -> torch.Tensor:
    """``rows`` ([lo, hi) of an FP8 weight) times the matching part of its block scales."""
    assert piece.scale_name is not None
    block_rows, block_cols = files.config["quantization_config"]["weight_block_size"]
    first = lo // block_rows
    scale = files.read_rows(piece.scale_name, first, -(-hi // block_rows)).float()
    expanded = scale.repeat_interleave(block_rows, 0)[lo - first * block_rows:]
    expanded = expanded[: hi - lo].repeat_interleave(block_cols, 1)[:, : rows.shape[1]]
    return rows.float() * expanded


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.no_grad()
def load_hf_into(model: nn.Module, path: str, model_cfg: ModelConfig, *,
                 chunk_bytes: int = _CHUNK_BYTES) -> LoadReport:
    """Copy the HF checkpoint at ``path`` (directory or fsspec URL) into ``model``'s shards.

    ``model`` is a ``Transformer`` built for ``model_cfg`` (which must match the checkpoint's
    config.json, training choices aside), plain or parallelized with FSDP2 / expert parallelism,
    already initialised (``init_weights``): tensors the checkpoint lacks -- whole MTP modules
    only -- keep those values. Reads only this rank's rows; no collectives (every rank checks
    the same headers, so all raise the same ``ValueError`` or none does).
    """
    started = time.perf_counter()
    report = LoadReport(path=path)
    with CheckpointFiles(path) as files:
        _check_architecture(model_cfg, config_from_hf(files.config), path)
        state = {name: t for name, t in model.state_dict(keep_vars=True).items()
                 if not name.endswith(_SKIP_BUFFERS)}
        shapes = {name: tuple(t.shape) for name, t in state.items()}
        pieces, report.fresh = _plan(files, model_cfg, shapes)
        if report.fresh and _is_rank0():
            modules = sorted({".".join(n.split(".")[:2]) for n in report.fresh})
            logger.warning("%s has no weights for MTP module(s) %s (config.json says "
                           "num_nextn_predict_layers=%d; transformers does not save them): "
                           "they start from a fresh seeded init: %s", path, modules,
                           model_cfg.num_mtp_modules, report.fresh)
        for piece in pieces:
            _read_piece(files, piece, state[piece.target], report, chunk_bytes)
    report.seconds = time.perf_counter() - started
    logger.info("loaded %s: %d tensors, %.1f MB read on this rank in %.1f s", path,
                report.tensors_read, report.bytes_read / 1e6, report.seconds)
    return report


def _read_piece(files: CheckpointFiles, piece: _Piece, param: torch.Tensor, report: LoadReport,
                chunk_bytes: int) -> None:
    offset, local_shape = local_box(param)
    full = tuple(param.shape)
    if any(offset[1:]) or tuple(local_shape[1:]) != full[1:]:
        raise HFCheckpointError(f"{piece.target}: sharded on a dim other than 0 "
                                f"(placements {getattr(param, 'placements', None)}); "
                                "load_hf_into reads row ranges of dim 0 only")
    local = param.to_local() if isinstance(param, DTensor) else param
    local = local.data
    lo, hi = offset[0], offset[0] + local_shape[0]
    entry = files.tensors[piece.hf_name]
    if piece.index:  # one expert: row `expert` of our dim 0, the whole HF tensor
        expert = piece.index[0]
        if not lo <= expert < hi:
            return
        dest = local[(expert - lo, *piece.index[1:])]
        src_lo, src_hi = 0, entry.shape[0]
    else:
        dest = local
        src_lo, src_hi = lo, hi
    if src_hi <= src_lo:
        return
    if not entry.shape:  # a scalar
        dest.copy_(files.read_rows(piece.hf_name, 0, 1))
        report.tensors_read += 1
        return
    step = max(1, chunk_bytes // max(entry.row_bytes, 1))
    for a in range(src_lo, src_hi, step):
        z = min(a + step, src_hi)
        rows = files.read_rows(piece.hf_name, a, z)
        nbytes = rows.numel() * rows.element_size()
        report.bytes_read += nbytes
        report.largest_read_bytes = max(report.largest_read_bytes, nbytes)
        if piece.scale_name is not None:
            rows = _dequantize(files, piece, rows, a, z)
        dest[a - src_lo:z - src_lo].copy_(rows)
    report.tensors_read += 1
