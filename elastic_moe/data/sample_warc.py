"""Crawl-like WARC files built offline: HTML pages whose main text is known, plus CC's other records.

The WARC reader and the extraction benchmark need pages where the "right" output is known
without a human judge. Each page's main text is a few paragraphs of sentences from
``sample_corpus.sentence_pool`` (Python's own documentation). It is wrapped in one of four page
layouts seen on the web: a semantic HTML5 page (``nav``/``article``/``aside``/``footer``), a
``div`` soup with class names (menu, sidebar, cookie banner, comment box), an old table
layout, and bare nested ``div``s with no hint at all. Boilerplate: menus, footers, a cookie
banner, a comment form, scripts, styles, in-article bylines, share buttons, ad slots and "read
more" links, and related-article links whose titles come from the same sentence pool (as on a
real site). Word-level
precision and recall against the main text (:func:`main_text_f1`) measure how much boilerplate an
extractor keeps and how much content it drops.

Like a Common Crawl WARC, each page is a ``request`` / ``response`` / ``metadata`` triple after a
``warcinfo`` record. ``write_warc`` can add responses that must yield no document (redirects,
images, a page of menus only) so readers can be checked to count them.
"""

from __future__ import annotations

import html
import io
import logging
import random
from collections import Counter
from typing import Any

from elastic_moe.data.sample_corpus import sentence_pool

logger = logging.getLogger(__name__)

_NAV = ["Home", "Products", "Pricing", "Blog", "About us", "Careers", "Contact", "Support",
        "Sign in", "Register", "Newsletter", "Events", "Partners", "Press"]
_FOOT = ["Copyright 2024 Example Media Group. All rights reserved.",
         "Privacy policy | Terms of service | Cookie settings | Imprint",
         "Follow us on Mastodon, YouTube and LinkedIn for daily updates.",
         "Powered by ExampleCMS version 4.2 running on the open web."]
_SCRIPT = ("<script>window.dataLayer=window.dataLayer||[];function gtag(){dataLayer.push("
           "arguments);}gtag('js',new Date());var trackingEnabled=true;</script>")
LAYOUTS = 4  # semantic HTML5, div soup with class names, table layout, bare divs
_STYLE = "<style>body{font-family:sans-serif}.menu li{display:inline;margin:0 4px}</style>"


def _paragraphs(rng: random.Random, pool: tuple[str, ...], num: int) -> list[str]:
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(2, 5))) for _ in range(num)]


def _links(rng: random.Random, pool: tuple[str, ...], num: int) -> list[str]:
    # related-article titles: the first words of other sentences
    return [" ".join(rng.choice(pool).split()[:rng.randint(3, 7)]) for _ in range(num)]


