"""Compile every Triton kernel for a GPU target without a GPU.

``python -m elastic_moe.kernels.compile_check``

The CPU interpreter runs kernels as numpy code, so it misses what only the compiler sees: layout
and shape rules of ``tl.dot``, type errors in masks, unsupported ops, register/shared-memory
overflows of the autotune configs. ``triton.compile(ASTSource(...), target=GPUTarget(...))`` runs
the real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) for sm_90 on any machine.
Must run with TRITON_INTERPRET unset: interpreted kernels are plain Python, not compilable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import triton
from elastic_moe.kernels import grouped_gemm, permute, swiglu
from elastic_moe.kernels.runtime import is_interpreting
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["CompileCase", "compile_cases", "compile_case"]

_TRITON_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
# Largest dynamic shared memory per block on sm_90 (227 KiB). A config above it still compiles but
# fails to launch; the autotuner skips such configs, so it is a warning, not a failure.
SM90_MAX_SHARED = 232448


@dataclass(frozen=True)
class CompileCase:
    name: str
    fn: Any  # a JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    div16: frozenset[str] = frozenset()  # int args a real launch sees as multiples of 16


def _sig(fn: Any, types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Full signature in argument order; ints default to i32, constexprs to 'constexpr'.

    A real launch specializes every int argument equal to 1 into a constexpr, so the unit strides
    (contiguous last dims) must be passed in ``constexprs`` as 1 to compile the same code.
    """
    return {name: "constexpr" if name in constexprs else types.get(name, "i32")
            for name in fn.arg_names}


