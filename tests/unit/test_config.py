import dataclasses

import pytest

from elastic_moe.config import ModelConfig, apply_overrides, debug, get_recipe
from elastic_moe.model import count_parameters


def test_deepseek_v3_671b_parameter_counts():
    cfg = get_recipe("deepseek_v3_671b").model
    assert (cfg.num_layers, cfg.num_dense_layers, cfg.dim, cfg.num_heads) == (61, 3, 7168, 128)
    assert (cfg.num_routed_experts, cfg.num_activated_experts, cfg.vocab_size) == (256, 8, 129280)
    counts = count_parameters(cfg)
    assert abs(counts.total - 671e9) / 671e9 < 0.01
    assert abs(counts.activated - 37e9) / 37e9 < 0.03
    # One MTP module = one MoE block + 2 norms + the 2*dim -> dim projection (~11.6B here; the
    # released 14B includes its copies of embedding and head).
    assert 11e9 < counts.mtp < 12.5e9


def test_small_and_debug_counts_are_consistent():
    for name in ("small", "debug"):
        cfg = get_recipe(name).model
        counts = count_parameters(cfg)
        per_expert = 3 * cfg.dim * cfg.moe_inter_dim
        routed = cfg.num_moe_layers * cfg.num_routed_experts * per_expert
        inactive = routed - routed * cfg.num_activated_experts // cfg.num_routed_experts
        assert counts.total - counts.activated == inactive
    small = count_parameters(get_recipe("small").model)
    assert 15e9 < small.total < 16.5e9 and 2.2e9 < small.activated < 3e9  # V2-Lite: 15.7B / 2.4B


@pytest.mark.parametrize("change, field", [
    ({"num_routed_experts": 10, "num_expert_groups": 4}, "num_routed_experts"),
    ({"num_activated_experts": 9}, "num_activated_experts"),
    ({"num_activated_experts": 5, "num_limited_groups": 1}, "num_activated_experts"),
    ({"num_limited_groups": 5}, "num_limited_groups"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"dim": 0}, "dim"),
])
def test_impossible_model_configs_name_the_field(change, field):
    base = dataclasses.asdict(debug().model)
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**base, **change})
    assert str(err.value).startswith(f"{field}=")


def test_overrides_apply_and_reject_unknown_keys():
    cfg = apply_overrides(debug(), ["train.steps=7", "model.dim=96", "checkpoint.async_save=false",
                                    "model.score_func=softmax"])
    assert cfg.train.steps == 7 and cfg.model.dim == 96 and cfg.checkpoint.async_save is False
    assert cfg.model.score_func == "softmax"
    for bad, needle in [("train.stepz=1", "no field 'stepz'"), ("modle.dim=3", "unknown section"),
                        ("train.steps=abc", "expected an integer"), ("train.steps", "key=value"),
                        ("model.score_func=relu", "must be one of"),
                        ("model.num_activated_experts=99", "num_activated_experts"),
                        ("tracking.max_retry_s=1", r"max_retry_s=1.0: must be >= retry_s")]:
        with pytest.raises(ValueError, match=needle):
            apply_overrides(debug(), [bad])
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("gpt5")
