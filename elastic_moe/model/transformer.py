"""The DeepSeek-V3 decoder (arXiv:2412.19437 sec. 2): MLA + (dense FFN | DeepSeekMoE) blocks,
a final RMSNorm, an untied output head and optional multi-token prediction modules.

Legend: B = batch, S = sequence, D = model dim, V = vocab.
Module and parameter names follow the Hugging Face layout (``embed_tokens``, ``layers.i.self_attn``,
``layers.i.mlp``, ``norm``, ``lm_head``) so checkpoint conversion is mostly renaming-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elastic_moe.config import ModelConfig
from elastic_moe.model.attention import MLA, attention_mask, rope_frequencies
from elastic_moe.model.init import seeded_normal_
from elastic_moe.model.moe import MLP, MoE, RoutedExperts, Router, moe_layers
from elastic_moe.model.mtp import MTPModule
from elastic_moe.model.norm import RMSNorm

IGNORE_INDEX = -100


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, use_moe: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: nn.Module = MoE(cfg) if use_moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x_BSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor,
                mask_B1SS: torch.Tensor | None) -> torch.Tensor:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos_SH, sin_SH, mask_B1SS)
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))


@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward() is called on
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor  # mean over MTP depths (before lambda); 0 without MTP
    balance_loss: torch.Tensor  # sum of the MoE layers' sequence-wise balance losses
    num_tokens: int


class _Embedding(nn.Embedding):
    """``nn.Embedding`` that draws no weights on the meta device. ``normal_`` (like ``arange``)
    has a Python kernel there, whose first use imports TorchDynamo: 2 s of CPU in a
    process that builds a meta model only to count or plan (the launcher, the coordinator).
    ``init_weights`` draws the weights anyway."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Transformer(nn.Module):
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = _Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg, use_moe=i >= cfg.num_dense_layers) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, use_moe=cfg.num_routed_experts > 0))
                                 for _ in range(cfg.num_mtp_modules))
        rope_shape = (cfg.max_seq_len, cfg.qk_rope_head_dim // 2)
        self.register_buffer("rope_cos", torch.empty(rope_shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(rope_shape), persistent=False)
        if not self.rope_cos.is_meta:  # on meta, computing them would load TorchDynamo
            self.init_buffers()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialize every parameter and buffer in place: also after ``to_empty`` from meta.

        With a seed, each weight is a function of (seed, parameter name) only, drawn block by
        block for the rows this rank holds (:mod:`elastic_moe.model.init`): a sharded model
        (FSDP2, expert parallelism) gets exactly the slices of the single-process model, at any
        world size, and no rank ever draws a full tensor it does not hold. Without a seed,
        torch's global generator (not reproducible across layouts).
        """
        std = self.cfg.init_std
        for prefix, module in self.named_modules():
            dot = prefix + "." if prefix else ""
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                _normal_(module.weight, std, seed, dot + "weight")
            elif isinstance(module, RoutedExperts):
                _normal_(module.w13, std, seed, dot + "w13")
                _normal_(module.w2, std, seed, dot + "w2")
            elif isinstance(module, Router):
                _normal_(module.weight, std, seed, dot + "weight")
                module.e_score_correction_bias.zero_()
        self.init_buffers()

    def init_buffers(self) -> None:
        """What is not training state: the rotary tables and the routers' load counters. Enough
        after ``to_empty`` when a restore overwrites every parameter, persistent buffer and
        optimizer moment (:func:`~elastic_moe.train.shard_state.fill_from_shards` checks)."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.tokens_per_expert.zero_()
        angles = rope_frequencies(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None = None,
                doc_ids_BS: torch.Tensor | None = None,
                mtp_loss_weight: float = 0.3) -> torch.Tensor | LossOutput:
        """Logits ``[B, S, V]`` without labels; with labels, the training losses."""
        try:
            return self._forward(input_ids_BS, labels_BS, doc_ids_BS, mtp_loss_weight)
        finally:
            # A MoE layer holds its balance loss, and through it the step's autograd graph, only
            # until the loss takes it in. A forward that raises (a lost peer's collective) must
            # not leave the graph on the modules: the graph refers back to them through autograd
            # nodes Python's collector cannot see, so the model, its process groups and their
            # threads and sockets would outlive the layout.
            for moe in moe_layers(self):
                moe.balance_loss = None

    def _forward(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None,
                 doc_ids_BS: torch.Tensor | None, mtp_loss_weight: float
                 ) -> torch.Tensor | LossOutput:
        seq_len = input_ids_BS.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len "
                             f"({self.cfg.max_seq_len})")
        cos_SH, sin_SH = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        mask = attention_mask(doc_ids_BS, seq_len, input_ids_BS.device)
        emb_BSD = self.embed_tokens(input_ids_BS)
        h_BSD = emb_BSD
        for layer in self.layers:
            h_BSD = layer(h_BSD, cos_SH, sin_SH, mask)
        logits_BSV = self.lm_head(self.norm(h_BSD))
        if labels_BS is None:
            return logits_BSV

        lm_loss = _cross_entropy(logits_BSV, labels_BS)
        mtp_losses = []
        for depth, module in enumerate(self.mtp, start=1):
            # Position i combines h_i (previous depth) with the embedding of token i+depth and
            # predicts label i+depth, i.e. token i+depth+1.
            if seq_len - depth <= 0:
                break
            keep = seq_len - depth
            sub_mask = None if doc_ids_BS is None else attention_mask(
                doc_ids_BS[:, depth:], keep, input_ids_BS.device)
            h_BSD = module(h_BSD[:, :keep], emb_BSD[:, depth:], cos_SH[:keep], sin_SH[:keep],
                           sub_mask)
            assert isinstance(module, MTPModule)
            mtp_logits = self.lm_head(module.shared_head.norm(h_BSD))
            mtp_losses.append(_cross_entropy(mtp_logits, labels_BS[:, depth:]))
        zero = lm_loss.new_zeros(())
        mtp_loss = torch.stack(mtp_losses).mean() if mtp_losses else zero
        balance = [m.balance_loss for m in moe_layers(self) if m.balance_loss is not None]
        balance_loss = torch.stack(balance).sum() if balance else zero
        loss = lm_loss + mtp_loss_weight * mtp_loss + balance_loss
        return LossOutput(loss, lm_loss, mtp_loss, balance_loss, int(labels_BS.numel()))


def _cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(),
                           ignore_index=IGNORE_INDEX)


def _normal_(t: torch.Tensor, std: float, seed: int | None, fqn: str) -> None:
    if t.device.type == "meta":
        return
    if seed is None:
        nn.init.normal_(t, 0.0, std)
        return
    seeded_normal_(t, std, seed, fqn)


# ---------------------------------------------------------------------- parameter accounting
@dataclass(frozen=True)
class ParameterCount:
    total: int  # main model, MTP excluded
    activated: int  # per token: routed experts counted K/E
    mtp: int  # MTP modules' own parameters (embedding/head are shared, not counted again)


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Exact counts from a model built on the meta device (no weights allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    routed = sum(p.numel() for name, p in model.named_parameters()
                 if ".experts." in name and not name.startswith("mtp."))
    activated = total - routed + routed * cfg.num_activated_experts // cfg.num_routed_experts
    return ParameterCount(total=total, activated=activated, mtp=mtp)
