"""Benchmark the Triton routed-expert kernels against torch (issue 5).

On CUDA: for DeepSeek-V3's per-GPU shape at EP=8 (32 local experts, top-8, D=7168, I=2048: a
rank receives T*8 rows over its 32 experts) and the `small` recipe's shape (E=64, top-6, D=2048,
I=1408) at T in {4096, 16384} tokens per rank, uniform and skewed routing (hottest expert ~3.5x
the mean, one expert empty), per kernel: median time (triton.testing.do_bench), TFLOP/s (2*M*N*K
on the real rows) or GB/s, and ratios against a dense torch.mm of the same FLOPs,
torch._grouped_mm (on the 16-row-aligned layout the `grouped_mm` backend uses) and the torch
per-expert loop; then the whole block forward and forward+backward for each expert backend
(triton, grouped_mm, torch), with peak memory, and which backend `auto` runs.

Without CUDA it runs the same kernels in Triton's CPU interpreter on scaled-down shapes and
reports *correctness* (relative error vs the float64 reference); interpreter timings say nothing
about GPU speed and are not reported.

    python benchmarks/moe_kernels.py [--dtype bf16] [--quick]

Writes benchmarks/results/moe_kernels-<device>.md. Shapes use suffixes; legend:
    T = tokens, K = experts per token, E = experts, D = model dim, I = expert hidden dim,
    H = 2 * I, M = routed rows (T * K)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The interpreter must be chosen before triton is imported (see kernels/runtime.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from elastic_moe.kernels import reference as ref  # noqa: E402
from elastic_moe.kernels import resolve_backend  # noqa: E402
from elastic_moe.kernels.grouped_gemm import grouped_mm, grouped_mm_dw, segment_offsets  # noqa: E402
from elastic_moe.kernels.moe import routed_experts_triton  # noqa: E402
from elastic_moe.kernels.permute import combine, expert_order, gather_rows  # noqa: E402
from elastic_moe.kernels.swiglu import swiglu, swiglu_backward  # noqa: E402
from elastic_moe.kernels.torch_grouped import PaddedLayout, grouped_mm_supported, routed_experts_grouped  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    top_k: int
    dim: int
    inter: int


GPU_SHAPES = [Shape("DeepSeek-V3 per GPU at EP=8", 32, 8, 7168, 2048),
              Shape("small recipe", 64, 6, 2048, 1408)]
GPU_TOKENS = [4096, 16384]
# Interpreter: same expert/top-k structure shrunk until a run takes seconds.
# E and top-k of Moonlight are real; DeepSeek-V3 keeps top-8 with 64 experts (fewer programs for
# the interpreter). A 3.5x hot expert needs E / K > 3.5 (a token picks an expert at most once).
CPU_SHAPES = [Shape("DeepSeek-V3 (scaled: E=64, D=64, I=32)", 64, 8, 64, 32),
              Shape("Moonlight (scaled: E=64, D=64, I=48)", 64, 6, 64, 48)]
CPU_TOKENS = [32]


def make_routing(num_tokens: int, shape: Shape, skewed: bool, device: str,
                 gen: torch.Generator) -> torch.Tensor:
    """topk_ids_TK, K distinct experts per token. Skewed: expert 0 takes exactly 3.5x the mean
    load (capped at one row per token), expert E-1 is never chosen, the rest random."""
    num_experts, top_k = shape.num_experts, shape.top_k
    scores_TE = torch.rand(num_tokens, num_experts, generator=gen, device=device)
    if skewed:
        num_hot = min(num_tokens, round(3.5 * num_tokens * top_k / num_experts))
        scores_TE[:, -1] = -1.0
        scores_TE[:, 0] = -1.0
        scores_TE[:num_hot, 0] = 2.0
    return scores_TE.topk(top_k, dim=1).indices


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().abs().max().clamp_min(1e-30)
    return float((actual.detach().double() - expected.detach().double()).abs().max() / scale)


def bench_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def torch_grouped(a_PK: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor
                  ) -> torch.Tensor:
    # torch._grouped_mm takes B as [E, K, N] and the segment *end* offsets (int32).
    return torch._grouped_mm(a_PK, w_EKN, offs=ends_E)


def torch_grouped_dw(dy_PN: torch.Tensor, x_PK: torch.Tensor, ends_E: torch.Tensor
                     ) -> torch.Tensor:
    # 2d x 2d mode: segments run along the reduction dim -> [E, N, K].
    return torch._grouped_mm(dy_PN.t(), x_PK, offs=ends_E)


@dataclass
class Problem:
    """All tensors of one routed-expert step, in expert order where it applies."""

    x_TD: torch.Tensor
    topk_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    w13_EHD: torch.Tensor
    w2_EDI: torch.Tensor
    order_M: torch.Tensor
    counts_E: torch.Tensor
    rows_TK: torch.Tensor
    offsets_E1: torch.Tensor
    x_MD: torch.Tensor
    h_MH: torch.Tensor
    a_MI: torch.Tensor
    y_MD: torch.Tensor
    dy_MD: torch.Tensor
    dh_MH: torch.Tensor
    layout: PaddedLayout  # the grouped_mm backend's aligned buffer, for the torch._grouped_mm rows


def build(shape: Shape, num_tokens: int, skewed: bool, dtype: torch.dtype, device: str,
          seed: int) -> Problem:
    gen = torch.Generator(device=device).manual_seed(seed)
    top_k, dim, inter = shape.top_k, shape.dim, shape.inter
    topk_ids_TK = make_routing(num_tokens, shape, skewed, device, gen)
    x_TD = torch.randn(num_tokens, dim, generator=gen, device=device).to(dtype)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen, device=device)
    w13_EHD = (torch.randn(shape.num_experts, 2 * inter, dim, generator=gen, device=device)
               / dim**0.5).to(dtype)
    w2_EDI = (torch.randn(shape.num_experts, dim, inter, generator=gen, device=device)
              / inter**0.5).to(dtype)
    order_M, counts_E, rows_TK = expert_order(topk_ids_TK, shape.num_experts)
    offsets_E1 = segment_offsets(counts_E)
    x_MD = gather_rows(x_TD, order_M, top_k)
    h_MH = grouped_mm(x_MD, w13_EHD, offsets_E1)
    a_MI = swiglu(h_MH)
    y_MD = grouped_mm(a_MI, w2_EDI, offsets_E1)
    num_rows = num_tokens * top_k
    dy_MD = torch.randn(num_rows, dim, generator=gen, device=device).to(dtype)
    dh_MH = torch.randn(num_rows, 2 * inter, generator=gen, device=device).to(dtype)
    experts_M = torch.repeat_interleave(torch.arange(shape.num_experts, device=device),
                                        counts_E)
    return Problem(x_TD, topk_ids_TK, weights_TK, w13_EHD, w2_EDI, order_M, counts_E, rows_TK,
                   offsets_E1, x_MD, h_MH, a_MI, y_MD, dy_MD, dh_MH,
                   PaddedLayout(experts_M, shape.num_experts))


def swiglu_grad_reference(h_MH: torch.Tensor, da_MI: torch.Tensor) -> torch.Tensor:
    h_MH = h_MH.detach().requires_grad_(True)
    return torch.autograd.grad(ref.swiglu_reference(h_MH), h_MH, da_MI)[0]


@dataclass
class Row:
    kernel: str
    work: float  # FLOPs for GEMMs, bytes for memory-bound kernels
    is_gemm: bool
    triton_fn: Callable[[], torch.Tensor]
    ref_fn: Callable[[], torch.Tensor]  # float64 oracle
    dense_fn: Callable[[], object] | None = None
    grouped_fn: Callable[[], object] | None = None
    loop_fn: Callable[[], object] | None = None


def kernel_rows(p: Problem) -> list[Row]:
    num_tokens, top_k = p.topk_ids_TK.shape
    num_rows, dim = p.x_MD.shape
    inter = p.a_MI.shape[1]
    elt = p.x_TD.element_size()
    counts = p.counts_E
    d = torch.float64
    w13_EDH = p.w13_EHD.transpose(1, 2)
    w2_EID = p.w2_EDI.transpose(1, 2)
    ends = p.layout.offsets_E
    x_P, a_P = p.layout.pad(p.x_MD), p.layout.pad(p.a_MI)
    dy_P, dh_P = p.layout.pad(p.dy_MD), p.layout.pad(p.dh_MH)
    dense = {  # torch.mm with the same M, N, K as each GEMM
        (num_rows, 2 * inter, dim): (p.x_MD, p.w13_EHD[0].t()),
        (num_rows, dim, inter): (p.a_MI, p.w2_EDI[0].t()),
        (num_rows, inter, dim): (p.dy_MD, p.w2_EDI[0]),
        (num_rows, dim, 2 * inter): (p.dh_MH, p.w13_EHD[0]),
    }

    def mm(m: int, n: int, k: int) -> Callable[[], object]:
        a, b = dense[(m, n, k)]
        return lambda: torch.mm(a, b)

    def loop_dw(dy: torch.Tensor, x: torch.Tensor) -> Callable[[], object]:
        return lambda: [dy_e.t() @ x_e for dy_e, x_e in
                        zip(dy.split(counts.tolist()), x.split(counts.tolist()), strict=True)]

    return [
        Row("permute (order + gather)", 2 * num_rows * dim * elt, False,
            lambda: gather_rows(p.x_TD, expert_order(p.topk_ids_TK, counts.numel())[0], top_k),
            lambda: ref.gather_reference(
                p.x_TD.to(d), ref.permute_reference(p.topk_ids_TK, counts.numel())[0], top_k),
            loop_fn=lambda: ref.gather_reference(
                p.x_TD, ref.permute_reference(p.topk_ids_TK, counts.numel())[0], top_k)),
        Row("gate/up fwd", 2 * num_rows * 2 * inter * dim, True,
            lambda: grouped_mm(p.x_MD, p.w13_EHD, p.offsets_E1),
            lambda: ref.grouped_mm_reference(p.x_MD.to(d), p.w13_EHD.to(d), counts),
            mm(num_rows, 2 * inter, dim),
            lambda: torch_grouped(x_P, w13_EDH, ends),
            lambda: ref.grouped_mm_reference(p.x_MD, p.w13_EHD, counts)),
        Row("gate/up fwd, gather fused", 2 * num_rows * 2 * inter * dim, True,
            lambda: grouped_mm(p.x_TD, p.w13_EHD, p.offsets_E1, a_rows_M=p.order_M // top_k),
            lambda: ref.grouped_mm_reference(p.x_MD.to(d), p.w13_EHD.to(d), counts),
            mm(num_rows, 2 * inter, dim),
            lambda: torch_grouped(p.layout.pad(p.x_TD[p.order_M // top_k]), w13_EDH, ends),
            None),
        Row("SwiGLU fwd", 3 * num_rows * inter * elt, False,
            lambda: swiglu(p.h_MH), lambda: ref.swiglu_reference(p.h_MH.to(d)),
            loop_fn=lambda: ref.swiglu_reference(p.h_MH)),
        Row("down fwd", 2 * num_rows * dim * inter, True,
            lambda: grouped_mm(p.a_MI, p.w2_EDI, p.offsets_E1),
            lambda: ref.grouped_mm_reference(p.a_MI.to(d), p.w2_EDI.to(d), counts),
            mm(num_rows, dim, inter),
            lambda: torch_grouped(a_P, w2_EID, ends),
            lambda: ref.grouped_mm_reference(p.a_MI, p.w2_EDI, counts)),
        Row("unpermute (weighted combine)", (num_rows + num_tokens) * dim * elt, False,
            lambda: combine(p.y_MD, p.rows_TK, p.weights_TK),
            lambda: ref.unpermute_reference(p.y_MD.to(d), p.order_M, p.weights_TK.to(d)),
            loop_fn=lambda: ref.unpermute_reference(p.y_MD, p.order_M, p.weights_TK)),
        Row("down dX", 2 * num_rows * inter * dim, True,
            lambda: grouped_mm(p.dy_MD, p.w2_EDI, p.offsets_E1, transpose_w=False),
            lambda: ref.grouped_mm_reference(p.dy_MD.to(d), w2_EID.to(d), counts),
            mm(num_rows, inter, dim),
            lambda: torch_grouped(dy_P, p.w2_EDI, ends),
            lambda: ref.grouped_mm_reference(p.dy_MD, w2_EID, counts)),
        Row("down dW", 2 * num_rows * inter * dim, True,
            lambda: grouped_mm_dw(p.dy_MD, p.a_MI, p.offsets_E1),
            lambda: torch.stack([dy_e.t() @ a_e for dy_e, a_e in zip(
                p.dy_MD.to(d).split(counts.tolist()), p.a_MI.to(d).split(counts.tolist()),
                strict=True)]),
            mm(num_rows, dim, inter),
            lambda: torch_grouped_dw(dy_P, a_P, ends),
            loop_dw(p.dy_MD, p.a_MI)),
        Row("SwiGLU bwd", 5 * num_rows * inter * elt, False,
            lambda: swiglu_backward(p.h_MH, p.a_MI)[0],
            lambda: swiglu_grad_reference(p.h_MH.to(d), p.a_MI.to(d))),
        Row("gate/up dX", 2 * num_rows * dim * 2 * inter, True,
            lambda: grouped_mm(p.dh_MH, p.w13_EHD, p.offsets_E1, transpose_w=False),
            lambda: ref.grouped_mm_reference(p.dh_MH.to(d), w13_EDH.to(d), counts),
            mm(num_rows, dim, 2 * inter),
            lambda: torch_grouped(dh_P, p.w13_EHD, ends),
            lambda: ref.grouped_mm_reference(p.dh_MH, w13_EDH, counts)),
        Row("gate/up dW", 2 * num_rows * dim * 2 * inter, True,
            lambda: grouped_mm_dw(p.dh_MH, p.x_MD, p.offsets_E1),
            lambda: torch.stack([dh_e.t() @ x_e for dh_e, x_e in zip(
                p.dh_MH.to(d).split(counts.tolist()), p.x_MD.to(d).split(counts.tolist()),
                strict=True)]),
            mm(num_rows, 2 * inter, dim),
            lambda: torch_grouped_dw(dh_P, x_P, ends),
            loop_dw(p.dh_MH, p.x_MD)),
    ]


def try_ms(fn: Callable[[], object] | None) -> float | None:
    if fn is None:
        return None
    try:
        return bench_ms(fn)
    except Exception as exc:  # e.g. torch._grouped_mm without sm_90 or for this layout
        print(f"    (comparison unavailable: {type(exc).__name__}: {str(exc)[:120]})")
        return None


def fmt_ratio(ours_ms: float, other_ms: float | None) -> str:
    return "n/a" if other_ms is None else f"{other_ms / ours_ms:.2f}x"


BLOCK_BACKENDS = {"triton": routed_experts_triton, "grouped_mm": routed_experts_grouped,
                  "torch": ref.routed_experts_reference}


def block_rows(p: Problem, timings: dict[str, float]) -> list[str]:
    """Whole routed-expert block per expert backend: fwd and fwd+bwd time, peak memory, and
    whether a second fwd+bwd is bitwise equal. ``timings`` gets each backend's fwd+bwd ms."""
    num_rows, dim = p.x_MD.shape
    inter = p.a_MI.shape[1]
    flops_fwd = 6 * num_rows * dim * inter
    lines = []
    for label, fn in BLOCK_BACKENDS.items():
        if label == "grouped_mm" and not grouped_mm_supported(p.x_TD.device, p.x_TD.dtype):
            lines.append(f"| block {label} | n/a (needs bf16 on sm90+) | | | | | |")
            continue
        leaves = [t.detach().clone().requires_grad_(True)
                  for t in (p.x_TD, p.weights_TK, p.w13_EHD, p.w2_EDI)]
        dout_TD = torch.randn_like(p.x_TD)

        def fwd(fn: Callable = fn, leaves: list = leaves) -> torch.Tensor:
            return fn(leaves[0], p.topk_ids_TK, *leaves[1:])

        def fwd_bwd(fwd: Callable = fwd, leaves: list = leaves,
                    dout_TD: torch.Tensor = dout_TD) -> object:
            return torch.autograd.grad(fwd(), leaves, dout_TD)

        first, second = fwd_bwd(), fwd_bwd()
        bitwise = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        del first, second
        fwd_ms = bench_ms(fwd)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd_ms = bench_ms(fwd_bwd)
        peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        timings[label] = fwd_bwd_ms
        lines.append(f"| block {label} | {fwd_ms:.3f} | {flops_fwd / fwd_ms / 1e9:.1f} | "
                     f"{fwd_bwd_ms:.3f} | {3 * flops_fwd / fwd_bwd_ms / 1e9:.1f} | "
                     f"{peak_gib:.2f} | {'yes' if bitwise else 'NO'} |")
    return lines