def _attrs(case: CompileCase) -> dict[tuple[int, ...], list[list[Any]]]:
    """tt.divisibility=16 on pointers (torch allocations are 16-aligned) and on ``div16`` ints,
    as the launcher adds them; without it the compiler cannot vectorize or pipeline loads."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(case.fn.arg_names)
            if case.signature[name].startswith("*") or name in case.div16}


def compile_cases(dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32"),
                  all_configs: bool = False) -> list[CompileCase]:
    """One case per kernel x dtype (x autotune config when ``all_configs``, else the first)."""
    cases: list[CompileCase] = []
    for dt in dtypes:
        tdt = _TRITON_DTYPES[dt]
        precision = "ieee" if dt == "fp32" else "tf32"
        gemm_cfgs = grouped_gemm.gemm_configs()
        dw_cfgs = grouped_gemm.dw_configs()
        for cfg in gemm_cfgs if all_configs else gemm_cfgs[:1]:
            # forward (Y = X W^T, with or without the fused gather) and dX (dY W).
            for gather, unit_b in ((False, "stride_bk"), (True, "stride_bk"), (False, "stride_bn")):
                fn = grouped_gemm.grouped_mm_kernel
                const = dict(cfg.kwargs, E_PAD=256, A_GATHER=gather, INPUT_PRECISION=precision,
                             stride_ak=1, stride_cn=1, **{unit_b: 1})
                types = {"a_ptr": f"*{tdt}", "a_rows_ptr": "*i64", "b_ptr": f"*{tdt}",
                         "c_ptr": f"*{tdt}", "offsets_ptr": "*i32"}
                div16 = frozenset({"N", "K", "stride_am", "stride_be", "stride_bk", "stride_bn",
                                   "stride_cm"})
                kind = "dx" if unit_b == "stride_bn" else "fwd"
                cases.append(CompileCase(f"grouped_mm[{kind},{dt},gather={gather},{cfg.kwargs}]",
                                         fn, _sig(fn, types, const), const, cfg.num_warps,
                                         cfg.num_stages, div16))
        for cfg in dw_cfgs if all_configs else dw_cfgs[:1]:
            for gather in (False, True):
                fn = grouped_gemm.grouped_mm_dw_kernel
                const = dict(cfg.kwargs, X_GATHER=gather, INPUT_PRECISION=precision,
                             stride_dyn=1, stride_xk=1, stride_dwk=1)
                types = {"dy_ptr": f"*{tdt}", "x_ptr": f"*{tdt}", "x_rows_ptr": "*i64",
                         "dw_ptr": f"*{tdt}", "offsets_ptr": "*i32"}
                div16 = frozenset({"N", "K", "stride_dym", "stride_xm", "stride_dwe",
                                   "stride_dwn"})
                cases.append(CompileCase(f"grouped_mm_dw[{dt},gather={gather},{cfg.kwargs}]",
                                         fn, _sig(fn, types, const), const, cfg.num_warps,
                                         cfg.num_stages, div16))
        for fn in (swiglu.swiglu_kernel, swiglu.swiglu_backward_kernel):
            const = {"BLOCK_M": 8, "BLOCK_I": 512}
            types = {n: f"*{tdt}" for n in fn.arg_names if n.endswith("_ptr")}
            div16 = frozenset(n for n in fn.arg_names if n == "inter" or n.startswith("stride"))
            cases.append(CompileCase(f"{fn.__name__}[{dt}]", fn, _sig(fn, types, const), const,
                                     div16=div16))
        fn = permute.gather_rows_kernel
        const = {"TOP_K": 8, "BLOCK_M": 4, "BLOCK_D": 1024}
        types = {"src_ptr": f"*{tdt}", "order_ptr": "*i64", "dst_ptr": f"*{tdt}"}
        div16 = frozenset({"D", "stride_src", "stride_dst"})
        cases.append(CompileCase(f"gather_rows[{dt}]", fn, _sig(fn, types, const), const,
                                 div16=div16))
        for has_weights in (False, True):
            fn = permute.combine_kernel
            const = {"TOP_K": 8, "HAS_WEIGHTS": has_weights, "BLOCK_T": 4, "BLOCK_D": 1024}
            types = {"y_ptr": f"*{tdt}", "rows_ptr": "*i32", "weights_ptr": "*fp32",
                     "out_ptr": f"*{tdt}"}
            cases.append(CompileCase(f"combine[{dt},weights={has_weights}]", fn,
                                     _sig(fn, types, const), const,
                                     div16=frozenset({"D", "stride_y", "stride_out"})))
        fn = permute.combine_backward_kernel
        const = {"TOP_K": 8, "BLOCK_T": 4, "BLOCK_D": 256}
        types = {"dout_ptr": f"*{tdt}", "y_ptr": f"*{tdt}", "rows_ptr": "*i32",
                 "weights_ptr": "*fp32", "dy_ptr": f"*{tdt}", "dweights_ptr": "*fp32"}
        div16 = frozenset({"D", "stride_dout", "stride_y", "stride_dy"})
        cases.append(CompileCase(f"combine_backward[{dt}]", fn, _sig(fn, types, const), const,
                                 div16=div16))
    # Routing kernels are dtype-free.
    for fn in (permute.expert_count_kernel, permute.expert_scatter_kernel):
        const = {"CHUNK": 1024}
        types = {"ids_ptr": "*i64", "counts_CE_ptr": "*i32", "base_EC_ptr": "*i32",
                 "order_ptr": "*i64", "rows_ptr": "*i32"}
        cases.append(CompileCase(f"{fn.__name__}", fn, _sig(fn, types, const), const))
    return cases


def compile_case(case: CompileCase, target: GPUTarget) -> Any:
    """Run the full compiler pipeline for ``target``; returns the CompiledKernel."""
    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs,
                    attrs=_attrs(case))
    return triton.compile(src, target=target,
                          options={"num_warps": case.num_warps, "num_stages": case.num_stages})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--all-configs", action="store_true",
                        help="every autotune config, not only the first")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if is_interpreting():
        print("TRITON_INTERPRET=1 is set: kernels are interpreted and cannot be compiled",
              file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    results = []
    for case in compile_cases(tuple(args.dtypes.split(",")), args.all_configs):
        start = time.perf_counter()
        try:
            kernel = compile_case(case, target)
            shared = kernel.metadata.shared
            status = "ok  " if shared <= SM90_MAX_SHARED or args.arch != 90 else "SMEM"
            print(f"{status} {time.perf_counter() - start:5.1f}s shared={shared:6d}B  {case.name}",
                  flush=True)
            results.append({"name": case.name, "ok": True, "shared": shared,
                            "constexprs": {k: v for k, v in case.constexprs.items()
                                           if k.startswith("BLOCK")},
                            "num_stages": case.num_stages, "has_cubin": "cubin" in kernel.asm})
        except Exception as exc:  # report every failing kernel, not only the first
            failures += 1
            print(f"FAIL {case.name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            results.append({"name": case.name, "ok": False, "error": str(exc)[:2000]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
