"""Readers: every format, and bad input that is counted or reported per file, never fatal."""

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from warcio.warcwriter import WARCWriter

from elastic_moe.data.pipeline import PrepareConfig, prepare
from elastic_moe.data.readers import ReaderConfig, ReadStats, list_inputs, read_documents

TEXT = "The quick brown fox jumps over the lazy dog and keeps running far away. " * 3


def _wet(path, payloads):
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        writer.write_record(writer.create_warcinfo_record("x.wet.gz", {"software": "test"}))
        for i, payload in enumerate(payloads):
            writer.write_record(writer.create_warc_record(
                f"https://x.org/{i}", "conversion", payload=io.BytesIO(payload),
                warc_headers_dict={"WARC-Record-ID": f"<urn:test:{i}>"}))


def _read(path, **kw):
    stats = ReadStats(path=str(path))
    docs = list(read_documents(str(path), stats, ReaderConfig(**kw)))
    return docs, stats


def test_wet_reads_conversion_records_and_counts_bad_utf8(tmp_path):
    path = tmp_path / "a.warc.wet.gz"
    _wet(path, [TEXT.encode(), b"caf\xe9 \xff broken bytes", b"   ", TEXT.encode() + b"!"])
    docs, stats = _read(path)
    assert [d.id for d in docs] == ["<urn:test:0>", "<urn:test:3>"]
    assert docs[0].url == "https://x.org/0" and docs[0].text == TEXT
    assert stats.skipped == {"bad_encoding": 1, "empty": 1, "warc_warcinfo": 1}
    assert stats.error == ""


def test_truncated_gzip_keeps_documents_before_the_cut(tmp_path):
    good = tmp_path / "good.warc.wet.gz"
    _wet(good, [TEXT.encode()] * 50)
    data = good.read_bytes()
    cut = tmp_path / "cut.warc.wet.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    docs, stats = _read(cut)
    assert 0 < len(docs) < 50
    assert stats.error and stats.skipped["file_error"] == 1

    jsonl = tmp_path / "cut.jsonl.gz"
    with gzip.open(jsonl, "wt") as fh:
        for i in range(200):
            fh.write(json.dumps({"id": f"d{i}", "text": TEXT}) + "\n")
    raw = jsonl.read_bytes()
    jsonl.write_bytes(raw[: len(raw) // 2])
    docs, stats = _read(jsonl)
    assert 0 < len(docs) < 200
    assert stats.error.startswith("EOFError")


def test_jsonl_bad_lines_are_counted_by_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"id": "ok1", "text": TEXT, "url": "u1"}).encode(),
             b"[1, 2, 3]", b'"just a string"', b"{not json", json.dumps({"id": "x"}).encode(),
             b'{"id": "bad", "text": "caf\xe9"}', json.dumps({"text": TEXT}).encode(),
             json.dumps({"id": "big", "text": "x" * 5000}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs, stats = _read(path, max_chars=1000)
    assert [d.id for d in docs] == ["ok1", "mixed.jsonl:6"]
    assert docs[0].url == "u1"
    assert stats.skipped == {"not_object": 2, "bad_json": 1, "missing_text": 1,
                             "bad_encoding": 1, "too_long": 1}


def test_jsonl_zstd_and_parquet(tmp_path):
    zst = tmp_path / "a.jsonl.zst"
    payload = "".join(json.dumps({"id": f"z{i}", "text": TEXT}) + "\n" for i in range(10))
    zst.write_bytes(zstandard.ZstdCompressor().compress(payload.encode()))
    docs, stats = _read(zst)
    assert [d.id for d in docs] == [f"z{i}" for i in range(10)] and not stats.error

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": ["p0", "p1", "p2"], "content": [TEXT, None, TEXT]}), good)
    docs, stats = _read(good, text_column="content")
    assert [d.id for d in docs] == ["p0", "p2"] and stats.skipped == {"missing_text": 1}

    docs, stats = _read(good)  # default text column "text" is missing
    assert docs == []
    assert "text_column='text'" in stats.error and "content" in stats.error


def test_list_inputs_rejects_nothing_found(tmp_path):
    with pytest.raises(ValueError, match="input="):
        list_inputs(str(tmp_path / "nope-*.jsonl"))
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("ignored")
    assert list_inputs(str(tmp_path)) == [str(tmp_path / "a.jsonl")]


def test_pipeline_processes_good_files_despite_bad_ones(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    good = inp / "good.jsonl"
    good.write_text("".join(json.dumps({"id": f"g{i}", "text": f"document {i} " + TEXT * (i + 1)})
                            + "\n" for i in range(40)))
    _wet(inp / "full.warc.wet.gz", [TEXT.encode() + str(i).encode() * i for i in range(30)])
    raw = (inp / "full.warc.wet.gz").read_bytes()
    (inp / "truncated.warc.wet.gz").write_bytes(raw[: len(raw) // 2])
    (inp / "garbage.jsonl.gz").write_bytes(b"\x1f\x8bthis is not gzip")
    (inp / "bad.jsonl").write_bytes(b'[1]\n"s"\n{"id": "u", "text": "caf\xe9"}\n')
    pq.write_table(pa.table({"body": [TEXT]}), inp / "notext.parquet")
    manifest = prepare(str(inp), str(tmp_path / "out"), PrepareConfig(seq_len=32, vocab_size=300),
                       use_ray=False, progress=False)
    errors = {e["file"].rsplit("/", 1)[-1]: e["error"] for e in manifest["file_errors"]}
    assert set(errors) == {"truncated.warc.wet.gz", "garbage.jsonl.gz", "notext.parquet"}
    assert "text_column" in errors["notext.parquet"]
    assert manifest["skipped"]["not_object"] == 2
    assert manifest["skipped"]["bad_encoding"] == 1
    assert manifest["skipped"]["file_error"] == 3
    assert manifest["documents_in"] >= 40 + 30  # all good docs + the truncated file's head
    assert manifest["num_sequences"] > 0 and manifest["tokens"] > 0
