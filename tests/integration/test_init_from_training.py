"""Round trips through real training: --init-from on 2 workers, lr 0, then jobs/export.py.

1. A tiny random ``transformers`` ``DeepseekV3ForCausalLM`` saved with ``save_pretrained`` (its
   config.json asks for one MTP module, its files hold none) trains 4 steps on 2 Ray Train
   workers (gloo) with learning rate 0 and router-bias updates off. transformers loads the export
   and its logits equal the original model's to 1e-5 relative (fp32).
2. A checkpoint this project saved, MTP included: the export holds exactly the saved tensors,
   MTP layer too -- its MTP weights were loaded, not freshly initialised. This run stops after
   its first committed checkpoint and is started again with the HF directory moved away: the
   restart restores the run's own checkpoint and never reads --init-from again.

In both, the validation loss logged to MLflow every 2 steps (on W=2) equals the loss of the
original weights evaluated in this process (W=1), so it does not depend on the world size.

Training runs through :func:`train`, the only place that knows how training is launched.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest
import torch
from elastic_moe.jobs.export import main as export_main
from elastic_moe.jobs.train import build_config
from safetensors.torch import load_file

from elastic_moe.config import Config, debug
from elastic_moe.model import Transformer, hf
from elastic_moe.model.hf_sharded import load_hf_into
from elastic_moe.train.evaluate import evaluate, val_micro_batches, validation_manifest
from tests.integration.elastic_helpers import RUNTIME_ENV, data_cache, sqlite_store

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS, EVAL_EVERY = 4, 2


def train(cfg: Config, run_name: str, output_dir: str,
          resume: bool = False) -> tuple[str, str, str]:
    """Run training to the end; returns (checkpoint root, MLflow URI, MLflow run id)."""
    from elastic_moe.actors.training import run_training

    result = run_training(cfg, run_name=run_name, output_dir=output_dir, resume=resume)
    assert result.ok, result.error
    assert result.mlflow_run_id is not None
    return result.checkpoint_dir, result.tracking_uri, result.mlflow_run_id


@pytest.fixture(scope="module")
def local_ray():
    # address="local": always a cluster of our own, never one another process started
    ray.init(address="local", num_cpus=3, runtime_env=RUNTIME_ENV, include_dashboard=False,
             namespace="elastic-moe")
    yield
    ray.shutdown()


def _config(init_from: str, tmp) -> Config:
    args = argparse.Namespace(
        recipe="debug", steps=STEPS, data=None, val_data=None, workers="2", init_from=init_from,
        set=["train.lr=0", "train.min_lr=0", "model.bias_update_speed=0",
             f"train.eval_every={EVAL_EVERY}", "train.global_batch_size=8",
             f"checkpoint.every_steps={STEPS}", f"data.cache_dir={data_cache()}",
             f"tracking.tracking_uri={sqlite_store(tmp / 'mlflow.db')}"])
    return build_config(args)


def _hf_model() -> transformers.DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=2048, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        v_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=256)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(0.0, 0.3)  # positive: see test_model_hf.py
    return model


def _reference_val(cfg: Config, path: str, train_manifest_dir: str) -> dict[str, float]:
    """Validation losses of the checkpoint at ``path`` in this process (W=1)."""
    model = Transformer(cfg.model)
    model.init_weights(seed=cfg.train.seed)  # MTP a checkpoint lacks: the same fresh init
    load_hf_into(model, path, cfg.model)
    manifest = validation_manifest(cfg, os.path.join(train_manifest_dir, "manifest.json"))
    assert manifest is not None
    batches = val_micro_batches(manifest, cfg.train.eval_sequences, 0, 1,
                                cfg.train.micro_batch_size)
    return evaluate(model, batches)


def _logged_val(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in ("val_loss", "val_mtp_loss")}


def _check_val(cfg: Config, path: str, uri: str, run_id: str) -> None:
    from elastic_moe.data.sample_corpus import ensure_prepared

    train_dir = os.path.dirname(ensure_prepared(cfg.data.cache_dir, cfg.data.tokenizer_vocab_size,
                                                cfg.train.seq_len))
    want = _reference_val(cfg, path, train_dir)
    logged = _logged_val(uri, run_id)
    for key, history in logged.items():
        assert [s for s, _ in history] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)), history
        for _, value in history:
            assert abs(value - want[key]) <= 1e-5 * abs(want[key]), (key, value, want[key])


def test_transformers_checkpoint_round_trip_through_training(local_ray, tmp_path):
    original = _hf_model()
    original.save_pretrained(tmp_path / "hf")
    assert not any(".layers.3." in k for k in load_file(tmp_path / "hf" / "model.safetensors"))
    cfg = _config(str(tmp_path / "hf"), tmp_path)
    assert cfg.model.num_mtp_modules == 1
    ckpt, uri, run_id = train(cfg, "from-transformers", str(tmp_path / "runs"))
    assert export_main(["--checkpoint", ckpt, "--output", str(tmp_path / "export")]) == 0

    again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "export").eval()
    tokens = torch.randint(0, 2048, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = original(tokens).logits, again(tokens).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
    _check_val(cfg, str(tmp_path / "hf"), uri, run_id)


def test_checkpoint_with_mtp_loads_its_mtp_weights(local_ray, tmp_path):
    model = Transformer(debug().model)
    model.init_weights(seed=12)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(0.0, 0.01)
    hf.save(model, str(tmp_path / "hf"), max_shard_bytes=400_000)
    cfg = _config(str(tmp_path / "hf"), tmp_path)
    first_half = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=EVAL_EVERY),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=EVAL_EVERY))
    train(first_half, "from-ours", str(tmp_path / "runs"))
    os.rename(tmp_path / "hf", tmp_path / "hf-away")  # a restart must not need it
    ckpt, uri, run_id = train(cfg, "from-ours", str(tmp_path / "runs"), resume=True)
    os.rename(tmp_path / "hf-away", tmp_path / "hf")
    assert export_main(["--checkpoint", ckpt, "--output", str(tmp_path / "export")]) == 0

    def tensors(path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                out.update(load_file(os.path.join(path, name)))
        return out

    saved, exported = tensors(tmp_path / "hf"), tensors(tmp_path / "export")
    assert saved.keys() == exported.keys()
    mtp = [k for k in saved if k.startswith(f"model.layers.{cfg.model.num_layers}.")]
    assert len(mtp) > 10
    for key, value in saved.items():
        assert torch.equal(exported[key], value), key
    _check_val(cfg, str(tmp_path / "hf"), uri, run_id)
