"""Data-worker actors: stream packed batches to training ranks from a world-size-free position.

Implements step 2 ("Streaming") of DESIGN.md. A data worker opens a prepared manifest
(:class:`~elastic_moe.data.shards.TokenDataset`, memory-mapped) and serves, for each
data-parallel rank, its contiguous part of each global batch (:mod:`elastic_moe.data.sampler`).
Batches are built ahead by a small thread pool (``prefetch`` per rank) so a training step never
waits on shard reads.

Position bookkeeping: the worker counts global batches handed out per rank since its restore
point; ``state()`` is the position of the first global batch that has *not* been handed to every
rank. A step needs all ranks (the gradient all-reduce), so a batch handed to only some ranks
belongs to an unfinished step and is served again after a restore: no sample is lost. Restoring
with another ``dp_size`` re-splits the remaining stream over the new ranks. The training loop
should checkpoint the position of the steps it actually completed (``sampler.advance``) and
restore from that; ``state()`` is the right value when the worker is the one being saved.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from elastic_moe.data.sampler import DataPosition, advance, batch_sample_ids, make_batch
from elastic_moe.data.shards import TokenDataset

logger = logging.getLogger(__name__)


class DataWorkerCore:
    """The data worker's logic as a plain class (``DataWorker`` is its Ray actor)."""

    def __init__(self, manifest_path: str, global_batch_size: int, dp_size: int,
                 position: dict[str, Any] | None = None, seed: int = 0, prefetch: int = 4,
                 ranks: list[int] | None = None) -> None:
        """``ranks``: the dp ranks this worker serves (default all); with several workers the
        run's position is the minimum of their ``state()`` positions."""
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch!r}: must be >= 0")
        self.dataset = TokenDataset(manifest_path)
        self.global_batch_size = global_batch_size
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="data-prefetch")
        self._lock = threading.Lock()
        pos = DataPosition.from_dict(position) if position else DataPosition(seed=seed)
        self._reset(pos, dp_size, ranks)

    def _reset(self, origin: DataPosition, dp_size: int, ranks: list[int] | None) -> None:
        # validates dp_size against the global batch (ValueError names the rule)
        batch_sample_ids(origin, self.dataset.num_sequences, self.global_batch_size, 0, dp_size)
        self.origin = origin
        self.dp_size = dp_size
        self.ranks = sorted(ranks) if ranks is not None else list(range(dp_size))
        bad = [r for r in self.ranks if not 0 <= r < dp_size]
        if bad or not self.ranks:
            raise ValueError(f"ranks={ranks!r}: must be a non-empty subset of [0, {dp_size})")
        self._served = {r: 0 for r in self.ranks}  # global batches handed out since `origin`
        self._cache: dict[tuple[int, int], Future] = {}

    # -- batches ------------------------------------------------------------------------------

    def _build(self, rank: int, step: int) -> dict[str, Any]:
        start = advance(self.origin, self.global_batch_size, self.dataset.num_sequences, step) \
            if step else self.origin
        ids = batch_sample_ids(start, self.dataset.num_sequences, self.global_batch_size, rank,
                               self.dp_size)
        return make_batch(self.dataset, ids)

    def _future(self, rank: int, step: int) -> Future:
        key = (rank, step)
        fut = self._cache.get(key)
        if fut is None:
            fut = self._pool.submit(self._build, rank, step)
            self._cache[key] = fut
        return fut

    def next_batch(self, dp_rank: int, dp_size: int) -> dict[str, Any]:
        """This rank's part of its next global batch (see ``sampler.make_batch`` for keys)."""
        with self._lock:
            if dp_size != self.dp_size:
                raise ValueError(f"dp_size={dp_size!r}: this worker serves dp_size="
                                 f"{self.dp_size}; call restore(state, new_dp_size) first")
            if dp_rank not in self._served:
                raise ValueError(f"dp_rank={dp_rank!r}: not served here (ranks {self.ranks})")
            step = self._served[dp_rank]
            self._served[dp_rank] = step + 1
            fut = self._future(dp_rank, step)
            del self._cache[(dp_rank, step)]
            for ahead in range(step + 1, step + 1 + self.prefetch):
                self._future(dp_rank, ahead)
        return fut.result()

    # -- position -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """``{"position": DataPosition dict, ...}``: the first global batch not yet handed to
        every rank. Independent of the world size."""
        with self._lock:
            done = min(self._served.values())
            pos = advance(self.origin, self.global_batch_size, self.dataset.num_sequences, done) \
                if done else self.origin
        return {"position": pos.to_dict(), "global_batch_size": self.global_batch_size,
                "num_sequences": self.dataset.num_sequences, "dp_size": self.dp_size}

    def restore(self, state: dict[str, Any], new_dp_size: int,
                ranks: list[int] | None = None) -> None:
        """Continue from ``state`` (a ``state()`` dict or a bare position dict) with
        ``new_dp_size`` consumers; prefetched batches of the old split are discarded."""
        pos = DataPosition.from_dict(state.get("position", state))
        if state.get("num_sequences", self.dataset.num_sequences) != self.dataset.num_sequences:
            raise ValueError(f"state num_sequences={state['num_sequences']!r}: does not match "
                             f"the dataset ({self.dataset.num_sequences})")
        with self._lock:
            for fut in self._cache.values():
                fut.cancel()
            self._reset(pos, new_dp_size, ranks)
        logger.info("data worker restored at epoch %d index %d for dp_size %d", pos.epoch,
                    pos.index, new_dp_size)

    def info(self) -> dict[str, int]:
        return {"num_sequences": self.dataset.num_sequences, "seq_len": self.dataset.seq_len,
                "vocab_size": self.dataset.vocab_size}


# num_cpus=0: the worker mostly waits on page cache and must not take a training slot on small
# clusters; max_concurrency lets every rank's call (and prefetch) proceed at once.
DataWorker = ray.remote(num_cpus=0, max_concurrency=16)(DataWorkerCore)