def run_gpu(dtype: torch.dtype, quick: bool, summary: list, deadline: float,
            flush: Callable[[list[str]], None]) -> list[str]:
    """Every (shape, T, routing) problem until ``deadline``; ``flush(out)`` after each one, so
    a run cut short keeps everything it measured."""
    out: list[str] = []
    shapes = GPU_SHAPES
    tokens = GPU_TOKENS[:1] if quick else GPU_TOKENS
    for shape in shapes:
        for num_tokens in tokens:
            for skewed in (False, True):
                if time.monotonic() > deadline:
                    out.append(f"- time limit reached: {shape.name} T={num_tokens} "
                               f"{'skewed' if skewed else 'uniform'} not run")
                    continue
                p = build(shape, num_tokens, skewed, dtype, "cuda", seed=0)
                load = p.counts_E.float()
                title = (f"### {shape.name} T={num_tokens} {'skewed' if skewed else 'uniform'} "
                         f"(max/mean load {float(load.max() / load.mean()):.2f}, "
                         f"empty experts {int((p.counts_E == 0).sum())})")
                print(title)
                out += [title, "",
                        "| kernel | ms | TFLOP/s or GB/s | vs dense mm | vs torch._grouped_mm "
                        "| vs torch loop | rel err |",
                        "|---|---|---|---|---|---|---|"]
                for row in kernel_rows(p):
                    err = rel_err(row.triton_fn(), row.ref_fn())
                    ms = bench_ms(row.triton_fn)
                    rate = (f"{row.work / ms / 1e9:.1f} TFLOP/s" if row.is_gemm
                            else f"{row.work / ms / 1e6:.0f} GB/s")
                    line = (f"| {row.kernel} | {ms:.3f} | {rate} | "
                            f"{fmt_ratio(ms, try_ms(row.dense_fn))} | "
                            f"{fmt_ratio(ms, try_ms(row.grouped_fn))} | "
                            f"{fmt_ratio(ms, try_ms(row.loop_fn))} | {err:.1e} |")
                    print(line)
                    out.append(line)
                out += ["", "| block | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
                        "| peak GiB (fwd+bwd) | bitwise rerun |", "|---|---|---|---|---|---|---|"]
                timings: dict[str, float] = {}
                lines = block_rows(p, timings)
                fastest = min(timings, key=timings.__getitem__)
                auto = resolve_backend("auto", p.x_TD.device, p.x_TD.dtype, p.x_TD.shape[-1])
                lines += ["", f"fastest block fwd+bwd: **{fastest}**; `auto` runs **{auto}**"
                          + ("" if auto == fastest else
                             f" ({timings[auto] / timings[fastest]:.2f}x the fastest)")]
                summary.append((title.removeprefix("### "), fastest, auto,
                                {k: round(v, 3) for k, v in timings.items()}))
                print("\n".join(lines))
                out += lines + [""]
                del p
                torch.cuda.empty_cache()
                flush(out)
    return out


