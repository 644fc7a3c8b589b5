"""Routed-expert kernels: one function boundary, three implementations.

The model calls :func:`routed_experts` (local experts) and expert parallelism calls
:func:`expert_mlp` on rows it has already dispatched. ``backend`` is one of

- ``"torch"``: the pure-torch reference (a per-expert loop); the default on CPU;
- ``"triton"``: the Triton permute / grouped GEMM / SwiGLU kernels (:mod:`elastic_moe.kernels.moe`). On CPU
  tensors it runs Triton's interpreter and needs ``TRITON_INTERPRET=1`` set before triton is
  first imported (tests only);
- ``"grouped_mm"``: ``torch._grouped_mm`` (CUTLASS grouped GEMMs) around the same permute and
  combine (:mod:`elastic_moe.kernels.torch_grouped`); bf16 on Hopper or newer, any dtype on CPU;
- ``"auto"``: the fastest of these for the device, dtype and model dim, as measured by
  benchmarks/moe_kernels.py (see :data:`AUTO_GROUPED_MM_MIN_DIM`): torch on CPU; on a Hopper GPU
  in bf16 grouped_mm from DeepSeek-V3's dim up, Triton below it and in other dtypes.

Under autocast the inputs run in the autocast dtype, like torch's own matmuls.
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

__all__ = ["AUTO_GROUPED_MM_MIN_DIM", "BACKENDS", "expert_mlp", "routed_experts", "resolve_backend",
           "permute_reference", "gather_reference", "unpermute_reference"]

BACKENDS = ("torch", "triton", "grouped_mm", "auto")
# What "auto" runs for bf16 on a Hopper GPU, from benchmarks/results/moe_kernels-NVIDIA-H200.md
# (whole routed-expert block, fwd+bwd): at DeepSeek-V3's per-GPU shape (D=7168) the grouped_mm
# backend is 1.07-1.14x faster than ours (our dW GEMMs reach 0.42-0.66x of torch._grouped_mm);
# at the `small` recipe's shape (D=2048) ours is 1.01-1.38x faster (the aligned layout's copies
# cost more than the GEMMs gain there). The model dim separates the two regimes.
AUTO_GROUPED_MM_MIN_DIM = 4096


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                    dim: int | None = None) -> str:
    """The implementation ``backend`` stands for on ``device`` with ``dtype`` tensors of model
    dim ``dim``."""
    if backend not in BACKENDS:
        raise ValueError(f"expert_backend={backend!r}: must be one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    from elastic_moe.kernels.torch_grouped import grouped_mm_supported

    if dtype == torch.bfloat16 and grouped_mm_supported(device, dtype) \
            and dim is not None and dim >= AUTO_GROUPED_MM_MIN_DIM:
        return "grouped_mm"
    return "triton"


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the autocast dtype when autocast is on for their device, as torch's own
    matmuls would run them. Custom kernels are outside autocast's op list: without this, fp32
    master weights and fp32 activations would run the experts in fp32 under a bf16 autocast
    (seen on an H200: 6.8% MFU, fp32 GEMMs on top of the profile)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def expert_mlp(x_MD: torch.Tensor, counts_E: torch.Tensor, w13_EHD: torch.Tensor,
               w2_EDI: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """SwiGLU expert MLP over rows already sorted by expert (``counts_E`` rows each)."""
    x_MD, w13_EHD, w2_EDI = _autocast(x_MD, w13_EHD, w2_EDI)
    chosen = resolve_backend(backend, x_MD.device, x_MD.dtype, x_MD.shape[-1])
    if chosen == "triton":
        from elastic_moe.kernels.moe import expert_mlp_triton

        return expert_mlp_triton(x_MD, counts_E, w13_EHD, w2_EDI)
    if chosen == "grouped_mm":
        from elastic_moe.kernels.torch_grouped import expert_mlp_grouped

        return expert_mlp_grouped(x_MD, counts_E, w13_EHD, w2_EDI)
    return expert_mlp_reference(x_MD, counts_E, w13_EHD, w2_EDI)


def routed_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                   topk_weights_TK: torch.Tensor, w13_EHD: torch.Tensor, w2_EDI: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """permute -> SwiGLU experts -> unpermute + weighted combine; differentiable."""
    x_TD, w13_EHD, w2_EDI = _autocast(x_TD, w13_EHD, w2_EDI)
    chosen = resolve_backend(backend, x_TD.device, x_TD.dtype, x_TD.shape[-1])
    if chosen == "triton":
        from elastic_moe.kernels.moe import routed_experts_triton

        return routed_experts_triton(x_TD, topk_ids_TK, topk_weights_TK, w13_EHD, w2_EDI)
    if chosen == "grouped_mm":
        from elastic_moe.kernels.torch_grouped import routed_experts_grouped

        return routed_experts_grouped(x_TD, topk_ids_TK, topk_weights_TK, w13_EHD, w2_EDI)
    return routed_experts_reference(x_TD, topk_ids_TK, topk_weights_TK, w13_EHD, w2_EDI)


if __name__ != "elastic_moe.kernels":  # imported as a top-level `kernels`: a name this project does not own
    from elastic_moe._namespace import hand_over_top_level_name

    hand_over_top_level_name(__name__, __path__[0])
