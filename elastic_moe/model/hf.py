"""Hugging Face-layout DeepSeek-V3 checkpoints (config.json + safetensors shards) in and out.

The layout is the one DeepSeek released and ``transformers``' DeepseekV3ForCausalLM reads:
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` per expert (the fused
``experts.gate_up_proj`` / ``experts.down_proj`` form written by newer ``transformers`` is read too),
and the MTP modules as extra layers ``model.layers.{num_layers + d}`` with ``enorm``, ``hnorm``,
``eh_proj`` and ``shared_head``. Saving streams one shard at a time. Loading goes through
:func:`elastic_moe.model.hf_sharded.load_hf_into` (one tensor chunk at a time, FP8
block-quantized weights -- ``weight_scale_inv`` -- dequantized on the way), the same reader
every rank of a sharded ``--init-from`` uses. Checkpoints saved by ``transformers`` carry no MTP
weights although their config asks for MTP: those modules start fresh, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file

from elastic_moe.config import ModelConfig
from elastic_moe.model.transformer import Transformer

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# config


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a DeepSeek-V3 ``config.json`` dict to :class:`ModelConfig`, rejecting what we can't run."""
    def need(key: str) -> Any:
        if key not in hf:
            raise ValueError(f"config.json: missing required field {key!r}")
        return hf[key]

    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"config.json: model_type={model_type!r} is not a DeepSeek-V2/V3 model")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU)")
    if hf.get("tie_word_embeddings", False):
        raise ValueError("config.json: tie_word_embeddings=true: DeepSeek-V3 has an untied head")
    if hf.get("attention_bias", False):
        raise ValueError("config.json: attention_bias=true is not supported (DeepSeek-V3 has none)")
    quant = hf.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method")
        if method != "fp8" or "weight_block_size" not in quant:
            raise ValueError(f"config.json: quantization_config quant_method={method!r}: only "
                             "FP8 block quantization (dequantized on load) is supported")
    score_func = hf.get("scoring_func", "sigmoid")
    norm_topk = hf.get("norm_topk_prob", score_func == "sigmoid")
    if norm_topk != (score_func == "sigmoid"):
        raise ValueError(f"config.json: norm_topk_prob={norm_topk} with scoring_func={score_func!r}:"
                         " supported are sigmoid+normalized (V3) and softmax+unnormalized (V2)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    max_pos = int(need("max_position_embeddings"))
    if rope_type in ("default", None):
        original, factor, mscale = max_pos, 1.0, 1.0
        beta_fast, beta_slow = 32, 1
    elif rope_type == "yarn":
        original = int(rope.get("original_max_position_embeddings", max_pos))
        factor = float(rope.get("factor") or max_pos / original)
        mscale = float(rope.get("mscale_all_dim") or 0.0)
        if float(rope.get("mscale") or 0.0) != mscale or rope.get("attention_factor") is not None:
            raise ValueError(f"config.json: rope mscale={rope.get('mscale')} != mscale_all_dim="
                             f"{rope.get('mscale_all_dim')}: only equal values (as in DeepSeek-V3)"
                             " are supported")
        if factor > 1 and max_pos <= original:
            raise ValueError(f"config.json: YaRN factor={factor} but max_position_embeddings="
                             f"{max_pos} <= original_max_position_embeddings={original}")
        beta_fast = int(rope.get("beta_fast") or 32)
        beta_slow = int(rope.get("beta_slow") or 1)
    else:
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (default, yarn)")
    num_routed = int(need("n_routed_experts"))
    return ModelConfig(
        vocab_size=int(need("vocab_size")), dim=int(need("hidden_size")),
        inter_dim=int(need("intermediate_size")), num_layers=int(need("num_hidden_layers")),
        num_dense_layers=int(hf.get("first_k_dense_replace", 0)),
        num_heads=int(need("num_attention_heads")), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        moe_inter_dim=int(need("moe_intermediate_size")), num_routed_experts=num_routed,
        num_shared_experts=int(hf.get("n_shared_experts") or 0),
        num_activated_experts=int(need("num_experts_per_tok")),
        num_expert_groups=int(hf.get("n_group") or 1), num_limited_groups=int(hf.get("topk_group") or 1),
        score_func=score_func, route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")), v_head_dim=int(need("v_head_dim")),
        max_seq_len=max_pos, original_seq_len=original, rope_theta=rope_theta,
        rope_factor=factor, beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale or 1.0,
        num_mtp_modules=int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0),
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    yarn = cfg.max_seq_len > cfg.original_seq_len and cfg.rope_factor > 1
    rope: dict[str, Any] | None = None
    if yarn:
        rope = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_seq_len,
                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.num_layers,
        "first_k_dense_replace": cfg.num_dense_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "n_shared_experts": cfg.num_shared_experts,
        "n_routed_experts": cfg.num_routed_experts, "num_experts_per_tok": cfg.num_activated_experts,
        "n_group": cfg.num_expert_groups, "topk_group": cfg.num_limited_groups,
        "scoring_func": cfg.score_func, "norm_topk_prob": cfg.score_func == "sigmoid",
        "routed_scaling_factor": cfg.route_scale, "topk_method": "noaux_tc",
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope, "rope_interleave": True,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "num_nextn_predict_layers": cfg.num_mtp_modules,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------
# name mapping


@dataclass
class _Target:
    """Where one HF tensor lands: a slice of one of our tensors."""

    name: str  # our state-dict key
    index: tuple[Any, ...] = ()  # indexing into our tensor (expert id, gate/up half)


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
# Released MTP layers carry their own copy of the (shared) embedding and head: read, not loaded.
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def _layer_prefix(cfg: ModelConfig, layer: int) -> str | None:
    if layer < cfg.num_layers:
        return f"layers.{layer}."
    if layer < cfg.num_layers + cfg.num_mtp_modules:
        return f"mtp.{layer - cfg.num_layers}."
    return None


def hf_to_ours(cfg: ModelConfig, hf_name: str) -> _Target | None:
    """Our tensor (and slice) for an HF key; ``None`` for a known-redundant key; KeyError if unknown."""
    inter = cfg.moe_inter_dim
    if hf_name == "model.embed_tokens.weight":
        return _Target("embed_tokens.weight")
    if hf_name == "model.norm.weight":
        return _Target("norm.weight")
    if hf_name == "lm_head.weight":
        return _Target("lm_head.weight")
    if m := _EXPERT.match(hf_name):
        layer, expert, proj = int(m[1]), int(m[2]), m[3]
        prefix = _layer_prefix(cfg, layer)
        if prefix is not None and expert < cfg.num_routed_experts:
            prefix = prefix + ("block." if prefix.startswith("mtp.") else "")
            if proj == "down":
                return _Target(prefix + "mlp.experts.w2", (expert,))
            rows = slice(0, inter) if proj == "gate" else slice(inter, 2 * inter)
            return _Target(prefix + "mlp.experts.w13", (expert, rows))
    elif m := _FUSED.match(hf_name):
        prefix = _layer_prefix(cfg, int(m[1]))
        if prefix is not None:
            prefix = prefix + ("block." if prefix.startswith("mtp.") else "")
            return _Target(prefix + ("mlp.experts.w13" if m[2] == "gate_up_proj" else "mlp.experts.w2"))
    elif m := _LAYER.match(hf_name):
        layer, rest = int(m[1]), m[2]
        prefix = _layer_prefix(cfg, layer)
        if prefix is not None and prefix.startswith("layers."):
            return _Target(prefix + rest)
        if prefix is not None:
            if rest in _MTP_SHARED_COPIES:
                return None
            if rest.startswith(_MTP_OWN):
                return _Target(prefix + rest)
            return _Target(prefix + "block." + rest)
    raise KeyError(hf_name)


def ours_to_hf(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """HF key/tensor pairs for one of our state-dict entries (experts split per expert)."""
    hf_prefix = "model."
    if name.startswith("mtp."):
        depth, rest = name.split(".", 2)[1:]
        layer = cfg.num_layers + int(depth)
        name = f"layers.{layer}." + rest.removeprefix("block.")
    if name == "lm_head.weight":
        yield name, tensor
        return
    if name.endswith("mlp.experts.w13"):
        base = hf_prefix + name.removesuffix("w13")
        for e in range(tensor.shape[0]):
            gate, up = tensor[e].chunk(2, dim=0)
            yield f"{base}{e}.gate_proj.weight", gate
            yield f"{base}{e}.up_proj.weight", up
        return
    if name.endswith("mlp.experts.w2"):
        base = hf_prefix + name.removesuffix("w2")
        for e in range(tensor.shape[0]):
            yield f"{base}{e}.down_proj.weight", tensor[e]
        return
    yield hf_prefix + name, tensor


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
    from elastic_moe.model.hf_sharded import hf_config_to_model_config, load_hf_into
    from elastic_moe.model.safetensors_files import CheckpointFiles

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
    log.info("saved %s (%d shards, %.1f MB)", path, len(files), total / 1e6)
    return files
