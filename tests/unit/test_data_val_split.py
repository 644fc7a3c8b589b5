"""prepare --val-fraction: whole documents held out after dedup, never a near-copy of training.

The corpus is the bundled generator's, with planted exact / near / URL copies listed in its
ground truth, so "no held-out document has a (near-)duplicate among the training documents" is
checked against planted facts, and the token counts against a run without a split.
"""

from __future__ import annotations

import json
import os

import pytest

from elastic_moe.data.pipeline import PrepareConfig, prepare, removed_ids
from elastic_moe.data.sample_corpus import generate
from elastic_moe.data.shards import TokenDataset


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_split")
    truth = generate(str(root / "corpus"), num_docs=160, seed=3)
    split = prepare(str(root / "corpus"), str(root / "split"),
                    PrepareConfig(seq_len=64, vocab_size=512, val_fraction=0.2),
                    use_ray=False, progress=False)
    whole = prepare(str(root / "corpus"), str(root / "whole"),
                    PrepareConfig(seq_len=64, vocab_size=512,
                                  tokenizer_path=str(root / "split" / "tokenizer.json")),
                    use_ray=False, progress=False)
    return root, truth, split, whole


def test_held_out_documents_are_whole_and_never_near_copies_of_training_ones(corpus):
    root, truth, split, whole = corpus
    val_ids = set((root / "split" / "val" / "documents.txt").read_text().split())
    removed = set(removed_ids(str(root / "split")))
    assert split["documents_val"] == len(val_ids) > 0
    assert not val_ids & removed  # only kept documents are held out
    # every planted group keeps at most one member, so a held-out survivor has no copy in
    # training; check it against the planted truth, not the pipeline's own bookkeeping
    for group in truth["groups"]:
        survivors = [d for d in [group["original"], *group["copies"]] if d not in removed]
        in_val = [d for d in survivors if d in val_ids]
        if group["kind"] != "url":  # a URL re-crawl has new content: not a duplicate
            assert len(survivors) <= 1, group
        assert not in_val or len(in_val) == len(survivors), group
    # the split only moves documents: tokens of train + val = tokens without a split
    val = json.load(open(root / "split" / "val" / "manifest.json"))
    assert split["tokens"] + val["tokens"] == whole["tokens"]
    assert split["documents_kept"] == whole["documents_kept"]
    fraction = len(val_ids) / split["documents_kept"]
    assert 0.1 < fraction < 0.3, fraction


def test_val_manifest_reads_like_training_data(corpus):
    root, _, split, _ = corpus
    path = os.path.join(root, "split", split["val_manifest"])
    val, train = TokenDataset(path), TokenDataset(str(root / "split" / "manifest.json"))
    assert val.num_sequences > 0 and val.seq_len == train.seq_len == 64
    assert val.vocab_size == train.vocab_size
    tokens, _ = val.sequence(0)
    assert tokens.max() < val.vocab_size


def test_bad_fraction_is_rejected():
    with pytest.raises(ValueError, match=r"val_fraction=1.0: must be in \[0, 1\)"):
        PrepareConfig(val_fraction=1.0)
