"""The bundled sample corpus: built offline from text that ships with Python, with planted dups.

docs/architecture.md's embedded default ("prepares the bundled sample corpus") and the dedup tests need a
corpus with *known* duplicates and no network. Sentences come from Python's own documentation
(``pydoc_data.topics``, the help() text of the language reference) and the docstrings of the
standard library's modules. Each original document draws its sentences at random from that pool,
so two originals share almost no word 5-grams; then we plant

* **exact** copies (identical text, new id and URL),
* **near** copies: ~1-3% word edits (substitute/delete/insert) or a changed footer line; only
  copies whose word 5-gram Jaccard with the original is >= 0.8 are planted (the value is recorded),
* **URL** duplicates: a re-crawl of an original's URL with new content.

Files are real formats: WET (WARC ``conversion`` records, gzip, via warcio) and JSONL (plain and
gzip). ``ground_truth.json`` lists every planted group; :func:`score_removed` turns a set of
removed ids into recall/precision against it.
"""

from __future__ import annotations

import ast
import fcntl
import functools
import gzip
import io
import json
import logging
import os
import random
import re
import shutil
import sysconfig
import uuid
from collections.abc import Callable
from typing import Any

from elastic_moe.data.normalize import normalize

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1  # bump when the generator changes: cached corpora are keyed by it
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_FOOTERS = [
    "Share this page with your friends and colleagues on social media today.",
    "All rights reserved by the original authors and contributors of this site.",
    "Subscribe to our newsletter for weekly updates about new articles and releases.",
    "Comments are closed for this article but you may still contact the editors.",
    "This page was archived from an older version of the documentation website.",
    "Follow us for more tutorials about programming languages and software tools.",
]


