"""How the kernels are being run: Triton's CPU interpreter or a real GPU backend.

Triton decides interpreter vs compiler when a ``@triton.jit`` function is *defined*, so
``TRITON_INTERPRET=1`` must be in the environment before any ``kernels.*`` Triton module is
imported; :func:`is_interpreting` reports what that import saw.
"""

from __future__ import annotations

import os

import torch

__all__ = ["input_precision", "is_interpreting"]


def is_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 inputs must not silently drop to tf32 (the fp32 path is the exact
    one, tested to 1e-5); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"
