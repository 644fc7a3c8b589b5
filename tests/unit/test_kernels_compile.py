"""Compile every Triton expert kernel for H100 (sm_90) without a GPU.

The interpreter runs kernels as numpy and misses compiler-only failures (tl.dot layout and dtype
rules, illegal ops, shared-memory blow-ups). ``elastic_moe.kernels.compile_check`` runs the real pipeline down
to a cubin for ``GPUTarget("cuda", 90, 32)``. It runs in a subprocess because compiling needs
TRITON_INTERPRET unset before triton is imported, while the interpreter tests need it set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_compile_check(tmp_path: Path, *flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "elastic_moe.kernels.compile_check", "--json", str(out),
                           *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(f"{r['name']}: {r['error']}" for r in failed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results


def check_results(results: list[dict], dtypes: list[str]) -> None:
    names = [r["name"] for r in results]
    for kernel in ("grouped_mm[fwd", "grouped_mm[dx", "grouped_mm_dw", "swiglu_kernel",
                   "swiglu_backward_kernel", "gather_rows", "combine[", "combine_backward",
                   "expert_count_kernel", "expert_scatter_kernel"):
        assert any(n.startswith(kernel) for n in names), f"{kernel} was not compiled"
    for dtype in dtypes:
        assert any(f"[{dtype}" in n or f",{dtype}," in n for n in names), dtype
    assert all(r["has_cubin"] for r in results), "ptxas did not produce a cubin"
    for r in results:
        if r["name"].startswith("grouped_mm[") and ",fp32," not in r["name"]:
            # A pipelined 16-bit GEMM keeps >= 2 stages of A and B tiles in shared memory; a
            # single stage means the loads were not pipelined (e.g. alignment unknown).
            block = r["constexprs"]
            tile_elems = block["BLOCK_K"] * (block["BLOCK_M"] + block["BLOCK_N"])
            stage_bytes = 2 * tile_elems
            assert r["shared"] >= 2 * stage_bytes, f"{r['name']}: not pipelined ({r['shared']} B)"
        assert r["shared"] <= 232448 or ",fp32," in r["name"], f"{r['name']}: over sm_90 smem"


@pytest.mark.slow
def test_compile_for_sm90_every_autotune_config_and_dtype(tmp_path: Path) -> None:
    """Every H100 autotune config in bf16; fp16 and the fp32 path at their first config."""
    results = run_compile_check(tmp_path, "--dtypes", "bf16", "--all-configs")
    check_results(results, ["bf16"])
    results = run_compile_check(tmp_path, "--dtypes", "fp16,fp32")
    check_results(results, ["fp16", "fp32"])
