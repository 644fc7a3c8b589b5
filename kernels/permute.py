"""Token permutation around the experts: expert-sorted order, gather, and the weighted combine.

Everything here is deterministic: the sort is a stable counting sort (a token's rows keep token
order inside each expert, the same order as ``permute_reference``), and the combine *gathers* the
K expert outputs of a token and sums them in k order instead of scatter-adding with float atomics.
The backward of the combine writes each routed row exactly once (a permutation), so it needs no
atomics either.

Shapes use suffixes; legend:
    T = tokens, K = experts per token (top-k), E = experts, D = model dim,
    M = routed rows (T * K), C = chunks of the flattened routing (CHUNK assignments each)
``order_M[m]`` is the flat (t * K + k) assignment at sorted row m; ``rows_TK`` (src2dst) is its
inverse: the sorted row of assignment (t, k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from elastic_moe.kernels.runtime import is_interpreting

__all__ = ["expert_order", "gather_rows", "combine", "combine_backward"]


@triton.jit
def expert_count_kernel(ids_ptr, counts_CE_ptr, M, NUM_EXPERTS, CHUNK: tl.constexpr):
    """counts_CE[c, e] = #assignments to expert e in chunk c (a compare-and-sum: no atomics)."""
    chunk = tl.program_id(0)
    expert = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < M, other=-1)
    hits = tl.sum((ids == expert).to(tl.int32), 0)
    tl.store(counts_CE_ptr + chunk * NUM_EXPERTS + expert, hits)


@triton.jit
def expert_scatter_kernel(ids_ptr, base_EC_ptr, order_ptr, rows_ptr, M, NUM_CHUNKS,
                          CHUNK: tl.constexpr):
    """Write each assignment's sorted row: base of (expert, chunk) + rank inside the chunk."""
    chunk = tl.program_id(0)
    expert = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < M, other=-1)
    hit = ids == expert
    base = tl.load(base_EC_ptr + expert * NUM_CHUNKS + chunk)
    # Inclusive scan gives the stable rank of each hit inside the chunk.
    dst = base + tl.cumsum(hit.to(tl.int32), 0) - 1
    tl.store(order_ptr + dst, offs.to(tl.int64), mask=hit)
    tl.store(rows_ptr + offs, dst, mask=hit)


