"""Pure-torch references for the routed-expert computation.

These are the test oracles for the Triton kernels and the default implementation on CPU.
Shapes use suffixes; legend:
    T = tokens, K = experts per token (top-k), E = experts, D = model dim,
    I = expert hidden dim, M = routed rows (T * K, or whatever arrives after EP dispatch).
Expert weights use the nn.Linear / Hugging Face layout [out, in]:
    w13_EHD: gate and up projections concatenated, H = 2 * I (gate first, then up)
    w2_EDI:  down projection
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def permute_reference(topk_ids_TK: torch.Tensor,
                      num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-sorted order of the T*K routed rows.

    Returns ``order_M`` (index into the flattened T*K assignments, stable: a token's rows keep
    token order inside each expert) and ``counts_E`` (rows per expert, int64).
    """
    flat_M = topk_ids_TK.reshape(-1)
    order_M = torch.argsort(flat_M, stable=True)
    counts_E = torch.bincount(flat_M, minlength=num_experts)
    return order_M, counts_E


def gather_reference(x_TD: torch.Tensor, order_M: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of x in expert order: row m is token ``order_M[m] // top_k``."""
    return x_TD.index_select(0, order_M // top_k)


def grouped_mm_reference(x_MK: torch.Tensor, w_ENK: torch.Tensor,
                         counts_E: torch.Tensor) -> torch.Tensor:
    """Y[seg_e] = X[seg_e] @ W[e]^T for contiguous segments of ``counts_E`` rows (a loop)."""
    outs = []
    for e, x_mK in enumerate(torch.split(x_MK, counts_E.tolist())):
        outs.append(x_mK @ w_ENK[e].t())
    if not outs:
        return x_MK.new_zeros(0, w_ENK.shape[1])
    return torch.cat(outs, dim=0)


def swiglu_reference(h_MH: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up on the concatenated [gate | up] projection output."""
    gate_MI, up_MI = h_MH.chunk(2, dim=-1)
    return F.silu(gate_MI) * up_MI


def expert_mlp_reference(x_MD: torch.Tensor, counts_E: torch.Tensor, w13_EHD: torch.Tensor,
                         w2_EDI: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP over expert-sorted rows."""
    h_MH = grouped_mm_reference(x_MD, w13_EHD, counts_E)
    return grouped_mm_reference(swiglu_reference(h_MH), w2_EDI, counts_E)


def unpermute_reference(y_MD: torch.Tensor, order_M: torch.Tensor,
                        topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Scatter rows back to token order and combine the K outputs with their gate weights.

    Deterministic: rows are put back in (token, k) order and summed over k in a fixed order.
    """
    num_tokens, top_k = topk_weights_TK.shape
    unsorted_MD = torch.empty_like(y_MD)
    unsorted_MD[order_M] = y_MD
    y_TKD = unsorted_MD.view(num_tokens, top_k, y_MD.shape[-1])  # -1 fails for 0 tokens
    return (y_TKD * topk_weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)


def routed_experts_reference(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                             topk_weights_TK: torch.Tensor, w13_EHD: torch.Tensor,
                             w2_EDI: torch.Tensor) -> torch.Tensor:
    """The whole routed-expert computation: permute -> SwiGLU experts -> unpermute + combine."""
    num_experts = w13_EHD.shape[0]
    top_k = topk_ids_TK.shape[1]
    order_M, counts_E = permute_reference(topk_ids_TK, num_experts)
    x_MD = gather_reference(x_TD, order_M, top_k)
    y_MD = expert_mlp_reference(x_MD, counts_E, w13_EHD, w2_EDI)
    return unpermute_reference(y_MD, order_M, topk_weights_TK)
