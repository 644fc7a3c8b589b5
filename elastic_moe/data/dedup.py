"""Exact and near-duplicate detection: content hashes, MinHash LSH, union-find clusters.

Implements steps 3-4 of the data flow in docs/architecture.md:

* **Exact**: xxHash3-128 of the normalized text (``normalize.py``); the first document of each hash
  (in global input order) is kept. URL dedup keeps the first document of each URL.
* **Near**: MinHash (Broder 1997, "On the resemblance and containment of documents") over word
  n-gram shingles of the normalized text, LSH banding (Leskovec, Rajaraman & Ullman, "Mining of
  Massive Datasets" ch. 3.4: ``b`` bands x ``r`` rows, two documents become candidates when all
  ``r`` rows of some band agree, which happens with probability ``1 - (1 - s^r)^b`` for Jaccard
  ``s``; the S-curve's threshold is about ``(1/b)^(1/r)``, 0.72 for the default 14 x 8), then a
  union-find over candidate pairs gives duplicate clusters; the document with the smallest global
  index in each cluster is kept. This is the recipe of Lee et al. 2022 and of datatrove's
  ``MinhashDedup*`` stages, with the same defaults.

Everything per document is vectorized over a batch of documents (numpy):

* shingle hashes: one polynomial prefix hash over the batch's bytes (mod 2^64) gives the hash of
  any byte span in O(1), so every word n-gram's hash is two gathers and a multiply, no per-shingle
  Python; a splitmix64 finalizer mixes it to 32 bits.
* permutations: ``h_k(x) = (a_k * x + b_k) mod 2^64 >> 32`` with odd random ``a_k`` (the
  multiply-add-shift family of Dietzfelbinger 1996: 2-universal for 32-bit keys), then
  ``np.minimum.reduceat`` per document.

The stages (signatures per input file, buckets per band, clusters) are plain functions over numpy
arrays; ``pipeline.py`` runs them as Ray tasks.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import xxhash

logger = logging.getLogger(__name__)

_POLY_BASE = 0x100000001B3  # odd, so it has an inverse mod 2^64 (prefix-hash spans need it)
_POLY_BASE_INV = pow(_POLY_BASE, -1, 1 << 64)
_MAX_SIG = np.uint32(0xFFFFFFFF)


@dataclass(kw_only=True, slots=True)
class DedupConfig:
    """MinHash LSH parameters; defaults follow datatrove / Lee et al. (5-grams, 14 x 8)."""

    ngram_size: int = 5  # words per shingle
    num_bands: int = 14
    rows_per_band: int = 8  # num_bands * rows_per_band permutations (112)
    seed: int = 1  # permutation seed; same seed = same signatures on every machine
    exact: bool = True  # exact dedup by normalized-content hash
    near: bool = True  # MinHash LSH near-dup dedup
    url: bool = True  # keep one document per URL (documents without a URL are never merged)
    batch_bytes: int = 1 << 20  # documents signed per vectorized batch (bounds memory)
    # near-dup clustering: 1 = one union-find task over all candidate pairs (fastest while it
    # fits); >= 2 = hash-partitioned large-star/small-star rounds (components.py), memory per
    # task ~ corpus / partitions; 0 = 1 up to single_task_max_docs, else one partition per
    # docs_per_partition documents
    cluster_partitions: int = 0
    # measured (benchmarks/results): at 1e7 docs one task needs 1.6 GB (linear in the corpus) and
    # is about as fast as 20 partitions on 2 cores; a partition of 500k docs needs ~130 MB
    single_task_max_docs: int = 5_000_000
    docs_per_partition: int = 500_000

    def __post_init__(self) -> None:
        for name in ("ngram_size", "num_bands", "rows_per_band", "batch_bytes",
                     "single_task_max_docs", "docs_per_partition"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name}={value!r}: must be positive")
        if self.cluster_partitions < 0:
            raise ValueError(f"cluster_partitions={self.cluster_partitions!r}: must be >= 0 "
                             f"(0 = auto)")

    def partitions_for(self, num_docs: int) -> int:
        """How many partitions the near-dup clustering of ``num_docs`` documents uses."""
        if self.cluster_partitions:
            return self.cluster_partitions
        if num_docs <= self.single_task_max_docs:
            return 1
        return max(2, -(-num_docs // self.docs_per_partition))

    @property
    def num_perm(self) -> int:
        return self.num_bands * self.rows_per_band

    @property
    def threshold(self) -> float:
        """Jaccard at the S-curve's steepest point, ``(1/b)^(1/r)``."""
        return (1.0 / self.num_bands) ** (1.0 / self.rows_per_band)


