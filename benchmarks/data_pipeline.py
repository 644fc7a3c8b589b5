"""Data pipeline benchmark: dedup, tokenization, WARC extraction and clustering at scale.

    python benchmarks/data_pipeline.py --datatrove-python /tmp/bench-venv/bin/python
    python benchmarks/data_pipeline.py --sections warc,cluster --datatrove-python ...

Issue 15's sections (``--sections warc,cluster``, written to
``results/data_pipeline_warc_cluster_cpu2.{md,json}``):

* **warc**: generated Common-Crawl-like WARCs (``elastic_moe.data.sample_warc``: HTML pages with
  a known main text in four layouts, plus request/metadata/redirect/image records). Ours: the
  WARC reader with resiliparse, then our signature stage, in one process; datatrove: its
  ``WarcReader`` + ``Trafilatura`` (+ ``MinhashDedupSignature``), ``LocalPipelineExecutor(tasks=1,
  workers=1)``. docs/s per core = pages / CPU seconds of the process (and its children: datatrove
  runs trafilatura in a sandbox process). Quality: word-level precision/recall/F1 of each page's
  text against its planted main text.
* **cluster**: synthetic band keys for 10^5..10^7 documents with planted duplicate groups; today's
  single union-find task vs the partitioned connected components, both as Ray tasks, with the
  peak memory of every task (``tasks.RayRunner(measure_memory=True)``: tracemalloc peak +
  input arrays).

Issue 6's section (``dedup``):

Issue 6's targets: dedup >= 2x datatrove's documents/s per core with equal or better recall, and
tokenize+pack within 10% of raw ``tokenizers`` batch encoding. Both dedups run on the same
generated corpus (>= 50 MB of JSONL from ``elastic_moe.data.sample_corpus`` with planted exact and
near duplicates) with the same parameters (word 5-grams, 14 bands x 8 rows, seed 1), each in one
process (one core: datatrove's ``LocalPipelineExecutor(workers=1)``, our stages with
``use_ray=False``), so documents/s is per core.

datatrove is NOT a project dependency: install it only in a separate benchmark environment, e.g.
``python -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install datatrove orjson regex
tokenizers spacy`` (its English word tokenizer needs spacy), and pass that interpreter with
``--datatrove-python``. Without it only our numbers are reported.

Timings on a shared machine are noisy: the signature and tokenization measurements are medians of
``--repeats`` runs; the datatrove run is done once per repeat as well.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_datatrove(input_dir: str, work_dir: str) -> None:
    """Runs under the benchmark interpreter: datatrove's 4 MinHash stages, prints JSON timings."""
    import glob
    import gzip

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    shutil.rmtree(work_dir, ignore_errors=True)
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)
    w = work_dir
    stages = [
        ("signatures", [JsonlReader(input_dir, glob_pattern="*.jsonl"),
                        MinhashDedupSignature(output_folder=f"{w}/sigs", config=cfg)], 1),
        ("buckets", [MinhashDedupBuckets(input_folder=f"{w}/sigs", output_folder=f"{w}/buckets",
                                         config=cfg)], cfg.num_buckets),
        ("clusters", [MinhashDedupCluster(input_folder=f"{w}/buckets",
                                          output_folder=f"{w}/remove_ids", config=cfg)], 1),
        ("filter", [JsonlReader(input_dir, glob_pattern="*.jsonl"),
                    MinhashDedupFilter(input_folder=f"{w}/remove_ids",
                                       exclusion_writer=JsonlWriter(f"{w}/removed"))], 1),
    ]
    out = {"config": str(cfg)}
    for name, pipeline, tasks in stages:
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1,
                              logging_dir=f"{w}/logs/{name}").run()
        out[f"{name}_s"] = time.perf_counter() - t
    # Isolate datatrove's word tokenization (spacy for English): time its shingle + signature
    # math alone with a whitespace splitter on the first 2000 documents.
    sig_step = stages[0][1][1]
    docs = []
    with open(sorted(glob.glob(f"{input_dir}/*.jsonl"))[0]) as fh:
        for line in fh:
            docs.append(json.loads(line)["text"])
            if len(docs) == 2000:
                break

    class _Whitespace:
        def word_tokenize(self, text: str, language: str | None = None) -> list[str]:
            return text.split()

    sig_step._word_tokenizer = _Whitespace()
    sig_step.__dict__["word_tokenizer"] = sig_step._word_tokenizer
    t = time.perf_counter()
    for text in docs:
        sig_step.get_signature(sig_step.get_shingles(text))
    out["no_spacy_signature_docs_per_s"] = len(docs) / (time.perf_counter() - t)
    removed = []
    for path in sorted(glob.glob(f"{w}/removed/*")):
        with gzip.open(path, "rt") as fh:
            removed += [json.loads(line)["id"] for line in fh]
    out["removed"] = removed
    print("DATATROVE_JSON " + json.dumps(out))


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _datatrove_runs(args: argparse.Namespace, flag: str, input_dir: str, work_name: str,
                    label: str) -> list[dict]:
    """``--datatrove-repeats`` runs of this script's ``flag`` mode under
    ``--datatrove-python``; each run's ``DATATROVE_JSON`` record."""
    runs = []
    for r in range(args.datatrove_repeats):
        proc = subprocess.run([args.datatrove_python, os.path.abspath(__file__), flag, input_dir,
                               os.path.join(args.workdir, work_name)],
                              capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("DATATROVE_JSON ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{label} run failed (see above)")
        runs.append(json.loads(line[0][len("DATATROVE_JSON "):]))
        print(f"{label} run {r}: " + str({k: round(v, 2) for k, v in runs[-1].items()
                                         if k.endswith("_s")}), flush=True)
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/elastic-moe-data-bench")
    p.add_argument("--num-docs", type=int, default=17000, help="originals (plus planted dups)")
    p.add_argument("--min-mb", type=float, default=50.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--datatrove-repeats", type=int, default=1, help="datatrove is slow")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenize-mb", type=float, default=4.0, help="text for the encode benchmark")
    p.add_argument("--tokenize-repeats", type=int, default=5)
    p.add_argument("--datatrove-python", default="")
    cpu = platform.processor() or platform.machine()
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU ({cpu})")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "data_pipeline_cpu2"))
    p.add_argument("--sections", default="dedup,warc,cluster",
                   help="comma-separated: dedup (+ tokenization), warc, cluster")
    p.add_argument("--warc-pages", type=int, default=4000)
    p.add_argument("--warc-files", type=int, default=4)
    p.add_argument("--cluster-sizes", default="100000,1000000,10000000",
                   type=lambda x: [int(float(v)) for v in x.split(",")])
    p.add_argument("--single-max", type=float, default=1e7,
                   help="largest corpus the single-task path is run on")
    p.add_argument("--docs-per-partition", type=int, default=500_000)
    p.add_argument("--cluster-cpus", type=int, default=2)
    p.add_argument("--cluster-repeats", type=int, default=3, help="timing runs (2 at 10^7)")
    p.add_argument("--out-warc-cluster", default=os.path.join(
        ROOT, "benchmarks", "results", "data_pipeline_warc_cluster_cpu2"))
    p.add_argument("--run-datatrove", nargs=2, metavar=("INPUT", "WORK"), help=argparse.SUPPRESS)
    p.add_argument("--run-datatrove-warc", nargs=2, metavar=("INPUT", "WORK"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_datatrove:
        run_datatrove(*args.run_datatrove)
        return 0
    if args.run_datatrove_warc:
        run_datatrove_warc(*args.run_datatrove_warc)
        return 0

    sys.path.insert(0, ROOT)
    sections = set(args.sections.split(","))
    if sections & {"warc", "cluster"}:
        new: dict = {"machine": args.machine, "python": platform.python_version()}
        if "warc" in sections:
            new["warc"] = bench_warc(args)
        if "cluster" in sections:
            new["cluster"] = bench_cluster(args)
        os.makedirs(os.path.dirname(args.out_warc_cluster), exist_ok=True)
        with open(args.out_warc_cluster + ".json", "w") as fh:
            json.dump(new, fh, indent=2)
        parts = [f"# WARC extraction and near-dup clustering — {args.machine}", ""]
        if "warc" in new:
            parts += ["## Extraction + signatures on the same WARC input", "",
                      _warc_table(new["warc"]), ""]
        if "cluster" in new:
            parts += ["## Near-dup clustering at scale (synthetic band keys, planted groups)", "",
                      _cluster_table(new["cluster"]), ""]
        with open(args.out_warc_cluster + ".md", "w") as fh:
            fh.write("\n".join(parts))
        print("\n".join(parts))
    if "dedup" not in sections:
        return 0
    import numpy as np

    from elastic_moe.data.pack import Packer
    from elastic_moe.data.pipeline import PrepareConfig, deduplicate, tokenizer_stage
    from elastic_moe.data.readers import ReaderConfig, ReadStats, list_inputs, read_documents
    from elastic_moe.data.sample_corpus import generate, score_removed
    from elastic_moe.data.shards import write_shard
    from elastic_moe.data.tokenizer import EOS_TOKEN, encode_documents, load_tokenizer

    corpus = os.path.join(args.workdir, "corpus")
    truth_path = os.path.join(corpus, "ground_truth.json")
    if not os.path.exists(truth_path):
        print(f"generating corpus in {corpus} ...", flush=True)
        generate(corpus, num_docs=args.num_docs, seed=0, min_sentences=10, max_sentences=40,
                 url_frac=0.0, num_wet=0, num_jsonl=4, jsonl_gzip=False)
    with open(truth_path) as fh:
        truth = json.load(fh)
    paths = list_inputs(corpus)
    corpus_mb = sum(os.path.getsize(f) for f in paths) / 1e6
    num_docs = truth["num_documents"]
    print(f"corpus: {num_docs} documents, {corpus_mb:.1f} MB JSONL", flush=True)
    if corpus_mb < args.min_mb:
        raise SystemExit(f"corpus is {corpus_mb:.1f} MB < --min-mb {args.min_mb}: raise "
                         f"--num-docs")

    results: dict = {"machine": args.machine, "corpus_mb": round(corpus_mb, 1),
                     "documents": num_docs, "python": platform.python_version()}

    # -- ours: dedup stages (1 process = 1 core), repeated; then a tokenizer for the encode test
    ours_runs = []
    config = PrepareConfig(seq_len=4096, vocab_size=args.vocab_size)
    for r in range(args.repeats):
        result = deduplicate(paths, config, use_ray=False, progress=False)
        ours_runs.append(result.timings)
        print(f"ours run {r}: " + str({k: round(v, 2) for k, v in result.timings.items()}),
              flush=True)
    ours_removed = {result.ids[d] for d in result.removed}
    sig_s = _median([t["signatures_s"] for t in ours_runs])
    dedup_s = _median([t["signatures_s"] + t["exact_url_s"] + t["near_s"] for t in ours_runs])
    ours_score = score_removed(ours_removed, truth)
    results["ours"] = {"signatures_s": round(sig_s, 2), "dedup_s": round(dedup_s, 2),
                       "signature_docs_per_s_per_core": round(num_docs / sig_s),
                       "dedup_docs_per_s_per_core": round(num_docs / dedup_s),
                       "score": ours_score, "timings_runs": ours_runs}
    tok_path = os.path.join(args.workdir, "tokenizer.json")
    if not os.path.exists(tok_path):
        t = time.perf_counter()
        tokenizer_json = tokenizer_stage(paths, result.keeps, ReaderConfig(), args.vocab_size,
                                         8 << 20)
        with open(tok_path, "w") as fh:
            fh.write(tokenizer_json)
        print(f"trained tokenizer (vocab {args.vocab_size}, 8 MB) in "
              f"{time.perf_counter() - t:.1f}s", flush=True)

    # -- datatrove -----------------------------------------------------------------------------
    dt = None
    if args.datatrove_python:
        dt_runs = _datatrove_runs(args, "--run-datatrove", corpus, "datatrove", "datatrove")
        dt_removed = set(dt_runs[-1]["removed"])
        dt_sig = _median([x["signatures_s"] for x in dt_runs])
        dt_dedup = _median([x["signatures_s"] + x["buckets_s"] + x["clusters_s"]
                            for x in dt_runs])
        dt = {"config": dt_runs[0]["config"], "signatures_s": round(dt_sig, 2),
              "dedup_s": round(dt_dedup, 2),
              "filter_s": round(_median([x["filter_s"] for x in dt_runs]), 2),
              "signature_docs_per_s_per_core": round(num_docs / dt_sig),
              "no_spacy_signature_docs_per_s_per_core": round(_median(
                  [x["no_spacy_signature_docs_per_s"] for x in dt_runs])),
              "dedup_docs_per_s_per_core": round(num_docs / dt_dedup),
              "score": score_removed(dt_removed, truth)}
        inter, union = ours_removed & dt_removed, ours_removed | dt_removed
        results["datatrove"] = dt
        results["agreement"] = {
            "removed_ours": len(ours_removed), "removed_datatrove": len(dt_removed),
            "both": len(inter), "only_ours": len(ours_removed - dt_removed),
            "only_datatrove": len(dt_removed - ours_removed),
            "jaccard": round(len(inter) / max(1, len(union)), 4)}
        results["speedup_signatures"] = round(dt_sig / sig_s, 2)
        results["speedup_dedup"] = round(dt_dedup / dedup_s, 2)

    # -- tokenization: raw encode_batch vs our encode + EOS + pack + shard write ---------------
    tok = load_tokenizer(tok_path)
    eos = tok.token_to_id(EOS_TOKEN)
    texts, size = [], 0
    stats = ReadStats(path="")
    for path in paths:
        for doc in read_documents(path, stats, ReaderConfig()):
            texts.append(doc.text)
            size += len(doc.text)
            if size >= args.tokenize_mb * 1e6:
                break
        if size >= args.tokenize_mb * 1e6:
            break
    # the variants run interleaved within each repeat and overheads are medians of per-repeat
    # ratios: other jobs on the shared cores shift absolute times between repeats
    times: dict[str, list[float]] = {"raw": [], "raw_ids": [], "fast_ids": [], "ours": []}
    shard = os.path.join(args.workdir, "bench-shard.arrow")
    n_tokens = 0

    def ours() -> None:
        packer = Packer(4096)
        seqs, starts = [], []
        for lo in range(0, len(texts), 1024):  # the batch size tokenize_stage uses
            ids, lengths = encode_documents(tok, texts[lo: lo + 1024], eos)
            packer.add_documents(ids, lengths)
            s, st = packer.take()
            seqs.append(s)
            starts.append(st)
        write_shard(shard, np.concatenate(seqs), np.concatenate(starts))

    variants = {
        "raw": lambda: tok.encode_batch(texts, add_special_tokens=False),
        "raw_ids": lambda: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
        "fast_ids": lambda: [e.ids for e in tok.encode_batch_fast(texts,
                                                                  add_special_tokens=False)],
        "ours": ours,
    }
    n_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts)) + len(texts)
    for _ in range(args.tokenize_repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    os.remove(shard)

    def overhead(base: str) -> float:
        return round(_median([o / b for o, b in zip(times["ours"], times[base],
                                                    strict=True)]) - 1, 3)

    results["tokenize"] = {
        "text_mb": round(size / 1e6, 1), "tokens": n_tokens, "vocab_size": tok.get_vocab_size(),
        **{f"{k}_tokens_per_s": round(n_tokens / _median(v)) for k, v in times.items()},
        "overhead_vs_encode_batch": overhead("raw"),
        "overhead_vs_encode_batch_ids": overhead("raw_ids"),
        "overhead_vs_encode_batch_fast_ids": overhead("fast_ids"),
        "times_s": {k: [round(x, 3) for x in v] for k, v in times.items()}}

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(results, fh, indent=2)
    table = _table(results)
    with open(args.out + ".md", "w") as fh:
        fh.write(table + "\n")
    print(table)
    return 0


def _table(r: dict) -> str:
    o, d, t = r["ours"], r.get("datatrove"), r["tokenize"]
    lines = [f"# data pipeline benchmark — {r['machine']}", "",
             f"Corpus: {r['documents']} documents, {r['corpus_mb']} MB JSONL (generated, planted "
             f"exact + near duplicates), Python {r['python']}. One process per system (= per "
             f"core); medians of repeated runs on a shared 2-core machine.", "",
             "| metric | ours | datatrove | ratio |", "|---|---:|---:|---:|"]

    def row(name: str, ours: object, dt: object, ratio: object = "") -> None:
        lines.append(f"| {name} | {ours} | {dt} | {ratio} |")

    dd = d or {}
    row("signature stage docs/s per core", o["signature_docs_per_s_per_core"],
        dd.get("signature_docs_per_s_per_core", "n/a"), r.get("speedup_signatures", ""))
    if d:
        row("signature docs/s per core, datatrove with a whitespace word splitter instead of "
            "spacy (first 2000 docs)", "", d["no_spacy_signature_docs_per_s_per_core"],
            round(o["signature_docs_per_s_per_core"]
                  / d["no_spacy_signature_docs_per_s_per_core"], 2))
    row("end-to-end dedup docs/s per core (sig+buckets+clusters)",
        o["dedup_docs_per_s_per_core"], dd.get("dedup_docs_per_s_per_core", "n/a"),
        r.get("speedup_dedup", ""))
    for key in ("exact_recall", "near_recall", "precision"):
        row(key, f"{o['score'][key]:.4f}",
            f"{dd['score'][key]:.4f}" if d else "n/a")
    row("documents removed", o["score"]["removed"], dd["score"]["removed"] if d else "n/a")
    if d:
        a = r["agreement"]
        lines += ["", f"Agreement of removed sets: {a['both']} both, {a['only_ours']} only ours, "
                  f"{a['only_datatrove']} only datatrove (Jaccard {a['jaccard']}). datatrove "
                  f"config: {d['config']}; its filter stage (applying the removals) took "
                  f"{d['filter_s']} s more."]
    lines += ["", f"Tokenization ({t['text_mb']} MB, {t['tokens']} tokens, vocab "
              f"{t['vocab_size']}, tokenizers' own threads):", "",
              "| path | tokens/s (median) |", "|---|---:|",
              f"| raw `Tokenizer.encode_batch` (ids left in Rust) | {t['raw_tokens_per_s']} |",
              f"| raw `encode_batch` + `.ids` | {t['raw_ids_tokens_per_s']} |",
              f"| raw `encode_batch_fast` + `.ids` | {t['fast_ids_tokens_per_s']} |",
              f"| ours: encode_batch_fast + EOS + uint32 + pack + Arrow shard | "
              f"{t['ours_tokens_per_s']} |", "",
              f"Overhead of ours (median of per-repeat ratios): "
              f"{t['overhead_vs_encode_batch']:+.1%} vs `encode_batch`, "
              f"{t['overhead_vs_encode_batch_ids']:+.1%} vs `encode_batch` + ids, "
              f"{t['overhead_vs_encode_batch_fast_ids']:+.1%} vs `encode_batch_fast` + ids."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# issue 15: WARC extraction + signatures vs datatrove, and near-dup clustering at scale


def run_datatrove_warc(input_dir: str, work_dir: str) -> None:
    """Runs under the benchmark interpreter: datatrove's WarcReader + Trafilatura, then the same
    plus MinhashDedupSignature; prints JSON with wall and CPU times and the extracted texts."""
    import glob
    import gzip

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), \
            resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    shutil.rmtree(work_dir, ignore_errors=True)
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)
    out: dict = {}
    runs = {
        "extract": [WarcReader(input_dir, glob_pattern="*.warc.gz"), Trafilatura(),
                    JsonlWriter(f"{work_dir}/extracted")],
        "extract_signatures": [WarcReader(input_dir, glob_pattern="*.warc.gz"), Trafilatura(),
                               MinhashDedupSignature(output_folder=f"{work_dir}/sigs",
                                                     config=cfg)],
    }
    for name, pipeline in runs.items():
        t, c = time.perf_counter(), cpu()
        LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1,
                              logging_dir=f"{work_dir}/logs/{name}").run()
        out[f"{name}_s"] = time.perf_counter() - t
        out[f"{name}_cpu_s"] = cpu() - c
    texts = {}
    for path in sorted(glob.glob(f"{work_dir}/extracted/*")):
        with gzip.open(path, "rt") as fh:
            for line in fh:
                rec = json.loads(line)
                texts[rec["id"]] = rec["text"]
    out["texts"] = texts
    print("DATATROVE_JSON " + json.dumps(out))


