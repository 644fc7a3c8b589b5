"""Prepare training data: files -> exact/near dedup -> BPE -> packed Arrow token shards.

    python jobs/prepare_data.py --input data/crawl/ --output outputs/prepared --seq-len 4096
    python jobs/prepare_data.py --input 'data/**/*.jsonl.zst' --output out --removed-ids rm.txt
    python jobs/prepare_data.py --input data/ --output out --val-fraction 0.01 \
        --tokenizer hf-model/tokenizer.json       # held-out split, a published model's tokenizer
    python jobs/prepare_data.py --input 'cc/*.warc.gz' --output out --languages en --gopher
    ray job submit --working-dir . -- python jobs/prepare_data.py --input /shared/in --output ...

Runs the stages of ``elastic_moe.data.pipeline`` as Ray tasks: on a local Ray started here, or on
the cluster named by ``RAY_ADDRESS`` / ``--address`` (then the output directory must be on storage
every node can reach). ``--no-ray`` runs the same stages in this process. Prints a summary table;
``<output>/manifest.json`` holds the counts (documents_in, documents_kept, exact_duplicates,
near_duplicates, skipped by reason, tokens, ...). With ``--val-fraction`` the held-out documents
are packed under ``<output>/val/`` with their own ``manifest.json`` (named in the main one as
``val_manifest``), which training evaluates on every ``train.eval_every`` steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python jobs/prepare_data.py` from a checkout, without installing: put the checkout on sys.path. Never
# for an installed copy, whose parent folder is site-packages/elastic_moe.
if os.path.isfile(os.path.join(ROOT, "pyproject.toml")) and ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from elastic_moe.data.dedup import DedupConfig  # noqa: E402
from elastic_moe.data.filters import FilterConfig  # noqa: E402
from elastic_moe.data.html import EXTRACTORS  # noqa: E402
from elastic_moe.data.pipeline import (  # noqa: E402
    PrepareConfig,
    prepare,
    removed_ids,
    summary_table,
)
from elastic_moe.data.readers import ReaderConfig  # noqa: E402

logger = logging.getLogger("prepare_data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, action="append",
                   help="directory, glob or file (repeatable)")
    p.add_argument("--output", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--removed-ids", default="",
                   help="write the id of every document removed as a duplicate, one per line")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--vocab-size", type=int, default=102400, help="when training a tokenizer")
    p.add_argument("--tokenizer", default="", help="load this tokenizer.json instead of training")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the kept documents (whole documents, after "
                        "dedup) as a validation set under <output>/val/")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default="id")
    p.add_argument("--max-chars", type=int, default=1_000_000)
    p.add_argument("--ngram-size", type=int, default=5)
    p.add_argument("--num-bands", type=int, default=14)
    p.add_argument("--rows-per-band", type=int, default=8)
    p.add_argument("--extractor", default="resiliparse", choices=EXTRACTORS,
                   help="main-text extractor for the HTML of WARC response records")
    p.add_argument("--languages", default="",
                   help="comma-separated ISO 639-1 codes to keep (langid.py); default: all")
    p.add_argument("--min-language-score", type=float, default=0.5)
    p.add_argument("--gopher", action="store_true",
                   help="Gopher quality + repetition rules (Rae et al. 2021, App. A.1.1)")
    p.add_argument("--cluster-partitions", type=int, default=0,
                   help="near-dup clustering: 1 = one union-find task, >= 2 = hash-partitioned "
                        "connected components, 0 = by corpus size")
    p.add_argument("--no-near", action="store_true", help="skip MinHash near-dup removal")
    p.add_argument("--no-url", action="store_true", help="skip URL dedup")
    p.add_argument("--address", default="", help="Ray address (default: $RAY_ADDRESS or local)")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs of a local Ray (0 = all)")
    p.add_argument("--no-ray", action="store_true", help="run the stages in this process")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = PrepareConfig(
        seq_len=args.seq_len, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer,
        val_fraction=args.val_fraction,
        reader=ReaderConfig(
            text_column=args.text_column, id_column=args.id_column, max_chars=args.max_chars,
            extractor=args.extractor,
            filters=FilterConfig(
                languages=tuple(x.strip() for x in args.languages.split(",") if x.strip()),
                min_language_score=args.min_language_score, gopher_quality=args.gopher,
                gopher_repetition=args.gopher)),
        dedup=DedupConfig(ngram_size=args.ngram_size, num_bands=args.num_bands,
                          rows_per_band=args.rows_per_band, near=not args.no_near,
                          url=not args.no_url, cluster_partitions=args.cluster_partitions))
    use_ray = not args.no_ray
    if use_ray:
        import ray

        address = args.address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=args.num_cpus or None)
        logger.info("ray: %s", ray.cluster_resources())
    manifest = prepare(args.input, args.output, config, use_ray=use_ray, progress=not args.quiet)
    if args.removed_ids:
        with open(args.removed_ids, "w") as fh:
            for doc_id in removed_ids(args.output):
                fh.write(doc_id + "\n")
    print(summary_table(manifest))
    print(f"manifest: {os.path.join(os.path.abspath(args.output), 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
