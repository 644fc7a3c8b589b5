"""Routed experts on Triton: autograd Functions over the permute, grouped GEMM and SwiGLU kernels.

DeepSeek-V3 (arXiv:2412.19437) section 2.1.2: each token goes to K of E fine-grained SwiGLU
experts and their outputs are summed with the gate weights. Forward:

    expert_order -> grouped_mm(x gathered in the A load, w13) -> swiglu -> grouped_mm(w2)
    -> combine (gather the K rows of each token, weighted sum in k order)

Backward mirrors it with the dX / dW grouped GEMMs; SwiGLU's output is recomputed rather than
stored, x is never materialised in expert order (the gather is fused into the GEMM A loads), and
no step uses float atomics, so results are bitwise reproducible run to run.

Shapes use suffixes; legend:
    T = tokens, K = experts per token (top-k), E = experts, D = model dim,
    I = expert hidden dim, H = 2 * I (gate | up), M = routed rows (T * K), E1 = E + 1
"""

from __future__ import annotations

from typing import Any

import torch
from elastic_moe.kernels.grouped_gemm import grouped_mm, grouped_mm_dw, segment_offsets
from elastic_moe.kernels.permute import combine, combine_backward, expert_order, gather_rows
from elastic_moe.kernels.runtime import check_device
from elastic_moe.kernels.swiglu import swiglu, swiglu_backward

__all__ = ["ExpertMLPFunction", "RoutedExpertsFunction", "expert_mlp_triton",
           "routed_experts_triton"]


