"""Packing, shards, the world-size-free position, and resume/resize over sample ids (no Ray)."""

import json
import os

import numpy as np
import pytest
from elastic_moe.actors.data_worker import DataWorkerCore

from elastic_moe.data.pack import Packer, doc_ids_from_starts
from elastic_moe.data.sampler import (
    DataPosition,
    advance,
    as_tensors,
    batch_sample_ids,
    epoch_permutation,
    make_batch,
    split_batch,
)
from elastic_moe.data.shards import TokenDataset, write_manifest, write_shard

SEQ_LEN = 7  # rows of 8 tokens


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    """60 sequences over two shards; token value = a running counter so rows are recognizable."""
    root = tmp_path_factory.mktemp("shards")
    packer = Packer(SEQ_LEN)
    lengths = np.array([3, 5, 9, 2, 17, 1, 8] * 20)
    tokens = np.arange(lengths.sum(), dtype=np.uint32)
    packer.add_documents(tokens, lengths)
    seqs, starts = packer.take()
    assert seqs.shape == (lengths.sum() // 8, 8)
    shards = []
    for name, lo, hi in (("a.arrow", 0, 25), ("b.arrow", 25, 60)):
        n = write_shard(str(root / name), seqs[lo:hi], starts[lo:hi])
        shards.append({"path": name, "num_sequences": n, "num_tokens": n * 8})
    write_manifest(str(root / "manifest.json"), {"shards": shards, "seq_len": SEQ_LEN,
                                                 "vocab_size": 5000, "num_sequences": 60,
                                                 "eos_id": 0})
    return str(root / "manifest.json"), seqs, starts


def test_packer_keeps_document_boundaries_and_remainder():
    packer = Packer(4)  # width 5
    packer.add_documents(np.arange(12, dtype=np.uint32), np.array([3, 4, 5]))
    seqs, starts = packer.take()
    assert seqs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert doc_ids_from_starts(starts).tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    rem, rem_starts = packer.remainder()
    assert rem.tolist() == [10, 11] and rem_starts.tolist() == [True, False]
    assert len(packer) == 0
    with pytest.raises(ValueError, match="seq_len=0"):
        Packer(0)


def test_token_dataset_random_access_matches_written_rows(dataset_path):
    path, seqs, starts = dataset_path
    ds = TokenDataset(path, max_open_shards=1)
    assert (ds.num_sequences, ds.seq_len, ds.vocab_size) == (60, SEQ_LEN, 5000)
    for i in (0, 24, 25, 59, 3, 40):
        tokens, doc_ids = ds.sequence(i)
        assert tokens.dtype == np.uint32 and tokens.shape == (8,)
        assert doc_ids.dtype == np.int32 and doc_ids.shape == (8,)
        assert np.array_equal(tokens, seqs[i])
        assert np.array_equal(doc_ids, doc_ids_from_starts(starts[i]))
    with pytest.raises(IndexError):
        ds.sequence(60)


def test_reading_shards_in_a_fresh_process_does_not_import_pandas(dataset_path):
    """pyarrow's ``to_numpy`` imports pandas on first use (0.25 s of CPU); a worker taking a
    lost member's place used to pay that inside the rebuild, loading its validation batches."""
    import subprocess
    import sys

    pytest.importorskip("pandas")  # the check means something only where pandas is there
    path, seqs, _ = dataset_path
    code = ("import sys, numpy as np; from elastic_moe.data.shards import TokenDataset; "
            f"ds = TokenDataset({path!r}); "
            "rows = np.stack([ds.sequence(i)[0] for i in range(ds.num_sequences)]); "
            "print(int(rows.sum()), rows.shape[0], 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, cwd=os.path.dirname(os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__)))))
    total, count, pandas = out.stdout.split()
    assert (int(total), int(count)) == (int(seqs[:60].sum()), 60)
    assert pandas == "False", "reading a shard imported pandas"


def test_shard_views_equal_pyarrow_to_numpy_on_sliced_arrays():
    import pyarrow as pa

    from elastic_moe.data.shards import _numpy_view

    flat = pa.array(np.arange(40, dtype=np.uint32)).slice(7, 20)
    lists = pa.array([[0, 3], [0], [0, 1, 5], [0, 2]], type=pa.list_(pa.int32())).slice(1, 2)
    for array in (flat, lists.offsets, lists.values, pa.array([], type=pa.int64())):
        want = array.to_numpy(zero_copy_only=True)
        got = _numpy_view(array)
        assert got.dtype == want.dtype and np.array_equal(got, want), (array, got, want)
    with pytest.raises(ValueError, match="nulls"):
        _numpy_view(pa.array([1, None, 3], type=pa.int32()))
    with pytest.raises(ValueError, match="integers expected"):
        _numpy_view(pa.array([True, False]))


def test_manifest_count_mismatch_is_an_error(dataset_path, tmp_path):
    path, _, _ = dataset_path
    with open(path) as fh:
        manifest = json.load(fh)
    manifest["num_sequences"] = 61
    manifest["shards"] = [dict(s, path=str(tmp_path.parent / s["path"])) for s in
                          manifest["shards"]]
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="num_sequences"):
        TokenDataset(str(bad))


def test_make_batch_shapes_and_shift(dataset_path):
    path, seqs, _ = dataset_path
    ds = TokenDataset(path)
    batch = make_batch(ds, [(0, 3), (0, 50)])
    assert tuple(batch["input_ids"].shape) == (2, SEQ_LEN)
    assert str(batch["input_ids"].dtype) == "torch.int64"
    assert str(batch["labels"].dtype) == "torch.int64"
    assert str(batch["doc_ids"].dtype) == "torch.int32"
    assert batch["input_ids"][1].tolist() == seqs[50][:-1].tolist()
    assert batch["labels"][1].tolist() == seqs[50][1:].tolist()
    assert batch["sample_ids"] == [(0, 3), (0, 50)]


def test_batch_split_rules():
    pos = DataPosition(seed=5)
    whole = batch_sample_ids(pos, 100, 12, 0, 1)
    parts = [batch_sample_ids(pos, 100, 12, r, 4) for r in range(4)]
    assert sum(parts, []) == whole  # contiguous equal parts of the same global batch
    assert [i for _, i in whole] == epoch_permutation(5, 0, 100)[:12].tolist()
    uneven = [batch_sample_ids(pos, 100, 12, r, 5) for r in range(5)]
    assert sum(uneven, []) == whole  # 12 over 5 ranks: 3, 3, 2, 2, 2, still contiguous
    assert [len(p) for p in uneven] == [3, 3, 2, 2, 2]
    with pytest.raises(ValueError, match="more consumers than the global batch"):
        batch_sample_ids(pos, 100, 12, 0, 13)
    with pytest.raises(ValueError, match="dp_rank=4"):
        batch_sample_ids(pos, 100, 12, 4, 4)
    with pytest.raises(ValueError, match="global_batch_size=200"):
        batch_sample_ids(pos, 100, 200, 0, 1)


def test_epoch_tail_rolls_into_next_epoch_without_loss():
    n, g = 10, 4
    pos, seen = DataPosition(seed=1), []
    for _ in range(5):  # 20 samples = exactly two epochs
        seen += batch_sample_ids(pos, n, g, 0, 1)
        pos = advance(pos, g, n)
    assert pos == DataPosition(epoch=2, index=0, seed=1)
    assert sorted(i for e, i in seen if e == 0) == list(range(n))
    assert sorted(i for e, i in seen if e == 1) == list(range(n))
    assert seen[8:12] == [(0, int(x)) for x in epoch_permutation(1, 0, n)[8:]] + \
        [(1, int(x)) for x in epoch_permutation(1, 1, n)[:2]]
    assert advance(DataPosition(), g, n, num_batches=5) == DataPosition(epoch=2, index=0)


def _consume(worker, dp_size, steps, log):
    for _ in range(steps):
        for rank in range(dp_size):
            log.extend(worker.next_batch(rank, dp_size)["sample_ids"])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_and_resize_covers_the_epoch_exactly_once(dataset_path, prefetch):
    """dp=4 -> 3 -> 1 -> 6 with saved/restored state: epoch 0 seen once, no gaps or repeats."""
    path, _, _ = dataset_path
    g, n = 12, 60
    worker = DataWorkerCore(path, global_batch_size=g, dp_size=4, seed=7, prefetch=prefetch)
    seen: list = []
    _consume(worker, 4, 2, seen)
    # an unfinished step: ranks 0 and 1 got their part of step 3, then the group failed
    worker.next_batch(0, 4)
    worker.next_batch(1, 4)
    state = json.loads(json.dumps(worker.state()))  # what a checkpoint would hold
    assert state["position"] == {"epoch": 0, "index": 24, "seed": 7}

    fresh = DataWorkerCore(path, global_batch_size=g, dp_size=1, prefetch=prefetch)
    fresh.restore(state, new_dp_size=3)
    _consume(fresh, 3, 1, seen)
    with pytest.raises(ValueError, match="dp_size=4"):
        fresh.next_batch(0, 4)
    fresh.restore(fresh.state(), new_dp_size=1)
    _consume(fresh, 1, 1, seen)
    fresh.restore(fresh.state(), new_dp_size=6)
    _consume(fresh, 6, 1, seen)  # 5 steps x 12 = the whole epoch of 60
    assert fresh.state()["position"] == {"epoch": 1, "index": 0, "seed": 7}
    ids = [i for e, i in seen]
    assert all(e == 0 for e, _ in seen)
    assert len(ids) == n and sorted(ids) == list(range(n))
    with pytest.raises(ValueError, match="dp_size=13"):
        fresh.restore(fresh.state(), new_dp_size=13)


def test_batch_at_serves_any_split_by_position_exactly_once(dataset_path):
    """The training path: shares asked by position across resizes 4 -> 5 -> 2 (uneven splits)
    and a restart that re-asks a step, against batches read straight from the dataset."""
    path, _, _ = dataset_path
    g, n = 12, 60
    worker = DataWorkerCore(path, global_batch_size=g, prefetch=2)
    reference = TokenDataset(path)
    pos, committed = DataPosition(seed=3), []
    for step, world in enumerate([4, 4, 5, 5, 2, 2]):
        got = [worker.batch_at(pos.to_dict(), g, r, world) for r in range(world)]
        for r, batch in enumerate(map(as_tensors, got)):
            want = make_batch(reference, batch_sample_ids(pos, n, g, r, world))
            assert batch["sample_ids"] == want["sample_ids"]
            for key in ("input_ids", "labels", "doc_ids"):
                assert batch[key].equal(want[key])
        if step == 2:  # the group fails before finishing step 2: it is asked again
            continue
        committed += [i for b in got for i in b["sample_ids"]]
        pos = advance(pos, g, n)
    # 5 committed steps x 12 = the epoch once; the first of epoch 1 after that
    assert len(committed) == n and sorted(i for e, i in committed if e == 0) == list(range(n))
    # this rank's next two global batches are already being built
    offset = pos.offset(n) - g
    assert {(3, offset + g, g, 1, 2), (3, offset + 2 * g, g, 1, 2)} <= set(worker._cache)
    with pytest.raises(ValueError, match="dp_rank=2"):
        worker.batch_at(pos.to_dict(), g, 2, 2)
    with pytest.raises(ValueError, match="global_batch_size=61"):
        worker.batch_at(pos.to_dict(), 61, 0, 1)


def test_split_batch_into_micro_batches(dataset_path):
    path, _, _ = dataset_path
    batch = make_batch(TokenDataset(path), [(0, i) for i in range(5)])
    parts = split_batch(batch, 2)
    assert [len(p["sample_ids"]) for p in parts] == [2, 2, 1]
    assert [i for p in parts for i in p["sample_ids"]] == batch["sample_ids"]
    for key in ("input_ids", "labels", "doc_ids"):
        assert np.array_equal(np.concatenate([p[key].numpy() for p in parts]), batch[key].numpy())
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        split_batch(batch, 0)


def test_make_batch_skips_bad_sequences_only_when_asked():
    import numpy as np
    import pytest

    from elastic_moe.data.sampler import make_batch
    from elastic_moe.data.shards import BadSampleError

    class Planted:  # sequence 2 holds a bad token
        seq_len = 4

        def sequence(self, i):
            if i == 2:
                raise BadSampleError(f"row {i}: token id 9999")
            return np.arange(i, i + 5, dtype=np.uint32), np.zeros(5, dtype=np.int32)

    ids = [(0, 1), (0, 2), (0, 3)]
    with pytest.raises(BadSampleError, match="row 2"):
        make_batch(Planted(), ids)
    batch = make_batch(Planted(), ids, skip_bad=True)
    assert batch["sample_ids"] == [(0, 1), (0, 3)]
    assert batch["bad_samples"] == [((0, 2), "row 2: token id 9999")]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [3, 4, 5, 6]]
    assert batch["labels"].tolist() == [[2, 3, 4, 5], [4, 5, 6, 7]]
    with pytest.raises(BadSampleError):  # nothing left to train on
        make_batch(Planted(), [(0, 2)], skip_bad=True)
