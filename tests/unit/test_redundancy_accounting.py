"""The redundancy accounting of ``--describe --workers W``, against hand-computed layouts."""

from __future__ import annotations

import math

from elastic_moe.config import apply_overrides, deepseek_v3_671b, small
from elastic_moe.parallel.mesh import TRAIN_BYTES_PER_PARAM, param_counts
from elastic_moe.train.redundancy import redundancy_report


def test_hsdp_replicas_across_nodes_need_no_copies():
    report = redundancy_report(apply_overrides(small(), ["parallel.max_workers=16"]), 16)
    assert report.plan.dp_replicate_degree == 2
    assert all(r.held_bytes == 0 and r.sent_bytes_per_step == 0 for r in report.ranks)
    assert report.replicated_fraction == 1.0
    assert dict(report.losses)["any one node"]


def test_without_replicas_a_worker_holds_one_wards_unreplicated_state():
    cfg = apply_overrides(small(), ["parallel.max_workers=16", "parallel.dp_replicate_degree=1",
                                    "parallel.expert_parallel_degree=8"])
    report = redundancy_report(cfg, 16)
    dense, routed = param_counts(cfg.model)
    # dense FSDP over all 16 ranks: no replica; experts EP 8: the other node holds the same 8
    dense_local = math.ceil(dense / 16)
    for rank in report.ranks:
        assert rank.wards == 1
        assert rank.held_bytes == 16 * dense_local
        assert rank.sent_bytes_per_step == 4 * dense_local
        assert rank.state_bytes == TRAIN_BYTES_PER_PARAM * (dense_local + math.ceil(routed / 8))
        assert rank.held_bytes <= rank.state_bytes
    assert dict(report.losses) == {"any one node": True}


def test_the_671b_accounting_at_2048_workers():
    cfg = apply_overrides(deepseek_v3_671b(), ["parallel.max_workers=2048",
                                               "parallel.memory_per_gpu_gib=80"])
    report = redundancy_report(cfg, 2048)
    assert report.plan.dp_replicate_degree >= 2
    assert max(r.held_bytes for r in report.ranks) == 0
    assert all(ok for _, ok in report.losses), report.losses
    assert 60 * 2**30 < report.ranks[0].state_bytes <= 80 * 2**30
    text = report.describe()
    assert "any one node: yes" in text and "0.00x the training state" in text
