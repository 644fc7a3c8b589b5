"""Our ``Transformer`` in Hugging Face's DeepSeek-V3 layout: config fields and tensor names.

The adapter between the two layouts (torchtitan's ``state_dict_adapter.py``), with no file I/O:
:func:`config_from_hf` / :func:`config_to_hf` map ``config.json`` to :class:`ModelConfig` and
back; :func:`hf_to_ours` / :func:`ours_to_hf` map state-dict keys. HF keeps one tensor per
expert, ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` (the fused
``experts.gate_up_proj`` / ``experts.down_proj`` form written by newer ``transformers`` is read
too), where we keep all of a layer's experts in ``mlp.experts.w13`` / ``w2``; the MTP modules are
extra layers ``model.layers.{num_layers + d}`` with ``enorm``, ``hnorm``, ``eh_proj`` and
``shared_head``. :mod:`elastic_moe.model.hf` (save, single-process load) and
:mod:`elastic_moe.model.hf_sharded` (every rank reads its slices) use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from elastic_moe.config import ModelConfig

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
class Target:
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


def hf_to_ours(cfg: ModelConfig, hf_name: str) -> Target | None:
    """Our tensor (and slice) for an HF key; ``None`` for a known-redundant key; KeyError if unknown."""
    inter = cfg.moe_inter_dim
    if hf_name == "model.embed_tokens.weight":
        return Target("embed_tokens.weight")
    if hf_name == "model.norm.weight":
        return Target("norm.weight")
    if hf_name == "lm_head.weight":
        return Target("lm_head.weight")
    if m := _EXPERT.match(hf_name):
        layer, expert, proj = int(m[1]), int(m[2]), m[3]
        prefix = _layer_prefix(cfg, layer)
        if prefix is not None and expert < cfg.num_routed_experts:
            prefix = prefix + ("block." if prefix.startswith("mtp.") else "")
            if proj == "down":
                return Target(prefix + "mlp.experts.w2", (expert,))
            rows = slice(0, inter) if proj == "gate" else slice(inter, 2 * inter)
            return Target(prefix + "mlp.experts.w13", (expert, rows))
    elif m := _FUSED.match(hf_name):
        prefix = _layer_prefix(cfg, int(m[1]))
        if prefix is not None:
            prefix = prefix + ("block." if prefix.startswith("mtp.") else "")
            return Target(prefix + ("mlp.experts.w13" if m[2] == "gate_up_proj" else "mlp.experts.w2"))
    elif m := _LAYER.match(hf_name):
        layer, rest = int(m[1]), m[2]
        prefix = _layer_prefix(cfg, layer)
        if prefix is not None and prefix.startswith("layers."):
            return Target(prefix + rest)
        if prefix is not None:
            if rest in _MTP_SHARED_COPIES:
                return None
            if rest.startswith(_MTP_OWN):
                return Target(prefix + rest)
            return Target(prefix + "block." + rest)
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
