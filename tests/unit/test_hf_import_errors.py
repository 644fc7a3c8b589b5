"""--init-from inputs: bad checkpoints and bad command lines each give one clear error.

Checkpoints are real files: a debug model written by ``hf.save`` into several shards, or a tiny
``transformers`` model written by ``save_pretrained``, then damaged the way downloads break.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
import torch
from elastic_moe.jobs.train import build_config, main

from elastic_moe.config import debug
from elastic_moe.model import Transformer, hf
from elastic_moe.model.hf_sharded import hf_config_to_model_config, load_hf_into

transformers = pytest.importorskip("transformers")


@pytest.fixture
def sharded(tmp_path):
    model = Transformer(debug().model)
    model.init_weights(seed=0)
    files = hf.save(model, str(tmp_path), max_shard_bytes=300_000)
    assert len(files) > 2
    return tmp_path, files


def _load(path) -> None:
    cfg = hf_config_to_model_config(str(path))
    model = Transformer(cfg)
    model.init_weights(seed=0)
    load_hf_into(model, str(path), cfg)


def test_missing_shard_file(sharded):
    path, files = sharded
    os.remove(path / files[1])
    with pytest.raises(ValueError, match=rf"names 1 shard file\(s\) that do not exist.*{files[1]}"):
        _load(path)


def test_index_names_a_file_that_does_not_exist(sharded):
    path, _ = sharded
    index_path = path / "model.safetensors.index.json"
    index = json.load(open(index_path))
    index["weight_map"]["lm_head.weight"] = "model-typo.safetensors"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match="model-typo.safetensors"):
        _load(path)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors_file(sharded, keep):
    """Cut inside the length prefix, inside the header, and inside the tensor data."""
    path, files = sharded
    shard = path / files[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=rf"{files[0]}.*(truncated|too short)"):
        _load(path)


def test_index_and_shards_from_different_checkpoints(sharded):
    path, files = sharded
    index_path = path / "model.safetensors.index.json"
    index = json.load(open(index_path))
    index["weight_map"]["model.layers.0.extra.weight"] = files[0]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match="header has no such tensor"):
        _load(path)


@pytest.mark.parametrize("change, needle", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"n_routed_experts": 9}, "num_routed_experts"),
    ({"model_type": "llama"}, "not a DeepSeek"),
    ({"rope_scaling": {"type": "longrope"}}, "rope type"),
])
def test_config_this_architecture_cannot_run(sharded, change, needle):
    path, _ = sharded
    config = json.load(open(path / "config.json"))
    config.update(change)
    json.dump(config, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match=needle):
        _load(path)


def test_model_built_for_another_config_is_refused(sharded):
    path, _ = sharded
    other = dataclasses.replace(debug().model, num_heads=2)
    model = Transformer(other)
    with pytest.raises(ValueError, match=r"model.num_heads=2 but .*config.json gives 4"):
        load_hf_into(model, str(path), other)


def test_loads_from_an_fsspec_url(sharded):
    """The same checkpoint from fsspec's in-memory filesystem (no local path involved)."""
    import fsspec

    path, files = sharded
    fs = fsspec.filesystem("memory")
    for name in os.listdir(path):
        fs.pipe(f"/ckpt14/{name}", (path / name).read_bytes())
    try:
        want = hf.load(str(path)).state_dict()
        got = hf.load("memory://ckpt14").state_dict()
    finally:
        fs.rm("/ckpt14", recursive=True)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


# --------------------------------------------------------------------------- command line
@pytest.fixture
def hf_dir(tmp_path):
    cfg = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=8,
        q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
        max_position_embeddings=256)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    return str(tmp_path / "hf")


def _error(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_describe_takes_the_model_from_config_json(hf_dir, capsys):
    assert main(["--init-from", hf_dir, "--set", "train.lr=0", "--set", "train.min_lr=0",
                 "--describe"]) == 0
    out = capsys.readouterr().out
    assert '"vocab_size": 512' in out and '"num_routed_experts": 4' in out
    assert f'"init_from": "{hf_dir}"' in out and '"lr": 0.0' in out


def test_init_from_refuses_resume_and_existing_runs(hf_dir, tmp_path, capsys):
    code, err = _error(["--init-from", hf_dir, "--resume", "--run-name", "r",
                        "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "--init-from with --resume" in err
    (tmp_path / "out" / "r").mkdir(parents=True)
    (tmp_path / "out" / "r" / "coordinator.json").write_text("{}")
    code, err = _error(["--init-from", hf_dir, "--run-name", "r",
                        "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "run 'r' already exists" in err and "new --run-name" in err


def test_architecture_overrides_are_refused(hf_dir, capsys):
    code, err = _error(["--init-from", hf_dir, "--set", "model.dim=64", "--describe"], capsys)
    assert code == 2 and "--set model.dim" in err and "config.json" in err
    assert main(["--init-from", hf_dir, "--set", "model.bias_update_speed=0", "--describe"]) == 0


def test_larger_data_vocab_points_to_the_models_tokenizer(hf_dir, tmp_path):
    from elastic_moe.actors.training import _prepare_data

    from elastic_moe.data.sample_corpus import ensure_prepared

    manifest = ensure_prepared(str(tmp_path / "data"), vocab_size=2048, seq_len=128)
    args = argparse.Namespace(recipe="debug", set=[], steps=None, data=manifest, val_data=None,
                              workers=None, init_from=hf_dir)
    cfg = build_config(args)
    assert cfg.model.vocab_size == 512
    with pytest.raises(ValueError, match=rf"prepare_data.py --tokenizer {hf_dir}/tokenizer.json"):
        _prepare_data(cfg)


def test_init_dry_run_reports_bytes_per_rank_for_671b(capsys):
    assert main(["--recipe", "deepseek_v3_671b", "--init-dry-run", "256"]) == 0
    out = capsys.readouterr().out
    assert "W=256" in out and "GiB on the fullest rank" in out
    # whole model ~671B + MTP parameters in fp32
    total = float(out.split("whole model ")[1].split(" GiB")[0])
    assert 2400 < total < 2700, out


def test_fresh_mtp_weights_are_not_random_garbage(hf_dir):
    """A transformers-saved model loads single-process: MTP from the seeded init, no NaNs."""
    model = hf.load(hf_dir, seed=4)
    assert model.cfg.num_mtp_modules == 1
    assert torch.isfinite(model.mtp[0].eh_proj.weight).all()
