"""Grouped GEMM over contiguous, variable-size expert segments (forward, dX and dW).

Rows of the activation matrix are sorted by expert; expert ``e`` owns rows
``offsets_E1[e]:offsets_E1[e + 1]`` (any count, including 0). One launch covers every expert:
the grid enumerates (m tile, n tile) pairs over an upper bound of the m tiles, and each program
finds its expert from the per-expert tile counts it computes itself (so the schedule needs no
host sync and stays valid for whatever BLOCK_M the autotuner picks).

Shapes use suffixes; legend:
    E = experts, M = routed rows (sum of the segments), N = output features,
    K = reduction features, E1 = E + 1 (segment offsets with a leading 0)
Weights use the nn.Linear layout ``w_ENK`` ([out, in]), so the forward is Y = X @ W[e]^T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from elastic_moe.kernels.runtime import input_precision, is_interpreting

__all__ = ["grouped_mm", "grouped_mm_dw", "segment_offsets", "gemm_configs", "dw_configs"]


def gemm_configs() -> list[triton.Config]:
    """Tile configs for the (m tile, n tile) kernel; one when interpreting (multi-config fails)."""
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    # H100 candidates (untuned on hardware yet): large tiles for the big-segment regime
    # (Moonlight T=16k), 64-row tiles for DeepSeek-V3's ~128-row segments where padding waste
    # of a 128-row tile would be large.
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]


def dw_configs() -> list[triton.Config]:
    """Tile configs for the per-expert dW reduction (BLOCK_M is the reduction step)."""
    if is_interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_M": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_M": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_M": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_M": 32}, num_warps=8, num_stages=4),
    ]


@triton.jit
def grouped_mm_kernel(
    a_ptr, a_rows_ptr, b_ptr, c_ptr, offsets_ptr,
    M, N, K, NUM_EXPERTS,
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cm, stride_cn,
    E_PAD: tl.constexpr, A_GATHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[seg_e] = A[seg_e] @ B[e] with B[e] addressed as [K, N] through its strides.

    With A_GATHER, row m of A is ``a[a_rows[m]]`` (the permute gather fused into the A load).
    """
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    # n fastest: neighbouring programs share the A tile and the expert's weights in L2.
    tile_m = pid // num_n_tiles
    tile_n = pid % num_n_tiles

    # Per-expert m-tile schedule, recomputed per program (E_PAD ints: cheap next to a GEMM tile).
    offs_e = tl.arange(0, E_PAD)
    seg_start_E = tl.load(offsets_ptr + offs_e, mask=offs_e < NUM_EXPERTS, other=0)
    seg_end_E = tl.load(offsets_ptr + offs_e + 1, mask=offs_e < NUM_EXPERTS, other=0)
    tiles_E = tl.cdiv(seg_end_E - seg_start_E, BLOCK_M)
    tiles_end_E = tl.cumsum(tiles_E, 0)
    total_tiles = tl.sum(tiles_E, 0)
    if tile_m >= total_tiles:
        # The grid is an upper bound (M / BLOCK_M + E); surplus programs have nothing to do.
        return
    expert = tl.sum((tiles_end_E <= tile_m).to(tl.int32), 0)
    is_e = offs_e == expert
    tile_in_e = tile_m - tl.sum(tl.where(is_e, tiles_end_E - tiles_E, 0), 0)
    seg_start = tl.sum(tl.where(is_e, seg_start_E, 0), 0)
    seg_end = tl.sum(tl.where(is_e, seg_end_E, 0), 0)

    offs_m = seg_start + tile_in_e * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_end
    if A_GATHER:
        rows_a = tl.load(a_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        rows_a = offs_m.to(tl.int64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_tile_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_tile_ptrs = (b_ptr + expert.to(tl.int64) * stride_be
                   + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k + k0 < K
        a = tl.load(a_tile_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_tile_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_tile_ptrs += BLOCK_K * stride_ak
        b_tile_ptrs += BLOCK_K * stride_bk

    c_tile_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_tile_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def grouped_mm_dw_kernel(
    dy_ptr, x_ptr, x_rows_ptr, dw_ptr, offsets_ptr,
    N, K,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_dwe, stride_dwn, stride_dwk,
    X_GATHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dW[e] = dY[seg_e]^T @ X[seg_e]; an empty segment writes zeros (no atomics, no memset)."""
    expert = tl.program_id(0)
    tile_n = tl.program_id(1)
    tile_k = tl.program_id(2)
    seg_start = tl.load(offsets_ptr + expert)
    seg_end = tl.load(offsets_ptr + expert + 1)

    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(seg_start, seg_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_end
        if X_GATHER:
            rows_x = tl.load(x_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            rows_x = offs_m.to(tl.int64)
        dy = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
                     + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        x = tl.load(x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)

    dw_tile_ptrs = (dw_ptr + expert.to(tl.int64) * stride_dwe
                    + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk)
    tl.store(dw_tile_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


# Autotuned launchers. Keyed on the static feature sizes (and dtype, which Triton adds); M changes
# every step, so keying on it would retune constantly.
grouped_mm_tuned = triton.autotune(configs=gemm_configs(), key=["N", "K"])(grouped_mm_kernel)
grouped_mm_dw_tuned = triton.autotune(configs=dw_configs(), key=["N", "K"])(grouped_mm_dw_kernel)


def segment_offsets(counts_E: torch.Tensor) -> torch.Tensor:
    """[0, c0, c0+c1, ...] as int32 on the counts' device (no host sync)."""
    offsets_E1 = torch.zeros(counts_E.numel() + 1, dtype=torch.int32, device=counts_E.device)
    torch.cumsum(counts_E, 0, out=offsets_E1[1:])
    return offsets_E1


def _check_features(name: str, value: int) -> None:
    if value % 16 != 0:
        raise ValueError(f"{name}={value}: grouped GEMM feature sizes must be multiples of 16")


def grouped_mm(a_MK: torch.Tensor, w_ENK: torch.Tensor, offsets_E1: torch.Tensor,
               *, transpose_w: bool = True, a_rows_M: torch.Tensor | None = None) -> torch.Tensor:
    """Y[seg_e] = A[seg_e] @ W[e]^T (``transpose_w``, the forward) or A[seg_e] @ W[e] (dX).

    ``a_rows_M`` fuses a row gather into the A load: row m of A is ``a_MK[a_rows_M[m]]`` and the
    number of rows is ``a_rows_M.numel()``; ``a_MK`` is then the un-permuted source (e.g. x_TD).
    """
    num_experts = w_ENK.shape[0]
    if transpose_w:  # Y = A @ W^T: B[k, n] = W[e, n, k]
        n_out, k_red = w_ENK.shape[1], w_ENK.shape[2]
        stride_bk, stride_bn = w_ENK.stride(2), w_ENK.stride(1)
    else:  # dX = dY @ W: B[k, n] = W[e, k, n]
        n_out, k_red = w_ENK.shape[2], w_ENK.shape[1]
        stride_bk, stride_bn = w_ENK.stride(1), w_ENK.stride(2)
    if a_MK.shape[1] != k_red:
        raise ValueError(f"a has {a_MK.shape[1]} features, weights expect {k_red}")
    _check_features("N", n_out)
    _check_features("K", k_red)
    num_rows = a_rows_M.numel() if a_rows_M is not None else a_MK.shape[0]
    out_MN = torch.empty(num_rows, n_out, dtype=a_MK.dtype, device=a_MK.device)
    if num_rows == 0:
        return out_MN

    def grid(meta: dict) -> tuple[int]:
        m_tiles_bound = triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts
        return (m_tiles_bound * triton.cdiv(n_out, meta["BLOCK_N"]),)

    grouped_mm_tuned[grid](
        a_MK, a_rows_M if a_rows_M is not None else offsets_E1, w_ENK, out_MN, offsets_E1,
        num_rows, n_out, k_red, num_experts,
        a_MK.stride(0), a_MK.stride(1),
        w_ENK.stride(0), stride_bk, stride_bn,
        out_MN.stride(0), out_MN.stride(1),
        E_PAD=triton.next_power_of_2(num_experts), A_GATHER=a_rows_M is not None,
        INPUT_PRECISION=input_precision(a_MK.dtype),
    )
    return out_MN


def grouped_mm_dw(dy_MN: torch.Tensor, x_MK: torch.Tensor, offsets_E1: torch.Tensor,
                  *, x_rows_M: torch.Tensor | None = None) -> torch.Tensor:
    """dW[e] = dY[seg_e]^T @ X[seg_e] -> [E, N, K] (the nn.Linear-layout weight gradient).

    ``x_rows_M`` gathers X rows as in :func:`grouped_mm`.
    """
    num_experts = offsets_E1.numel() - 1
    n_out, k_red = dy_MN.shape[1], x_MK.shape[1]
    _check_features("N", n_out)
    _check_features("K", k_red)
    # fp32 master gradients are the caller's business; dW comes out in the activation dtype like
    # torch's matmul backward.
    dw_ENK = torch.empty(num_experts, n_out, k_red, dtype=dy_MN.dtype, device=dy_MN.device)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (num_experts, triton.cdiv(n_out, meta["BLOCK_N"]),
                triton.cdiv(k_red, meta["BLOCK_K"]))

    grouped_mm_dw_tuned[grid](
        dy_MN, x_MK, x_rows_M if x_rows_M is not None else offsets_E1, dw_ENK, offsets_E1,
        n_out, k_red,
        dy_MN.stride(0), dy_MN.stride(1),
        x_MK.stride(0), x_MK.stride(1),
        dw_ENK.stride(0), dw_ENK.stride(1), dw_ENK.stride(2),
        X_GATHER=x_rows_M is not None, INPUT_PRECISION=input_precision(dy_MN.dtype),
    )
    return dw_ENK
