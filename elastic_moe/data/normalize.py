"""Text normalization for dedup keys (the stored text is never changed).

Follows the normalization used for near-duplicate detection in web-corpus pipelines (e.g. the
"Deduplicating Training Data Makes Language Models Better" setup, Lee et al. 2022, and datatrove's
``simplify_text``): Unicode NFC, lowercase, punctuation folded to spaces, every digit folded to
``0`` (so dates, counters and prices do not hide a copy), whitespace collapsed to single spaces.
Two documents whose normalized forms are equal are exact duplicates; MinHash runs over the words of
the normalized form.
"""

from __future__ import annotations

import re
import unicodedata

# \w keeps letters, digits and "_" of every script; everything else (punctuation, symbols) folds
# to a space so "end." and "end" are the same word.
_PUNCT = re.compile(r"[^\w\s]|_", flags=re.UNICODE)
_DIGIT = re.compile(r"\d", flags=re.UNICODE)


def normalize(text: str) -> str:
    """Normalized dedup key text: NFC, lowercase, punctuation -> space, digits -> 0, 1 space."""
    text = unicodedata.normalize("NFC", text).lower()
    text = _PUNCT.sub(" ", text)
    text = _DIGIT.sub("0", text)
    return " ".join(text.split())
