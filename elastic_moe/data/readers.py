"""Readers for Common-Crawl-style inputs: WARC/WET, JSONL(.gz/.zst) and Parquet.

Implements step 1 of the data flow in docs/architecture.md ("read Common-Crawl-style records"). WARC and WET
files go through ``warc.py``: WET ``conversion`` records hold Common Crawl's plain text, WARC
``response`` records hold the crawled HTML, reduced to its main text (``html.py``); every other
record is counted by reason. JSONL and Parquet carry one document per line / row with a text
column. The optional quality and language filters of ``filters.py`` run last, on every format.

Bad data never crashes a job: a malformed record, an undecodable one, an empty or a giant
document is skipped and counted by reason in :class:`ReadStats`; a file that cannot be read to the
end (truncated gzip, missing text column, unknown format) is recorded as a per-file error with the
documents read before the failure kept, and the other files go on.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from elastic_moe.data.filters import FilterConfig, build_filter
from elastic_moe.data.html import EXTRACTORS

logger = logging.getLogger(__name__)

WARC_SUFFIXES = (".warc.wet.gz", ".wet.gz", ".warc.gz", ".wet", ".warc")  # WARC and WET
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = WARC_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass(kw_only=True, slots=True)
class ReaderConfig:
    """What counts as a usable document and where its fields are."""

    text_column: str = "text"  # JSONL key / Parquet column with the document text
    id_column: str = "id"  # JSONL key / Parquet column with the document id
    url_column: str = "url"  # optional; used for URL dedup
    min_chars: int = 1  # shorter (after strip) = "empty"
    max_chars: int = 1_000_000  # longer = "too_long": giant pages are usually dumps, not prose
    extractor: str = "resiliparse"  # main-text extractor for WARC HTML (html.EXTRACTORS)
    filters: FilterConfig = field(default_factory=FilterConfig)  # all off by default

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise ValueError(f"min_chars={self.min_chars!r}: must be >= 0")
        if self.max_chars <= self.min_chars:
            raise ValueError(f"max_chars={self.max_chars!r}: must be > min_chars "
                             f"({self.min_chars})")
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"extractor={self.extractor!r}: must be one of {EXTRACTORS}")


@dataclass(slots=True)
class Document:
    """One input document; ``text`` is stored untouched (normalization is only for dedup keys)."""

    id: str  # JSONL/Parquet id field, WET WARC-Record-ID; "<file>:<n>" when absent
    text: str
    url: str = ""


@dataclass(slots=True)
class ReadStats:
    """Per-file outcome: documents read, skips by reason, and a file-level error if any."""

    path: str
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)  # kept after a repair (charset fallback)
    error: str = ""  # non-empty when the file could not be read to its end

    def merge_into(self, skipped: Counter, repaired: Counter | None = None) -> None:
        skipped.update(self.skipped)
        if repaired is not None:
            repaired.update(self.repaired)


def list_inputs(spec: str | list[str]) -> list[str]:
    """Expand ``spec`` (a directory, a glob, a file, or a list of them) into sorted input files.

    Sorted order makes the global document order (and so which duplicate is kept) deterministic.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: set[str] = set()
    for item in specs:
        if os.path.isdir(item):
            for root, _, names in os.walk(item):
                for name in names:
                    if name.endswith(ALL_SUFFIXES):
                        files.add(os.path.join(root, name))
        elif os.path.isfile(item):
            files.add(item)
        else:
            matched = glob.glob(item, recursive=True)
            if not matched:
                raise ValueError(f"input={item!r}: no such file, directory or glob match")
            files.update(m for m in matched if os.path.isfile(m))
    if not files:
        raise ValueError(f"input={spec!r}: no input files with a known suffix {ALL_SUFFIXES}")
    return sorted(os.path.abspath(f) for f in files)


def file_format(path: str) -> str:
    """``"warc"`` (WARC or WET), ``"jsonl"`` or ``"parquet"`` by suffix; ValueError otherwise."""
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(WARC_SUFFIXES):
        return "warc"
    raise ValueError(f"path={path!r}: unknown input format; expected one of {ALL_SUFFIXES}")


def read_documents(path: str, stats: ReadStats, config: ReaderConfig | None = None
                   ) -> Iterator[Document]:
    """Yield the usable documents of one file, counting skips and file errors into ``stats``.

    The generator never raises for bad data: an exception while reading the file ends it with
    ``stats.error`` set (documents already yielded stay valid).
    """
    config = config or ReaderConfig()
    try:
        fmt = file_format(path)
        raw = {"warc": _read_warc, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt](
            path, stats, config)
        quality = build_filter(config.filters)
        for doc in raw:
            if _keep(doc, stats, config) and quality.keep(doc.text, stats.skipped):
                stats.documents += 1
                yield doc
    except Exception as exc:  # noqa: BLE001 - any reader failure is a per-file error, by design
        stats.error = f"{type(exc).__name__}: {exc}"
        stats.skipped["file_error"] += 1
        logger.warning("input %s: stopped after %d documents: %s", path, stats.documents,
                       stats.error)


def _keep(doc: Document, stats: ReadStats, config: ReaderConfig) -> bool:
    n = len(doc.text.strip())
    if n < config.min_chars:
        stats.skipped["empty"] += 1
        return False
    if len(doc.text) > config.max_chars:
        stats.skipped["too_long"] += 1
        return False
    return True


def _decode(payload: bytes, stats: ReadStats) -> str | None:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped["bad_encoding"] += 1
        return None


def _read_warc(path: str, stats: ReadStats, config: ReaderConfig) -> Iterator[Document]:
    from elastic_moe.data.warc import read_warc

    for record_id, url, text in read_warc(path, stats.skipped, stats.repaired, config.extractor):
        yield Document(id=record_id, text=text, url=url)


def _open_text_stream(path: str) -> io.BufferedIOBase:
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        import zstandard

        # the zstd reader has readinto but no readline; BufferedReader adds line iteration
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"),
                                                            read_across_frames=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]
    return open(path, "rb")


def _read_jsonl(path: str, stats: ReadStats, config: ReaderConfig) -> Iterator[Document]:
    base = os.path.basename(path)
    with _open_text_stream(path) as fh:
        for lineno, raw_line in enumerate(fh):
            if not raw_line.strip():
                continue
            line = _decode(raw_line, stats)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                stats.skipped["bad_json"] += 1
                continue
            if not isinstance(obj, dict):
                stats.skipped["not_object"] += 1
                continue
            text = obj.get(config.text_column)
            if not isinstance(text, str):
                stats.skipped["missing_text"] += 1
                continue
            doc_id = obj.get(config.id_column)
            yield Document(id=str(doc_id) if doc_id is not None else f"{base}:{lineno}",
                           text=text, url=str(obj.get(config.url_column) or ""))


def _read_parquet(path: str, stats: ReadStats, config: ReaderConfig) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if config.text_column not in names:
        raise ValueError(f"text_column={config.text_column!r}: not a column of {path} "
                         f"(columns: {names})")
    columns = [c for c in (config.text_column, config.id_column, config.url_column) if c in names]
    base = os.path.basename(path)
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        data = batch.to_pydict()
        texts = data[config.text_column]
        ids = data.get(config.id_column, [None] * len(texts))
        urls = data.get(config.url_column, [None] * len(texts))
        for text, doc_id, url in zip(texts, ids, urls, strict=True):
            row += 1
            if not isinstance(text, str):
                stats.skipped["missing_text"] += 1
                continue
            yield Document(id=str(doc_id) if doc_id is not None else f"{base}:{row - 1}",
                           text=text, url=str(url or ""))
