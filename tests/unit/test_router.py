import dataclasses

import torch

from elastic_moe.config import debug
from elastic_moe.model.moe import Router, sequence_balance_loss


def _router(**changes):
    fields = dict(num_routed_experts=16, num_expert_groups=4, num_limited_groups=2,
                  num_activated_experts=4)
    cfg = dataclasses.replace(debug().model, **{**fields, **changes})
    router = Router(cfg)
    torch.manual_seed(0)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router, cfg


def test_chosen_experts_stay_inside_the_top_groups():
    router, cfg = _router()
    with torch.no_grad():
        router.e_score_correction_bias.uniform_(-0.2, 0.2)
        x = torch.randn(500, cfg.dim)
        out = router(x)
        biased = out.scores_TE + router.e_score_correction_bias
        per_group = cfg.num_routed_experts // cfg.num_expert_groups
        group_score = biased.view(500, cfg.num_expert_groups, per_group).topk(2, -1).values.sum(-1)
        allowed = group_score.topk(cfg.num_limited_groups, dim=-1).indices
        chosen_groups = out.topk_ids_TK // per_group
    for t in range(500):
        assert set(chosen_groups[t].tolist()) <= set(allowed[t].tolist())
    # and the restriction binds: unrestricted top-k would leave the groups for some tokens
    free = biased.topk(cfg.num_activated_experts, dim=-1).indices // per_group
    assert any(not set(free[t].tolist()) <= set(allowed[t].tolist()) for t in range(500))


def test_bias_changes_selection_but_not_gate_weights():
    router, cfg = _router()
    x = torch.randn(200, cfg.dim)
    with torch.no_grad():
        plain = router(x)
        router.e_score_correction_bias[3] = 10.0  # expert 3 always wins selection now
        biased = router(x)
    assert (biased.topk_ids_TK == 3).any(dim=1).all()
    assert not torch.equal(plain.topk_ids_TK, biased.topk_ids_TK)
    # gate weights are the unbiased scores of the chosen experts, normalized and scaled
    chosen = biased.scores_TE.gather(1, biased.topk_ids_TK)
    expected = chosen / chosen.sum(-1, keepdim=True) * cfg.route_scale
    assert torch.allclose(biased.topk_weights_TK, expected)
    assert torch.allclose(biased.topk_weights_TK.sum(-1), torch.full((200,), cfg.route_scale))


def test_bias_update_balances_a_skewed_load():
    router, cfg = _router(num_expert_groups=1, num_limited_groups=1)
    with torch.no_grad():
        torch.nn.init.normal_(router.weight, std=0.1)
        # Two hot experts: their weights align with a direction every token shares.
        common = torch.ones(cfg.dim) / cfg.dim**0.5
        router.weight[0] += 1.5 * common
        router.weight[1] += 1.0 * common
        x = torch.randn(2000, cfg.dim, generator=torch.Generator().manual_seed(1)) + common

        def imbalance():
            counts = torch.bincount(router(x).topk_ids_TK.flatten(), minlength=16).float()
            return (counts.max() / counts.mean()).item()

        start = imbalance()
        for _ in range(100):
            counts = torch.bincount(router(x).topk_ids_TK.flatten(), minlength=16)
            router.update_bias(counts, speed=1e-2)
        end = imbalance()
    print(f"max/mean expert load: {start:.2f} -> {end:.2f}")
    assert start > 2.5
    assert end < 1.2
    bias = router.e_score_correction_bias
    assert bias[0] < 0 and bias[1] < 0  # the hot experts were pushed down


def test_sequence_balance_loss_zero_when_balanced_positive_when_skewed():
    num_experts, seq = 4, 8
    scores = torch.full((1, seq, num_experts), 0.5)
    # every expert chosen exactly seq*k/E times
    ids = torch.tensor([[0, 1], [2, 3]] * (seq // 2)).unsqueeze(0)
    assert sequence_balance_loss(scores, ids, alpha=1e-4).abs().item() < 1e-12
    skewed_scores = torch.tensor([0.9, 0.8, 0.1, 0.1]).expand(1, seq, num_experts)
    skewed_ids = torch.tensor([[0, 1]] * seq).unsqueeze(0)
    assert sequence_balance_loss(skewed_scores, skewed_ids, alpha=1e-4).item() > 1e-5


def test_reference_experts_accept_zero_tokens():
    from elastic_moe.kernels.reference import routed_experts_reference

    out = routed_experts_reference(torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.long),
                                   torch.zeros(0, 2), torch.randn(4, 6, 8), torch.randn(4, 8, 3))
    assert out.shape == (0, 8)
