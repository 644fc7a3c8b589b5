"""Routed-expert kernels: one function boundary, three implementations.

The model calls :func:`routed_experts` (local experts) and expert parallelism calls
:func:`expert_mlp` on rows it has already dispatched. ``backend`` is one of

- ``"torch"``: the pure-torch reference (a per-expert loop); the default on CPU;
- ``"triton"``: the Triton permute / grouped GEMM / SwiGLU kernels (:mod:`kernels.moe`). On CPU
  tensors it runs Triton's interpreter and needs ``TRITON_INTERPRET=1`` set before triton is
  first imported (tests only);
- ``"grouped_mm"``: ``torch._grouped_mm`` (CUTLASS grouped GEMMs) around the same permute and
  combine (:mod:`kernels.torch_grouped`); bf16 on Hopper or newer, any dtype on CPU;
- ``"auto"``: the fastest of these for the device and dtype, as measured by
  benchmarks/moe_kernels.py (see :data:`AUTO_CUDA_BF16`).
"""

from __future__ import annotations

import torch

from kernels.reference import (
    expert_mlp_reference,
    gather_reference,
    permute_reference,
    routed_experts_reference,
    unpermute_reference,
)

__all__ = ["AUTO_CUDA_BF16", "BACKENDS", "expert_mlp", "routed_experts", "resolve_backend",
           "permute_reference", "gather_reference", "unpermute_reference"]

BACKENDS = ("torch", "triton", "grouped_mm", "auto")
# What "auto" runs for bf16 on a Hopper GPU: on an H200 (benchmarks/results/moe_kernels-*H200*)
# torch._grouped_mm's grouped GEMMs beat ours at every DeepSeek-V3 and `small` shape measured,
# and the whole block fwd+bwd with them is faster too, so auto takes them there.
AUTO_CUDA_BF16 = "grouped_mm"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The implementation ``backend`` stands for on ``device`` with ``dtype`` tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"expert_backend={backend!r}: must be one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    from kernels.torch_grouped import grouped_mm_supported

    if dtype == torch.bfloat16 and grouped_mm_supported(device, dtype):
        return AUTO_CUDA_BF16
    return "triton"


def expert_mlp(x_MD: torch.Tensor, counts_E: torch.Tensor, w13_EHD: torch.Tensor,
               w2_EDI: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """SwiGLU expert MLP over rows already sorted by expert (``counts_E`` rows each)."""
    chosen = resolve_backend(backend, x_MD.device, x_MD.dtype)
    if chosen == "triton":
        from kernels.moe import expert_mlp_triton

        return expert_mlp_triton(x_MD, counts_E, w13_EHD, w2_EDI)
    if chosen == "grouped_mm":
        from kernels.torch_grouped import expert_mlp_grouped

        return expert_mlp_grouped(x_MD, counts_E, w13_EHD, w2_EDI)
    return expert_mlp_reference(x_MD, counts_E, w13_EHD, w2_EDI)


def routed_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                   topk_weights_TK: torch.Tensor, w13_EHD: torch.Tensor, w2_EDI: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """permute -> SwiGLU experts -> unpermute + weighted combine; differentiable."""
    chosen = resolve_backend(backend, x_TD.device, x_TD.dtype)
    if chosen == "triton":
        from kernels.moe import routed_experts_triton

        return routed_experts_triton(x_TD, topk_ids_TK, topk_weights_TK, w13_EHD, w2_EDI)
    if chosen == "grouped_mm":
        from kernels.torch_grouped import routed_experts_grouped

        return routed_experts_grouped(x_TD, topk_ids_TK, topk_weights_TK, w13_EHD, w2_EDI)
    return routed_experts_reference(x_TD, topk_ids_TK, topk_weights_TK, w13_EHD, w2_EDI)