@triton.jit
def gather_rows_kernel(src_ptr, order_ptr, dst_ptr, M, D, stride_src, stride_dst,
                       TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[m] = src[order[m] // TOP_K]: tokens into expert order."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_d < D)[None, :]
    tokens = tl.load(order_ptr + offs_m, mask=mask_m, other=0) // TOP_K
    vals = tl.load(src_ptr + tokens[:, None] * stride_src + offs_d[None, :], mask=mask)
    tl.store(dst_ptr + offs_m.to(tl.int64)[:, None] * stride_dst + offs_d[None, :], vals, mask=mask)


@triton.jit
def combine_kernel(y_ptr, rows_ptr, weights_ptr, out_ptr, T, D, stride_y, stride_out,
                   TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_k w[t, k] * y[rows[t, k]], summed in k order in fp32 (deterministic)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        rows = tl.load(rows_ptr + offs_t * TOP_K + k, mask=mask_t, other=0).to(tl.int64)
        y = tl.load(y_ptr + rows[:, None] * stride_y + offs_d[None, :], mask=mask, other=0.0)
        y = y.to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + offs_t * TOP_K + k, mask=mask_t, other=0.0).to(tl.float32)
            y = y * w[:, None]
        acc += y
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_out + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def combine_backward_kernel(dout_ptr, y_ptr, rows_ptr, weights_ptr, dy_ptr, dweights_ptr, T, D,
                            stride_dout, stride_y, stride_dy,
                            TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dy[rows[t, k]] = w[t, k] * dout[t] and dw[t, k] = <dout[t], y[rows[t, k]]>.

    One program owns whole tokens, so the dot over D is a plain loop (no cross-program sum) and
    every dy row is written by exactly one program.
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_t64 = offs_t.to(tl.int64)
    for k in tl.static_range(TOP_K):
        rows = tl.load(rows_ptr + offs_t * TOP_K + k, mask=mask_t, other=0).to(tl.int64)
        w = tl.load(weights_ptr + offs_t * TOP_K + k, mask=mask_t, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_t[:, None] & (offs_d < D)[None, :]
            dout = tl.load(dout_ptr + offs_t64[:, None] * stride_dout + offs_d[None, :],
                           mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + rows[:, None] * stride_y + offs_d[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            dw += tl.sum(dout * y, 1)
            tl.store(dy_ptr + rows[:, None] * stride_dy + offs_d[None, :],
                     (dout * w[:, None]).to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dweights_ptr + offs_t * TOP_K + k, dw.to(dweights_ptr.dtype.element_ty),
                 mask=mask_t)


def _row_blocks(num_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) for the memory-bound row kernels."""
    if is_interpreting():
        # Few, fat programs: the interpreter costs ~per program, not per element.
        return 16, min(128, triton.next_power_of_2(num_cols)), 4
    return 4, min(1024, triton.next_power_of_2(num_cols)), 4


def expert_order(topk_ids_TK: torch.Tensor, num_experts: int, *, chunk: int = 1024
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable expert-sorted order of the T*K assignments.

    Returns ``order_M`` (int64, same as ``permute_reference``), ``counts_E`` (int64) and
    ``rows_TK`` (int32, the sorted row of each assignment). ``chunk`` (a power of 2) is the number
    of assignments one program scans; tests shrink it to exercise the cross-chunk bases.
    Expert ids must lie in [0, E); out-of-range ids are not counted (checked on CPU only, a GPU
    check would cost a host sync every step).
    """
    num_tokens, top_k = topk_ids_TK.shape
    num_rows = num_tokens * top_k
    device = topk_ids_TK.device
    ids_M = topk_ids_TK.reshape(-1).contiguous()
    if device.type == "cpu" and num_rows and (ids_M.min() < 0 or ids_M.max() >= num_experts):
        raise ValueError(f"topk_ids must lie in [0, {num_experts}); got "
                         f"[{int(ids_M.min())}, {int(ids_M.max())}]")
    order_M = torch.empty(num_rows, dtype=torch.int64, device=device)
    rows_TK = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    if num_rows == 0:
        return order_M, torch.zeros(num_experts, dtype=torch.int64, device=device), rows_TK
    num_chunks = triton.cdiv(num_rows, chunk)
    counts_CE = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=device)
    expert_count_kernel[(num_chunks, num_experts)](ids_M, counts_CE, num_rows, num_experts,
                                                   CHUNK=chunk)
    # Row base of every (expert, chunk) block: an exclusive scan in expert-major order. C*E ints,
    # tiny next to the routed rows, so torch's scan is good enough.
    counts_EC = counts_CE.t().reshape(-1)
    base_EC = (torch.cumsum(counts_EC, 0, dtype=torch.int32) - counts_EC).contiguous()
    expert_scatter_kernel[(num_chunks, num_experts)](ids_M, base_EC, order_M, rows_TK, num_rows,
                                                     num_chunks, CHUNK=chunk)
    return order_M, counts_CE.sum(0, dtype=torch.int64), rows_TK


def gather_rows(x_TD: torch.Tensor, order_M: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_MD[m] = x_TD[order_M[m] // top_k] (the permute's data movement)."""
    num_rows, dim = order_M.numel(), x_TD.shape[1]
    x_TD = x_TD.contiguous()
    x_MD = torch.empty(num_rows, dim, dtype=x_TD.dtype, device=x_TD.device)
    if num_rows == 0:
        return x_MD
    block_m, block_d, warps = _row_blocks(dim)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(dim, block_d))
    gather_rows_kernel[grid](x_TD, order_M, x_MD, num_rows, dim, x_TD.stride(0), x_MD.stride(0),
                             TOP_K=top_k, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return x_MD


def combine(y_MD: torch.Tensor, rows_TK: torch.Tensor, weights_TK: torch.Tensor | None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out_TD[t] = sum_k weights[t, k] * y_MD[rows_TK[t, k]] (weights None: plain sum)."""
    num_tokens, top_k = rows_TK.shape
    dim = y_MD.shape[1]
    y_MD = y_MD.contiguous()
    out_TD = torch.empty(num_tokens, dim, dtype=out_dtype or y_MD.dtype, device=y_MD.device)
    if num_tokens == 0:
        return out_TD
    block_t, block_d, warps = _row_blocks(dim)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d))
    weights = weights_TK.contiguous() if weights_TK is not None else rows_TK
    combine_kernel[grid](y_MD, rows_TK, weights, out_TD, num_tokens, dim,
                         y_MD.stride(0), out_TD.stride(0), TOP_K=top_k,
                         HAS_WEIGHTS=weights_TK is not None, BLOCK_T=block_t, BLOCK_D=block_d,
                         num_warps=warps)
    return out_TD


def combine_backward(dout_TD: torch.Tensor, y_MD: torch.Tensor, rows_TK: torch.Tensor,
                     weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`combine` w.r.t. y_MD (sorted rows) and the gate weights."""
    num_tokens, top_k = rows_TK.shape
    dim = y_MD.shape[1]
    dout_TD, y_MD, weights_TK = dout_TD.contiguous(), y_MD.contiguous(), weights_TK.contiguous()
    dy_MD = torch.empty_like(y_MD)
    dweights_TK = torch.empty_like(weights_TK)
    if num_tokens == 0:
        return dy_MD, dweights_TK
    block_t, block_d, warps = _row_blocks(dim)
    # Whole tokens per program: at most 256 columns per step keeps the [BLOCK_T, BLOCK_D] tiles
    # in registers while the D loop runs.
    block_d = min(block_d, 256)
    combine_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
        dout_TD, y_MD, rows_TK, weights_TK, dy_MD, dweights_TK, num_tokens, dim,
        dout_TD.stride(0), y_MD.stride(0), dy_MD.stride(0),
        TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return dy_MD, dweights_TK