def make_page(rng: random.Random, pool: tuple[str, ...], layout: int) -> tuple[str, str]:
    """One HTML page and its main text (title + paragraphs, blank-line separated)."""
    title = " ".join(rng.choice(pool).split()[:8])
    paras = _paragraphs(rng, pool, rng.randint(3, 10))
    main_text = "\n\n".join([title, *paras])
    e = html.escape
    nav = "".join(f'<li><a href="/{i}">{e(x)}</a></li>'
                  for i, x in enumerate(rng.sample(_NAV, 8)))
    related = "".join(f'<li><a href="/r/{i}">{e(t)}</a></li>'
                      for i, t in enumerate(_links(rng, pool, 6)))
    foot = "".join(f"<p>{e(x)}</p>" for x in _FOOT)
    # in-article noise a reader skips: byline, share buttons, an ad slot, a "read more" link
    noise = [f'<p class="byline">By {rng.choice(["Ann Lee", "Bo Chen", "Kim Roy"])}, '
             f'{rng.randint(1, 28)} March 2024</p>',
             '<div class="share-buttons">Share on Facebook Share on X Email this</div>',
             '<div class="ad-slot">Advertisement</div>',
             f'<p class="read-more">Read more: <a href="/more">{e(_links(rng, pool, 1)[0])}'
             f'</a></p>']
    blocks = [f"<p>{e(p)}</p>" for p in paras]
    if layout in (0, 1, 3):
        blocks.insert(0, noise[0])
        blocks.insert(len(blocks) // 2, noise[2])
        blocks.append(noise[3])
        blocks.append(noise[1])
    body = "".join(blocks)
    head = f"<head><meta charset=\"utf-8\"><title>{e(title)}</title>{_STYLE}{_SCRIPT}</head>"
    if layout == 0:
        page = (f"<!DOCTYPE html><html lang=\"en\">{head}<body><header><nav><ul>{nav}</ul></nav>"
                f"</header><main><article><h1>{e(title)}</h1>{body}</article></main><aside>"
                f"<h3>Related articles</h3><ul>{related}</ul></aside><footer>{foot}</footer>"
                f"{_SCRIPT}</body></html>")
    elif layout == 1:
        page = (f"<!DOCTYPE html><html>{head}<body><div id=\"cookie-banner\" class=\"cookie\">"
                f"We use cookies to improve your experience. <button>Accept all</button></div>"
                f"<div class=\"menu\"><ul>{nav}</ul></div><div class=\"wrapper\"><div "
                f"class=\"post-content entry\"><h2>{e(title)}</h2>{body}</div><div "
                f"class=\"sidebar widget\"><h4>Popular now</h4><ul>{related}</ul></div></div>"
                f"<div class=\"comments\"><h4>Leave a comment</h4><form><textarea></textarea>"
                f"<input type=\"submit\" value=\"Post comment\"></form></div>"
                f"<div class=\"footer\">{foot}</div></body></html>")
    elif layout == 3:  # no semantic tags or telling class names at all
        page = (f"<html>{head}<body><div id=\"a1\"><div id=\"a2\"><ul>{nav}</ul></div>"
                f"<div id=\"a3\"><h1>{e(title)}</h1>{body}</div><div id=\"a4\"><ul>{related}"
                f"</ul></div><div id=\"a5\">{foot}</div></div></body></html>")
    else:
        page = (f"<html>{head}<body><table width=\"100%\"><tr><td colspan=\"2\">"
                f"<ul>{nav}</ul></td></tr><tr><td width=\"20%\" valign=\"top\"><ul>{related}"
                f"</ul></td><td><h1>{e(title)}</h1>{body}</td></tr><tr><td colspan=\"2\">"
                f"{foot}</td></tr></table></body></html>")
    return page, main_text


def write_warc(path: str, num_pages: int, seed: int = 0, extra_responses: bool = True
               ) -> dict[str, Any]:
    """Write a gzip WARC (``request``/``response``/``metadata`` per page, like Common Crawl).

    Returns ``{"main_text": {record id: main text}, "no_document": Counter of expected reasons}``.
    With ``extra_responses`` every tenth page is followed by a redirect, an image and a page with
    nothing but menus (expected reasons ``warc_non_200``, ``warc_non_html``,
    ``warc_empty_extraction``).
    """
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    pool = sentence_pool()
    truth: dict[str, str] = {}
    expected: Counter = Counter()

    def response(writer: Any, url: str, status: str, ctype: str, body: bytes) -> str:
        http = StatusAndHeaders(status, [("Content-Type", ctype),
                                         ("Content-Length", str(len(body)))],
                                protocol="HTTP/1.1")
        # Common Crawl records the sniffed type of every non-empty payload
        extra = {"WARC-Identified-Payload-Type": ctype.split(";")[0]} if body else {}
        rec = writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                        http_headers=http, warc_headers_dict=extra)
        writer.write_record(rec)
        return rec.rec_headers.get_header("WARC-Record-ID")

    def request(writer: Any, url: str) -> None:
        http = StatusAndHeaders(f"GET {url} HTTP/1.1", [("Host", "example.org")],
                                is_http_request=True)
        writer.write_record(writer.create_warc_record(url, "request", http_headers=http))
        expected["warc_request"] += 1

    def metadata(writer: Any, url: str) -> None:
        writer.write_record(writer.create_warc_record(
            url, "metadata", payload=io.BytesIO(b"fetchTimeMs: 120\n"),
            warc_content_type="application/warc-fields"))
        expected["warc_metadata"] += 1

    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        writer.write_record(writer.create_warcinfo_record(path, {"software": "elastic-moe"}))
        expected["warc_warcinfo"] += 1
        for i in range(num_pages):
            url = f"https://site{i % 97}.example.org/article/{i}"
            page, main_text = make_page(rng, pool, i % LAYOUTS)
            request(writer, url)
            rid = response(writer, url, "200 OK", "text/html; charset=utf-8",
                           page.encode("utf-8"))
            truth[rid] = main_text
            metadata(writer, url)
            if extra_responses and i % 10 == 9:
                response(writer, url + "?old", "301 Moved Permanently", "text/html", b"")
                response(writer, url + ".png", "200 OK", "image/png", b"\x89PNG\r\n" + bytes(64))
                menus = f"<html><body><nav><ul>{''.join(f'<li>{x}</li>' for x in _NAV)}</ul>" \
                        f"</nav>{_SCRIPT}</body></html>"
                response(writer, url + "/menu", "200 OK", "text/html", menus.encode())
                expected.update(["warc_non_200", "warc_non_html", "warc_empty_extraction"])
    return {"main_text": truth, "no_document": expected}


def _words(text: str) -> Counter:
    return Counter(w.strip(".,;:!?()[]\"'").lower() for w in text.split())


def main_text_f1(extracted: str, reference: str) -> dict[str, float]:
    """Bag-of-words precision, recall and F1 of an extraction against the known main text."""
    got, want = _words(extracted), _words(reference)
    overlap = sum((got & want).values())
    precision = overlap / max(1, sum(got.values()))
    recall = overlap / max(1, sum(want.values()))
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}
