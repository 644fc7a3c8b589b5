"""The prepare pipeline: files -> dedup -> tokenizer -> packed Arrow shards + manifest.

Implements the "Data" step of docs/architecture.md's flow as stages of parallel tasks (Ray tasks, or plain
calls in-process with ``use_ray=False`` for the embedded demo and tests; the stages and their
outputs are identical):

1. **signatures** (one task per input file): read, normalize, content hash, MinHash band keys.
2. **exact / URL dedup** (driver, vectorized over the per-document hashes).
3. **buckets** (one task per LSH band): candidate pairs of documents sharing a band key.
4. **clusters** (one task): union-find over all candidate pairs; keep the smallest global index.
   Past ``DedupConfig.single_task_max_docs`` documents, 3-4 run instead as hash-partitioned
   rounds of tasks (``components.py``: buckets per key partition, then large-star/small-star
   connected components), with memory per task bounded by its partition and the same result.
5. **tokenizer**: train byte-level BPE on a sample of kept documents, or load ``tokenizer.json``.
6. **tokenize + pack** (one task per input file): re-read the file, encode kept documents, pack
   into ``seq_len + 1`` sequences, write one shard; each file's remainder goes back to the driver,
   which packs all remainders into a last shard (at most ``seq_len`` tokens are dropped, counted).

The global document order is (sorted file path, record order), so the result is deterministic.
On a multi-node cluster the output directory must be on storage every node can write (shared FS).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from elastic_moe.data import dedup as dd
from elastic_moe.data.components import cluster_partitioned
from elastic_moe.data.normalize import normalize
from elastic_moe.data.pack import Packer
from elastic_moe.data.readers import ReaderConfig, ReadStats, list_inputs, read_documents
from elastic_moe.data.shards import MANIFEST_VERSION, write_manifest, write_shard
from elastic_moe.data.tasks import LocalRunner, RayRunner, TaskRunner
from elastic_moe.data.tokenizer import (
    EOS_TOKEN,
    encode_documents,
    load_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class PrepareConfig:
    """Everything the prepare pipeline needs besides its inputs and output directory."""

    seq_len: int = 4096  # packed sequences hold seq_len + 1 tokens (inputs + shifted labels)
    vocab_size: int = 102400  # BPE vocabulary when training a tokenizer
    tokenizer_path: str = ""  # load this tokenizer.json instead of training one
    tokenizer_train_bytes: int = 256 << 20  # train on at most this much kept text
    # Fraction of kept documents held out, whole, into <output>/val/ (chosen by a hash of the
    # document id, after dedup over the whole corpus, so no held-out document has a
    # near-duplicate among the training ones). 0 = no validation split.
    val_fraction: float = 0.0
    encode_batch_docs: int = 1024  # documents per tokenizers.encode_batch call
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    dedup: dd.DedupConfig = field(default_factory=dd.DedupConfig)

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"seq_len={self.seq_len!r}: must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r}: must be in [0, 1)")
        if not self.tokenizer_path and self.vocab_size < 260:
            raise ValueError(f"vocab_size={self.vocab_size!r}: must be >= 260")


# ---------------------------------------------------------------------------------------------
# stage functions (module level so Ray can ship them by reference)


def signature_stage(path: str, reader: ReaderConfig, config: dd.DedupConfig) -> dict[str, Any]:
    """Stage 1 for one file: ids, URLs, content hashes, band keys, read stats."""
    stats = ReadStats(path=path)
    ids, urls, normalized = [], [], []
    for doc in read_documents(path, stats, reader):
        ids.append(doc.id)
        urls.append(doc.url)
        normalized.append(normalize(doc.text))
    hashes = np.array([dd.content_hash(t) for t in normalized], dtype="S16")
    sigs = dd.minhash_signatures(normalized, config) if config.near else \
        np.zeros((len(ids), config.num_perm), dtype=np.uint32)
    has_words = np.array([bool(t) for t in normalized], dtype=bool)
    return {"ids": ids, "urls": urls, "hashes": hashes, "band_keys": dd.band_keys(sigs, config),
            "has_words": has_words, "stats": stats}


def bucket_stage(keys: np.ndarray, doc_index: np.ndarray, band: int) -> np.ndarray:
    """Stage 3 for one band: star edges between documents with equal band keys."""
    return dd.bucket_edges(np.ascontiguousarray(keys[:, band]), doc_index)


def cluster_stage(*edge_sets: np.ndarray) -> dict[int, int]:
    """Stage 4: union-find over all bands' edges -> {removed doc: kept doc}."""
    edges = np.concatenate(edge_sets) if edge_sets else np.zeros((0, 2), dtype=np.int64)
    return dd.cluster_roots(edges)


