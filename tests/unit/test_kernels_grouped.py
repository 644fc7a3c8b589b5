"""The ``grouped_mm`` expert backend (torch._grouped_mm) vs the float64 reference, on CPU.

CPU torch runs ``torch._grouped_mm`` in fp32 (on CUDA it needs bf16 on Hopper; tests/gpu covers
that), so these check the padded layout, the deterministic gather and the autograd wiring:
outputs and all four gradients to 1e-5 of ``elastic_moe.kernels.reference`` in float64, empty experts, a
segment that ends exactly on the alignment, one token, and a second run bitwise equal.

Shapes use suffixes; legend:
    T = tokens, K = experts per token, E = experts, D = model dim, I = expert hidden dim
"""

from __future__ import annotations

import pytest
import torch
from elastic_moe.kernels import BACKENDS, expert_mlp, resolve_backend, routed_experts
from elastic_moe.kernels import reference as ref
from elastic_moe.kernels.torch_grouped import ALIGN_ROWS, PaddedLayout, grouped_mm_supported

TOL = 1e-5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all()
    scale = expected.detach().abs().max().clamp_min(1e-30)
    return float((actual.detach().double() - expected.detach().double()).abs().max() / scale)


CASES = {
    # (T, K, E, D, I, unused experts)
    "uniform": (64, 4, 8, 32, 24, ()),
    "empty_experts": (50, 3, 9, 16, 8, (0, 4, 8)),
    "aligned_segment": (ALIGN_ROWS, 1, 2, 8, 8, (1,)),  # one segment of exactly ALIGN_ROWS rows
    "one_token": (1, 4, 4, 8, 8, ()),
}


def _problem(name: str, seed: int = 0):
    num_tokens, top_k, num_experts, dim, inter, unused = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    scores[:, list(unused)] = -1.0
    topk_ids_TK = scores.topk(top_k, dim=1).indices
    x_TD = torch.randn(num_tokens, dim, generator=gen)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen)
    w13_EHD = torch.randn(num_experts, 2 * inter, dim, generator=gen) / dim**0.5
    w2_EDI = torch.randn(num_experts, dim, inter, generator=gen) / inter**0.5
    return topk_ids_TK, [x_TD, weights_TK, w13_EHD, w2_EDI]


@pytest.mark.parametrize("name", list(CASES))
def test_routed_experts_grouped_matches_float64_reference(name):
    topk_ids_TK, tensors = _problem(name)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out_TD = routed_experts(leaves[0], topk_ids_TK, *leaves[1:], backend="grouped_mm")
    dout_TD = torch.randn(out_TD.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad(out_TD, leaves, dout_TD)
    leaves64 = [t.double().requires_grad_(True) for t in tensors]
    want_TD = ref.routed_experts_reference(leaves64[0], topk_ids_TK, *leaves64[1:])
    want_grads = torch.autograd.grad(want_TD, leaves64, dout_TD.double())
    assert rel_err(out_TD, want_TD) < TOL
    for what, got, want in zip(("dx", "dweights", "dw13", "dw2"), grads, want_grads,
                               strict=True):
        assert rel_err(got, want) < TOL, what
    unused = list(CASES[name][5])
    if unused:  # an expert no token chose gets exactly zero gradient
        assert torch.all(grads[2][unused] == 0) and torch.all(grads[3][unused] == 0)
    # a second run is bitwise the same (no float atomics decide any sum)
    again = routed_experts(leaves[0], topk_ids_TK, *leaves[1:], backend="grouped_mm")
    grads_again = torch.autograd.grad(again, leaves, dout_TD)
    assert torch.equal(out_TD, again)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again, strict=True))


def test_expert_mlp_grouped_matches_reference_with_empty_experts():
    gen = torch.Generator().manual_seed(3)
    counts_E = torch.tensor([0, 37, 1, 0, 16, 5, 0])
    num_rows, dim, inter = int(counts_E.sum()), 16, 12
    tensors = [torch.randn(num_rows, dim, generator=gen),
               torch.randn(len(counts_E), 2 * inter, dim, generator=gen) / dim**0.5,
               torch.randn(len(counts_E), dim, inter, generator=gen) / inter**0.5]
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    y_MD = expert_mlp(leaves[0], counts_E, *leaves[1:], backend="grouped_mm")
    dy_MD = torch.randn(y_MD.shape, generator=gen)
    grads = torch.autograd.grad(y_MD, leaves, dy_MD)
    leaves64 = [t.double().requires_grad_(True) for t in tensors]
    want_MD = ref.expert_mlp_reference(leaves64[0], counts_E, *leaves64[1:])
    want_grads = torch.autograd.grad(want_MD, leaves64, dy_MD.double())
    assert rel_err(y_MD, want_MD) < TOL
    for got, want in zip(grads, want_grads, strict=True):
        assert rel_err(got, want) < TOL


def test_layout_aligns_every_segment_and_covers_the_buffer():
    experts_M = torch.tensor([2, 0, 2, 2, 5, 0, 2])
    layout = PaddedLayout(experts_M, num_experts=6)
    offsets = [0, *layout.offsets_E.tolist()]
    assert offsets[-1] == layout.capacity  # no buffer row outside every segment
    assert all(start % ALIGN_ROWS == 0 for start in offsets[:-1])
    for row, expert in enumerate(experts_M.tolist()):  # each row inside its expert's segment
        assert offsets[expert] <= int(layout.row_M[row]) < offsets[expert + 1]
        assert int(layout.source_P[layout.row_M[row]]) == row
    assert int((layout.source_P < len(experts_M)).sum()) == len(experts_M)


def test_backend_names_and_auto():
    assert "grouped_mm" in BACKENDS
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    assert resolve_backend("grouped_mm", torch.device("cpu")) == "grouped_mm"
    assert grouped_mm_supported(torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="expert_backend='cutlass'"):
        resolve_backend("cutlass", torch.device("cpu"))
