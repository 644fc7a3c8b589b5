"""Hugging Face-layout DeepSeek-V3 checkpoints (config.json + safetensors shards) in and out.

The layout is the one DeepSeek released and ``transformers``' DeepseekV3ForCausalLM reads; the
mapping between its names and ours is :mod:`elastic_moe.model.hf_adapter`. Saving streams one
shard at a time. Loading goes through :func:`elastic_moe.model.hf_sharded.load_hf_into` (one
tensor chunk at a time, FP8 block-quantized weights -- ``weight_scale_inv`` -- dequantized on the
way), the same reader every rank of a sharded ``--init-from`` uses. Checkpoints saved by
``transformers`` carry no MTP weights although their config asks for MTP: those modules start
fresh, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from elastic_moe.config import ModelConfig
from elastic_moe.model.hf_adapter import config_to_hf, ours_to_hf
from elastic_moe.model.hf_sharded import hf_config_to_model_config, load_hf_into
from elastic_moe.model.safetensors_files import INDEX_FILE, CheckpointFiles
from elastic_moe.model.transformer import Transformer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# load


def load(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         seed: int = 0) -> Transformer:
    """Build the model described by ``path/config.json`` in this process and fill it.

    ``dtype`` defaults to the config's ``torch_dtype`` (float32 if absent); the router bias stays
    float32. Streams through :func:`~elastic_moe.model.hf_sharded.load_hf_into` (the loader
    ``--init-from`` uses on every rank), so the same checkpoints load, with the same errors:
    MTP modules a checkpoint lacks (transformers saves none) start from a fresh init with
    ``seed``, with a warning; any other missing or unknown tensor is an error.
    """
    cfg = hf_config_to_model_config(path)
    hf_cfg = CheckpointFiles.read_config(path)
    if dtype is None:
        dtype = getattr(torch, str(hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32"))
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.init_weights(seed=seed)  # buffers, and MTP modules the checkpoint may lack
    model.to(dtype)
    for module in model.modules():  # the bias only ever moves by +-gamma: keep it exact
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.float()
    load_hf_into(model, path, cfg)
    return model


# ---------------------------------------------------------------------------------------------
# save


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save(model: Transformer, path: str, dtype: torch.dtype | None = None,
         max_shard_bytes: int = 4 * 1024**3) -> list[str]:
    """Write ``config.json``, safetensors shards and the index in the released DeepSeek layout.

    Tensors are converted and written one shard at a time. DTensor parameters are gathered one
    tensor at a time (collective: call on every rank; only rank 0 needs to keep the files).
    Returns the shard file names.
    """
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("rope_") and "tokens_per_expert" not in k}
    if dtype is None:
        dtype = next(iter(state.values())).dtype

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            t = state[name]
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[name] = t.detach().cpu()
        return out

    shapes = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    return write_sharded(model.cfg, shapes, fetch, path, dtype, max_shard_bytes)


def write_sharded(cfg: ModelConfig, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  fetch: Callable[[list[str]], dict[str, torch.Tensor]], path: str,
                  dtype: torch.dtype, max_shard_bytes: int = 4 * 1024**3) -> list[str]:
    """Write our state (``name -> (shape, dtype)``, tensors produced by ``fetch(names)`` one
    shard's worth at a time) as an HF-layout checkpoint; the router bias stays float32."""
    os.makedirs(path, exist_ok=True)

    def out_dtype(name: str, src: torch.dtype) -> torch.dtype:
        if name.endswith("e_score_correction_bias") or not src.is_floating_point:
            return src
        return dtype

    # Plan shards from sizes alone so each shard is materialized once.
    plan: list[list[str]] = [[]]
    size = 0
    for name, (shape, src) in shapes.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=out_dtype(name, src)).element_size()
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    files = []
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, t in fetch(names).items():
            for hf_name, part in ours_to_hf(cfg, name, t.to(out_dtype(name, t.dtype))):
                tensors[hf_name] = part.contiguous()
                weight_map[hf_name] = fname
                total += _tensor_bytes(part)
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        files.append(fname)
        del tensors
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype), f, indent=1)
    logger.info("saved %s (%d shards, %.1f MB)", path, len(files), total / 1e6)
    return files
