"""WARC input: HTML responses -> main text, and every record without a document counted by reason.

The files are real WARCs written with warcio (and one WARC/0.18 file written byte by byte); the
reference for the extracted text is the main text planted by ``sample_warc``.
"""

import gzip
import io
import json
import os
from collections import Counter

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from elastic_moe.data.pipeline import PrepareConfig, prepare, summary_table
from elastic_moe.data.readers import ReaderConfig, ReadStats, read_documents
from elastic_moe.data.sample_warc import LAYOUTS, main_text_f1, write_warc

PARA = ("The committee published its annual report on river water quality today, and the "
        "findings show a steady improvement in most of the monitored stretches since last year. ")
ARTICLE = (f"<html><head><title>Report</title><script>var tracker = 'ga-12345';</script>"
           f"<style>.nav {{ color: red }}</style></head><body><nav><ul><li><a href='/'>Home</a>"
           f"</li><li><a href='/shop'>Shop</a></li><li><a href='/login'>Sign in</a></li></ul></nav>"
           f"<article><h1>River report</h1><p>{PARA * 3}</p><p>{PARA * 2}</p></article>"
           f"<footer>Copyright 2024 Example Media. All rights reserved.</footer></body></html>")


def _read(path, **kw):
    stats = ReadStats(path=str(path))
    return list(read_documents(str(path), stats, ReaderConfig(**kw))), stats


def _response(writer, url, body, status="200 OK", ctype="text/html; charset=utf-8"):
    http = StatusAndHeaders(status, [("Content-Type", ctype)] if ctype else [],
                            protocol="HTTP/1.1")
    rec = writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http)
    writer.write_record(rec)
    return rec.rec_headers.get_header("WARC-Record-ID")


def test_generated_crawl_main_text_kept_and_other_records_counted(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    truth = write_warc(str(path), num_pages=20, seed=1)
    docs, stats = _read(path)
    assert [d.id for d in docs] == list(truth["main_text"])
    assert all(d.url.startswith("https://site") for d in docs)
    for i, doc in enumerate(docs):
        score = main_text_f1(doc.text, truth["main_text"][doc.id])
        assert score["recall"] >= 0.97, score
        assert score["precision"] >= 0.8, score
        assert "dataLayer" not in doc.text and "font-family" not in doc.text  # scripts, styles
        if i % LAYOUTS in (0, 1):  # footers marked up as such are dropped (not in table layouts)
            assert "Privacy policy" not in doc.text
    # 20 request + 20 metadata + 1 warcinfo records, and per ten pages 3 non-documents
    assert stats.skipped == truth["no_document"]
    assert truth["no_document"] == {"warc_request": 20, "warc_metadata": 20, "warc_warcinfo": 1,
                                    "warc_non_200": 2, "warc_non_html": 2,
                                    "warc_empty_extraction": 2}
    assert stats.error == ""


def test_each_kind_of_response_is_counted_by_reason(tmp_path):
    path = tmp_path / "mixed.warc.gz"
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        good = _response(w, "https://a.org/report", ARTICLE.encode())
        _response(w, "https://a.org/img.png", b"\x89PNG\r\n\x1a\n" + os.urandom(200),
                  ctype="image/png")
        _response(w, "https://a.org/api", b'{"a": 1}', ctype="application/json")
        _response(w, "https://a.org/gone", b"<html><body>Not found</body></html>",
                  status="404 Not Found")
        _response(w, "https://a.org/moved", b"", status="301 Moved Permanently")
        # declared UTF-8, actually Windows-1252: the declared charset fails, detection recovers
        latin = ARTICLE.replace("River report", "Caf\u00e9 cr\u00e8me report")
        cp1252 = _response(w, "https://a.org/latin", latin.encode("cp1252"))
        # an unknown declared charset: detection again
        bogus = _response(w, "https://a.org/bogus", ARTICLE.encode(),
                          ctype="text/html; charset=x-klingon")
        # binary served as HTML: no charset decodes it
        _response(w, "https://a.org/binary", os.urandom(4000))
        _response(w, "https://a.org/frames", b"<html><frameset><frame src=a></frameset></html>")
        # no Content-Type at all, but the body is HTML: sniffed like a browser does
        sniffed = _response(w, "https://a.org/sniff", ARTICLE.encode(), ctype="")
        w.write_record(w.create_warc_record("dns:a.org", "response",
                                            payload=io.BytesIO(b"a.org. 300 IN A 1.2.3.4"),
                                            warc_content_type="text/dns"))
        w.write_record(w.create_revisit_record("https://a.org/report", "sha1:X", "https://a.org",
                                               "2024-01-01T00:00:00Z"))
    docs, stats = _read(path)
    assert [d.id for d in docs] == [good, cp1252, bogus, sniffed]
    text = docs[0].text
    assert "River report" in text and PARA.strip() in text
    for boiler in ("Sign in", "tracker", "color: red", "Copyright"):
        assert boiler not in text, boiler
    assert "Caf\u00e9 cr\u00e8me report" in docs[1].text
    assert stats.skipped == {"warc_non_html": 2, "warc_non_200": 2, "bad_charset": 1,
                             "warc_empty_extraction": 1, "warc_non_http": 1, "warc_revisit": 1}
    assert stats.repaired == {"charset_fallback": 2}
    assert stats.error == ""


def _old_record(kind: str, url: str, block: bytes, num: int, content_type: str) -> bytes:
    head = (f"WARC/0.18\r\nWARC-Type: {kind}\r\nWARC-Target-URI: {url}\r\n"
            f"WARC-Date: 2009-03-01T12:00:00Z\r\nWARC-Record-ID: <urn:uuid:0000-{num}>\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(block)}\r\n\r\n")
    return head.encode() + block + b"\r\n\r\n"


def test_warc_018_file_like_clueweb09(tmp_path):
    http = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=iso-8859-1\r\n\r\n"
            + ARTICLE.replace("River report", "R\u00e9sum\u00e9 of the report").encode("latin-1"))
    data = (_old_record("warcinfo", "", b"software: Nutch 1.0\r\n", 0, "application/warc-fields")
            + _old_record("response", "http://old.example/1", http, 1,
                          "application/http;msgtype=response")
            + _old_record("response", "http://old.example/2", http.replace(b"200 OK", b"500 Err"),
                          2, "application/http;msgtype=response"))
    path = tmp_path / "clueweb.warc.gz"
    path.write_bytes(gzip.compress(data))
    docs, stats = _read(path)
    assert [(d.id, d.url) for d in docs] == [("<urn:uuid:0000-1>", "http://old.example/1")]
    assert "R\u00e9sum\u00e9 of the report" in docs[0].text
    assert stats.skipped == {"warc_warcinfo": 1, "warc_non_200": 1}
    assert stats.error == ""


