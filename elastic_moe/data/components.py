"""Near-dup clusters past one machine: connected components of the LSH graph, hash-partitioned.

Step 4 of the data flow in docs/architecture.md. The single-task path (``dedup.cluster_roots``, a union-find
over every band's candidate pairs) holds all pairs of the corpus in one process, which fits up to
about 10^7 documents. This module computes the same clusters in rounds of tasks whose inputs are
one partition each, so memory per task follows the partition size, not the corpus:

1. **buckets** (one task per key partition): the ``(bucket id, doc)`` rows whose bucket id (band
   and band key, mixed) hashes to the partition are sorted; each bucket of ``m`` documents gives
   ``m - 1`` star edges to its smallest document (as ``dedup.bucket_edges``). Edges leave as
   both directions, split by the source document's partition (``doc % P``).
2. **large-star / small-star rounds** (Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii,
   "Connected Components in MapReduce and Beyond", SoCC 2014): with ``m(u)`` the smallest of
   ``u`` and its neighbours, *large-star* links every neighbour ``v > u`` of ``u`` to ``m(u)``;
   *small-star* links ``u`` and its neighbours ``v < u`` to the smallest of them. Both keep
   connectivity, and the graph converges to one star per component centred on its smallest
   document, in O(log^2 n) rounds (a handful for LSH graphs, whose clusters are small).
3. **roots**: once every node is settled (it is the smallest of its neighbourhood, or it has a
   single neighbour), each non-centre ``u`` is removed as a duplicate of ``m(u)``.

The result is the single-task result: in both, each cluster keeps its smallest global document
index and every other member maps to it. Every task of a round reads the ``j``-th output of every
task of the round before (a shuffle through Ray's object store, see ``tasks.py``); the driver
keeps only references and, at the end, the removed pairs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from elastic_moe.data.dedup import splitmix64
from elastic_moe.data.tasks import TaskRunner

logger = logging.getLogger(__name__)

_EMPTY = np.zeros((0, 2), dtype=np.int64)


@dataclass(slots=True)
class ComponentsReport:
    """What the scaled-out clustering did (for the manifest and the benchmark)."""

    num_partitions: int
    rounds: int = 0  # large-star rounds, the last one finding every node settled
    seconds: float = 0.0


def _unique_rows(edges: np.ndarray) -> np.ndarray:
    """Distinct ``(k, 2)`` int64 rows, sorted by (src, dst); one 1-D sort of packed pairs."""
    if edges.shape[0] == 0:
        return _EMPTY
    order = np.lexsort((edges[:, 1], edges[:, 0]))
    e = edges[order]
    keep = np.ones(e.shape[0], dtype=bool)
    keep[1:] = (e[1:, 0] != e[:-1, 0]) | (e[1:, 1] != e[:-1, 1])
    return e[keep]


def split_by_source(edges: np.ndarray, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Split directed edges into ``num_partitions`` arrays by ``src % num_partitions``."""
    part = edges[:, 0] % num_partitions
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(num_partitions + 1))
    sorted_edges = edges[order]
    return tuple(np.ascontiguousarray(sorted_edges[bounds[j]: bounds[j + 1]])
                 for j in range(num_partitions))


def _both_ways(edges: np.ndarray) -> np.ndarray:
    return np.concatenate((edges, edges[:, ::-1]))


def bucket_ids(keys: np.ndarray, band: int) -> np.ndarray:
    """One uint64 id per (band, key): band keys of different bands never share a bucket.

    ``splitmix64`` is a bijection, so ids collide only when two 64-bit (key, band) mixes do,
    with probability ~rows^2 / 2^64 (the band keys themselves already accept that).
    """
    salt = np.uint64((0x9E3779B97F4A7C15 * (band + 1)) & 0xFFFFFFFFFFFFFFFF)
    return splitmix64(keys ^ salt)


def partition_band(keys: np.ndarray, doc_index: np.ndarray, band: int, num_partitions: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """One band's ``(bucket ids, docs)`` rows, split into ``num_partitions`` by bucket id.

    ``keys`` is the band's key of each document ``doc_index[i]``. Each bucket lands whole in one
    partition.
    """
    ids = bucket_ids(np.ascontiguousarray(keys), band)
    part = (ids % np.uint64(num_partitions)).astype(np.int64)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(num_partitions + 1))
    return [(ids[order[bounds[j]: bounds[j + 1]]],
             doc_index[order[bounds[j]: bounds[j + 1]]].astype(np.int64))
            for j in range(num_partitions)]


def bucket_task(num_partitions: int, *pieces: tuple[np.ndarray, np.ndarray]
                ) -> tuple[np.ndarray, ...]:
    """Star edges of every bucket in one partition, split by source partition.

    One piece per band: a bucket never spans bands, so each piece is sorted on its own (the
    sort's scratch memory is one band's, not the partition's).
    """
    edges = [_star_edges(ids, docs) for ids, docs in pieces]
    merged = _unique_rows(np.concatenate(edges)) if edges else _EMPTY
    return split_by_source(_both_ways(merged), num_partitions)


def _star_edges(ids: np.ndarray, docs: np.ndarray) -> np.ndarray:
    if ids.size == 0:
        return _EMPTY
    order = np.argsort(ids)
    i, d = ids[order], docs[order]
    del order
    starts = np.flatnonzero(np.concatenate(([True], i[1:] != i[:-1])))
    sizes = np.diff(np.append(starts, i.size))
    del i
    head = np.repeat(np.minimum.reduceat(d, starts), sizes)  # the smallest document
    member = d != head
    return np.stack((d[member], head[member]), axis=1).astype(np.int64)


