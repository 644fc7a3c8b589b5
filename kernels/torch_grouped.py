"""Routed experts on ``torch._grouped_mm`` (CUTLASS grouped GEMMs on Hopper), bitwise reproducible.

The third expert backend beside the Triton kernels and the per-expert loop: the same
permute -> SwiGLU experts -> weighted combine as ``reference.routed_experts_reference``, with the
two expert GEMMs (and, through autograd, their dX and dW) as one grouped GEMM each.

``torch._grouped_mm`` wants every expert's segment aligned (16-byte strides; the dW GEMMs reduce
over the rows, so the row segments must start aligned too), so rows are laid out in a padded
buffer: expert ``e``'s rows start at a multiple of ``ALIGN_ROWS`` and the gaps hold zero rows.
The buffer has a fixed capacity (no host sync to size it); the last expert's segment runs to
the end of it, over zero rows, so no row of the buffer is outside every segment.

Determinism: a token's K rows are gathered into the buffer, so the gradient of x sums K rows per
token. Autograd would do that with an index_add (float atomics on CUDA, order varies run to
run); :class:`_GatherTokens` sums them with a gather in k order instead. Every other scatter
writes each destination once.

Shapes use suffixes; legend:
    T = tokens, K = experts per token, E = experts, D = model dim, I = expert hidden dim,
    H = 2 * I, M = routed rows (T * K), P = padded rows (capacity of the buffer), E1 = E + 1
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ALIGN_ROWS", "PaddedLayout", "expert_mlp_grouped", "grouped_mm_supported",
           "routed_experts_grouped"]

ALIGN_ROWS = 16  # 32 bytes of bf16 rows: above the 16-byte alignment the grouped GEMMs need


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for these tensors: any dtype on CPU; on CUDA, bf16 on
    Hopper or newer (the CUTLASS kernels it dispatches to)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


class PaddedLayout:
    """Where each routed row sits in the padded buffer, from the rows' experts."""

    def __init__(self, experts_M: torch.Tensor, num_experts: int) -> None:
        num_rows = experts_M.numel()
        device = experts_M.device
        order_M = torch.argsort(experts_M, stable=True)  # sorted row -> routed row
        counts_E = torch.bincount(experts_M, minlength=num_experts)
        padded_E = (counts_E + ALIGN_ROWS - 1) // ALIGN_ROWS * ALIGN_ROWS
        self.capacity = -(-(num_rows + num_experts * (ALIGN_ROWS - 1)) // ALIGN_ROWS) * ALIGN_ROWS
        pad_end_E = torch.cumsum(padded_E, 0)
        pad_start_E = pad_end_E - padded_E
        start_E = torch.cumsum(counts_E, 0) - counts_E
        expert_sorted_M = experts_M[order_M]
        rank_M = torch.arange(num_rows, device=device) - start_E[expert_sorted_M]
        dest_sorted_M = pad_start_E[expert_sorted_M] + rank_M
        # row_M: the buffer row of each routed row; source_P: the routed row of each buffer row
        # (num_rows: a zero row)
        self.row_M = torch.empty_like(order_M)
        self.row_M[order_M] = dest_sorted_M
        self.source_P = torch.full((self.capacity,), num_rows, dtype=torch.long, device=device)
        self.source_P[dest_sorted_M] = order_M
        offsets_E = pad_end_E.clone()
        if num_experts:
            offsets_E[-1] = self.capacity
        self.offsets_E = offsets_E.to(torch.int32)

    def pad(self, rows_MX: torch.Tensor) -> torch.Tensor:
        """Rows in routed order laid out in the buffer, zero rows in the gaps. Each row lands
        once, so autograd's scatter back writes each row once (no atomics decide a sum)."""
        return torch.cat([rows_MX, rows_MX.new_zeros(1, rows_MX.shape[1])])[self.source_P]


class _GatherTokens(torch.autograd.Function):
    """x_P = x_TD rows into the buffer (zero rows in the gaps); its gradient sums each token's K
    rows in k order, with no atomics."""

    @staticmethod
    def forward(ctx: Any, x_TD: torch.Tensor, token_P: torch.Tensor, row_TK: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(row_TK)
        x_ext = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
        return x_ext.index_select(0, token_P)

    @staticmethod
    def backward(ctx: Any, dx_PD: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (row_TK,) = ctx.saved_tensors
        num_tokens, top_k = row_TK.shape
        dx_TKD = dx_PD.index_select(0, row_TK.reshape(-1)).view(num_tokens, top_k, -1)
        return dx_TKD.sum(dim=1), None, None


def _swiglu_experts(x_PD: torch.Tensor, w13_EHD: torch.Tensor, w2_EDI: torch.Tensor,
                    offsets_E: torch.Tensor) -> torch.Tensor:
    h_PH = torch._grouped_mm(x_PD, w13_EHD.transpose(-2, -1), offs=offsets_E)
    gate_PI, up_PI = h_PH.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate_PI) * up_PI, w2_EDI.transpose(-2, -1), offs=offsets_E)


def routed_experts_grouped(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                           topk_weights_TK: torch.Tensor, w13_EHD: torch.Tensor,
                           w2_EDI: torch.Tensor) -> torch.Tensor:
    """The whole routed-expert computation on grouped GEMMs; matches
    ``routed_experts_reference`` and is differentiable in x, the weights, w13 and w2."""
    num_tokens, top_k = topk_ids_TK.shape
    layout = PaddedLayout(topk_ids_TK.reshape(-1), w13_EHD.shape[0])
    row_TK = layout.row_M.view(num_tokens, top_k)
    # a buffer row's token: its routed row // K; the zero rows point past the last token
    token_P = torch.where(layout.source_P < num_tokens * top_k, layout.source_P // top_k,
                          num_tokens)
    x_PD = _GatherTokens.apply(x_TD, token_P, row_TK)
    y_PD = _swiglu_experts(x_PD, w13_EHD, w2_EDI, layout.offsets_E)
    # each buffer row is read once, so autograd's scatter back writes each row once
    y_TKD = y_PD[row_TK]
    return (y_TKD * topk_weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)


def expert_mlp_grouped(x_MD: torch.Tensor, counts_E: torch.Tensor, w13_EHD: torch.Tensor,
                       w2_EDI: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP over rows already sorted by expert (``counts_E`` rows each)."""
    num_experts = w13_EHD.shape[0]
    experts_M = torch.repeat_interleave(
        torch.arange(num_experts, device=x_MD.device), counts_E.to(x_MD.device),
        output_size=x_MD.shape[0])
    layout = PaddedLayout(experts_M, num_experts)
    y_PD = _swiglu_experts(layout.pad(x_MD), w13_EHD, w2_EDI, layout.offsets_E)
    return y_PD[layout.row_M]
