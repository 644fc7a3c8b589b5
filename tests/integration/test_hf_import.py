"""Sharded HF import, sharded seeded init and validation loss at W = 1, 2, 3, 4 (real gloo).

References, all independent of the code under test's sharded path:

* **planted ground truth**: a debug-size ``Transformer`` with seeded weights and random router
  biases, written with ``hf.save`` into several safetensors shards. A single-process
  ``hf.load`` must give it back bit-exactly; every rank's shards after ``load_hf_into`` must equal
  the matching rows of it. The FP8 copy quantizes three weights in 16x16 blocks (the embedding's
  2048 rows split 683/683/682 at W=3, so shard edges cut through scale blocks); its truth is
  dequantized in the test with plain torch.
* **reads only its slices**: from fp32 shards, the bytes a rank reads equal its local tensor
  bytes exactly (no rank ever reads a full tensor it does not hold).
* **init**: each rank's shards after ``setup_model(seed)`` equal the rows of a single-process
  ``Transformer.init_weights(seed)``, at every W and EP degree; ``init_bytes_per_rank`` (the
  dry run) predicts each rank's bytes exactly.
* **validation loss**: one plain forward of the whole validation set in the test process (mean
  cross-entropy over all tokens) against ``evaluate`` on each rank's share, summed over ranks.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from elastic_moe.config import ParallelConfig, debug
from elastic_moe.data.shards import write_manifest, write_shard
from elastic_moe.model import hf
from elastic_moe.model.hf_sharded import hf_config_to_model_config, load_hf_into
from elastic_moe.model.init import local_box
from elastic_moe.model.transformer import Transformer
from elastic_moe.parallel import plan_mesh, setup_model
from elastic_moe.parallel.memory import init_bytes_per_rank
from elastic_moe.train.evaluate import evaluate, val_micro_batches
from tests.integration.multiproc import launch

pytestmark = pytest.mark.integration

TRUTH_SEED, INIT_SEED = 3, 41
BLOCK = 16
FP8_NAMES = ("model.embed_tokens.weight", "model.layers.1.self_attn.kv_b_proj.weight",
             "model.layers.2.mlp.experts.5.down_proj.weight")
# (gpus_per_node, ep) per world size; W=4 with 2 per node is HSDP 2x2 (Replicate, Shard(0))
LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (2, 2)], 3: [(3, 1)], 4: [(2, 2)]}
VAL_SEQUENCES, VAL_SEQ_LEN = 6, 32


def _model_cfg():
    return debug().model


def _checkpoint_cfg(path: str):
    cfg = _model_cfg()
    return hf_config_to_model_config(path, expert_backend=cfg.expert_backend,
                                     init_std=cfg.init_std,
                                     bias_update_speed=cfg.bias_update_speed,
                                     seq_aux_alpha=cfg.seq_aux_alpha)


def _quantize_fp8(src: str, dst: str) -> dict[str, torch.Tensor]:
    """Copy ``src`` to ``dst`` with FP8_NAMES block-quantized; returns their dequantized truth."""
    shutil.copytree(src, dst)
    index_path = os.path.join(dst, "model.safetensors.index.json")
    index = json.load(open(index_path))
    truth = {}
    gen = torch.Generator().manual_seed(5)
    for name in FP8_NAMES:
        shard = os.path.join(dst, index["weight_map"][name])
        tensors = load_file(shard)
        w = tensors[name]
        rows, cols = -(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)
        scale = torch.rand(rows, cols, generator=gen) * 0.01 + 0.001
        expanded = scale.repeat_interleave(BLOCK, 0)[: w.shape[0]].repeat_interleave(
            BLOCK, 1)[:, : w.shape[1]]
        tensors[name] = (w / expanded).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale
        truth[name] = tensors[name].float() * expanded
        save_file(tensors, shard, metadata={"format": "pt"})
        index["weight_map"][name + "_scale_inv"] = index["weight_map"][name]
    json.dump(index, open(index_path, "w"))
    config_path = os.path.join(dst, "config.json")
    config = json.load(open(config_path))
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
    json.dump(config, open(config_path, "w"))
    return truth


def _val_manifest(root: str) -> str:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, _model_cfg().vocab_size, (VAL_SEQUENCES, VAL_SEQ_LEN + 1),
                          dtype=np.uint32)
    starts = np.zeros_like(tokens, dtype=bool)
    starts[:, 0] = True
    starts[:, VAL_SEQ_LEN // 2] = True  # two documents per sequence: the doc mask matters
    os.makedirs(root, exist_ok=True)
    write_shard(os.path.join(root, "val.arrow"), tokens, starts)
    manifest = os.path.join(root, "manifest.json")
    write_manifest(manifest, {"shards": [{"path": "val.arrow", "num_sequences": VAL_SEQUENCES}],
                              "seq_len": VAL_SEQ_LEN, "vocab_size": _model_cfg().vocab_size,
                              "num_sequences": VAL_SEQUENCES})
    return manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("hf_import")
    model = Transformer(_model_cfg())
    model.init_weights(seed=TRUTH_SEED)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(9)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(
                    torch.rand(module.e_score_correction_bias.shape, generator=gen) * 0.01)
    plain_dir, fp8_dir = str(tmp / "plain"), str(tmp / "fp8")
    assert len(hf.save(model, plain_dir, max_shard_bytes=300_000)) > 3
    truth = {k: v.clone() for k, v in model.state_dict().items()
             if not k.startswith("rope_") and "tokens_per_expert" not in k}
    fp8_hf = _quantize_fp8(plain_dir, fp8_dir)
    fp8_truth = dict(truth)
    for hf_name, value in fp8_hf.items():
        if ".experts." in hf_name:  # layers.2 expert 5's down_proj is row 5 of w2
            name = "layers.2.mlp.experts.w2"
            fp8_truth[name] = fp8_truth[name].clone()
            fp8_truth[name][5] = value
        else:
            fp8_truth[hf_name.removeprefix("model.")] = value

    # The single-process load must reproduce the planted truth exactly.
    for path, want in ((plain_dir, truth), (fp8_dir, fp8_truth)):
        loaded = hf.load(path).state_dict()
        for name, value in want.items():
            assert torch.equal(loaded[name], value), f"{path}: single-process {name}"
    init_ref = Transformer(_model_cfg())
    init_ref.init_weights(seed=INIT_SEED)

    val_manifest = _val_manifest(str(tmp / "val"))
    model.eval()
    batch = val_micro_batches(val_manifest, VAL_SEQUENCES, 0, 1, VAL_SEQUENCES)[0]
    with torch.no_grad():
        out = model(batch["input_ids"], batch["labels"], batch["doc_ids"])
    refs = {"truth": truth, "fp8_truth": fp8_truth,
            "init": {k: v for k, v in init_ref.state_dict().items() if k in truth},
            "val_loss": float(out.lm_loss), "val_mtp_loss": float(out.mtp_loss)}
    ref_path = str(tmp / "refs.pt")
    torch.save(refs, ref_path)
    return {"plain": plain_dir, "fp8": fp8_dir, "refs": ref_path, "val": val_manifest}


def _local(param: torch.Tensor) -> tuple[torch.Tensor, slice]:
    offset, shape = local_box(param)
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.detach(), slice(offset[0], offset[0] + shape[0])


def _assert_shards_equal(model, want: dict[str, torch.Tensor], what: str) -> int:
    """Every local shard equals its rows of ``want``; returns the local bytes compared."""
    total = 0
    state = model.state_dict(keep_vars=True)
    assert set(want) <= set(state), what
    for name, ref in want.items():
        local, rows = _local(state[name])
        assert torch.equal(local, ref[rows]), f"{what}: {name} rows {rows}"
        total += local.numel() * local.element_size()
    return total


def _worker(rank: int, world_size: int, paths: dict[str, str]) -> None:
    refs = torch.load(paths["refs"])
    cfg = _checkpoint_cfg(paths["plain"])
    assert cfg == _model_cfg()
    for gpus_per_node, ep in LAYOUTS[world_size]:
        prefs = ParallelConfig(max_workers=world_size, gpus_per_node=gpus_per_node,
                               expert_parallel_degree=ep)
        plan = plan_mesh(world_size, gpus_per_node, cfg, prefs)
        what = f"{plan.describe()} rank {rank}"

        # seeded init: this rank's rows of the single-process init; bytes as the dry run says
        model = setup_model(cfg, plan, "cpu", seed=INIT_SEED)
        _assert_shards_equal(model, refs["init"], f"{what} init")
        held = sum(_local(t)[0].numel() * 4 for t in model.state_dict(keep_vars=True).values())
        held += sum(b.numel() * 4 for n, b in model.named_buffers()
                    if n.startswith("rope_") or "tokens_per_expert" in n)
        assert init_bytes_per_rank(cfg, plan).bytes_per_rank[rank] == held, what

        report = load_hf_into(model, paths["plain"], cfg)
        local_bytes = _assert_shards_equal(model, refs["truth"], f"{what} load")
        assert report.bytes_read == local_bytes, f"{what}: read {report.bytes_read} B for " \
                                                 f"{local_bytes} B of shards"
        assert report.fresh == []

        # the same weights give the same validation loss at every W
        batches = val_micro_batches(paths["val"], VAL_SEQUENCES, rank, world_size, 2)
        got = evaluate(model, batches)
        for key in ("val_loss", "val_mtp_loss"):
            assert abs(got[key] - refs[key]) <= 1e-5 * abs(refs[key]), (what, key, got, refs)
        assert got["val_tokens"] == VAL_SEQUENCES * VAL_SEQ_LEN

        fp8_model = setup_model(cfg, plan, "cpu", seed=INIT_SEED)
        # reads of 1000 B: 15 embedding rows of FP8, so chunks straddle the 16-row scale blocks
        load_hf_into(fp8_model, paths["fp8"], cfg, chunk_bytes=1000)
        _assert_shards_equal(fp8_model, refs["fp8_truth"], f"{what} fp8 load")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharded_load_init_and_val_loss(world_size: int, setup) -> None:
    """W=1 (no process group), 2 (ep 1 and 2), 3 (uneven FSDP shards), 4 (HSDP 2x2, ep 2)."""
    if world_size == 1:
        _worker(0, 1, setup)
    else:
        launch(_worker, world_size, setup)