def run_cpu(dtype: torch.dtype, dry_run: bool = False) -> list[str]:
    """Interpreter correctness on scaled shapes; torch._grouped_mm checked on CPU too.
    ``dry_run``: one shape, uniform routing only (checks the script end to end)."""
    out = ["| shape | routing | max/mean load | empty experts | kernel | rel err vs float64 "
           "reference | torch._grouped_mm rel err |", "|---|---|---|---|---|---|---|"]
    for shape in CPU_SHAPES[:1] if dry_run else CPU_SHAPES:
        for num_tokens in CPU_TOKENS:
            for skewed in (False,) if dry_run else (False, True):
                p = build(shape, num_tokens, skewed, dtype, "cpu", seed=0)
                load = p.counts_E.float()
                stats = (f"{float(load.max() / load.mean()):.2f} | "
                         f"{int((p.counts_E == 0).sum())}")
                routing = "skewed" if skewed else "uniform"
                for row in kernel_rows(p):
                    err = rel_err(row.triton_fn(), row.ref_fn())
                    grouped = "-"
                    if row.grouped_fn is not None:
                        try:
                            got = row.grouped_fn()
                            if got.dim() == 2 and got.shape[0] == p.layout.capacity:
                                got = got[p.layout.row_M]  # back from the aligned buffer
                            grouped = f"{rel_err(got, row.ref_fn()):.1e}"
                        except Exception as exc:
                            grouped = f"n/a ({type(exc).__name__})"
                    line = (f"| {shape.name} T={num_tokens} | {routing} | {stats} | "
                            f"{row.kernel} | {err:.1e} | {grouped} |")
                    print(line)
                    out.append(line)
                leaves = [t.detach().clone().requires_grad_(True)
                          for t in (p.x_TD, p.weights_TK, p.w13_EHD, p.w2_EDI)]
                got = routed_experts_triton(leaves[0], p.topk_ids_TK, *leaves[1:])
                dout_TD = torch.randn_like(got)
                grads = torch.autograd.grad(got, leaves, dout_TD)
                leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
                want = ref.routed_experts_reference(leaves64[0], p.topk_ids_TK, *leaves64[1:])
                want_grads = torch.autograd.grad(want, leaves64, dout_TD.double())
                errs = [rel_err(got, want)] + [rel_err(g, w) for g, w in
                                               zip(grads, want_grads, strict=True)]
                line = (f"| {shape.name} T={num_tokens} | {routing} | {stats} | whole block "
                        f"out / dx / dweights / dw13 / dw2 | "
                        f"{' / '.join(f'{e:.1e}' for e in errs)} | - |")
                print(line)
                out.append(line)
    return out