def _neighbourhoods(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                          np.ndarray]:
    """Unique edges sorted by source, each edge's ``m(src)``, and per-group starts/sizes."""
    edges = _unique_rows(np.concatenate(parts) if parts else _EMPTY)
    src, dst = edges[:, 0], edges[:, 1]
    starts = np.flatnonzero(np.concatenate(([True], src[1:] != src[:-1]))) if src.size else \
        np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.append(starts, src.size))
    group_min = np.minimum(src[starts], np.minimum.reduceat(dst, starts)) if src.size else \
        np.zeros(0, dtype=np.int64)
    return edges, np.repeat(group_min, sizes), starts, sizes


def large_star_task(num_partitions: int, *parts: np.ndarray) -> tuple[np.ndarray | int, ...]:
    """Large-star on one source partition; the last output is the number of unsettled nodes."""
    edges, m, starts, sizes = _neighbourhoods(parts)
    src, dst = edges[:, 0], edges[:, 1]
    if src.size:
        # settled: u is the smallest of its neighbourhood, or u hangs off a single smaller node
        unsettled = int(np.count_nonzero((m[starts] < src[starts]) & (sizes > 1)))
    else:
        unsettled = 0
    up = dst > src
    out = np.stack((dst[up], m[up]), axis=1)
    return (*split_by_source(_both_ways(out), num_partitions), unsettled)


def small_star_task(num_partitions: int, *parts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Small-star on one source partition."""
    edges, m, starts, _ = _neighbourhoods(parts)
    src, dst = edges[:, 0], edges[:, 1]
    down = dst < src
    # every smaller neighbour, and u itself, links to the smallest of them (m(u) when u has one)
    to_min = np.stack((dst[down], m[down]), axis=1)
    to_min = to_min[to_min[:, 0] != to_min[:, 1]]
    has_down = np.zeros(src.size, dtype=bool)
    has_down[down] = True
    owners = np.flatnonzero(np.logical_or.reduceat(has_down, starts)) if src.size else starts
    centre = np.stack((src[starts[owners]], m[starts[owners]]), axis=1)
    return split_by_source(_both_ways(np.concatenate((to_min, centre))), num_partitions)


def roots_task(*parts: np.ndarray) -> np.ndarray:
    """On a converged (star) graph: ``(k, 2)`` rows ``(removed doc, kept doc)``."""
    edges, m, starts, _ = _neighbourhoods(parts)
    src = edges[:, 0]
    node, root = src[starts], m[starts]
    leaf = root < node
    return np.stack((node[leaf], root[leaf]), axis=1)


def _columns(outputs: list[list[object]], j: int) -> list[object]:
    return [task_out[j] for task_out in outputs]


def cluster_partitioned(keys: np.ndarray, doc_index: np.ndarray, num_partitions: int,
                        runner: TaskRunner, max_rounds: int = 64, progress: bool = False
                        ) -> tuple[dict[int, int], ComponentsReport]:
    """``{removed doc: kept doc}`` over LSH band keys, as ``dedup.cluster_roots`` would give.

    ``keys`` is ``(docs, bands)`` uint64 (``dedup.band_keys`` of the documents ``doc_index``).
    """
    from tqdm import tqdm

    if num_partitions < 2:
        raise ValueError(f"num_partitions={num_partitions!r}: must be >= 2 (one partition is "
                         f"the single-task path, dedup.cluster_roots)")
    t0 = time.perf_counter()
    p = num_partitions
    report = ComponentsReport(num_partitions=p)
    bar = tqdm(desc="clusters", unit="round", disable=not progress, leave=False)
    try:
        # the driver ships one band at a time: it never holds a second copy of all band keys
        pieces: list[list[object]] = [[] for _ in range(p)]
        for band in range(keys.shape[1]):
            for j, piece in enumerate(partition_band(keys[:, band], doc_index, band, p)):
                pieces[j].append(runner.put(piece))
        handles = [runner.submit(bucket_task, [p, *pieces[j]], num_returns=p) for j in range(p)]
        del pieces
        bar.set_postfix_str("buckets")
        for _ in range(max_rounds):
            large = [runner.submit(large_star_task, [p, *_columns(handles, j)],
                                   num_returns=p + 1) for j in range(p)]
            unsettled = sum(runner.get([out[-1] for out in large]))
            report.rounds += 1
            bar.update(1)
            bar.set_postfix(unsettled=unsettled)
            logger.info("near-dup clusters: round %d, %d nodes not yet in a star", report.rounds,
                        unsettled)
            if unsettled == 0:
                break
            handles = [runner.submit(small_star_task, [p, *_columns(large, j)],
                                     num_returns=p) for j in range(p)]
        else:
            raise RuntimeError(f"max_rounds={max_rounds}: connected components did not converge "
                               f"({unsettled} nodes unsettled)")
        # the round that found the graph settled read `handles`: those are the stars
        pairs = runner.get([runner.submit(roots_task, _columns(handles, j))[0]
                            for j in range(p)])
    finally:
        bar.close()
    merged = np.concatenate(pairs) if pairs else _EMPTY
    report.seconds = time.perf_counter() - t0
    return dict(zip(merged[:, 0].tolist(), merged[:, 1].tolist(), strict=True)), report
