"""Routed-expert kernels: one function boundary, a torch and a Triton implementation.

The model calls :func:`routed_experts` (local experts) and expert parallelism calls
:func:`expert_mlp` on rows it has already dispatched. ``backend`` is ``"torch"``, ``"triton"`` or
``"auto"`` (Triton on CUDA tensors, torch elsewhere). ``"triton"`` on CPU tensors runs Triton's
interpreter and needs ``TRITON_INTERPRET=1`` set before triton is first imported (tests only).
"""

from __future__ import annotations

import torch
from elastic_moe.kernels.reference import (
    expert_mlp_reference,
    gather_reference,
    permute_reference,
    routed_experts_reference,
    unpermute_reference,
)

__all__ = ["expert_mlp", "routed_experts", "resolve_backend", "permute_reference",
           "gather_reference", "unpermute_reference"]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("torch", "triton", "auto"):
        raise ValueError(f"expert_backend={backend!r}: must be 'torch', 'triton' or 'auto'")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def expert_mlp(x_MD: torch.Tensor, counts_E: torch.Tensor, w13_EHD: torch.Tensor,
               w2_EDI: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """SwiGLU expert MLP over rows already sorted by expert (``counts_E`` rows each)."""
    if resolve_backend(backend, x_MD.device) == "triton":
        from elastic_moe.kernels.moe import expert_mlp_triton

        return expert_mlp_triton(x_MD, counts_E, w13_EHD, w2_EDI)
    return expert_mlp_reference(x_MD, counts_E, w13_EHD, w2_EDI)


def routed_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                   topk_weights_TK: torch.Tensor, w13_EHD: torch.Tensor, w2_EDI: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """permute -> SwiGLU experts -> unpermute + weighted combine; differentiable."""
    if resolve_backend(backend, x_TD.device) == "triton":
        from elastic_moe.kernels.moe import routed_experts_triton

        return routed_experts_triton(x_TD, topk_ids_TK, topk_weights_TK, w13_EHD, w2_EDI)
    return routed_experts_reference(x_TD, topk_ids_TK, topk_weights_TK, w13_EHD, w2_EDI)


if __name__ != "elastic_moe.kernels":  # imported as a top-level `kernels`: a name this project does not own
    from elastic_moe._namespace import hand_over_top_level_name

    hand_over_top_level_name(__name__, __path__[0])
