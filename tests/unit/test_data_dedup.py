"""Dedup building blocks and planted-duplicate recall/precision of the in-process pipeline."""

import json
import os
import random

import numpy as np
import pytest

from elastic_moe.data import dedup as dd
from elastic_moe.data.normalize import normalize
from elastic_moe.data.pipeline import PrepareConfig, prepare, removed_ids
from elastic_moe.data.sample_corpus import generate, score_removed, shingle_jaccard


def test_normalize_folds_case_punctuation_digits_whitespace():
    assert normalize("Hello,  World!\n2024 e\u0301t\u00e9") == "hello world 0000 \u00e9t\u00e9"
    assert normalize("a_b--c") == "a b c"
    assert normalize("   ") == ""


def test_shingle_hash_depends_on_content_not_position():
    hashes, counts = dd.shingle_hashes(["a b c d e f", "x a b c d e", "p q"], 5)
    assert counts.tolist() == [2, 2, 1]
    assert hashes[0] == hashes[3]  # "a b c d e" at offset 0 of doc 0 and offset 2 of doc 1
    assert len(set(hashes.tolist())) == 4


def test_minhash_estimates_jaccard_and_is_deterministic():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    base = [rng.choice(vocab) for _ in range(400)]
    edited = list(base)
    for j in rng.sample(range(400), 8):
        edited[j] = "zzz"
    a, b, c = " ".join(base), " ".join(edited), " ".join(rng.choice(vocab) for _ in range(400))
    config = dd.DedupConfig()
    sigs = dd.minhash_signatures([a, b, c, ""], config)
    true_j = shingle_jaccard(a, b)
    est_j = float((sigs[0] == sigs[1]).mean())
    # 112 permutations: standard error sqrt(J(1-J)/112) ~ 0.035
    assert abs(est_j - true_j) < 0.12, (est_j, true_j)
    assert (sigs[0] == sigs[2]).mean() < 0.05
    assert (sigs[3] == np.uint32(0xFFFFFFFF)).all()  # no words -> sentinel, excluded from LSH
    assert np.array_equal(sigs, dd.minhash_signatures([a, b, c, ""], config))
    # batch boundaries must not change signatures
    small = dd.minhash_signatures([a, b, c, ""], dd.DedupConfig(batch_bytes=10))
    assert np.array_equal(sigs, small)


def test_lsh_threshold_and_config_validation():
    assert dd.DedupConfig().threshold == pytest.approx(0.719, abs=1e-3)
    assert dd.DedupConfig().num_perm == 112
    with pytest.raises(ValueError, match="num_bands=0"):
        dd.DedupConfig(num_bands=0)


def test_buckets_union_find_and_exact():
    edges = dd.bucket_edges(np.array([7, 3, 7, 7, 3, 9], dtype=np.uint64),
                            np.array([10, 11, 12, 13, 14, 15]))
    assert sorted(map(tuple, edges.tolist())) == [(12, 10), (13, 10), (14, 11)]
    removed = dd.cluster_roots(np.array([[5, 2], [9, 5], [4, 3], [3, 1]]))
    assert removed == {5: 2, 9: 2, 4: 1, 3: 1}
    first = dd.exact_duplicates(np.array([b"x", b"y", b"x", b"y", b"z"], dtype="S16"))
    assert first.tolist() == [0, 1, 0, 1, 4]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    truth = generate(str(root / "corpus"), num_docs=1200, seed=3)
    manifest = prepare(str(root / "corpus"), str(root / "out"),
                       PrepareConfig(seq_len=128, vocab_size=512), use_ray=False, progress=False)
    return truth, manifest, str(root / "out")


def test_planted_duplicates_recall_and_precision(prepared, capsys):
    truth, manifest, out = prepared
    near_j = [j for g in truth["groups"] if g["kind"] == "near" for j in g["jaccard"]]
    assert min(near_j) >= 0.8  # planted near copies meet the definition
    score = score_removed(set(removed_ids(out)), truth)
    with capsys.disabled():
        print(f"\n[dedup ground truth] exact recall {score['exact_recall']:.2%} "
              f"({score['exact_planted']} planted), near recall {score['near_recall']:.2%} "
              f"({score['near_planted']} planted, Jaccard {min(near_j):.2f}..{max(near_j):.2f}), "
              f"url recall {score['url_recall']:.2%}, precision {score['precision']:.2%} "
              f"({score['removed']} removed)")
    assert score["exact_recall"] == 1.0
    assert score["near_recall"] >= 0.95
    assert score["url_recall"] == 1.0
    assert score["precision"] >= 0.99
    assert manifest["documents_in"] == truth["num_documents"]
    assert manifest["documents_kept"] == manifest["documents_in"] - score["removed"]


def test_removed_records_point_at_kept_documents(prepared):
    _, _, out = prepared
    with open(os.path.join(out, "removed.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    removed = {r["id"] for r in records}
    assert {r["reason"] for r in records} == {"exact", "near", "url"}
    # exact dups point at a document that survived exact dedup (first occurrence)
    assert all(r["duplicate_of"] != r["id"] for r in records)
    near_targets = {r["duplicate_of"] for r in records if r["reason"] == "near"}
    assert not near_targets & removed  # union-find roots are kept documents
