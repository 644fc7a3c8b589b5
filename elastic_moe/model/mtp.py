"""Multi-token prediction modules (DeepSeek-V3, arXiv:2412.19437 sec. 2.2).

Module k (1..D) combines the previous depth's hidden state at position i with the embedding of
token i+k, h' = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})] (embedding first, the order of
the released weights), runs one transformer block and predicts token i+k+1 through the shared
output head. Embedding and head are the main model's; MTP is dropped at inference.
Parameter names follow the released checkpoint (enorm, hnorm, eh_proj, shared_head.norm).
"""

from __future__ import annotations

import torch
from torch import nn

from elastic_moe.config import ModelConfig
from elastic_moe.model.norm import RMSNorm


class SharedHead(nn.Module):
    """The MTP module's own final norm; the projection itself is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = block
        self.shared_head = SharedHead(cfg)

    def forward(self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor, cos_SH: torch.Tensor,
                sin_SH: torch.Tensor, mask_B1SS: torch.Tensor | None) -> torch.Tensor:
        """Returns the new hidden state (before ``shared_head.norm``)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))
        return self.block(x, cos_SH, sin_SH, mask_B1SS)
