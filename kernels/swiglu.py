"""Fused SwiGLU on the concatenated [gate | up] projection: silu(gate) * up, forward and backward.

The backward recomputes silu(gate) * up from h instead of the forward storing it: the down
projection's weight gradient needs that activation, and recomputing it here (one extra read of h,
which the backward reads anyway) saves keeping an [M, I] tensor alive between forward and backward.

Shapes use suffixes; legend:
    M = routed rows, I = expert hidden dim, H = 2 * I (gate columns first, then up)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from elastic_moe.kernels.runtime import is_interpreting

__all__ = ["swiglu", "swiglu_backward"]


@triton.jit
def swiglu_kernel(h_ptr, a_ptr, M, inter, stride_hm, stride_am,
                  BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (offs_m < M)[:, None] & (offs_i < inter)[None, :]
    h_row_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_i[None, :]
    # fp32 math whatever the storage dtype (the interpreter's bf16 arithmetic is also wrong).
    gate = tl.load(h_row_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_row_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up
    tl.store(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_i[None, :],
             a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward_kernel(h_ptr, da_ptr, dh_ptr, a_ptr, M, inter,
                           stride_hm, stride_dam, stride_dhm, stride_am,
                           BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """dh = [da * up * silu'(gate) | da * silu(gate)], and a = silu(gate) * up recomputed."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (offs_m < M)[:, None] & (offs_i < inter)[None, :]
    offs_m64 = offs_m.to(tl.int64)
    h_row_ptrs = h_ptr + offs_m64[:, None] * stride_hm + offs_i[None, :]
    gate = tl.load(h_row_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_row_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + offs_m64[:, None] * stride_dam + offs_i[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    dgate = da * up * sig * (1.0 + gate * (1.0 - sig))
    dup = da * silu
    dh_row_ptrs = dh_ptr + offs_m64[:, None] * stride_dhm + offs_i[None, :]
    tl.store(dh_row_ptrs, dgate.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_row_ptrs + inter, dup.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + offs_m64[:, None] * stride_am + offs_i[None, :],
             (silu * up).to(a_ptr.dtype.element_ty), mask=mask)


def _blocks(inter: int) -> tuple[int, int]:
    if is_interpreting():
        return 16, min(128, triton.next_power_of_2(inter))
    return 8, min(512, triton.next_power_of_2(inter))


def _check(h_MH: torch.Tensor) -> int:
    if h_MH.shape[1] % 2 != 0 or h_MH.stride(1) != 1:
        raise ValueError(f"h_MH shape {tuple(h_MH.shape)} stride {h_MH.stride()}: need an even, "
                         "unit-stride last dim ([gate | up])")
    return h_MH.shape[1] // 2


def swiglu(h_MH: torch.Tensor) -> torch.Tensor:
    """silu(h[:, :I]) * h[:, I:] -> [M, I]."""
    inter = _check(h_MH)
    num_rows = h_MH.shape[0]
    a_MI = torch.empty(num_rows, inter, dtype=h_MH.dtype, device=h_MH.device)
    if num_rows == 0:
        return a_MI
    block_m, block_i = _blocks(inter)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(inter, block_i))
    swiglu_kernel[grid](h_MH, a_MI, num_rows, inter, h_MH.stride(0), a_MI.stride(0),
                        BLOCK_M=block_m, BLOCK_I=block_i)
    return a_MI


def swiglu_backward(h_MH: torch.Tensor, da_MI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dh_MH, a_MI): the input gradient and the recomputed forward activation."""
    inter = _check(h_MH)
    num_rows = h_MH.shape[0]
    da_MI = da_MI.contiguous()
    dh_MH = torch.empty_like(h_MH)
    a_MI = torch.empty(num_rows, inter, dtype=h_MH.dtype, device=h_MH.device)
    if num_rows == 0:
        return dh_MH, a_MI
    block_m, block_i = _blocks(inter)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(inter, block_i))
    swiglu_backward_kernel[grid](h_MH, da_MI, dh_MH, a_MI, num_rows, inter,
                                 h_MH.stride(0), da_MI.stride(0), dh_MH.stride(0), a_MI.stride(0),
                                 BLOCK_M=block_m, BLOCK_I=block_i)
    return dh_MH, a_MI
