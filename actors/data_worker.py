"""Data-worker actors: stream packed batches to training ranks from a world-size-free position.

Implements step 2 ("Streaming") of docs/architecture.md. A data worker opens a prepared manifest
(:class:`~elastic_moe.data.shards.TokenDataset`, memory-mapped) and serves, for each
data-parallel rank, its contiguous share of each global batch (:mod:`elastic_moe.data.sampler`).
Batches are built ahead by a small thread pool (``prefetch`` per rank) so a training step never
waits on shard reads.

Two ways to ask for batches, sharing one prefetch cache:

- **By position** (:meth:`DataWorkerCore.batch_at`), what the training loop uses: the trainer
  names the global batch by the data position it checkpoints, so the worker keeps no state a
  restart could desynchronise. A restarted worker group, a restarted data worker (Ray restarts it
  on another node) or a resize all just ask for the position they restored; any number of ranks
  and any split work.
- **By cursor** (:meth:`DataWorkerCore.next_batch`, ``state()``, ``restore()``): the worker counts
  global batches handed out per rank since its restore point; ``state()`` is the position of the
  first global batch that has *not* been handed to every rank. A step needs all ranks (the
  gradient all-reduce), so a batch handed to only some ranks belongs to an unfinished step and is
  served again after a restore: no sample is lost. Restoring with another ``dp_size`` re-splits
  the remaining stream over the new ranks.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from elastic_moe.data.sampler import (
    DataPosition,
    advance,
    batch_sample_ids,
    check_global_batch,
    gather_batch,
    rank_share,
)
from elastic_moe.data.shards import TokenDataset

logger = logging.getLogger(__name__)

# (seed, stream offset, global batch, dp_rank, dp_size): one rank's share of one global batch
_Key = tuple[int, int, int, int, int]
_MAX_CACHED = 512  # bound on prefetched batches held (stale ones after a restart age out)


class DataWorkerCore:
    """The data worker's logic as a plain class (``DataWorker`` is its Ray actor)."""

    def __init__(self, manifest_path: str, global_batch_size: int, dp_size: int = 1,
                 position: dict[str, Any] | None = None, seed: int = 0, prefetch: int = 4,
                 ranks: list[int] | None = None, skip_bad: bool = False) -> None:
        """``global_batch_size``/``dp_size``/``position``/``ranks`` set up the cursor API only
        (``ranks``: the dp ranks this worker serves, default all; with several workers the run's
        position is the minimum of their ``state()`` positions). ``batch_at`` ignores them."""
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch!r}: must be >= 0")
        self.dataset = TokenDataset(manifest_path)
        self.skip_bad = skip_bad  # data.bad_samples="skip": leave bad sequences out, listed
        self.global_batch_size = global_batch_size
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="data-prefetch")
        self._lock = threading.Lock()
        self._cache: dict[_Key, Future] = {}
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

    # -- batches ------------------------------------------------------------------------------

    def _build(self, key: _Key) -> dict[str, Any]:
        seed, offset, global_batch, rank, dp_size = key
        epoch, index = divmod(offset, self.dataset.num_sequences)
        ids = batch_sample_ids(DataPosition(epoch=epoch, index=index, seed=seed),
                               self.dataset.num_sequences, global_batch, rank, dp_size)
        return gather_batch(self.dataset, ids, skip_bad=self.skip_bad)

    def _future(self, key: _Key) -> Future:
        fut = self._cache.get(key)
        if fut is None:
            fut = self._pool.submit(self._build, key)
            self._cache[key] = fut
        return fut

    def _serve(self, position: DataPosition, global_batch: int, rank: int,
               dp_size: int) -> Future:
        """The future for one share; queues the same rank's next ``prefetch`` shares. Locked."""
        offset = position.offset(self.dataset.num_sequences)
        key = (position.seed, offset, global_batch, rank, dp_size)
        # What this rank asked for before (older positions, another split) is not needed again
        # unless a restart rewinds it, and then it is simply rebuilt.
        for old in [k for k in self._cache if k[3] == rank and k != key
                    and (k[4] != dp_size or k[2] != global_batch or k[1] <= offset)]:
            self._cache.pop(old).cancel()
        fut = self._cache.pop(key, None)
        if fut is None:
            fut = self._pool.submit(self._build, key)
        for ahead in range(1, self.prefetch + 1):
            self._future((position.seed, offset + ahead * global_batch, global_batch, rank,
                          dp_size))
        while len(self._cache) > _MAX_CACHED:
            self._cache.pop(next(iter(self._cache))).cancel()
        return fut

    def batch_at(self, position: dict[str, Any], global_batch_size: int, dp_rank: int,
                 dp_size: int) -> dict[str, Any]:
        """Rank ``dp_rank`` of ``dp_size``'s share of the global batch starting at ``position``
        (a ``DataPosition`` dict), as ``sampler.gather_batch`` returns it (numpy arrays). Shares may be uneven
        (``sampler.rank_share``). Prefetches this rank's next global batches."""
        pos = DataPosition.from_dict(position)
        # a bad batch/rank/size raises here, not inside (and cached in) the prefetch futures
        check_global_batch(self.dataset.num_sequences, global_batch_size)
        rank_share(global_batch_size, dp_rank, dp_size)
        with self._lock:
            fut = self._serve(pos, global_batch_size, dp_rank, dp_size)
        return fut.result()

    def next_batch(self, dp_rank: int, dp_size: int) -> dict[str, Any]:
        """This rank's part of its next global batch (see ``sampler.gather_batch``)."""
        with self._lock:
            if dp_size != self.dp_size:
                raise ValueError(f"dp_size={dp_size!r}: this worker serves dp_size="
                                 f"{self.dp_size}; call restore(state, new_dp_size) first")
            if dp_rank not in self._served:
                raise ValueError(f"dp_rank={dp_rank!r}: not served here (ranks {self.ranks})")
            step = self._served[dp_rank]
            self._served[dp_rank] = step + 1
            pos = self._position_after(step)
            fut = self._serve(pos, self.global_batch_size, dp_rank, dp_size)
        return fut.result()

    def _position_after(self, batches: int) -> DataPosition:
        if not batches:
            return self.origin
        return advance(self.origin, self.global_batch_size, self.dataset.num_sequences, batches)

    # -- position -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """``{"position": DataPosition dict, ...}``: the first global batch not yet handed to
        every rank. Independent of the world size."""
        with self._lock:
            pos = self._position_after(min(self._served.values()))
        return {"position": pos.to_dict(), "global_batch_size": self.global_batch_size,
                "num_sequences": self.dataset.num_sequences, "dp_size": self.dp_size}

    def restore(self, state: dict[str, Any], new_dp_size: int,
                ranks: list[int] | None = None) -> None:
        """Continue from ``state`` (a ``state()`` dict or a bare position dict) with
        ``new_dp_size`` consumers; prefetched batches of the old split are dropped as the new
        ranks ask."""
        pos = DataPosition.from_dict(state.get("position", state))
        if state.get("num_sequences", self.dataset.num_sequences) != self.dataset.num_sequences:
            raise ValueError(f"state num_sequences={state['num_sequences']!r}: does not match "
                             f"the dataset ({self.dataset.num_sequences})")
        with self._lock:
            self._reset(pos, new_dp_size, ranks)
        logger.info("data worker restored at epoch %d index %d for dp_size %d", pos.epoch,
                    pos.index, new_dp_size)

    def info(self) -> dict[str, int]:
        return {"num_sequences": self.dataset.num_sequences, "seq_len": self.dataset.seq_len,
                "vocab_size": self.dataset.vocab_size}


# num_cpus=0: the worker mostly waits on page cache and must not take a training slot on small
# clusters; max_concurrency lets every rank's call (and prefetch) proceed at once.
DataWorker = ray.remote(num_cpus=0, max_concurrency=16)(DataWorkerCore)  # type: ignore[call-overload]


def start_data_workers(run_name: str, manifest_path: str, count: int, prefetch: int,
                       global_batch_size: int, namespace: str | None = None,
                       skip_bad: bool = False) -> list[ray.actor.ActorHandle]:
    """The run's ``count`` data workers (named ``<run>-data-<i>``; reused if they exist).

    Training asks them by position (``batch_at``), so they hold nothing that must survive: Ray
    restarts a lost one (its node failed) and retries the calls that were in flight. Detached:
    they outlive the coordinator's process (which starts them) like the training workers; the
    coordinator stops them when the run ends.
    """
    return [DataWorker.options(  # type: ignore[attr-defined]
        name=f"{run_name}-data-{i}", namespace=namespace, get_if_exists=True,
        lifetime="detached", max_restarts=-1, max_task_retries=-1, scheduling_strategy="SPREAD",
    ).remote(manifest_path, global_batch_size=global_batch_size, prefetch=prefetch,
             skip_bad=skip_bad)
        for i in range(count)]
