"""Multi-head Latent Attention with decoupled RoPE and YaRN scaling.

MLA: DeepSeek-V2 (arXiv:2405.04434) sec. 2.1; YaRN: arXiv:2309.00071 sec. 3; DeepSeek-V3
(arXiv:2412.19437) sec. 2.1.1 and 4.3 (context extension).

Legend: B = batch, S = sequence, D = model dim, N = heads, R = qk_rope_head_dim,
P = qk_nope_head_dim, V = v_head_dim, L = kv_lora_rank.

RoPE is applied to interleaved pairs (x0, x1), (x2, x3), ... as in DeepSeek's reference code; Hugging
Face's ``rope_interleave=True`` path permutes the same pairs to rotate-half order first, which
gives the same attention scores because q and k are permuted alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from elastic_moe.config import ModelConfig
from elastic_moe.model.norm import RMSNorm


def yarn_mscale(factor: float, mscale: float) -> float:
    """Attention temperature correction of YaRN (eq. 22 of arXiv:2309.00071)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Angles ``[max_seq_len, R/2]`` with YaRN's ramp between interpolated and original frequencies.

    YaRN applies only when the model is built for a longer context than it was trained on.
    """
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if cfg.max_seq_len > cfg.original_seq_len and cfg.rope_factor > 1:
        def correction_dim(num_rotations: float) -> float:
            return dim * math.log(cfg.original_seq_len / (num_rotations * 2 * math.pi)) / (
                2 * math.log(base))

        low = float(max(math.floor(correction_dim(cfg.beta_fast)), 0))
        high = float(min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1))
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low)
                           / (high - low), 0, 1)
        keep = 1 - ramp  # 1 = keep original (high-frequency) dims, 0 = interpolate
        freqs = freqs / cfg.rope_factor * (1 - keep) + freqs * keep
    positions = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    return torch.outer(positions, freqs)


def apply_rope(x_BSNR: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs; H = R/2. Computed in float32."""
    dtype = x_BSNR.dtype
    x = x_BSNR.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    cos = cos_SH[None, :, None, :]
    sin = sin_SH[None, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(dtype)


def attention_mask(doc_ids_BS: torch.Tensor | None, seq_len: int,
                   device: torch.device) -> torch.Tensor | None:
    """Causal mask, block-diagonal by document when packed-sequence doc ids are given.

    Returns None for plain causal attention (SDPA's is_causal path is faster).
    """
    if doc_ids_BS is None:
        return None
    causal_SS = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    same_doc_BSS = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    return (same_doc_BSS & causal_SS)[:, None]


class MLA(nn.Module):
    """Multi-head Latent Attention; parameter names follow the Hugging Face layout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        qk_head_dim = cfg.qk_head_dim
        if self.q_lora_rank == 0:
            self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank,
                                   cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = qk_head_dim ** -0.5
        if cfg.max_seq_len > cfg.original_seq_len:
            # YaRN also sharpens the softmax; DeepSeek applies mscale to both q and k (squared).
            self.softmax_scale *= yarn_mscale(cfg.rope_factor, cfg.mscale) ** 2

    def forward(self, x_BSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor,
                mask_B1SS: torch.Tensor | None) -> torch.Tensor:
        bsz, seq_len, _ = x_BSD.shape
        if self.q_lora_rank == 0:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_BSNQ = q.view(bsz, seq_len, self.num_heads, -1)
        q_nope, q_rope = q_BSNQ.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos_SH, sin_SH)

        kv_latent, k_rope = self.kv_a_proj_with_mqa(x_BSD).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # One rotary key per position, shared by all heads (decoupled RoPE, V2 sec. 2.1.3).
        k_rope_BS1R = apply_rope(k_rope.unsqueeze(2), cos_SH, sin_SH)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent)).view(
            bsz, seq_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v_BSNV = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        q_full = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        k_full = torch.cat([k_nope, k_rope_BS1R.expand(-1, -1, self.num_heads, -1)],
                           dim=-1).transpose(1, 2)
        out_BNSV = F.scaled_dot_product_attention(
            q_full, k_full, v_BSNV.transpose(1, 2), attn_mask=mask_B1SS,
            is_causal=mask_B1SS is None, scale=self.softmax_scale)
        return self.o_proj(out_BNSV.transpose(1, 2).reshape(bsz, seq_len, -1))
