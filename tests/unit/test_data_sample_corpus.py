"""ensure_prepared: the bundled corpus the demo and training tests start from."""

import os
import time

import numpy as np

from elastic_moe.data.sample_corpus import ensure_prepared
from elastic_moe.data.sampler import DataPosition, batch_sample_ids, make_batch
from elastic_moe.data.shards import TokenDataset


def test_ensure_prepared_is_idempotent_and_big_enough_for_debug(tmp_path):
    t0 = time.perf_counter()
    manifest = ensure_prepared(str(tmp_path), vocab_size=2048, seq_len=128)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert ensure_prepared(str(tmp_path), vocab_size=2048, seq_len=128) == manifest
    assert time.perf_counter() - t0 < 0.5
    print(f"\n[ensure_prepared] first call {first:.1f}s")
    assert first < 60
    corpus = [f for f in os.listdir(tmp_path / "sample-corpus-v1")]
    assert any(f.endswith(".warc.wet.gz") for f in corpus)
    assert any(f.endswith(".jsonl") for f in corpus) and "ground_truth.json" in corpus

    ds = TokenDataset(manifest)
    assert ds.num_sequences >= 400 and ds.seq_len == 128 and ds.vocab_size == 2048
    eos_seen = 0
    for i in range(0, ds.num_sequences, 97):
        tokens, doc_ids = ds.sequence(i)
        assert tokens.shape == (129,) and int(tokens.max()) < 2048
        # a new document starts right after every EOS
        eos = np.flatnonzero(tokens[:-1] == ds.eos_id)
        assert (doc_ids[eos + 1] == doc_ids[eos] + 1).all()
        eos_seen += eos.size
    assert eos_seen > 0
    ids = batch_sample_ids(DataPosition(), ds.num_sequences, 8, 1, 2)
    batch = make_batch(ds, ids)
    assert tuple(batch["input_ids"].shape) == (4, 128)
