"""Byte-level BPE tokenizer (GPT-2 / DeepSeek-V3 style) via Hugging Face ``tokenizers``.

DeepSeek-V3 (arXiv:2412.19437 sec. 4.1) uses byte-level BPE with a 128K vocabulary (V2/LLM: 102,400,
our default for real runs). Byte-level means every byte has a token, so no input is ever unknown.
Either train one on the (deduplicated) corpus or load an existing ``tokenizer.json``; every document
gets an EOS token appended so packed sequences keep document boundaries visible to the model.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (incl. specials).

    EOS gets id 0 and PAD id 1 so their ids do not depend on the vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size!r}: must be >= 260 (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    logger.info("trained byte-level BPE: vocab %d", tok.get_vocab_size())
    return tok


def load_tokenizer(path: str) -> Any:
    """Load a ``tokenizer.json``; it must define the EOS token ``<|endoftext|>``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    if tok.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"tokenizer={path!r}: has no {EOS_TOKEN!r} token (needed as EOS)")
    return tok


def tokenizer_sha256(path: str) -> str:
    """Content hash of a tokenizer.json, recorded in the manifest so shards and vocab match."""
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def encode_documents(tok: Any, texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch of documents, each followed by EOS.

    Returns ``(tokens, lengths)``: all token ids concatenated (uint32) and each document's length
    including its EOS (int64). Uses ``encode_batch`` (parallel in Rust).
    """
    if not texts:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False) \
        if hasattr(tok, "encode_batch_fast") else tok.encode_batch(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for s, x in zip(starts.tolist(), ids, strict=True):
        tokens[s: s + len(x)] = x
    tokens[ends - 1] = eos_id
    return tokens, lengths
