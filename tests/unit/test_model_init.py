"""Per-shard seeded init: any slice drawn alone equals that slice of the full tensor.

The debug model's tensors fit in one row block each, so the block arithmetic is checked here on
shapes that span several blocks (and rows larger than a block), sliced the way FSDP2's
``torch.chunk`` and expert parallelism cut dim 0 at several world sizes.
"""

from __future__ import annotations

import pytest
import torch

from elastic_moe.config import ParallelConfig, debug, deepseek_v3_671b
from elastic_moe.model.init import BLOCK_ELEMENTS, draw_normal, rows_per_block
from elastic_moe.parallel.memory import init_bytes_per_rank
from elastic_moe.parallel.mesh import TRAIN_BYTES_PER_PARAM, estimate_bytes_per_rank, plan_mesh


@pytest.mark.parametrize("shape", [(1000, 600), (7, 300, 1000), (300_000,), (129, 2048)])
@pytest.mark.parametrize("parts", [2, 3, 5])
def test_slices_drawn_alone_equal_the_full_tensor(shape, parts):
    full = draw_normal(shape, (0,) * len(shape), shape, 0.02, seed=7, fqn="w")
    assert full.shape == shape
    assert -(-shape[0] // rows_per_block(shape)) > 1  # several blocks
    pieces = []
    for chunk in torch.arange(shape[0]).chunk(parts):  # FSDP2's uneven dim-0 chunks
        lo, n = int(chunk[0]), len(chunk)
        pieces.append(draw_normal(shape, (lo,) + (0,) * (len(shape) - 1), (n, *shape[1:]),
                                  0.02, seed=7, fqn="w"))
    assert torch.equal(torch.cat(pieces), full)
    # a box cut in an inner dim too (a placement other than Shard(0))
    if len(shape) > 1:
        box = draw_normal(shape, (1,) + (5,) * (len(shape) - 1),
                          (3,) + tuple(d - 10 for d in shape[1:]), 0.02, seed=7, fqn="w")
        assert torch.equal(box, full[(slice(1, 4), *[slice(5, d - 5) for d in shape[1:]])])


def test_values_depend_on_seed_and_name_only():
    shape = (600, 1000)
    base = draw_normal(shape, (0, 0), shape, 1.0, seed=1, fqn="a")
    assert torch.equal(base, draw_normal(shape, (0, 0), shape, 1.0, seed=1, fqn="a"))
    assert not torch.equal(base, draw_normal(shape, (0, 0), shape, 1.0, seed=2, fqn="a"))
    assert not torch.equal(base, draw_normal(shape, (0, 0), shape, 1.0, seed=1, fqn="b"))
    # blocks are independent draws, not one stream restarted
    rows = rows_per_block(shape)
    assert not torch.equal(base[:rows], base[rows:2 * rows])
    assert abs(float(base.std()) - 1.0) < 0.01 and abs(float(base.mean())) < 0.01
    assert rows * 1000 <= BLOCK_ELEMENTS


def test_dry_run_agrees_with_the_planners_memory_estimate():
    """Init bytes per rank (4 B/param) vs the planner's training state (16 B/param): two
    independent computations of the same shard sizes for the 671B model at W=256."""
    cfg = deepseek_v3_671b()
    plan = plan_mesh(256, 8, cfg.model, cfg.parallel)
    report = init_bytes_per_rank(cfg.model, plan)
    want = estimate_bytes_per_rank(cfg.model, plan.dp_shard_degree, plan.expert_parallel_degree)
    got = max(report.bytes_per_rank) * TRAIN_BYTES_PER_PARAM / 4
    assert abs(got - want) / want < 1e-3, (got, want)
    assert report.transient_bytes <= 4096 * 7168 * 4 * 1.01  # one expert row of w13


def test_dry_run_uneven_fsdp_shards():
    cfg = debug().model
    plan = plan_mesh(3, 3, cfg, ParallelConfig(max_workers=3, gpus_per_node=3))
    report = init_bytes_per_rank(cfg, plan)
    assert len(set(report.bytes_per_rank)) > 1  # torch.chunk leaves the last rank short
    assert "W=3" in report.describe()


def test_a_model_left_uninitialized_and_filled_from_a_state_dict_computes_the_same():
    """``setup_model(init_weights=False)`` (a restore from shards overwrites every tensor)
    still sets what is not state: the rotary tables and the routers' load counters. Filled with
    an initialized model's state dict, it computes exactly that model's loss."""
    from elastic_moe.config import apply_overrides
    from elastic_moe.parallel import setup_model

    cfg = apply_overrides(debug(), ["parallel.min_workers=1", "parallel.max_workers=1"])
    plan = plan_mesh(1, 1, cfg.model, cfg.parallel)
    reference = setup_model(cfg.model, plan, "cpu", seed=3, mixed_precision="fp32")
    filled = setup_model(cfg.model, plan, "cpu", seed=3, mixed_precision="fp32",
                         init_weights=False)
    filled.load_state_dict(reference.state_dict())
    assert torch.equal(filled.rope_cos, reference.rope_cos)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(filled(ids, ids).loss, reference(ids, ids).loss)
