"""WARC and WET records -> (record id, URL, text), every record without a document counted.

Common Crawl ships each crawl as WARC (the raw HTTP exchanges: ``request``, ``response`` and
``metadata`` records), WET (``conversion`` records with its own plain-text extraction) and WAT
files. Both WARC kinds go through one reader:

* ``conversion`` records (WET): the block is the text, decoded as UTF-8.
* ``response`` records (WARC): HTTP status 200 with an HTML body (``text/html`` or
  ``application/xhtml+xml``) is decoded (``html.decode_html``: declared charset, meta tag,
  uchardet) and reduced to its main text (``html.extract_main_text``).
* anything else yields no document and is counted, so a WARC that gives 0 documents says why.

Counted reasons (keys of ``ReadStats.skipped``): ``warc_<type>`` for record types that never
hold a document (``warc_request``, ``warc_metadata``, ``warc_warcinfo``, ``warc_revisit``, ...),
``warc_non_http`` (a response that is not HTTP, e.g. DNS), ``warc_non_200`` (redirects, errors),
``warc_non_html`` (images, PDFs, JSON, ...), ``bad_charset``, ``bad_encoding`` (a WET block that
is not UTF-8), ``warc_extract_error`` (the HTML parser failed), ``warc_empty_extraction`` (no main
text left: a frameset, a page of menus), ``missing_id``. Repairs that keep the record (a wrong or
unknown declared charset) are counted in ``ReadStats.repaired``.

Old WARC/0.17 and WARC/0.18 files (e.g. ClueWeb09) are read by warcio like WARC/1.0. We
decompress gzip ourselves (:class:`GzipStream`) because gzip.GzipFile, and warcio over it, stop
quietly at a cut member: a truncated file raises ``EOFError`` after the documents before the cut,
and the reader records it as a per-file error (the same as a truncated WET file).
"""

from __future__ import annotations

import io
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

from elastic_moe.data.html import decode_html, extract_main_text

logger = logging.getLogger(__name__)

HTML_TYPES = ("text/html", "application/xhtml+xml")


class GzipStream(io.RawIOBase):
    """Multi-member gzip decompression that flags a truncated stream instead of hiding it."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self._raw = raw
        self._dec = zlib.decompressobj(wbits=31)
        self._buf = b""
        self._pos = 0  # read offset into _buf (slicing a large buffer per read would be O(n^2))
        self._in_member = False
        self.truncated = False

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:  # type: ignore[no-untyped-def]
        while self._pos >= len(self._buf):
            chunk = self._raw.read(1 << 16)
            if not chunk:
                self.truncated = self._in_member
                return 0
            parts = []
            while chunk:
                self._in_member = True
                parts.append(self._dec.decompress(chunk))
                if self._dec.eof:  # member done; the rest of the chunk starts the next one
                    chunk = self._dec.unused_data
                    self._dec = zlib.decompressobj(wbits=31)
                    self._in_member = False
                else:
                    chunk = b""
            self._buf, self._pos = b"".join(parts), 0
        n = min(len(out), len(self._buf) - self._pos)
        out[:n] = self._buf[self._pos: self._pos + n]
        self._pos += n
        return n


def read_warc(path: str, skipped: Counter, repaired: Counter, extractor: str = "resiliparse"
              ) -> Iterator[tuple[str, str, str]]:
    """Yield ``(record id, target URL, text)`` per document record of a WARC/WET file.

    Raises ``EOFError`` at a truncated gzip member or record, after the documents before it.
    """
    gz = path.lower().endswith(".gz")
    with open(path, "rb") as raw:
        fh: Any = GzipStream(raw) if gz else raw
        try:
            yield from _records(fh, skipped, repaired, extractor)
        except (ValueError, ImportError):
            raise
        except Exception as exc:
            if gz and fh.truncated:  # warcio fails on a record cut inside its headers
                raise EOFError("truncated gzip stream (compressed file ended mid-member)"
                               ) from exc
            raise ValueError(f"malformed or truncated WARC record: {type(exc).__name__}: "
                             f"{exc}") from exc
        if gz and fh.truncated:
            raise EOFError("truncated gzip stream (compressed file ended mid-member)")


def _records(fh: Any, skipped: Counter, repaired: Counter, extractor: str
             ) -> Iterator[tuple[str, str, str]]:
    from warcio.archiveiterator import ArchiveIterator

    stream = io.BufferedReader(fh, 1 << 20) if isinstance(fh, io.RawIOBase) else fh
    for record in ArchiveIterator(stream):
        kind = record.rec_type
        record_id = record.rec_headers.get_header("WARC-Record-ID") or ""
        if kind not in ("conversion", "response"):
            while record.raw_stream.read(1 << 16):  # read through it to see it is whole
                pass
            _check_whole(record, record_id)
            skipped[f"warc_{kind}"] += 1
            continue
        url = record.rec_headers.get_header("WARC-Target-URI") or ""
        payload = record.content_stream().read()
        _check_whole(record, record_id)
        if kind == "conversion":
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                skipped["bad_encoding"] += 1
                continue
        else:
            html_text = _response_text(record, payload, skipped, repaired, extractor)
            if html_text is None:
                continue
            text = html_text
        if not record_id:
            skipped["missing_id"] += 1
            continue
        yield record_id, url, text


def _check_whole(record: Any, record_id: str) -> None:
    # warcio ends quietly on a cut record: bytes of the block left unread are the only sign
    left = getattr(record.raw_stream, "limit", 0)
    if left:
        raise EOFError(f"truncated WARC record {record_id or '?'}: {left} bytes of its block "
                       f"missing (file cut short?)")


def _response_text(record: Any, payload: bytes, skipped: Counter, repaired: Counter,
                   extractor: str) -> str | None:
    http = record.http_headers
    if http is None or not (http.protocol or "").upper().startswith("HTTP"):
        skipped["warc_non_http"] += 1
        return None
    if http.get_statuscode() != "200":
        skipped["warc_non_200"] += 1
        return None
    content_type = http.get_header("Content-Type") or ""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime not in HTML_TYPES:
        # no Content-Type: sniff, as browsers do; Common Crawl records the identified type too
        identified = (record.rec_headers.get_header("WARC-Identified-Payload-Type") or "").lower()
        sniffed = identified in HTML_TYPES or _looks_like_html(payload)
        if mime or not sniffed:
            skipped["warc_non_html"] += 1
            return None
    decoded = decode_html(payload, content_type)
    if decoded.text is None:
        skipped["bad_charset"] += 1
        return None
    if decoded.repair:
        repaired[decoded.repair] += 1
    try:
        text = extract_main_text(decoded.text, extractor)
    except ImportError:  # a missing extractor package is a setup error, not a bad page
        raise
    except Exception as exc:  # noqa: BLE001 - a page the parser rejects is one record, counted
        logger.debug("extraction failed for %s: %s", record.rec_headers.get_header(
            "WARC-Target-URI"), exc)
        skipped["warc_extract_error"] += 1
        return None
    if not text.strip():
        skipped["warc_empty_extraction"] += 1
        return None
    return text


def _looks_like_html(payload: bytes) -> bool:
    head = payload[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))
