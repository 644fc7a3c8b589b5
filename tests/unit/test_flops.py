"""Training FLOPs per token against torch's own FLOP counter on the debug model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from elastic_moe.config import apply_overrides, debug
from elastic_moe.model import Transformer
from elastic_moe.model.flops import (
    attention_flops_per_token,
    forward_matmul_flops_per_token,
    peak_tflops,
    training_flops_per_token,
)

WEIGHT_MATMULS = {"mm", "addmm"}  # CPU attention runs as bmm (score and value products)


def _counted(model, batch, backward: bool) -> dict[str, int]:
    """FLOPs per aten op of one forward (and backward) of ``model`` on ``batch``."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(batch["input_ids"], batch["labels"])
        if backward:
            out.loss.backward()
    return {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}


def _setup(mtp: int):
    cfg = apply_overrides(debug(), [f"model.num_mtp_modules={mtp}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights(seed=0)
    b, s = 2, cfg.train.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (b, s + 1))
    return cfg, model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, b * s


# With MTP, depth-1 prediction covers S - 1 positions per sequence where the estimate charges S:
# 1/128 of the MTP share, under 0.5% of the total here.
@pytest.mark.parametrize("mtp,rel", [(0, 1e-9), (1, 5e-3)])
def test_flops_match_torch_counter(mtp, rel):
    """Every token meets exactly top-k routed experts (no dropping), so without MTP the weight
    matmuls and the attention products match torch's count exactly."""
    cfg, model, batch, tokens = _setup(mtp)
    fwd = _counted(model, batch, backward=False)
    weights = sum(n for op, n in fwd.items() if op in WEIGHT_MATMULS)
    assert weights == pytest.approx(forward_matmul_flops_per_token(cfg.model) * tokens, rel=rel)
    # the counter charges the full S x S score matrix; a causal token uses half on average
    assert fwd["bmm"] == pytest.approx(
        2 * attention_flops_per_token(cfg.model, cfg.train.seq_len) * tokens, rel=rel)
    # the backward has two matmuls per forward one, except the first layer's input gradient
    # (nothing upstream needs it): within 2% of 3x on this tiny model
    fwd_bwd = _counted(model, batch, backward=True)
    weights_all = sum(n for op, n in fwd_bwd.items() if op in WEIGHT_MATMULS)
    assert weights_all == pytest.approx(3 * weights, rel=0.02)


def test_training_flops_and_peak():
    cfg = debug()
    total = training_flops_per_token(cfg.model, cfg.train.seq_len)
    assert total == pytest.approx(3 * (forward_matmul_flops_per_token(cfg.model)
                                       + attention_flops_per_token(cfg.model, cfg.train.seq_len)))
    assert peak_tflops(torch.device("cpu")) is None