def bench_warc(args: argparse.Namespace) -> dict:
    """Extraction (+ signatures) docs/s per core on generated WARCs, and main-text quality."""
    from elastic_moe.data.dedup import DedupConfig
    from elastic_moe.data.pipeline import signature_stage
    from elastic_moe.data.readers import ReaderConfig, ReadStats, read_documents
    from elastic_moe.data.sample_warc import LAYOUTS, main_text_f1, write_warc

    warc_dir = os.path.join(args.workdir, "warc")
    truth_path = os.path.join(warc_dir, "main_text.json")
    if not os.path.exists(truth_path):
        os.makedirs(warc_dir, exist_ok=True)
        truth: dict[str, str] = {}
        for i in range(args.warc_files):
            t = write_warc(os.path.join(warc_dir, f"crawl-{i:03d}.warc.gz"),
                           args.warc_pages // args.warc_files, seed=100 + i)
            truth.update(t["main_text"])
        with open(truth_path, "w") as fh:
            json.dump(truth, fh)
    with open(truth_path) as fh:
        truth = json.load(fh)
    paths = sorted(glob.glob(os.path.join(warc_dir, "*.warc.gz")))
    mb = sum(os.path.getsize(f) for f in paths) / 1e6
    layout_of = {rid: i % LAYOUTS for i, rid in enumerate(truth)}
    print(f"warc: {len(truth)} pages in {len(paths)} files, {mb:.1f} MB gzip", flush=True)

    def quality(texts: dict[str, str]) -> dict:
        per_layout: dict[int, list[dict]] = {k: [] for k in range(LAYOUTS)}
        for rid, ref in truth.items():  # a page the extractor dropped scores 0
            per_layout[layout_of[rid]].append(main_text_f1(texts.get(rid, ""), ref))
        scores = [s for v in per_layout.values() for s in v]
        mean = {k: round(statistics.mean(s[k] for s in scores), 4)
                for k in ("precision", "recall", "f1")}
        mean["pages_with_text"] = sum(1 for rid in truth if texts.get(rid, "").strip())
        mean["f1_by_layout"] = [round(statistics.mean(s["f1"] for s in v), 4)
                                for v in per_layout.values()]
        return mean

    def ours(extractor: str, signatures: bool) -> tuple[float, float, dict[str, str]]:
        reader = ReaderConfig(extractor=extractor)
        texts: dict[str, str] = {}
        t, c = time.perf_counter(), time.process_time()
        for path in paths:
            if signatures:
                signature_stage(path, reader, DedupConfig())
            else:
                stats = ReadStats(path=path)
                texts.update((d.id, d.text) for d in read_documents(path, stats, reader))
        return time.perf_counter() - t, time.process_time() - c, texts

    res: dict = {"pages": len(truth), "files": len(paths), "warc_mb": round(mb, 1)}
    runs: dict[str, list[tuple[float, float]]] = {"extract": [], "extract_signatures": []}
    texts: dict[str, str] = {}
    for _ in range(args.repeats):
        wall, cpu, texts = ours("resiliparse", False)
        runs["extract"].append((wall, cpu))
        wall, cpu, _ = ours("resiliparse", True)
        runs["extract_signatures"].append((wall, cpu))
    n = len(truth)
    res["ours"] = {name: {"wall_s": round(_median([w for w, _ in v]), 3),
                          "cpu_s": round(_median([c for _, c in v]), 3),
                          "docs_per_s_per_core": round(n / _median([c for _, c in v]), 1)}
                   for name, v in runs.items()}
    res["ours"]["quality"] = quality(texts)
    wall, cpu, traf_texts = ours("trafilatura", False)  # the same library, in our reader
    res["ours_trafilatura_extract"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                       "docs_per_s_per_core": round(n / cpu, 1),
                                       "quality": quality(traf_texts)}
    if args.datatrove_python:
        dt_runs = _datatrove_runs(args, "--run-datatrove-warc", warc_dir, "datatrove-warc",
                                  "datatrove WARC")
        dt: dict = {}
        for name in ("extract", "extract_signatures"):
            cpu = _median([x[f"{name}_cpu_s"] for x in dt_runs])
            dt[name] = {"wall_s": round(_median([x[f"{name}_s"] for x in dt_runs]), 3),
                        "cpu_s": round(cpu, 3), "docs_per_s_per_core": round(n / cpu, 1)}
        dt["quality"] = quality(dt_runs[-1]["texts"])
        res["datatrove"] = dt
        res["ratio_per_core"] = {
            name: round(res["ours"][name]["docs_per_s_per_core"]
                        / dt[name]["docs_per_s_per_core"], 2)
            for name in ("extract", "extract_signatures")}
    return res


def _planted_keys(n: int, bands: int, seed: int) -> tuple[np.ndarray, dict[int, int]]:
    """Random band keys for ``n`` documents with planted duplicate groups (~10% of documents).

    Groups of 2-6 documents; each member shares 1-3 random bands with the group's smallest
    document or with the member before it (chains). Returns the keys and the expected
    ``{removed doc: kept doc}``.
    """
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 1 << 63, size=(n, bands), dtype=np.uint64)
    sizes = rng.integers(2, 7, size=max(1, n // 40))
    docs = rng.choice(n, size=int(sizes.sum()), replace=False)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    group = np.repeat(np.arange(sizes.size), sizes)
    # sort each group's documents so the first is the smallest (the one kept)
    order = np.lexsort((docs, group))
    docs = docs[order]
    leader = np.repeat(docs[starts], sizes)
    pos = np.arange(docs.size) - np.repeat(starts, sizes)
    member = pos > 0
    prev = np.roll(docs, 1)
    src = np.where(rng.random(docs.size) < 0.5, leader, prev)
    # position by position, so a member's source (leader or previous member) is already final
    for k in range(1, int(sizes.max())):
        at = pos == k
        dst, from_ = docs[at], src[at]
        for copy in range(3):
            band = rng.integers(0, bands, dst.size)
            take = np.ones(dst.size, dtype=bool) if copy == 0 else rng.random(dst.size) < 0.5
            keys[dst[take], band[take]] = keys[from_[take], band[take]]
    return keys, dict(zip(docs[member].tolist(), leader[member].tolist(), strict=True))


def bench_cluster(args: argparse.Namespace) -> dict:
    """Single union-find task vs partitioned connected components at 10^5..10^7 documents."""
    import ray

    from elastic_moe.data.dedup import DedupConfig
    from elastic_moe.data.pipeline import near_duplicates
    from elastic_moe.data.tasks import RayRunner, peak_rss, reset_peak_rss

    ray.init(address="local", num_cpus=args.cluster_cpus, include_dashboard=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    warm = RayRunner()  # start the worker pool before anything is timed
    warm.get([warm.submit(_median, [[float(i)]])[0] for i in range(2 * args.cluster_cpus)])
    res: dict = {"docs_per_partition": args.docs_per_partition, "sizes": [],
                 "timing_repeats": args.cluster_repeats}
    for n in args.cluster_sizes:
        t = time.perf_counter()
        keys, expected = _planted_keys(n, 14, seed=n % 1000)
        print(f"cluster n={n}: keys built in {time.perf_counter() - t:.1f}s, "
              f"{len(expected)} planted duplicates", flush=True)
        doc_index = np.arange(n, dtype=np.int64)
        row: dict = {"documents": n, "planted_removed": len(expected)}
        results = {}
        paths = [("partitioned", max(2, -(-n // args.docs_per_partition)))]
        if n <= args.single_max:
            paths.insert(0, ("single_task", 1))
        for name, parts in paths:
            config = DedupConfig(cluster_partitions=parts)
            # timed without measurement (tracemalloc slows Python-heavy tasks), median of repeats
            walls = []
            for _ in range(args.cluster_repeats if n < 10**7 else min(2, args.cluster_repeats)):
                t = time.perf_counter()
                near, info = near_duplicates(keys, doc_index, config, RayRunner())
                walls.append(time.perf_counter() - t)
                del near
            wall = _median(walls)
            # ... then again with each task's peak resident memory
            runner = RayRunner(measure_memory=True)
            reset_peak_rss()
            t = time.perf_counter()
            near, info = near_duplicates(keys, doc_index, config, runner)
            measured_wall = time.perf_counter() - t
            peaks = [p / 2**20 for p in runner.peak_bytes]
            results[name] = near
            row[name] = {"wall_s": round(wall, 2), "wall_runs_s": [round(w, 2) for w in walls],
                         "measured_wall_s": round(measured_wall, 2),
                         "partitions": info["partitions"],
                         "rounds": info["rounds"], "tasks": len(peaks),
                         "max_task_peak_mb": round(max(peaks), 1),
                         "median_task_peak_mb": round(statistics.median(peaks), 1),
                         "driver_peak_rss_mb": round(peak_rss() / 2**20, 1),
                         "removed": len(near), "equals_planted": near == expected}
            print(f"  {name}: {row[name]}", flush=True)
            del near
        if len(results) == 2:
            row["same_removed"] = results["single_task"] == results["partitioned"]
        res["sizes"].append(row)
        del keys, results
    ray.shutdown()
    return res


def _warc_table(r: dict) -> str:
    o, d = r["ours"], r.get("datatrove")
    lines = [f"| {r['pages']} pages, {r['warc_mb']} MB gzip WARC | ours (resiliparse) | "
             f"datatrove 0.10.1 (WarcReader + Trafilatura) | ratio |", "|---|---:|---:|---:|"]
    for name, label in (("extract", "extraction docs/s per core"),
                        ("extract_signatures", "extraction + MinHash signatures docs/s per core")):
        lines.append(f"| {label} | {o[name]['docs_per_s_per_core']} | "
                     f"{d[name]['docs_per_s_per_core'] if d else 'n/a'} | "
                     f"{r['ratio_per_core'][name] if d else ''} |")
    for key in ("precision", "recall", "f1"):
        lines.append(f"| main-text word {key} | {o['quality'][key]} | "
                     f"{d['quality'][key] if d else 'n/a'} | |")
    lines.append(f"| F1 by layout (HTML5, div+classes, table, bare divs) | "
                 f"{o['quality']['f1_by_layout']} | {d['quality']['f1_by_layout'] if d else ''}"
                 f" | |")
    lines.append(f"| pages with any text | {o['quality']['pages_with_text']} | "
                 f"{d['quality']['pages_with_text'] if d else ''} | |")
    t = r["ours_trafilatura_extract"]
    lines += ["", f"trafilatura inside our reader (same pages): {t['docs_per_s_per_core']} docs/s "
              f"per core, F1 {t['quality']['f1']} (by layout {t['quality']['f1_by_layout']})."]
    return "\n".join(lines)


def _cluster_table(r: dict) -> str:
    lines = [f"Task peak = tracemalloc peak of what the task allocated + bytes of its input arrays "
             f"(not the ~125 MB of the worker's interpreter). Partitioned path: one partition per "
             f"{r['docs_per_partition']} documents (at least 2). Driver peak = the benchmark "
             f"process's resident high-water mark (keys, object-store pages it wrote).", "",
             "| documents | path | partitions | rounds | tasks | wall s (median) | wall s with "
             "tracemalloc "
             "| max task peak MB | median task peak MB | driver peak MB | removed = planted |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in r["sizes"]:
        for name in ("single_task", "partitioned"):
            if name not in row:
                lines.append(f"| {row['documents']:.0e} | {name} | | | | not run | | | | | |")
                continue
            x = row[name]
            lines.append(f"| {row['documents']:.0e} | {name} | {x['partitions']} | "
                         f"{x['rounds']} | {x['tasks']} | {x['wall_s']} | {x['measured_wall_s']} | "
                         f"{x['max_task_peak_mb']} | {x['median_task_peak_mb']} | "
                         f"{x['driver_peak_rss_mb']} | {x['equals_planted']} |")
        if "same_removed" in row:
            lines.append(f"| | same removed set on both paths: {row['same_removed']} | | | | | | "
                         f"| | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