def test_truncated_member_keeps_earlier_pages_and_reports_the_file(tmp_path):
    full = tmp_path / "full.warc.gz"
    truth = write_warc(str(full), num_pages=30, seed=2, extra_responses=False)
    data = full.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) * 6 // 10])
    docs, stats = _read(cut)
    ids = list(truth["main_text"])
    assert 0 < len(docs) < 30
    assert [d.id for d in docs] == ids[: len(docs)]  # a prefix, every one complete
    for doc in docs:
        assert main_text_f1(doc.text, truth["main_text"][doc.id])["recall"] >= 0.97
    assert stats.error.startswith("EOFError") and stats.skipped["file_error"] == 1
    # an uncompressed WARC cut inside a page: the short record itself is the sign
    plain = tmp_path / "cut.warc"
    raw = gzip.decompress(data)
    plain.write_bytes(raw[: raw.index(b"</h1>", len(raw) // 2)])
    docs, stats = _read(plain)
    assert 0 < len(docs) < 30 and "truncated WARC record" in stats.error
    assert [d.id for d in docs] == ids[: len(docs)]


def test_prepare_on_warc_reports_counts(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    truth = write_warc(str(inp / "a.warc.gz"), num_pages=30, seed=3)
    manifest = prepare(str(inp), str(tmp_path / "out"), PrepareConfig(seq_len=64, vocab_size=300),
                       use_ray=False, progress=False)
    assert manifest["documents_in"] == 30
    expected = Counter(truth["no_document"])
    assert {k: v for k, v in manifest["skipped"].items() if k.startswith("warc_")} == expected
    assert manifest["repaired"] == {}
    assert manifest["near_dedup"] == {"path": "single_task", "partitions": 1, "rounds": 1}
    table = summary_table(manifest)
    assert "skipped: warc_non_200" in table and "skipped: warc_empty_extraction" in table
    assert manifest["num_sequences"] > 0


def test_prepare_data_cli_with_filters_and_partitioned_clustering(tmp_path, capsys):
    import elastic_moe.jobs.prepare_data as cli

    inp = tmp_path / "in"
    inp.mkdir()
    truth = write_warc(str(inp / "a.warc.gz"), num_pages=24, seed=4)
    removed = tmp_path / "removed.txt"
    rc = cli.main(["--input", str(inp), "--output", str(tmp_path / "out"), "--no-ray", "--quiet",
                   "--seq-len", "64", "--vocab-size", "300", "--languages", "en", "--gopher",
                   "--cluster-partitions", "2", "--removed-ids", str(removed)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "skipped: warc_request" in out and "near-dup clustering" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["near_dedup"]["path"] == "partitioned"
    filtered = sum(v for k, v in manifest["skipped"].items() if k.startswith(("lang_", "gopher_")))
    assert manifest["documents_in"] + filtered == len(truth["main_text"])
    assert set(removed.read_text().split()) <= set(truth["main_text"])