def content_hash(normalized: str) -> bytes:
    """16-byte xxHash3-128 digest of a normalized text (exact-dedup key)."""
    return xxhash.xxh3_128_digest(normalized.encode("utf-8"))


def permutations(config: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` uint64 coefficients of the ``num_perm`` hash functions (seeded)."""
    rng = np.random.default_rng(config.seed)
    two = np.uint64(2)
    a = rng.integers(0, 1 << 63, size=config.num_perm, dtype=np.uint64) * two + np.uint64(1)
    b = rng.integers(0, 1 << 63, size=config.num_perm, dtype=np.uint64) * two
    return a, b


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (a bijection of uint64), elementwise."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=4)
def _power_table_pow2(size: int) -> tuple[np.ndarray, np.ndarray]:
    powers = np.full(size, _POLY_BASE, dtype=np.uint64)
    powers[0] = 1
    inv = np.full(size, _POLY_BASE_INV, dtype=np.uint64)
    inv[0] = 1
    return np.cumprod(powers, dtype=np.uint64), np.cumprod(inv, dtype=np.uint64)


def _power_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``P^j`` and ``P^-j`` for ``j < size`` (cached by power of two: cumprod is the slow part)."""
    return _power_table_pow2(1 << max(16, (size - 1).bit_length()))


def shingle_hashes(texts: list[str], ngram_size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every word n-gram of every text, grouped by text.

    ``texts`` must be normalized (single spaces, no newlines). Returns ``(hashes, counts)``: the
    hashes of text ``i`` are ``hashes[offsets[i]:offsets[i+1]]`` with ``offsets`` the cumulative
    ``counts``. A text with fewer than ``ngram_size`` words has one shingle (all its words); an
    empty text has none.
    """
    counts = np.zeros(len(texts), dtype=np.int64)
    if not texts:
        return np.zeros(0, dtype=np.uint64), counts
    buf = np.frombuffer("\n".join(texts).encode("utf-8"), dtype=np.uint8)
    if buf.size == 0:
        return np.zeros(0, dtype=np.uint64), counts
    is_sep = (buf == 32) | (buf == 10)
    word = ~is_sep
    prev_sep = np.concatenate(([True], is_sep[:-1]))
    next_sep = np.concatenate((is_sep[1:], [True]))
    starts = np.flatnonzero(word & prev_sep)
    ends = np.flatnonzero(word & next_sep) + 1
    newlines = np.flatnonzero(buf == 10)
    word_doc = np.searchsorted(newlines, starts, side="right")
    words_per_doc = np.bincount(word_doc, minlength=len(texts))
    first_word = np.concatenate(([0], np.cumsum(words_per_doc)[:-1]))

    # spans of full n-grams (both ends in the same document) ...
    n = ngram_size
    if starts.size >= n:
        w = np.arange(starts.size - n + 1)
        same = word_doc[w] == word_doc[w + n - 1]
        w = w[same]
        span_s, span_e, span_doc = starts[w], ends[w + n - 1], word_doc[w]
    else:
        span_s = span_e = span_doc = np.zeros(0, dtype=np.int64)
    # ... plus one whole-text shingle for short texts (1..n-1 words) so they still get signed
    short = np.flatnonzero((words_per_doc > 0) & (words_per_doc < n))
    if short.size:
        span_s = np.concatenate((span_s, starts[first_word[short]]))
        span_e = np.concatenate((span_e, ends[first_word[short] + words_per_doc[short] - 1]))
        span_doc = np.concatenate((span_doc, short))
        order = np.argsort(span_doc, kind="stable")
        span_s, span_e, span_doc = span_s[order], span_e[order], span_doc[order]

    # polynomial prefix hash: H[i] = sum_{j<i} buf[j] * P^j (mod 2^64); span [s, e) hashes to
    # (H[e] - H[s]) * P^-s, independent of where the span sits in the batch.
    powers, inv_powers = _power_tables(buf.size)
    prefix = np.zeros(buf.size + 1, dtype=np.uint64)
    np.cumsum(buf * powers[: buf.size], dtype=np.uint64, out=prefix[1:])
    raw = (prefix[span_e] - prefix[span_s]) * inv_powers[span_s]
    hashes = splitmix64(raw) >> np.uint64(32)
    counts[:] = np.bincount(span_doc, minlength=len(texts))
    return hashes, counts


def minhash_signatures(texts: list[str], config: DedupConfig,
                       perms: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """MinHash signatures, shape ``(len(texts), num_perm)`` uint32, of normalized texts.

    A text without words gets the all-``0xFFFFFFFF`` signature; callers must exclude such texts
    from LSH (they would all collide).
    """
    a, b = perms if perms is not None else permutations(config)
    sigs = np.full((len(texts), config.num_perm), _MAX_SIG, dtype=np.uint32)
    # sign in byte-bounded batches so the (shingles x permutations) block stays small
    batch: list[int] = []
    batch_bytes = 0
    for i, text in enumerate(texts):
        batch.append(i)
        batch_bytes += len(text)
        if batch_bytes >= config.batch_bytes:
            _sign_batch(texts, batch, config, a, b, sigs)
            batch, batch_bytes = [], 0
    if batch:
        _sign_batch(texts, batch, config, a, b, sigs)
    return sigs


def _sign_batch(texts: list[str], idx: list[int], config: DedupConfig, a: np.ndarray,
                b: np.ndarray, out: np.ndarray) -> None:
    hashes, counts = shingle_hashes([texts[i] for i in idx], config.ngram_size)
    has = counts > 0
    if not has.any():
        return
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))[has]
    rows = np.asarray(idx)[has]
    # one permutation at a time over contiguous 1-D arrays, in place: measured ~5x faster than a
    # (shingles x permutations) block, which spills out of cache. The hash is the high 32 bits
    # of a * h + b; taking them after the min gives the same value (x >> 32 is monotonic) and
    # saves a pass over the shingles per permutation.
    tmp = np.empty_like(hashes)
    for k in range(config.num_perm):
        np.multiply(hashes, a[k], out=tmp)
        tmp += b[k]
        out[rows, k] = np.minimum.reduceat(tmp, offsets) >> np.uint64(32)


def band_keys(signatures: np.ndarray, config: DedupConfig) -> np.ndarray:
    """One 64-bit key per (document, band): equal keys = all ``rows_per_band`` rows agree.

    Shape ``(num_docs, num_bands)`` uint64. A 64-bit key collision between different bands'
    contents has probability ~n^2 / 2^64, negligible at corpus scale.
    """
    n = signatures.shape[0]
    rows = signatures.reshape(n, config.num_bands, config.rows_per_band).astype(np.uint64)
    key = np.zeros((n, config.num_bands), dtype=np.uint64)
    for r in range(config.rows_per_band):
        key = splitmix64(key ^ rows[:, :, r] ^ np.uint64(r + 1))
    return key


def bucket_edges(keys: np.ndarray, doc_index: np.ndarray) -> np.ndarray:
    """Candidate pairs of one band: ``(k, 2)`` int64 edges ``(doc, first doc of its bucket)``.

    ``keys[i]`` is the band key of document ``doc_index[i]``. A bucket of ``m`` documents yields
    ``m - 1`` star edges to its smallest document, enough for the union-find.
    """
    if keys.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    order = np.lexsort((doc_index, keys))
    k, d = keys[order], doc_index[order]
    new_bucket = np.concatenate(([True], k[1:] != k[:-1]))
    head = d[np.maximum.accumulate(np.where(new_bucket, np.arange(k.size), 0))]
    member = ~new_bucket
    return np.stack((d[member], head[member]), axis=1).astype(np.int64)


class UnionFind:
    """Disjoint sets over int ids; the root of every set is its smallest id (= the kept doc)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:  # path compression keeps later finds O(1)
            parent[x], x = root, parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = (rx, ry) if rx < ry else (ry, rx)
            self.parent[hi] = lo
            self.parent.setdefault(lo, lo)


def cluster_roots(edges: np.ndarray) -> dict[int, int]:
    """Union-find over candidate edges: ``{doc: cluster root}`` for every non-root member.

    Only documents to remove appear as keys; each maps to its cluster's kept (smallest) document.
    """
    uf = UnionFind()
    if edges.size:
        for x, y in np.unique(edges, axis=0).tolist():
            uf.union(x, y)
    removed = {}
    for doc in list(uf.parent):
        root = uf.find(doc)
        if root != doc:
            removed[doc] = root
    return removed


def exact_duplicates(hashes: np.ndarray) -> np.ndarray:
    """For ``(n,)`` hash keys (any fixed-width dtype), index of the first equal key per row.

    ``first[i] == i`` means row ``i`` is kept; otherwise it duplicates row ``first[i]``.
    """
    if hashes.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)
