"""Prepare pipeline as Ray tasks, prepare_data CLI on a cluster address, DataWorker actors."""

import json
import os
import subprocess
import sys

import pytest

from elastic_moe.data.pipeline import PrepareConfig, prepare, removed_ids
from elastic_moe.data.sample_corpus import generate, score_removed

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # address="local": never the dead head a killed `ray start --head` (test_coordinator)
    # recorded in /tmp/ray/ray_current_cluster, which a bare ray.init() attaches to
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-data")
    truth = generate(str(root / "corpus"), num_docs=600, seed=11)
    return str(root), truth


def test_ray_tasks_match_in_process_pipeline(ray_cluster, corpus):
    root, truth = corpus
    config = PrepareConfig(seq_len=64, vocab_size=400)
    local = prepare(f"{root}/corpus", f"{root}/local", config, use_ray=False, progress=False)
    remote = prepare(f"{root}/corpus", f"{root}/ray", config, use_ray=True, progress=False)
    for key in ("documents_in", "documents_kept", "exact_duplicates", "near_duplicates",
                "url_duplicates", "tokens", "num_sequences", "shards", "tokenizer"):
        assert local[key] == remote[key], key
    assert removed_ids(f"{root}/local") == removed_ids(f"{root}/ray")
    for shard in remote["shards"]:
        with open(f"{root}/local/{shard['path']}", "rb") as a, \
                open(f"{root}/ray/{shard['path']}", "rb") as b:
            assert a.read() == b.read()
    score = score_removed(set(removed_ids(f"{root}/ray")), truth)
    assert score["exact_recall"] == 1.0 and score["precision"] >= 0.99


def test_prepare_data_cli_on_cluster_address(ray_cluster, corpus, tmp_path):
    root, truth = corpus
    out, removed_file = tmp_path / "out", tmp_path / "removed.txt"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address,
               PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "prepare_data.py"),
         "--input", f"{root}/corpus/*.jsonl*", "--input", f"{root}/corpus/*.wet.gz",
         "--output", str(out), "--removed-ids", str(removed_file), "--seq-len", "64",
         "--vocab-size", "400", "--quiet"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "documents kept" in proc.stdout and "near duplicates" in proc.stdout
    removed = removed_file.read_text().split("\n")[:-1]
    assert len(removed) == len(set(removed))
    score = score_removed(set(removed), truth)
    print(f"\n[cli] {score}")
    assert score["exact_recall"] == 1.0
    assert score["near_recall"] >= 0.95
    assert score["precision"] >= 0.99
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("documents_in", "documents_kept", "exact_duplicates", "near_duplicates",
                "skipped", "tokens"):
        assert key in manifest, key
    assert manifest["documents_in"] == truth["num_documents"]
    assert manifest["documents_in"] - manifest["documents_kept"] == len(removed)
    assert manifest["exact_duplicates"] + manifest["near_duplicates"] + \
        manifest["url_duplicates"] == len(removed)
    # JSONL ids and WET WARC-Record-IDs both appear
    assert any(r.startswith("doc-") for r in removed)
    assert any(r.startswith("<urn:uuid:") for r in removed)


def test_data_worker_actor_resize(ray_cluster, corpus):
    from elastic_moe.actors.data_worker import DataWorker

    from elastic_moe.data.shards import TokenDataset

    root, _ = corpus
    manifest = f"{root}/ray/manifest.json"
    if not os.path.exists(manifest):
        prepare(f"{root}/corpus", f"{root}/ray", PrepareConfig(seq_len=64, vocab_size=400),
                use_ray=True, progress=False)
    n = TokenDataset(manifest).num_sequences
    g = 12
    worker = DataWorker.remote(manifest, global_batch_size=g, dp_size=4, seed=3, prefetch=2)
    seen = []

    def consume(dp_size, steps):
        for _ in range(steps):
            # every rank asks at once, as training workers do
            batches = ray_cluster.get([worker.next_batch.remote(r, dp_size)
                                       for r in range(dp_size)])
            for b in batches:
                assert tuple(b["input_ids"].shape) == (g // dp_size, 64)
                seen.extend(b["sample_ids"])

    consume(4, 3)
    state = ray_cluster.get(worker.state.remote())
    ray_cluster.kill(worker)  # the worker dies with the failed group; a new one restores
    worker = DataWorker.remote(manifest, global_batch_size=g, dp_size=1, prefetch=2)
    ray_cluster.get(worker.restore.remote(state, 3))
    consume(3, 2)
    ray_cluster.get(worker.restore.remote(ray_cluster.get(worker.state.remote()), 1))
    consume(1, 2)
    ray_cluster.get(worker.restore.remote(ray_cluster.get(worker.state.remote()), 6))
    steps_left = -(-(n - len(seen)) // g)  # through the end of epoch 0
    consume(6, steps_left)
    epoch0 = [i for e, i in seen if e == 0]
    assert len(epoch0) == n and sorted(epoch0) == list(range(n))
    epoch1 = [i for e, i in seen if e == 1]
    assert len(epoch1) == len(set(epoch1)) == len(seen) - n


def test_partitioned_clustering_on_ray_matches_single_task(ray_cluster, corpus):
    """Real Ray tasks, shuffled through the object store, and per-task peak memory reported."""
    import numpy as np

    from elastic_moe.data import dedup as dd
    from elastic_moe.data.pipeline import deduplicate, near_duplicates
    from elastic_moe.data.readers import list_inputs
    from elastic_moe.data.tasks import RayRunner

    root, _ = corpus
    paths = list_inputs(f"{root}/corpus")
    single = deduplicate(paths, PrepareConfig(), use_ray=False, progress=False)
    parted = deduplicate(paths, PrepareConfig(dedup=dd.DedupConfig(cluster_partitions=3)),
                         use_ray=True, progress=False)
    assert parted.near_dedup["path"] == "partitioned"
    assert parted.removed == single.removed

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 1 << 63, size=(5000, 14), dtype=np.uint64)
    keys[rng.integers(0, 5000, 800), 3] = keys[rng.integers(0, 5000, 800), 3]
    runner = RayRunner()
    got, info = near_duplicates(keys, np.arange(5000), dd.DedupConfig(cluster_partitions=2),
                                runner)
    want, _ = near_duplicates(keys, np.arange(5000), dd.DedupConfig(cluster_partitions=1),
                              runner)
    assert got == want and len(got) > 500 and info["partitions"] == 2


def test_ray_runner_measures_each_task_on_its_own(ray_cluster):
    from elastic_moe.data.tasks import RayRunner

    def _allocate(num_bytes):  # nested: Ray ships it by value (tests/ is not on workers' path)
        import numpy as np

        return int(np.ones(num_bytes // 8).sum())

    runner = RayRunner(measure_memory=True)
    big = runner.submit(_allocate, [400 << 20])
    assert runner.get(big) == [(400 << 20) // 8]
    small = runner.submit(_allocate, [8])
    assert runner.get(small) == [1]
    peak_big, peak_small = runner.peak_bytes
    assert (400 << 20) <= peak_big < (440 << 20), peak_big
    assert peak_small < (1 << 20), peak_small  # the same worker's earlier task is not charged
