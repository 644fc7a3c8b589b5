"""Numerical equivalence with transformers' DeepseekV3ForCausalLM and HF-layout round trips."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from elastic_moe.config import ModelConfig, debug
from elastic_moe.model import Transformer, hf, hf_adapter

transformers = pytest.importorskip("transformers")


def _hf_model(q_lora_rank, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_rope_head_dim=8,
        v_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "rope_theta": 10000.0},
        num_mtp_layers=0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                # Large enough to change which experts win. Kept positive: transformers masks
                # groups with 0 in some versions and -inf in others; with positive biased scores
                # both agree (this model always masks with -inf).
                b.uniform_(0.0, 0.3)
    return model


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_logits_match_transformers(tmp_path, q_lora_rank):
    ref = _hf_model(q_lora_rank)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = hf.load(str(tmp_path)).eval()
    assert ours.cfg.q_lora_rank == (q_lora_rank or 0)
    assert ours.cfg.num_dense_layers == 1 and ours.cfg.num_expert_groups == 4
    tokens = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    assert got.shape == (2, 100, 256)
    assert (got - expected).abs().max().item() < 1e-4


def test_bias_changes_routing_in_the_reference_case(tmp_path):
    # Guard the test above: with the bias zeroed the logits must differ, i.e. the bias mattered.
    ref = _hf_model(24)
    ref.save_pretrained(tmp_path)
    ours = hf.load(str(tmp_path)).eval()
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = ours(tokens)
        for module in ours.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.zero_()
        after = ours(tokens)
    assert (before - after).abs().max().item() > 1e-3


def test_save_load_round_trip_is_bit_exact_with_mtp(tmp_path):
    cfg = debug().model
    model = Transformer(cfg)
    model.init_weights(seed=3)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.01, 0.01)
    files = hf.save(model, str(tmp_path), max_shard_bytes=400_000)
    assert len(files) > 1  # sharded, with an index
    loaded = hf.load(str(tmp_path))
    # architecture fields round-trip; backend, init and bias speed are training choices, not in HF
    defaults = ModelConfig()
    assert loaded.cfg == dataclasses.replace(cfg, expert_backend=defaults.expert_backend,
                                             init_std=defaults.init_std,
                                             bias_update_speed=defaults.bias_update_speed)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    index = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    assert f"model.layers.{cfg.num_layers}.eh_proj.weight" in index  # MTP as an extra layer
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index


def test_transformers_reads_what_we_write(tmp_path):
    ref = _hf_model(24, seed=5)
    ref.save_pretrained(tmp_path / "a")
    ours = hf.load(str(tmp_path / "a"))
    hf.save(ours, str(tmp_path / "b"))
    again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "b").eval()
    tokens = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, ref(tokens).logits)


def _saved_debug_model(path):
    """A debug model saved as one HF shard under ``path``; returns it and the shard path."""
    model = Transformer(debug().model)
    model.init_weights(seed=0)
    hf.save(model, str(path))
    return model, path / "model-00001-of-00001.safetensors"


def test_unknown_and_missing_tensors_are_listed(tmp_path):
    model, shard = _saved_debug_model(tmp_path)
    tensors = load_file(shard)
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(tensors, shard)
    index_path = tmp_path / "model.safetensors.index.json"
    os.remove(index_path)
    os.rename(shard, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        hf.load(str(tmp_path))
    message = str(err.value)
    assert "model.layers.0.mystery.weight" in message
    assert "layers.2.mlp.experts.w13" in message and "missing" in message


def _drop_from_checkpoint(path, shard, prefixes):
    tensors = {k: v for k, v in load_file(shard).items() if not k.startswith(prefixes)}
    save_file(tensors, shard)
    index_path = path / "model.safetensors.index.json"
    index = json.load(open(index_path))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors}
    json.dump(index, open(index_path, "w"))


def test_missing_mtp_module_starts_fresh_with_one_warning(tmp_path, caplog):
    model, shard = _saved_debug_model(tmp_path)
    n = debug().model.num_layers
    _drop_from_checkpoint(tmp_path, shard, (f"model.layers.{n}.",))
    with caplog.at_level("WARNING"):
        loaded = hf.load(str(tmp_path), seed=5)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "mtp.0" in warnings[0].getMessage()
    fresh = Transformer(loaded.cfg)  # init_std is not in config.json: the default one
    fresh.init_weights(seed=5)
    for name, value in loaded.state_dict().items():
        want = (fresh if name.startswith("mtp.") else model).state_dict()[name]
        assert torch.equal(value, want), name


def test_partly_missing_mtp_module_is_an_error(tmp_path):
    _, shard = _saved_debug_model(tmp_path)
    n = debug().model.num_layers
    _drop_from_checkpoint(tmp_path, shard, (f"model.layers.{n}.eh_proj.",))
    with pytest.raises(ValueError, match=r"1 missing tensors.*mtp\.0\.eh_proj\.weight"):
        hf.load(str(tmp_path))


def test_fp8_block_quantized_weights_are_dequantized(tmp_path):
    model, shard = _saved_debug_model(tmp_path)
    tensors = load_file(shard)
    block = 16
    name = "model.layers.1.self_attn.kv_b_proj.weight"  # 64 x 32: 4 x 2 blocks
    w = tensors[name]
    scale = torch.rand(w.shape[0] // block, w.shape[1] // block) * 0.01 + 0.001
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
    tensors[name] = (w / expanded).to(torch.float8_e4m3fn)
    tensors[name + "_scale_inv"] = scale
    save_file(tensors, shard)
    cfg_path = tmp_path / "config.json"
    config = json.load(open(cfg_path))
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block]}
    json.dump(config, open(cfg_path, "w"))
    loaded = hf.load(str(tmp_path))
    expected = tensors[name].float() * expanded
    got = loaded.layers[1].self_attn.kv_b_proj.weight
    assert torch.equal(got, expected)
    # fp8 e4m3 keeps ~2 significant digits: dequantized weights stay close to the originals
    assert torch.allclose(got, w, rtol=0.07, atol=1e-3)


def test_unsupported_configs_are_named(tmp_path):
    base = hf_adapter.config_to_hf(debug().model, torch.float32)
    for change, needle in [({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
                           ({"hidden_act": "gelu"}, "hidden_act"),
                           ({"tie_word_embeddings": True}, "tie_word_embeddings"),
                           ({"n_routed_experts": 9}, "num_routed_experts")]:
        with pytest.raises(ValueError, match=needle):
            hf_adapter.config_from_hf({**base, **change})


def test_truncated_shard_is_a_clear_error(tmp_path):
    model, shard = _saved_debug_model(tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model-00001-of-00001.safetensors"):
        hf.load(str(tmp_path))