def device_name() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    return "cpu-interpreter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="default: bf16 on CUDA, fp32 in the interpreter (its bf16 is wrong)")
    parser.add_argument("--quick", action="store_true", help="GPU: only T=4096")
    parser.add_argument("--out", default=None, help="result file (default: benchmarks/results/)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="GPU: start no new problem after this many seconds")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: one tiny shape in the interpreter (checks the script runs)")
    args = parser.parse_args()
    started = time.monotonic()
    deadline = started + (args.time_limit_s or float("inf"))
    on_gpu = torch.cuda.is_available()
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    header = [
        f"# moe_kernels on {device_name()}", "",
        f"- date: {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, dtype {dtype_name}",
        f"- command: `{' '.join(['python benchmarks/moe_kernels.py', *sys.argv[1:]])}`",
    ]
    path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"moe_kernels-{device_name()}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    summary: list = []

    def flush(body: list[str]) -> None:
        table = []
        if summary:
            table = ["## Which backend is fastest (whole block, fwd+bwd ms)", "",
                     "| problem | fastest | auto runs | ms per backend |", "|---|---|---|---|"]
            table += [f"| {name} | {fastest} | {auto} | "
                      f"{', '.join(f'{k} {v}' for k, v in ms.items())} |"
                      for name, fastest, auto, ms in summary] + [""]
        path.write_text("\n".join(header + table + body) + "\n")
        path.with_suffix(".json").write_text(json.dumps(
            {"device": device_name(), "dtype": dtype_name, "summary": summary}, indent=1))

    if on_gpu:
        header += ["- ratios are (other time / Triton time): > 1 means Triton is faster", ""]
        body = run_gpu(dtype, args.quick, summary, deadline, flush)
    else:
        header += [
            "- no GPU: Triton ran in its CPU interpreter (TRITON_INTERPRET=1) on scaled-down "
            "shapes (Moonlight's E=64 and top-6; DeepSeek-V3's top-8 with 64 instead of 256 "
            "experts; D and I shrunk). These are correctness numbers only; the GPU timings are "
            "in the moe_kernels-NVIDIA-*.md files.",
            "- rel err = max|triton - ref| / max|ref|, ref = kernels/reference.py in float64.",
            ""]
        body = run_cpu(dtype, dry_run=args.dry_run)
    flush(body)
    print(f"wrote {path} in {time.monotonic() - started:.0f} s")

if __name__ == "__main__":
    main()
