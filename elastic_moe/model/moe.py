"""DeepSeekMoE: shared + fine-grained routed experts with auxiliary-loss-free balancing.

DeepSeekMoE: arXiv:2401.06066 sec. 3; DeepSeek-V3: arXiv:2412.19437 sec. 2.1.2 (sigmoid
affinities, group-limited routing, bias-based load balancing, sequence-wise balance loss).

Legend: B = batch, S = sequence, T = tokens (B*S), D = model dim, E = routed experts,
K = experts per token, G = expert groups, I = expert hidden dim.

Expert computation crosses exactly one boundary, :meth:`RoutedExperts.forward`, which calls
``elastic_moe.kernels.routed_experts``; expert parallelism replaces that module, the kernels replace the math.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import elastic_moe.kernels as kernels
from elastic_moe.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and shared experts); HF parameter names."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    topk_ids_TK: torch.Tensor  # int64 expert ids
    topk_weights_TK: torch.Tensor  # float32 gate weights (unbiased, normalized, scaled)
    scores_TE: torch.Tensor  # float32 unbiased affinities (for the balance loss)


class Router(nn.Module):
    """Top-k gate with group-limited selection and a selection-only bias."""

    e_score_correction_bias: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_routed_experts
        self.top_k = cfg.num_activated_experts
        self.num_groups = cfg.num_expert_groups
        self.num_limited_groups = cfg.num_limited_groups
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.num_routed_experts, cfg.dim))
        # Aux-loss-free balancing bias: changes which experts are chosen, never the gate weights.
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(cfg.num_routed_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.score_func == "sigmoid":
            scores_TE = logits_TE.sigmoid()
        else:
            scores_TE = logits_TE.softmax(dim=-1)
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.num_groups > 1:
            choice_TGe = choice_TE.unflatten(-1, (self.num_groups, -1))
            if self.score_func == "sigmoid":
                group_scores_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
            else:  # DeepSeek-V2 scores a group by its best expert
                group_scores_TG = choice_TGe.amax(dim=-1)
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_scores_TG.topk(self.num_limited_groups, dim=-1).indices, True)
            choice_TE = choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).flatten(1)
        topk_ids_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, topk_ids_TK)
        if self.score_func == "sigmoid":
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(topk_ids_TK, weights_TK * self.route_scale, scores_TE)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor, speed: float) -> None:
        """b_i += gamma * sign(mean_load - load_i) (V3 sec. 2.1.2), loads of the global batch."""
        load = tokens_per_expert_E.to(self.e_score_correction_bias)
        self.e_score_correction_bias.add_(speed * torch.sign(load.mean() - load))


class RoutedExperts(nn.Module):
    """All routed experts as two stacked weights (the expert dim is the one EP shards)."""

    def __init__(self, num_experts: int, dim: int, inter_dim: int, backend: str = "auto") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.backend = backend
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter_dim, dim))  # [gate; up]
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, inter_dim))

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                topk_weights_TK: torch.Tensor) -> torch.Tensor:
        return kernels.routed_experts(x_TD, topk_ids_TK, topk_weights_TK, self.w13, self.w2,
                                      backend=self.backend)


def sequence_balance_loss(scores_BSE: torch.Tensor, topk_ids_BSK: torch.Tensor,
                          alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss (V3 eq. 17-20), averaged over sequences.

    Reported relative to its value at perfect balance (where sum_i f_i P_i = 1), so a perfectly
    balanced sequence scores 0; the shift is a constant, gradients are the paper's.
    """
    num_experts = scores_BSE.shape[-1]
    seq_len, top_k = topk_ids_BSK.shape[1], topk_ids_BSK.shape[2]
    counts_BE = torch.zeros(scores_BSE.shape[0], num_experts, device=scores_BSE.device)
    counts_BE.scatter_add_(1, topk_ids_BSK.flatten(1),
                           torch.ones_like(topk_ids_BSK.flatten(1), dtype=counts_BE.dtype))
    f_BE = counts_BE * num_experts / (top_k * seq_len)
    p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return alpha * ((f_BE * p_BE).sum(dim=-1) - 1.0).mean()


class MoE(nn.Module):
    """Shared experts + routed experts; records tokens per expert for balancing and telemetry."""

    tokens_per_expert: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_routed_experts
        self.seq_aux_alpha = cfg.seq_aux_alpha
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.num_routed_experts, cfg.dim, cfg.moe_inter_dim,
                                     cfg.expert_backend)
        self.shared_experts = (MLP(cfg.dim, cfg.moe_inter_dim * cfg.num_shared_experts)
                               if cfg.num_shared_experts > 0 else None)
        # Summed over micro-batches until the optimizer step consumes it (not checkpointed).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_routed_experts),
                             persistent=False)
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, dim = x_BSD.shape
        x_TD = x_BSD.reshape(-1, dim)
        routing = self.gate(x_TD)
        with torch.no_grad():
            counts_E = torch.bincount(routing.topk_ids_TK.flatten(), minlength=self.num_experts)
            self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
        if self.training and self.seq_aux_alpha > 0:
            self.balance_loss = sequence_balance_loss(
                routing.scores_TE.view(bsz, seq_len, -1),
                routing.topk_ids_TK.view(bsz, seq_len, -1), self.seq_aux_alpha)
        else:
            self.balance_loss = None
        out_TD = self.experts(x_TD, routing.topk_ids_TK, routing.topk_weights_TK).to(x_TD.dtype)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        return out_TD.view(bsz, seq_len, dim)


def moe_layers(model: nn.Module) -> Iterator[MoE]:
    for module in model.modules():
        if isinstance(module, MoE):
            yield module


@torch.no_grad()
def global_expert_loads(model: nn.Module, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Tokens routed to each expert over the global batch, ``[num_moe_layers, E]``.

    Every rank routes its own tokens over all experts, so summing the per-rank counts over all
    ranks (one all-reduce for all layers) gives the global batch's load. Collective.
    """
    layers = list(moe_layers(model))
    if not layers:
        return torch.zeros(0, 0)
    loads_LE = torch.stack([layer.tokens_per_expert for layer in layers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads_LE, op=dist.ReduceOp.SUM, group=group)
    return loads_LE


@torch.no_grad()
def clear_expert_loads(model: nn.Module) -> None:
    """Drop the load counts of a step that is not applied (no bias update from it)."""
    for layer in moe_layers(model):
        layer.tokens_per_expert.zero_()


def apply_router_bias_update(model: nn.Module, loads_LE: torch.Tensor, speed: float,
                             ) -> tuple[dict[str, float], torch.Tensor]:
    """One aux-loss-free bias update per MoE layer from the global loads (local, no collective).

    Clears the counters and returns load statistics for telemetry (max/mean load ratio, bias
    range) and the loads on the CPU.
    """
    layers = list(moe_layers(model))
    if not layers:
        return {}, torch.zeros(0, 0)
    stats: dict[str, float] = {}
    for i, (layer, load_E) in enumerate(zip(layers, loads_LE, strict=True)):
        layer.gate.update_bias(load_E, speed)
        layer.tokens_per_expert.zero_()
        mean = load_E.mean().clamp_min(1e-9)
        bias = layer.gate.e_score_correction_bias
        stats[f"moe/{i}/load_max_over_mean"] = float(load_E.max() / mean)
        stats[f"moe/{i}/bias_min"] = float(bias.min())
        stats[f"moe/{i}/bias_max"] = float(bias.max())
    stats["moe/load_max_over_mean"] = max(v for k, v in stats.items() if "load_max" in k)
    return stats, loads_LE.cpu()

