"""World-size-independent data position and the split of a global batch over data-parallel ranks.

Implements the "Streaming" step of docs/architecture.md: the data position is one number per run (plus the
epoch and seed), never a per-rank cursor, so a resize only changes how the *next* global batch is
split, and no sample is lost or seen twice.

The sample stream is the concatenation of seeded epoch permutations of the packed sequences:
stream offset ``t`` is sample ``(epoch = t // N, index = perm_epoch[t % N])``. A global batch is
the next ``global_batch_size`` offsets; rank ``r`` of ``dp_size`` gets the ``r``-th contiguous
share of them (sizes differ by at most one when ``dp_size`` does not divide the batch).

**Epoch tail**: when ``N`` is not a multiple of the global batch, the last global batch of an
epoch takes the epoch's remaining samples and continues with the first samples of the next
epoch's permutation. Nothing is dropped or padded; every ``(epoch, index)`` is served exactly
once, and the sample ids carry their epoch so a consumer can tell.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class DataPosition:
    """Where the run is in the sample stream; the same for every world size.

    ``index`` = samples of ``epoch`` already consumed (0 <= index < num_sequences). ``seed``
    fixes every epoch's permutation. Checkpoints store :meth:`to_dict`.
    """

    epoch: int = 0
    index: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0:
            raise ValueError(f"epoch={self.epoch!r}: must be >= 0")
        if self.index < 0:
            raise ValueError(f"index={self.index!r}: must be >= 0")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> DataPosition:
        return cls(epoch=int(state["epoch"]), index=int(state["index"]),
                   seed=int(state.get("seed", 0)))

    def offset(self, num_sequences: int) -> int:
        """Stream offset ``epoch * N + index``: samples consumed since the run began."""
        return self.epoch * num_sequences + self.index


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_sequences: int) -> np.ndarray:
    """The seeded permutation of ``range(num_sequences)`` for one epoch (int64, read-only)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_sequences)
    perm.flags.writeable = False
    return perm


def check_global_batch(num_sequences: int, global_batch_size: int) -> None:
    if num_sequences <= 0:
        raise ValueError(f"num_sequences={num_sequences!r}: must be positive")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size!r}: must be positive")
    if global_batch_size > num_sequences:
        raise ValueError(f"global_batch_size={global_batch_size!r}: must be <= num_sequences "
                         f"({num_sequences}) so one batch never holds a sample twice")


def stream_samples(position: DataPosition, start: int, count: int,
                   num_sequences: int) -> list[tuple[int, int]]:
    """``count`` (epoch, sequence index) pairs from stream offset ``position + start``."""
    out: list[tuple[int, int]] = []
    t = position.offset(num_sequences) + start
    end = t + count
    while t < end:
        epoch, i = divmod(t, num_sequences)
        take = min(end - t, num_sequences - i)
        perm = epoch_permutation(position.seed, epoch, num_sequences)
        out.extend((epoch, int(s)) for s in perm[i: i + take])
        t += take
    return out


def rank_share(global_batch_size: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """(start, count) of a rank's contiguous share of a global batch; shares differ by <= 1.

    The first ``global_batch_size % dp_size`` ranks take one sample more, so any data-parallel
    size up to the batch size works (the trainer weights each rank's loss by count / batch).
    """
    if dp_size <= 0:
        raise ValueError(f"dp_size={dp_size!r}: must be positive")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank!r}: must be in [0, dp_size={dp_size})")
    if dp_size > global_batch_size:
        raise ValueError(f"dp_size={dp_size!r}: more consumers than the global batch "
                         f"({global_batch_size} samples); some would get nothing")
    base, extra = divmod(global_batch_size, dp_size)
    return dp_rank * base + min(dp_rank, extra), base + (1 if dp_rank < extra else 0)


