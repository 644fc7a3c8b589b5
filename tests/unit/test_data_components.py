"""Scaled-out near-dup clustering equals the single union-find task (the independent reference)."""

import numpy as np
import pytest

from elastic_moe.data import dedup as dd
from elastic_moe.data.components import cluster_partitioned
from elastic_moe.data.pipeline import PrepareConfig, deduplicate
from elastic_moe.data.readers import list_inputs
from elastic_moe.data.sample_corpus import generate
from elastic_moe.data.tasks import LocalRunner


def _reference(keys, doc_index):
    edges = [dd.bucket_edges(np.ascontiguousarray(keys[:, b]), doc_index)
             for b in range(keys.shape[1])]
    return dd.cluster_roots(np.concatenate(edges))


def _planted(n, bands, num_links, seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 1 << 63, size=(n, bands), dtype=np.uint64)
    # a document copies one band key of another: pairs merge into clusters, chains and all
    a, b = rng.integers(0, n, num_links), rng.integers(0, n, num_links)
    keys[a, rng.integers(0, bands, num_links)] = keys[b, rng.integers(0, bands, num_links)]
    keys[a, 0] = keys[b, 0]
    return keys


@pytest.mark.parametrize("num_partitions", [2, 5])
def test_random_clusters_match_union_find(num_partitions):
    keys = _planted(20_000, 14, 3_000, seed=num_partitions)
    doc_index = np.arange(keys.shape[0], dtype=np.int64) * 3 + 7  # sparse global indices
    expected = _reference(keys, doc_index)
    got, report = cluster_partitioned(keys, doc_index, num_partitions, LocalRunner())
    assert len(expected) > 2_000
    assert got == expected
    assert report.rounds >= 2


def test_one_long_chain_converges_to_its_smallest_document():
    n = 3_000
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 1 << 63, size=(n, 2), dtype=np.uint64)
    order = rng.permutation(n)
    for i in range(n - 1):  # a path through the documents in random order
        keys[order[i + 1], i % 2] = keys[order[i], i % 2]
    doc_index = np.arange(n, dtype=np.int64)
    got, report = cluster_partitioned(keys, doc_index, 4, LocalRunner())
    assert got == _reference(keys, doc_index)
    assert set(got.values()) == {0} and len(got) == n - 1
    with pytest.raises(RuntimeError, match="max_rounds=2"):
        cluster_partitioned(keys, doc_index, 4, LocalRunner(), max_rounds=2)


def test_no_candidates_and_bad_partitions():
    keys = np.arange(40, dtype=np.uint64).reshape(10, 4) * np.uint64(7919)
    got, _ = cluster_partitioned(keys, np.arange(10), 3, LocalRunner())
    assert got == {}
    with pytest.raises(ValueError, match="num_partitions=1"):
        cluster_partitioned(keys, np.arange(10), 1, LocalRunner())
    with pytest.raises(ValueError, match="cluster_partitions=-1"):
        dd.DedupConfig(cluster_partitions=-1)
    config = dd.DedupConfig(single_task_max_docs=100, docs_per_partition=30)
    assert [config.partitions_for(n) for n in (100, 101, 1000)] == [1, 4, 34]


def test_pipeline_removes_the_same_documents_on_both_paths(tmp_path):
    generate(str(tmp_path / "corpus"), num_docs=800, seed=5)
    paths = list_inputs(str(tmp_path / "corpus"))
    single = deduplicate(paths, PrepareConfig(), use_ray=False, progress=False)
    parted = deduplicate(paths, PrepareConfig(dedup=dd.DedupConfig(cluster_partitions=3)),
                         use_ray=False, progress=False)
    assert single.near_dedup["path"] == "single_task"
    assert parted.near_dedup["path"] == "partitioned" and parted.near_dedup["partitions"] == 3
    assert sum(r == "near" for r, _ in single.removed.values()) > 50
    assert parted.removed == single.removed