def _kept_texts(path: str, keep: np.ndarray, reader: ReaderConfig) -> list[str]:
    stats = ReadStats(path=path)
    texts = [d.text for d in read_documents(path, stats, reader)]
    if len(texts) != keep.size:
        raise RuntimeError(f"input {path} changed during prepare: {len(texts)} documents now, "
                           f"{keep.size} at the signature stage")
    return [t for t, k in zip(texts, keep.tolist(), strict=True) if k]


def tokenizer_stage(paths: list[str], keeps: list[np.ndarray], reader: ReaderConfig,
                    vocab_size: int, max_bytes: int) -> str:
    """Stage 5: train byte-level BPE on up to ``max_bytes`` of kept text; returns its JSON."""
    def texts():
        seen = 0
        for path, keep in zip(paths, keeps, strict=True):
            for text in _kept_texts(path, keep, reader):
                yield text
                seen += len(text)
                if seen >= max_bytes:
                    return

    return train_tokenizer(texts(), vocab_size).to_str()


def tokenize_stage(path: str, keep: np.ndarray, reader: ReaderConfig, tokenizer_json: str,
                   seq_len: int, shard_path: str, batch_docs: int) -> dict[str, Any]:
    """Stage 6 for one file: encode kept docs + EOS, pack, write a shard, return the remainder."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"tokenizer: has no {EOS_TOKEN!r} token (needed as EOS)")
    texts = _kept_texts(path, keep, reader)
    packer = Packer(seq_len)
    num_tokens = 0
    seqs, starts = [], []
    for lo in range(0, len(texts), batch_docs):
        tokens, lengths = encode_documents(tok, texts[lo: lo + batch_docs], eos)
        num_tokens += tokens.size
        packer.add_documents(tokens, lengths)
        t, s = packer.take()
        seqs.append(t)
        starts.append(s)
    tokens2d = np.concatenate(seqs) if seqs else np.zeros((0, seq_len + 1), dtype=np.uint32)
    starts2d = np.concatenate(starts) if starts else np.zeros((0, seq_len + 1), dtype=bool)
    num = write_shard(shard_path, tokens2d, starts2d) if len(tokens2d) else 0
    rem_tokens, rem_starts = packer.remainder()
    return {"path": shard_path if num else "", "num_sequences": num, "tokens": num_tokens,
            "documents": len(texts), "rem_tokens": rem_tokens, "rem_starts": rem_starts}


def near_duplicates(keys: np.ndarray, doc_index: np.ndarray, config: dd.DedupConfig,
                    runner: TaskRunner, progress: bool = False
                    ) -> tuple[dict[int, int], dict[str, Any]]:
    """Stages 3-4: ``{removed doc: kept doc}`` over the band keys of documents ``doc_index``.

    One union-find task (``cluster_stage``) or, with ``config.partitions_for(n) >= 2``, the
    partitioned connected components of ``components.py``; both give the same mapping.
    """
    from tqdm import tqdm

    num_partitions = config.partitions_for(int(doc_index.size))
    if num_partitions >= 2:
        near, report = cluster_partitioned(keys, doc_index, num_partitions, runner,
                                           progress=progress)
        return near, {"path": "partitioned", "partitions": num_partitions,
                      "rounds": report.rounds}
    keys_arg, index_arg = runner.put(keys), runner.put(doc_index)  # one copy for all bands
    edges = [runner.submit(bucket_stage, [keys_arg, index_arg, b])[0]
             for b in range(config.num_bands)]
    with tqdm(total=len(edges), desc="buckets", unit="task", disable=not progress,
              leave=False) as bar:
        pending = list(edges)
        while pending:
            done, pending = runner.wait_one(pending)
            bar.update(len(done))
    near = runner.get(runner.submit(cluster_stage, edges))[0]
    return near, {"path": "single_task", "partitions": 1, "rounds": 1}


# ---------------------------------------------------------------------------------------------
# driver


def _run_stage(name: str, fn: Callable[..., Any], calls: Sequence[tuple], use_ray: bool,
               progress: bool) -> list[Any]:
    """Run ``fn(*args)`` for every ``args`` in ``calls``, as Ray tasks or in-process, in order."""
    from tqdm import tqdm

    bar = tqdm(total=len(calls), desc=name, unit="task", disable=not progress, leave=False)
    try:
        if not use_ray:
            out = []
            for args in calls:
                out.append(fn(*args))
                bar.update(1)
            return out
        import ray

        remote = ray.remote(num_cpus=1)(fn)
        refs = [remote.remote(*args) for args in calls]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
        return ray.get(refs)
    finally:
        bar.close()


@dataclass(slots=True)
class DedupResult:
    """Outcome of stages 1-4 over ``paths`` in global document order."""

    paths: list[str]
    ids: list[str]  # every usable document, in global order
    keeps: list[np.ndarray]  # per file: bool mask of kept documents
    removed: dict[int, tuple[str, int]]  # global doc -> (reason, global doc it duplicates)
    skipped: Counter
    repaired: Counter  # records kept after a repair (e.g. a wrong declared charset)
    near_dedup: dict[str, Any]  # how the clustering ran: path, partitions, rounds
    file_errors: list[dict[str, str]]
    timings: dict[str, float]


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when it is set


def deduplicate(paths: list[str], config: PrepareConfig, *, use_ray: bool = True,
                progress: bool = True) -> DedupResult:
    """Stages 1-4: signatures, exact + URL dedup, LSH buckets, union-find clusters."""
    if use_ray:
        _ensure_ray()
    timings: dict[str, float] = {}

    # 1. signatures
    t = time.perf_counter()
    sig = _run_stage("signatures", signature_stage,
                     [(p, config.reader, config.dedup) for p in paths], use_ray, progress)
    timings["signatures_s"] = time.perf_counter() - t
    counts = [len(s["ids"]) for s in sig]
    ids = [i for s in sig for i in s["ids"]]
    n = len(ids)
    skipped: Counter = Counter()
    repaired: Counter = Counter()
    file_errors = []
    for s in sig:
        s["stats"].merge_into(skipped, repaired)
        if s["stats"].error:
            file_errors.append({"file": s["stats"].path, "error": s["stats"].error})

    # 2. exact + URL dedup (first occurrence in global order wins)
    t = time.perf_counter()
    removed: dict[int, tuple[str, int]] = {}  # doc -> (reason, kept doc)
    hashes = np.concatenate([s["hashes"] for s in sig]) if n else np.zeros(0, dtype="S16")
    if config.dedup.exact:
        first = dd.exact_duplicates(hashes)
        for d in np.flatnonzero(first != np.arange(n)).tolist():
            removed[d] = ("exact", int(first[d]))
    if config.dedup.url:
        urls = np.array([u for s in sig for u in s["urls"]], dtype=object)
        alive = np.array([d not in removed and bool(urls[d]) for d in range(n)], dtype=bool)
        idx = np.flatnonzero(alive)
        if idx.size:
            first = dd.exact_duplicates(urls[idx].astype(str))
            for j in np.flatnonzero(first != np.arange(idx.size)).tolist():
                removed[int(idx[j])] = ("url", int(idx[first[j]]))
    timings["exact_url_s"] = time.perf_counter() - t

    # 3-4. near dedup over survivors that have words
    t = time.perf_counter()
    near_info: dict[str, Any] = {"path": "off", "partitions": 0, "rounds": 0}
    if config.dedup.near and n:
        keys = np.concatenate([s["band_keys"] for s in sig])
        has_words = np.concatenate([s["has_words"] for s in sig])
        alive = has_words.copy()
        if removed:
            alive[list(removed)] = False
        doc_index = np.flatnonzero(alive)
        runner: TaskRunner = RayRunner() if use_ray else LocalRunner()
        near, near_info = near_duplicates(keys[doc_index], doc_index, config.dedup, runner,
                                          progress)
        for d, root in near.items():
            removed[d] = ("near", root)
    timings["near_s"] = time.perf_counter() - t

    keep_all = np.ones(n, dtype=bool)
    if removed:
        keep_all[list(removed)] = False
    bounds = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    keeps = [keep_all[bounds[i]:bounds[i + 1]] for i in range(len(paths))]
    return DedupResult(paths=paths, ids=ids, keeps=keeps, removed=removed, skipped=skipped,
                       repaired=repaired, near_dedup=near_info, file_errors=file_errors,
                       timings=timings)


def prepare(inputs: str | list[str], output_dir: str, config: PrepareConfig, *,
            use_ray: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline; writes shards, ``tokenizer.json``, ``removed.jsonl`` and
    ``manifest.json`` under ``output_dir`` and returns the manifest.

    With ``use_ray=True`` Ray must be importable; an uninitialized Ray is started with
    ``ray.init()`` (which joins ``RAY_ADDRESS`` when set).
    """
    t0 = time.perf_counter()
    paths = list_inputs(inputs)
    os.makedirs(output_dir, exist_ok=True)
    result = deduplicate(paths, config, use_ray=use_ray, progress=progress)
    ids, keeps, removed, timings = result.ids, result.keeps, result.removed, result.timings
    n = len(ids)
    keep_all = np.concatenate(keeps) if keeps else np.zeros(0, dtype=bool)
    held_out = _held_out(ids, config.val_fraction) & keep_all
    train_keeps = [k & ~held_out[o:o + k.size] for k, o in zip(keeps, _file_offsets(keeps),
                                                                 strict=True)]
    val_keeps = [k & held_out[o:o + k.size] for k, o in zip(keeps, _file_offsets(keeps),
                                                              strict=True)]

    # 5. tokenizer
    t = time.perf_counter()
    tok_path = os.path.join(output_dir, "tokenizer.json")
    if config.tokenizer_path:
        tokenizer_json = load_tokenizer(config.tokenizer_path).to_str()
    else:
        tokenizer_json = _run_stage(
            "tokenizer", tokenizer_stage,
            [(paths, train_keeps, config.reader, config.vocab_size,
              config.tokenizer_train_bytes)],
            use_ray, progress)[0]
    with open(tok_path, "w") as fh:
        fh.write(tokenizer_json)
    tok = load_tokenizer(tok_path)
    timings["tokenizer_s"] = time.perf_counter() - t

    # 6. tokenize + pack + shards (training documents; then the held-out ones under val/)
    t = time.perf_counter()
    tok_arg: Any = tokenizer_json
    if use_ray:  # one object-store copy of the (MBs-large) tokenizer JSON for all tasks
        import ray

        tok_arg = ray.put(tokenizer_json)
    shards, packed, dropped = _pack(paths, train_keeps, config, tok_arg, output_dir, use_ray,
                                    progress)
    val_manifest = None
    if config.val_fraction > 0:
        val_dir = os.path.join(output_dir, VAL_DIR)
        val_shards, val_packed, val_dropped = _pack(paths, val_keeps, config, tok_arg, val_dir,
                                                    use_ray, progress)
        val_manifest = _split_manifest(tok, tok_path, config, val_shards, val_packed, val_dropped,
                                       int(sum(k.sum() for k in val_keeps)), val_dir)
        with open(os.path.join(val_dir, "documents.txt"), "w") as fh:
            for keep_file, offset in zip(val_keeps, _file_offsets(val_keeps), strict=True):
                for d in np.flatnonzero(keep_file).tolist():
                    fh.write(ids[offset + d] + "\n")
        if val_manifest["num_sequences"] == 0:
            raise ValueError(f"val_fraction={config.val_fraction}: the {val_manifest['documents']}"
                             " held-out documents do not fill one sequence of seq_len="
                             f"{config.seq_len}; raise val_fraction")
        write_manifest(os.path.join(val_dir, "manifest.json"), val_manifest)
    timings["tokenize_pack_s"] = time.perf_counter() - t

    # removed documents, with the reason and the kept document they duplicate
    with open(os.path.join(output_dir, "removed.jsonl"), "w") as fh:
        for d in sorted(removed):
            reason, kept = removed[d]
            fh.write(json.dumps({"id": ids[d], "reason": reason, "duplicate_of": ids[kept]})
                     + "\n")
    reasons = Counter(r for r, _ in removed.values())
    num_sequences = sum(s["num_sequences"] for s in shards)
    width = config.seq_len + 1
    timings["total_s"] = time.perf_counter() - t0
    manifest = {
        "version": MANIFEST_VERSION,
        "inputs": paths,
        "seq_len": config.seq_len,
        "vocab_size": tok.get_vocab_size(),
        "eos_id": tok.token_to_id(EOS_TOKEN),
        "tokenizer": {"path": "tokenizer.json", "sha256": tokenizer_sha256(tok_path),
                      "trained": not config.tokenizer_path},
        "shards": shards,
        "num_sequences": num_sequences,
        "documents_in": n,
        "documents_kept": int(keep_all.sum()),  # validation documents included
        "exact_duplicates": reasons.get("exact", 0),
        "url_duplicates": reasons.get("url", 0),
        "near_duplicates": reasons.get("near", 0),
        "skipped": dict(sorted(result.skipped.items())),
        "repaired": dict(sorted(result.repaired.items())),
        "near_dedup": result.near_dedup,
        "file_errors": result.file_errors,
        "tokens": int(sum(r["tokens"] for r in packed)),
        "tokens_packed": num_sequences * width,
        "tokens_dropped_tail": int(dropped),
        "dedup": {"ngram_size": config.dedup.ngram_size, "num_bands": config.dedup.num_bands,
                  "rows_per_band": config.dedup.rows_per_band, "seed": config.dedup.seed,
                  "threshold": round(config.dedup.threshold, 4)},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if val_manifest is not None:
        manifest["val_manifest"] = f"{VAL_DIR}/manifest.json"
        manifest["documents_val"] = val_manifest["documents"]
        manifest["val_fraction"] = config.val_fraction
    write_manifest(os.path.join(output_dir, "manifest.json"), manifest)
    logger.info("prepared %d sequences from %d/%d documents in %.1fs", num_sequences,
                manifest["documents_kept"], n, timings["total_s"])
    return manifest


VAL_DIR = "val"


def _file_offsets(keeps: list[np.ndarray]) -> list[int]:
    return np.concatenate(([0], np.cumsum([k.size for k in keeps])))[:-1].astype(int).tolist()


def _held_out(ids: list[str], fraction: float) -> np.ndarray:
    """Documents chosen for validation: a hash of the id below ``fraction`` (deterministic,
    independent of file order and of the other documents)."""
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    limit = int(fraction * 2**64)
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(),
                                    "little") < limit for i in ids], dtype=bool)


