"""evaluate() in one process against a plain cross-entropy, and how the fixed set is shared out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elastic_moe.config import debug
from elastic_moe.data.shards import write_manifest, write_shard
from elastic_moe.model import Transformer
from elastic_moe.train.evaluate import WEIGHT_KEY, evaluate, val_micro_batches

SEQ_LEN, NUM = 24, 5


@pytest.fixture
def manifest(tmp_path) -> str:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, debug().model.vocab_size, (NUM, SEQ_LEN + 1), dtype=np.uint32)
    starts = np.zeros_like(tokens, dtype=bool)
    starts[:, 0] = True
    write_shard(str(tmp_path / "v.arrow"), tokens, starts)
    path = str(tmp_path / "manifest.json")
    write_manifest(path, {"shards": [{"path": "v.arrow", "num_sequences": NUM}],
                          "seq_len": SEQ_LEN, "vocab_size": debug().model.vocab_size,
                          "num_sequences": NUM})
    return path


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_every_sequence_is_evaluated_once(manifest, world_size):
    seen = []
    for rank in range(world_size):
        for batch in val_micro_batches(manifest, 100, rank, world_size, micro_batch_size=2):
            assert WEIGHT_KEY not in batch
            seen += [i for _, i in batch["sample_ids"]]
    assert sorted(seen) == list(range(NUM))


def test_ranks_past_the_set_join_with_weight_zero(manifest):
    batches = val_micro_batches(manifest, 3, 4, 6, micro_batch_size=2)
    assert len(batches) == 1 and batches[0][WEIGHT_KEY] == 0.0
    assert WEIGHT_KEY not in val_micro_batches(manifest, 3, 2, 6, micro_batch_size=2)[0]


def test_matches_a_plain_cross_entropy_and_leaves_the_model_as_it_was(manifest):
    model = Transformer(debug().model)
    model.init_weights(seed=2)
    model.train()
    loads = [m.tokens_per_expert.clone() for m in model.modules() if hasattr(m, "tokens_per_expert")]
    got = evaluate(model, val_micro_batches(manifest, NUM, 0, 1, micro_batch_size=2))
    assert model.training
    after = [m.tokens_per_expert for m in model.modules() if hasattr(m, "tokens_per_expert")]
    assert all(torch.equal(a, b) for a, b in zip(loads, after, strict=True))

    batch = val_micro_batches(manifest, NUM, 0, 1, micro_batch_size=NUM)[0]
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], doc_ids_BS=batch["doc_ids"])
    want = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    assert abs(got["val_loss"] - float(want)) <= 1e-5 * float(want)
    assert got["val_tokens"] == NUM * SEQ_LEN and got["val_mtp_loss"] > 0
