"""How the kernels are being run: Triton's CPU interpreter or a real GPU backend.

Triton picks interpreter vs compiler when a ``@triton.jit`` function is *defined*, and its own
library functions (``tl.cdiv``, ...) are defined when ``triton`` is first imported. So
``TRITON_INTERPRET=1`` must be in the environment before ``import triton`` anywhere in the
process; setting it later gives "Cannot call @triton.jit'd outside of the scope of a kernel".
"""

from __future__ import annotations

import os

import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["check_device", "input_precision", "is_interpreting"]


def is_interpreting() -> bool:
    """True when Triton runs in the CPU interpreter, judged by how triton's own library functions
    were defined (the environment variable may have changed since)."""
    probe = getattr(getattr(tl, "standard", None), "cdiv", None)
    if probe is not None:
        return not isinstance(probe, JITFunction)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if os.environ.get("TRITON_INTERPRET", "0") == "1" and not is_interpreting():
    raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; set it before the "
                       "first `import triton` (e.g. in the environment of the process)")


def check_device(tensor: torch.Tensor) -> None:
    """Fail early and clearly instead of deep inside a launch."""
    if tensor.device.type == "cpu" and not is_interpreting():
        raise ValueError("Triton expert kernels got CPU tensors without the interpreter: run on "
                         "CUDA, use expert_backend='torch', or set TRITON_INTERPRET=1 before "
                         "triton is imported")
    if tensor.device.type == "cuda" and is_interpreting():
        raise ValueError("TRITON_INTERPRET=1 is set but the tensors are on CUDA: the interpreter "
                         "is for CPU tests (its bf16 math is wrong); unset it to use the GPU")


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 inputs must not silently drop to tf32 (the fp32 path is the exact
    one, tested to 1e-5); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"