def _pack(paths: list[str], keeps: list[np.ndarray], config: PrepareConfig, tok_arg: Any,
          out_dir: str, use_ray: bool, progress: bool
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Tokenize and pack the kept documents into ``out_dir/shards``: (shards, per-file results,
    tokens dropped in the last partial sequence)."""
    shard_dir = os.path.join(out_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    packed = _run_stage(
        "tokenize+pack", tokenize_stage,
        [(p, keeps[i], config.reader, tok_arg, config.seq_len,
          os.path.join(shard_dir, f"shard-{i:05d}.arrow"), config.encode_batch_docs)
         for i, p in enumerate(paths)], use_ray, progress)
    tail = Packer(config.seq_len)
    for r in packed:
        tail.add(r["rem_tokens"], r["rem_starts"])
    tail_tokens, tail_starts = tail.take()
    dropped = len(tail)
    shards = [{"path": os.path.relpath(r["path"], out_dir), "num_sequences": r["num_sequences"]}
              for r in packed if r["num_sequences"]]
    if len(tail_tokens):
        tail_path = os.path.join(shard_dir, "shard-tail.arrow")
        shards.append({"path": os.path.relpath(tail_path, out_dir),
                       "num_sequences": write_shard(tail_path, tail_tokens, tail_starts)})
    for s in shards:
        s["num_tokens"] = s["num_sequences"] * (config.seq_len + 1)
    return shards, packed, int(dropped)


def _split_manifest(tok: Any, tok_path: str, config: PrepareConfig, shards: list[dict[str, Any]],
                    packed: list[dict[str, Any]], dropped: int, documents: int,
                    out_dir: str) -> dict[str, Any]:
    """The manifest of the validation split (readable by ``TokenDataset`` like the main one)."""
    num_sequences = sum(s["num_sequences"] for s in shards)
    return {"version": MANIFEST_VERSION, "split": "validation", "seq_len": config.seq_len,
            "vocab_size": tok.get_vocab_size(), "eos_id": tok.token_to_id(EOS_TOKEN),
            "tokenizer": {"path": os.path.relpath(tok_path, out_dir),
                          "sha256": tokenizer_sha256(tok_path)},
            "shards": shards, "num_sequences": num_sequences, "documents": documents,
            "tokens": int(sum(r["tokens"] for r in packed)),
            "tokens_packed": num_sequences * (config.seq_len + 1),
            "tokens_dropped_tail": dropped}


def removed_ids(output_dir: str) -> list[str]:
    """Ids of every document removed as a duplicate (any reason), in global input order."""
    with open(os.path.join(output_dir, "removed.jsonl")) as fh:
        return [json.loads(line)["id"] for line in fh if line.strip()]


def summary_table(manifest: dict[str, Any]) -> str:
    """A plain-text table of the manifest's counts, printed at the end of a prepare job."""
    rows = [("documents in", manifest["documents_in"]),
            ("exact duplicates", manifest["exact_duplicates"]),
            ("url duplicates", manifest["url_duplicates"]),
            ("near duplicates", manifest["near_duplicates"]),
            ("documents kept", manifest["documents_kept"])]
    if "documents_val" in manifest:
        rows.append(("  of which held out for validation", manifest["documents_val"]))
    rows += [(f"skipped: {k}", v) for k, v in manifest["skipped"].items()]
    rows += [(f"kept after repair: {k}", v) for k, v in manifest.get("repaired", {}).items()]
    near = manifest.get("near_dedup")
    if near and near["path"] == "partitioned":
        rows.append(("near-dup clustering", f"{near['partitions']} parts, {near['rounds']} rds"))
    elif near:
        rows.append(("near-dup clustering", near["path"].replace("_", " ")))
    rows += [("files with errors", len(manifest["file_errors"])),
             ("tokens (kept docs + EOS)", manifest["tokens"]),
             (f"sequences x {manifest['seq_len'] + 1} tokens", manifest["num_sequences"]),
             ("tokens dropped (last partial sequence)", manifest["tokens_dropped_tail"]),
             ("vocab size", manifest["vocab_size"]),
             ("shards", len(manifest["shards"]))]
    rows += [(f"time: {k}", f"{v:.2f}") for k, v in manifest["timings"].items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'stage / count':<{width}}  value", "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:>12}" for k, v in rows]
    lines += [f"file error: {e['file']}: {e['error']}" for e in manifest["file_errors"]]
    return "\n".join(lines)
