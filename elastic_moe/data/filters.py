"""Optional document filters: language ID and Gopher quality / repetition rules. Off by default.

* **Language**: langid.py (Lui & Baldwin, ACL 2012 demo), whose model ships inside the ``langid``
  package (nothing is downloaded at run time). A document is kept when its most probable language
  is in ``languages`` with normalized probability >= ``min_language_score`` (the first 2,000
  characters are scored: enough for a stable guess, and bounded cost on giant pages).
* **Gopher quality** (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
  Training Gopher", App. A.1.1): 50..100,000 words, mean word length 3..10 characters, at most 0.1
  symbols (``#``, ``...``) per word, at most 90% of lines starting with a bullet, at most 30%
  ending with an ellipsis, at least 80% of words with a letter, at least 2 of the English stop
  words "the, be, to, of, and, that, have, with".
* **Gopher repetition** (same appendix, Table A1): duplicate lines (> 30% of lines or > 20% of
  characters), duplicate paragraphs (30% / 20%), the most frequent 2/3/4-gram covering > 20/18/16%
  of the characters, duplicated 5..10-grams covering > 15..10%.

Each rejection is counted under its own reason (``lang_other``, ``lang_low_score``,
``gopher_<rule>``) in the reader's ``skipped`` counter and so in the manifest. Words are
whitespace-separated tokens, which suits the English-centric Gopher rules and nothing else.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("\u2022", "\u2023", "\u25b6", "\u25cf", "\u25e6", "\u25aa", "-", "*", "\u2013")
TOP_NGRAM_MAX = ((2, 0.20), (3, 0.18), (4, 0.16))
DUP_NGRAM_MAX = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
_LANGID_CHARS = 2000


@dataclass(kw_only=True, slots=True)
class FilterConfig:
    """Which optional filters run; every one is off by default."""

    languages: tuple[str, ...] = ()  # ISO 639-1 codes to keep (langid.py); () = no language filter
    min_language_score: float = 0.5  # normalized langid probability of the top language
    gopher_quality: bool = False  # Rae et al. 2021 App. A.1.1 quality rules
    gopher_repetition: bool = False  # Rae et al. 2021 Table A1 repetition rules
    min_words: int = 50  # Gopher quality: fewer words = "gopher_word_count"
    max_words: int = 100_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_language_score <= 1.0:
            raise ValueError(f"min_language_score={self.min_language_score!r}: must be in [0, 1]")
        if not 0 <= self.min_words < self.max_words:
            raise ValueError(f"min_words={self.min_words!r}, max_words={self.max_words!r}: need "
                             f"0 <= min_words < max_words")
        bad = [code for code in self.languages if not (code.isalpha() and len(code) in (2, 3))]
        if bad:
            raise ValueError(f"languages={self.languages!r}: {bad} are not ISO 639 codes")

    @property
    def active(self) -> bool:
        return bool(self.languages) or self.gopher_quality or self.gopher_repetition


@functools.lru_cache(maxsize=1)
def _language_identifier() -> Any:
    try:
        from langid.langid import LanguageIdentifier, model
    except ImportError as exc:
        raise ImportError("the language filter needs `pip install langid`") from exc
    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


class TextFilter:
    """Applies a :class:`FilterConfig` to one text at a time, counting rejections by reason."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self._langid = None
        if config.languages:
            self._langid = _language_identifier()
            self._langid.set_languages(None)  # score against every language the model knows

    def keep(self, text: str, skipped: Counter) -> bool:
        if not self.config.active:
            return True
        reason = self.reject_reason(text)
        if reason:
            skipped[reason] += 1
            return False
        return True

    def reject_reason(self, text: str) -> str:
        """``""`` to keep the text, else the name of the first rule it fails."""
        config = self.config
        if self._langid is not None:
            lang, score = self._langid.classify(text[:_LANGID_CHARS])
            if lang not in config.languages:
                return "lang_other"
            if score < config.min_language_score:
                return "lang_low_score"
        if config.gopher_quality or config.gopher_repetition:
            words = text.split()
            if config.gopher_quality:
                reason = gopher_quality_reason(text, words, config.min_words, config.max_words)
                if reason:
                    return reason
            if config.gopher_repetition:
                return gopher_repetition_reason(text, words)
        return ""


def build_filter(config: FilterConfig) -> TextFilter:
    return TextFilter(config)


def gopher_quality_reason(text: str, words: list[str], min_words: int, max_words: int) -> str:
    """The first Gopher quality rule ``text`` fails, or ``""``."""
    n = len(words)
    if not min_words <= n <= max_words:
        return "gopher_word_count"
    mean_len = sum(len(w) for w in words) / n
    if not 3 <= mean_len <= 10:
        return "gopher_mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > 0.1:
        return "gopher_symbol_ratio"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        if sum(line.startswith(BULLETS) for line in lines) > 0.9 * len(lines):
            return "gopher_bullet_lines"
        if sum(line.endswith(("...", "\u2026")) for line in lines) > 0.3 * len(lines):
            return "gopher_ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) < 0.8 * n:
        return "gopher_alpha_words"
    if len(STOP_WORDS.intersection(w.lower() for w in words)) < 2:
        return "gopher_stop_words"
    return ""


def _duplicates(items: list[str]) -> tuple[int, int]:
    """How many items, and how many characters of them, repeat an earlier item."""
    seen: set[str] = set()
    num = chars = 0
    for item in items:
        if item in seen:
            num += 1
            chars += len(item)
        else:
            seen.add(item)
    return num, chars


def gopher_repetition_reason(text: str, words: list[str]) -> str:
    """The first Gopher repetition rule ``text`` fails, or ``""``."""
    total = max(1, len(text))
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    num, chars = _duplicates(paragraphs)
    if paragraphs and num > 0.3 * len(paragraphs):
        return "gopher_dup_paragraphs"
    if chars > 0.2 * total:
        return "gopher_dup_paragraph_chars"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    num, chars = _duplicates(lines)
    if lines and num > 0.3 * len(lines):
        return "gopher_dup_lines"
    if chars > 0.2 * total:
        return "gopher_dup_line_chars"
    word_chars = max(1, sum(len(w) for w in words))
    for n, limit in TOP_NGRAM_MAX:
        if len(words) < n:
            break
        grams = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
        gram, count = grams.most_common(1)[0]
        if count > 1 and sum(len(w) for w in gram) * count > limit * word_chars:
            return f"gopher_top_{n}gram"
    for n, limit in DUP_NGRAM_MAX:
        if len(words) < n:
            break
        # characters of words inside an n-gram that already occurred (each word counted once)
        seen: set[tuple[str, ...]] = set()
        covered = [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i: i + n])
            if gram in seen:
                covered[i: i + n] = [True] * n
            else:
                seen.add(gram)
        if sum(len(w) for w, c in zip(words, covered, strict=True) if c) > limit * word_chars:
            return f"gopher_dup_{n}gram"
    return ""