def _sentences(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        for s in _SENT_SPLIT.split(" ".join(para.split())):
            words = s.split()
            if 6 <= len(words) <= 60 and sum(c.isalpha() for c in s) > 0.7 * len(s):
                out.append(s)
    return out


@functools.lru_cache(maxsize=1)
def sentence_pool() -> tuple[str, ...]:
    """Unique English sentences from Python's help topics and stdlib docstrings (sorted).

    Cached: parsing the stdlib takes seconds and the result never changes within a process."""
    import pydoc_data.topics

    pool = set()
    for key in sorted(pydoc_data.topics.topics):
        pool.update(_sentences(pydoc_data.topics.topics[key]))
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # an unparsable stdlib file only shrinks the pool
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    pool.update(_sentences(doc))
    return tuple(sorted(pool))


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact word n-gram Jaccard of the normalized texts (the quantity MinHash estimates)."""
    def grams(t: str) -> set[tuple[str, ...]]:
        w = normalize(t).split()
        return {tuple(w[i: i + n]) for i in range(max(1, len(w) - n + 1))}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / max(1, len(ga | gb))


def _make_doc(rng: random.Random, pool: tuple[str, ...], min_s: int, max_s: int) -> str:
    sents = rng.sample(pool, rng.randint(min_s, max_s))
    paras, i = [], 0
    while i < len(sents):
        k = rng.randint(2, 5)
        paras.append(" ".join(sents[i: i + k]))
        i += k
    return "\n\n".join(paras)


def _edit_words(rng: random.Random, text: str, rate: float, vocab: list[str]) -> str:
    words = text.split(" ")
    for _ in range(max(1, round(rate * len(words)))):
        op, j = rng.random(), rng.randrange(len(words))
        if op < 0.5:
            words[j] = rng.choice(vocab)
        elif op < 0.75 and len(words) > 1:
            del words[j]
        else:
            words.insert(j, rng.choice(vocab))
    return " ".join(words)


def generate(out_dir: str, num_docs: int = 1200, seed: int = 0, min_sentences: int = 6,
             max_sentences: int = 20, exact_frac: float = 0.08, near_frac: float = 0.12,
             url_frac: float = 0.01, num_wet: int = 2, num_jsonl: int = 2,
             jsonl_gzip: bool = True) -> dict[str, Any]:
    """Write the corpus (WET + JSONL files and ``ground_truth.json``) into ``out_dir``.

    ``num_docs`` originals; ``exact_frac``/``near_frac``/``url_frac`` of them get planted copies
    (near-copied originals get one or two copies). Every other JSONL file is gzipped unless
    ``jsonl_gzip`` is False. Deterministic for a given Python and seed.
    Returns the ground truth.
    """
    rng = random.Random(seed)
    pool = sentence_pool()
    if len(pool) < 1000:
        raise RuntimeError(f"sentence pool has only {len(pool)} sentences (need >= 1000)")
    vocab = sorted({w for s in pool[:2000] for w in s.split() if w.isalpha()})
    docs: list[dict[str, Any]] = []  # {"key", "text", "url"}
    for i in range(num_docs):
        text = _make_doc(rng, pool, min_sentences, max_sentences)
        if rng.random() < 0.3:  # site boilerplate, so "changed footer" copies are realistic
            text += "\n\n" + rng.choice(_FOOTERS)
        docs.append({"key": f"orig-{i}", "text": text, "url": f"https://example.org/page/{i}"})
    order = list(range(num_docs))
    rng.shuffle(order)
    n_exact, n_near, n_url = (round(f * num_docs) for f in (exact_frac, near_frac, url_frac))
    exact_src = order[:n_exact]
    near_src = order[n_exact: n_exact + n_near]
    url_src = order[n_exact + n_near: n_exact + n_near + n_url]
    groups: list[dict[str, Any]] = []
    copies: list[dict[str, Any]] = []
    for j, i in enumerate(exact_src):
        key = f"exact-{j}"
        copies.append({"key": key, "text": docs[i]["text"], "url": f"https://mirror.example/{j}"})
        groups.append({"kind": "exact", "original": f"orig-{i}", "copies": [key]})
    for j, i in enumerate(near_src):
        group: dict[str, Any] = {"kind": "near", "original": f"orig-{i}", "copies": [],
                                 "jaccard": []}
        for c in range(1 + (rng.random() < 0.3)):
            original = docs[i]["text"]
            for _ in range(20):  # retry until the copy is a near dup by the definition
                if rng.random() < 0.25:
                    body = original.rsplit("\n\n", 1)[0] if original.endswith(
                        tuple(_FOOTERS)) else original
                    text = body + "\n\n" + rng.choice(_FOOTERS) + " " + rng.choice(_FOOTERS)
                else:
                    text = _edit_words(rng, original, rng.uniform(0.005, 0.03), vocab)
                jac = shingle_jaccard(original, text)
                if 0.8 <= jac < 1.0:
                    break
            else:
                continue
            key = f"near-{j}-{c}"
            copies.append({"key": key, "text": text, "url": f"https://copy.example/{j}/{c}"})
            group["copies"].append(key)
            group["jaccard"].append(round(jac, 4))
        if group["copies"]:
            groups.append(group)
    for j, i in enumerate(url_src):
        key = f"url-{j}"
        copies.append({"key": key, "text": _make_doc(rng, pool, min_sentences, max_sentences),
                       "url": docs[i]["url"]})
        groups.append({"kind": "url", "original": f"orig-{i}", "copies": [key]})
    everything = docs + copies
    rng.shuffle(everything)

    os.makedirs(out_dir, exist_ok=True)
    num_files = num_wet + num_jsonl
    ids: dict[str, str] = {}
    for f in range(num_files):
        part = everything[f::num_files]
        if f < num_wet:
            path = os.path.join(out_dir, f"crawl-{f:03d}.warc.wet.gz")
            for d in part:
                ids[d["key"]] = f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, d['key'] + str(seed))}>"
            _write_wet(path, part, ids)
        else:
            suffix = ".jsonl.gz" if jsonl_gzip and (f - num_wet) % 2 else ".jsonl"
            path = os.path.join(out_dir, f"docs-{f - num_wet:03d}{suffix}")
            for d in part:
                ids[d["key"]] = f"doc-{d['key']}"
            _write_jsonl(path, part, ids)
    truth = {
        "version": CORPUS_VERSION, "seed": seed, "num_documents": len(everything),
        "num_originals": num_docs,
        "groups": [{**g, "original": ids[g["original"]], "copies": [ids[c] for c in g["copies"]]}
                   for g in groups],
    }
    with open(os.path.join(out_dir, "ground_truth.json"), "w") as fh:
        json.dump(truth, fh, indent=1)
    logger.info("sample corpus: %d documents (%d planted groups) in %s", len(everything),
                len(groups), out_dir)
    return truth


def _write_wet(path: str, docs: list[dict[str, Any]], ids: dict[str, str]) -> None:
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        writer.write_record(writer.create_warcinfo_record(
            os.path.basename(path), {"software": "elastic-moe sample_corpus",
                                     "description": "synthetic WET for tests"}))
        for d in docs:
            headers = {"WARC-Record-ID": ids[d["key"]], "WARC-Date": "2024-01-01T00:00:00Z",
                       "Content-Type": "text/plain"}
            writer.write_record(writer.create_warc_record(
                d["url"], "conversion", payload=io.BytesIO(d["text"].encode("utf-8")),
                warc_headers_dict=headers))


def _write_jsonl(path: str, docs: list[dict[str, Any]], ids: dict[str, str]) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"id": ids[d["key"]], "url": d["url"], "text": d["text"]}) + "\n")


def score_removed(removed: set[str], truth: dict[str, Any]) -> dict[str, float]:
    """Recall per planted kind and precision of a removed-id set against the ground truth.

    A planted group of k documents (original + copies) is fully handled when k - 1 of its members
    are removed (which member survives does not matter). Recall of a kind = removed members,
    capped at k - 1 per group, over the sum of k - 1. Precision = those correct removals over all
    removals (removing an unrelated document, or every member of a group, is a false positive).
    """
    member_group = {}
    for g, group in enumerate(truth["groups"]):
        for doc in [group["original"], *group["copies"]]:
            member_group[doc] = g
    removed_per_group: dict[int, int] = {}
    for doc in removed:
        if doc in member_group:
            g = member_group[doc]
            removed_per_group[g] = removed_per_group.get(g, 0) + 1
    out: dict[str, float] = {}
    correct_total = 0
    for kind in ("exact", "near", "url"):
        want = got = 0
        for g, group in enumerate(truth["groups"]):
            if group["kind"] == kind:
                k1 = len(group["copies"])
                want += k1
                got += min(removed_per_group.get(g, 0), k1)
        out[f"{kind}_recall"] = got / want if want else 1.0
        out[f"{kind}_planted"] = want
        correct_total += got
    out["removed"] = len(removed)
    out["precision"] = correct_total / len(removed) if removed else 1.0
    return out


def _prepare_once(cache_dir: str, corpus_name: str, out_name: str,
                  make_corpus: Callable[[str], Any], prepare_cfg: Any, use_ray: bool) -> str:
    """``cache_dir/out_name/manifest.json``, made if missing: the corpus is generated by
    ``make_corpus(directory)`` into ``cache_dir/corpus_name`` (kept for the next call) and
    prepared with ``prepare_cfg``. A file lock serializes processes; each directory appears
    atomically by rename."""
    from elastic_moe.data.pipeline import prepare

    corpus_dir = os.path.join(cache_dir, corpus_name)
    out_dir = os.path.join(cache_dir, out_name)
    manifest = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest):
        return manifest
    with open(os.path.join(cache_dir, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(manifest):  # another process finished while we waited
            return manifest
        if not os.path.exists(os.path.join(corpus_dir, "ground_truth.json")):
            tmp = corpus_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            make_corpus(tmp)
            shutil.rmtree(corpus_dir, ignore_errors=True)
            os.replace(tmp, corpus_dir)
        tmp_out = out_dir + ".tmp"
        shutil.rmtree(tmp_out, ignore_errors=True)
        prepare(corpus_dir, tmp_out, prepare_cfg, use_ray=use_ray, progress=False)
        os.replace(tmp_out, out_dir)
    return manifest


def ensure_prepared(cache_dir: str, vocab_size: int, seq_len: int, use_ray: bool = False) -> str:
    """Generate the bundled corpus under ``cache_dir`` if needed, prepare it, return the manifest.

    Idempotent and safe to call from several processes at once (a file lock serializes them; the
    prepared directory appears atomically by rename). The default runs the pipeline stages
    in-process (``use_ray=False``): on the small corpus Ray task start-up would dominate. The
    corpus (~1,400 documents, WET + JSONL) yields a few thousand sequences of ``seq_len + 1``
    tokens at vocab 2048 / seq_len 128. Returns the path of ``manifest.json``.
    """
    from elastic_moe.data.pipeline import PrepareConfig

    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    return _prepare_once(cache_dir, f"sample-corpus-v{CORPUS_VERSION}",
                         f"prepared-v{CORPUS_VERSION}-vocab{vocab_size}-seq{seq_len}", generate,
                         PrepareConfig(seq_len=seq_len, vocab_size=vocab_size), use_ray)


def ensure_validation(cache_dir: str, vocab_size: int, seq_len: int) -> str:
    """A validation set for the bundled corpus; returns its ``manifest.json``.

    The bundled training data stays exactly what :func:`ensure_prepared` makes (runs and tests
    depend on it), so the held-out documents are not taken from it: they are new originals from
    the same generator with another seed (no planted copies), tokenized with the training
    tokenizer. Sentences come from the same pool, so like any two originals they share almost
    no word 5-grams with a training document: none is a near-duplicate of one. Idempotent and
    process-safe like :func:`ensure_prepared`.
    """
    from elastic_moe.data.pipeline import PrepareConfig

    train_manifest = ensure_prepared(cache_dir, vocab_size, seq_len)
    cache_dir = os.path.abspath(cache_dir)
    tokenizer = os.path.join(os.path.dirname(train_manifest), "tokenizer.json")

    def originals(directory: str) -> None:
        generate(directory, num_docs=80, seed=1, exact_frac=0.0, near_frac=0.0, url_frac=0.0,
                 num_wet=0, num_jsonl=1)

    return _prepare_once(cache_dir, f"validation-corpus-v{CORPUS_VERSION}",
                         f"validation-v{CORPUS_VERSION}-vocab{vocab_size}-seq{seq_len}",
                         originals, PrepareConfig(seq_len=seq_len, tokenizer_path=tokenizer),
                         use_ray=False)
