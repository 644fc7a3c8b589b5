"""Packing tokenized documents into fixed-length training sequences with document boundaries.

Concatenate-and-chunk packing (as in GPT-3 / DeepSeek pre-training): documents, each ending in EOS,
are laid end to end and cut into sequences of ``seq_len + 1`` tokens (inputs are the first
``seq_len``, labels the last ``seq_len``). Nothing is padded; a document may continue into the next
sequence. Every sequence records where documents start inside it (position 0 always counts as a
start: the continuation of a cut document is its own attention segment), so training can mask
attention per document (as in Llama 3 / DeepSeek-V3's document masking).
"""

from __future__ import annotations

import numpy as np


def starts_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """Boolean start flags (one per token) for documents of the given lengths laid end to end."""
    total = int(lengths.sum())
    starts = np.zeros(total, dtype=bool)
    if lengths.size:
        starts[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = True
    return starts


def doc_ids_from_starts(starts: np.ndarray) -> np.ndarray:
    """Per-token document index within a sequence (0, 0, 1, 1, 1, 2, ...) from start flags.

    Works on one sequence ``(W,)`` or a batch ``(B, W)``; position 0 is always a start.
    """
    flags = starts.astype(np.int32, copy=True)
    flags[..., 0] = 1
    return np.cumsum(flags, axis=-1, dtype=np.int32) - 1


class Packer:
    """Streams token runs in, full ``(num, seq_len + 1)`` sequences out; keeps the remainder.

    Feed documents with :meth:`add_documents` (or pre-flagged runs with :meth:`add`), call
    :meth:`take` for the full sequences so far, and :meth:`remainder` at the end for the tokens
    that did not fill a sequence (they can be packed together with other files' remainders).
    """

    def __init__(self, seq_len: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len!r}: must be positive")
        self.width = seq_len + 1
        self._tokens: list[np.ndarray] = []
        self._starts: list[np.ndarray] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        if tokens.shape != starts.shape:
            raise ValueError(f"starts.shape={starts.shape}: must equal tokens.shape {tokens.shape}")
        if tokens.size:
            self._tokens.append(np.asarray(tokens, dtype=np.uint32))
            self._starts.append(np.asarray(starts, dtype=bool))
            self._size += tokens.size

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Add whole documents: ``tokens`` concatenated, ``lengths`` per document (EOS included)."""
        self.add(tokens, starts_from_lengths(lengths))

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """All full sequences so far: ``tokens (N, W) uint32`` and ``starts (N, W) bool``."""
        num = self._size // self.width
        if num == 0:
            return (np.zeros((0, self.width), dtype=np.uint32),
                    np.zeros((0, self.width), dtype=bool))
        tokens = np.concatenate(self._tokens)
        starts = np.concatenate(self._starts)
        cut = num * self.width
        self._tokens, self._starts = [tokens[cut:]], [starts[cut:]]
        self._size = tokens.size - cut
        seq_starts = starts[:cut].reshape(num, self.width).copy()
        seq_starts[:, 0] = True
        return tokens[:cut].reshape(num, self.width), seq_starts

    def remainder(self) -> tuple[np.ndarray, np.ndarray]:
        """The tokens (and start flags) that do not fill a sequence; empties the packer."""
        if not self._size:
            return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=bool)
        tokens, starts = np.concatenate(self._tokens), np.concatenate(self._starts)
        starts[0] = True  # a cut document's tail is its own attention segment
        self._tokens, self._starts, self._size = [], [], 0
        return tokens, starts