def batch_sample_ids(position: DataPosition, num_sequences: int, global_batch_size: int,
                     dp_rank: int, dp_size: int) -> list[tuple[int, int]]:
    """This rank's ``(epoch, sequence index)`` pairs for the global batch starting at ``position``.

    The global batch is the next ``global_batch_size`` samples of the stream, split into
    ``dp_size`` contiguous shares (:func:`rank_share`).
    """
    check_global_batch(num_sequences, global_batch_size)
    start, count = rank_share(global_batch_size, dp_rank, dp_size)
    return stream_samples(position, start, count, num_sequences)


def advance(position: DataPosition, global_batch_size: int, num_sequences: int,
            num_batches: int = 1) -> DataPosition:
    """The position after ``num_batches`` global batches; rolls into the next epoch(s)."""
    check_global_batch(num_sequences, global_batch_size)
    epoch, index = divmod(position.offset(num_sequences) + num_batches * global_batch_size,
                          num_sequences)
    return DataPosition(epoch=epoch, index=index, seed=position.seed)


def gather_batch(dataset: Any, sample_ids: list[tuple[int, int]],
                 skip_bad: bool = False) -> dict[str, Any]:
    """Gather a batch from a :class:`~elastic_moe.data.shards.TokenDataset` as numpy arrays:
    what a data reader sends (it never loads torch); :func:`as_tensors` makes the tensors.

    Returns ``input_ids (B, S) int64`` (tokens 0..S-1), ``labels (B, S) int64`` (tokens 1..S,
    the next-token targets), ``doc_ids (B, S) int32`` (document index of each input position
    within its sequence: attend only where the ids are equal; a label crosses into the next
    document only at an EOS input, so it stays a valid target), and ``sample_ids`` (the
    ``(epoch, index)`` list, for bookkeeping and tests).

    ``skip_bad``: a sequence the dataset refuses (``BadSampleError``) is left out of the batch
    and listed in ``bad_samples`` as ``[(epoch, index), message]`` (without it, the error is
    raised). A batch left with no sequence at all raises the first error.
    """
    from elastic_moe.data.shards import BadSampleError

    width = dataset.seq_len + 1
    tokens = np.empty((len(sample_ids), width), dtype=np.int64)
    docs = np.empty((len(sample_ids), width), dtype=np.int32)
    kept: list[tuple[int, int]] = []
    bad: list[tuple[tuple[int, int], str]] = []
    for sample in sample_ids:
        try:
            tokens[len(kept)], docs[len(kept)] = dataset.sequence(sample[1])
        except BadSampleError as exc:
            if not skip_bad or len(bad) + 1 == len(sample_ids):
                raise
            bad.append((tuple(sample), str(exc)))  # type: ignore[arg-type]
            continue
        kept.append(sample)
    rows = len(kept)
    return {
        "input_ids": np.ascontiguousarray(tokens[:rows, :-1]),
        "labels": np.ascontiguousarray(tokens[:rows, 1:]),
        "doc_ids": np.ascontiguousarray(docs[:rows, :-1]),
        "sample_ids": kept,
        "bad_samples": bad,
    }


BATCH_ARRAYS = ("input_ids", "labels", "doc_ids")


def as_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """A :func:`gather_batch` dict with its arrays as torch tensors (copies: an array Ray hands
    over may be a read-only view of its object store)."""
    import torch

    return {key: torch.from_numpy(np.array(value)) if key in BATCH_ARRAYS else value
            for key, value in batch.items()}


def make_batch(dataset: Any, sample_ids: list[tuple[int, int]],
               skip_bad: bool = False) -> dict[str, Any]:
    """:func:`gather_batch` with torch tensors."""
    return as_tensors(gather_batch(dataset, sample_ids, skip_bad=skip_bad))


def split_batch(batch: dict[str, Any], micro_batch_size: int) -> list[dict[str, Any]]:
    """A :func:`make_batch` dict cut into consecutive micro-batches of ``micro_batch_size`` rows
    (the last may be smaller)."""
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size={micro_batch_size!r}: must be positive")
    rows = len(batch["sample_ids"])
    return [{key: value[i:i + micro_batch_size] for key, value in batch.items()
             if key != "bad_samples"}  # the batch's, not a micro-batch's
            for i in range(0, rows, micro_batch_size)]