def _check_weights(x: torch.Tensor, w13_EHD: torch.Tensor, w2_EDI: torch.Tensor) -> None:
    check_device(x)
    num_experts, hidden2, dim = w13_EHD.shape
    if w2_EDI.shape != (num_experts, dim, hidden2 // 2) or hidden2 % 2:
        raise ValueError(f"w13_EHD {tuple(w13_EHD.shape)} and w2_EDI {tuple(w2_EDI.shape)}: "
                         "need [E, 2I, D] and [E, D, I]")
    if x.shape[-1] != dim:
        raise ValueError(f"x has dim {x.shape[-1]}, w13_EHD expects {dim}")
    if not (x.dtype == w13_EHD.dtype == w2_EDI.dtype):
        raise ValueError(f"dtypes x={x.dtype} w13={w13_EHD.dtype} w2={w2_EDI.dtype} must match")


def _mlp_backward(dy_MD: torch.Tensor, h_MH: torch.Tensor, x_src: torch.Tensor,
                  x_rows_M: torch.Tensor | None, w13_EHD: torch.Tensor, w2_EDI: torch.Tensor,
                  offsets_E1: torch.Tensor, needs: tuple[bool, bool, bool]
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx_MD, dw13_EHD, dw2_EDI) of the SwiGLU expert MLP; ``needs`` = which are wanted."""
    need_x, need_w13, need_w2 = needs
    da_MI = grouped_mm(dy_MD, w2_EDI, offsets_E1, transpose_w=False)
    dh_MH, a_MI = swiglu_backward(h_MH, da_MI)
    dw2_EDI = grouped_mm_dw(dy_MD, a_MI, offsets_E1) if need_w2 else None
    dx_MD = grouped_mm(dh_MH, w13_EHD, offsets_E1, transpose_w=False) if need_x else None
    dw13_EHD = grouped_mm_dw(dh_MH, x_src, offsets_E1, x_rows_M=x_rows_M) if need_w13 else None
    return dx_MD, dw13_EHD, dw2_EDI


class ExpertMLPFunction(torch.autograd.Function):
    """SwiGLU expert MLP over rows already sorted by expert (expert parallelism's entry point)."""

    @staticmethod
    def forward(ctx: Any, x_MD: torch.Tensor, counts_E: torch.Tensor, w13_EHD: torch.Tensor,
                w2_EDI: torch.Tensor) -> torch.Tensor:
        _check_weights(x_MD, w13_EHD, w2_EDI)
        x_MD = x_MD.contiguous()
        offsets_E1 = segment_offsets(counts_E.to(x_MD.device))
        h_MH = grouped_mm(x_MD, w13_EHD, offsets_E1)
        y_MD = grouped_mm(swiglu(h_MH), w2_EDI, offsets_E1)
        ctx.save_for_backward(x_MD, h_MH, w13_EHD, w2_EDI, offsets_E1)
        return y_MD

    @staticmethod
    def backward(ctx: Any, dy_MD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_MD, h_MH, w13_EHD, w2_EDI, offsets_E1 = ctx.saved_tensors
        need_x, _, need_w13, need_w2 = ctx.needs_input_grad
        dx_MD, dw13_EHD, dw2_EDI = _mlp_backward(
            dy_MD.contiguous(), h_MH, x_MD, None, w13_EHD, w2_EDI, offsets_E1,
            (need_x, need_w13, need_w2))
        return dx_MD, None, dw13_EHD, dw2_EDI


class RoutedExpertsFunction(torch.autograd.Function):
    """permute -> SwiGLU experts -> weighted combine, differentiable in x, weights, w13, w2."""

    @staticmethod
    def forward(ctx: Any, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                topk_weights_TK: torch.Tensor, w13_EHD: torch.Tensor, w2_EDI: torch.Tensor,
                fuse_gather: bool = True) -> torch.Tensor:
        _check_weights(x_TD, w13_EHD, w2_EDI)
        if topk_weights_TK.shape != topk_ids_TK.shape:
            raise ValueError(f"topk_weights {tuple(topk_weights_TK.shape)} != topk_ids "
                             f"{tuple(topk_ids_TK.shape)}")
        top_k = topk_ids_TK.shape[1]
        x_TD = x_TD.contiguous()
        order_M, counts_E, rows_TK = expert_order(topk_ids_TK, w13_EHD.shape[0])
        offsets_E1 = segment_offsets(counts_E)
        tokens_M = order_M // top_k
        if fuse_gather:
            h_MH = grouped_mm(x_TD, w13_EHD, offsets_E1, a_rows_M=tokens_M)
        else:
            h_MH = grouped_mm(gather_rows(x_TD, order_M, top_k), w13_EHD, offsets_E1)
        y_MD = grouped_mm(swiglu(h_MH), w2_EDI, offsets_E1)
        out_TD = combine(y_MD, rows_TK, topk_weights_TK)
        # y_MD is kept for the gate-weight gradient <dout, y>; recomputing it would cost a GEMM.
        ctx.save_for_backward(x_TD, tokens_M, rows_TK, topk_weights_TK, w13_EHD, w2_EDI,
                              offsets_E1, h_MH, y_MD)
        return out_TD

    @staticmethod
    def backward(ctx: Any, dout_TD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x_TD, tokens_M, rows_TK, topk_weights_TK, w13_EHD, w2_EDI, offsets_E1, h_MH,
         y_MD) = ctx.saved_tensors
        need_x, _, need_weights, need_w13, need_w2, _ = ctx.needs_input_grad
        dy_MD, dweights_TK = combine_backward(dout_TD, y_MD, rows_TK, topk_weights_TK)
        dx_MD, dw13_EHD, dw2_EDI = _mlp_backward(
            dy_MD, h_MH, x_TD, tokens_M, w13_EHD, w2_EDI, offsets_E1,
            (need_x, need_w13, need_w2))
        # Each token's K row-gradients are summed in k order (a gather, not a scatter-add).
        dx_TD = combine(dx_MD, rows_TK, None) if need_x and dx_MD is not None else None
        return dx_TD, None, dweights_TK if need_weights else None, dw13_EHD, dw2_EDI, None


def expert_mlp_triton(x_MD: torch.Tensor, counts_E: torch.Tensor, w13_EHD: torch.Tensor,
                      w2_EDI: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP over expert-sorted rows (``counts_E`` rows per expert)."""
    return ExpertMLPFunction.apply(x_MD, counts_E, w13_EHD, w2_EDI)


def routed_experts_triton(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                          topk_weights_TK: torch.Tensor, w13_EHD: torch.Tensor,
                          w2_EDI: torch.Tensor, *, fuse_gather: bool = True) -> torch.Tensor:
    """The whole routed-expert computation; matches ``routed_experts_reference``."""
    return RoutedExpertsFunction.apply(x_TD, topk_ids_TK, topk_weights_TK, w13_EHD, w2_EDI,
                                       fuse_gather)
