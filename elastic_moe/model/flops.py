"""Training FLOPs per token of the model, and model FLOPs utilization (MFU).

Counted as the matmuls of one forward times 3 (the backward is two matmuls per forward matmul):

- every weight matrix a token passes through: 2 FLOPs per weight; routed experts count only the
  ``num_activated_experts`` a token is sent to, the router and shared experts count fully; the
  embedding lookup is free; the shared LM head runs once for the model and once per MTP module;
- attention scores and the weighted sum: ``2 * S * H * (qk_head_dim + v_head_dim)`` per layer
  and token, halved because a causal token attends to ``S / 2`` positions on average.

Norms, activations, the softmax and the optimizer are left out (they are not matmuls), as in the
usual 6N + attention estimate.
"""

from __future__ import annotations

import torch

from elastic_moe.config import ModelConfig

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                    "B200": 2250.0, "L40S": 362.0}


def forward_matmul_flops_per_token(cfg: ModelConfig) -> float:
    """2 x the weights one token's forward multiplies with (see the module docstring)."""
    from elastic_moe.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    expert_fraction = cfg.num_activated_experts / cfg.num_routed_experts
    weights = 0.0
    for name, param in model.named_parameters():
        if param.dim() < 2 or name.startswith("embed_tokens."):
            continue  # norms (elementwise) and the embedding lookup (a gather)
        if ".experts." in name and ".shared_experts." not in name:
            weights += param.numel() * expert_fraction
        else:
            weights += param.numel()
    weights += cfg.num_mtp_modules * model.lm_head.weight.numel()  # the head, shared by MTP
    return 2.0 * weights


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward score + value matmuls per token, causal (S / 2 keys on average), all layers."""
    layers = cfg.num_layers + cfg.num_mtp_modules
    head_dims = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    return 2.0 * layers * cfg.num_heads * head_dims * seq_len / 2


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward matmul FLOPs per trained token."""
    return 3.0 * (forward_matmul_flops_per_token(cfg) + attention_flops_per_token(cfg, seq_len))


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
