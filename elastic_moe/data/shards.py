"""Token shards (Arrow IPC files) and the manifest that lists them; random-access reading.

Implements step 1's output and step 2's input in docs/architecture.md. A shard is an Arrow IPC *file*
(random-access format) with one row per packed sequence:

* ``tokens``: ``fixed_size_list<uint32>[seq_len + 1]`` (uint32 because real vocabularies exceed
  65,535 ids),
* ``doc_starts``: ``list<int32>``, the positions where a document starts in the sequence.

``manifest.json`` (next to the shards) lists shard paths relative to itself with their sequence
and token counts, plus the tokenizer hash, dedup and skip statistics. :class:`TokenDataset`
memory-maps shards lazily, so opening a dataset reads no token data and random access pages in only
the rows it touches.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from elastic_moe.data.pack import doc_ids_from_starts

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
ROWS_PER_BATCH = 1024  # Arrow record batch size: small enough to page in, large enough to scan


def write_shard(path: str, tokens: np.ndarray, starts: np.ndarray) -> int:
    """Write packed sequences ``tokens (N, W) uint32`` with ``starts (N, W) bool``; returns N.

    Written to ``path + ".tmp"`` then renamed, so a crashed writer never leaves a half shard.
    """
    import pyarrow as pa

    if tokens.ndim != 2 or tokens.shape != starts.shape:
        raise ValueError(f"tokens.shape={tokens.shape}: must be (N, W) and equal starts.shape "
                         f"{starts.shape}")
    num, width = tokens.shape
    schema = pa.schema([("tokens", pa.list_(pa.uint32(), width)),
                        ("doc_starts", pa.list_(pa.int32()))])
    tmp = path + ".tmp"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for lo in range(0, num, ROWS_PER_BATCH):
            tok = np.ascontiguousarray(tokens[lo: lo + ROWS_PER_BATCH], dtype=np.uint32)
            st = starts[lo: lo + ROWS_PER_BATCH]
            rows, cols = np.nonzero(st)
            offsets = np.zeros(tok.shape[0] + 1, dtype=np.int32)
            np.cumsum(np.bincount(rows, minlength=tok.shape[0]), out=offsets[1:])
            tok_col = pa.FixedSizeListArray.from_arrays(pa.array(tok.reshape(-1)), width)
            st_col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols.astype(np.int32)))
            writer.write_batch(pa.record_batch([tok_col, st_col], schema=schema))
    os.replace(tmp, path)
    return num


def write_manifest(path: str, manifest: dict[str, Any]) -> None:
    """Atomically write ``manifest.json`` (temp file + rename): a manifest means a complete set."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_manifest(path: str) -> dict[str, Any]:
    with open(path) as fh:
        manifest = json.load(fh)
    for key in ("shards", "seq_len", "vocab_size", "num_sequences"):
        if key not in manifest:
            raise ValueError(f"manifest={path!r}: missing key {key!r}")
    return manifest


class BadSampleError(ValueError):
    """A sequence in a shard cannot be trained on (a token id outside the vocabulary)."""


def _numpy_view(array: Any) -> np.ndarray:
    """A zero-copy numpy view of a primitive Arrow array without nulls (integers here).

    What ``Array.to_numpy(zero_copy_only=True)`` returns, without its first call importing
    pandas (pyarrow's pandas shim): that import took about 0.2 s of CPU in every fresh process
    that read a shard, and a worker taking a lost member's place paid it inside the rebuild,
    when it loaded its validation batches."""
    import pyarrow as pa

    if not pa.types.is_integer(array.type):  # bit-packed booleans would read as garbage
        raise ValueError(f"an Arrow {array.type} array in a token shard: integers expected")
    if array.null_count:
        raise ValueError(f"an Arrow {array.type} array with {array.null_count} nulls in a "
                         "token shard (shards hold no nulls)")
    dtype = np.dtype(str(array.type))
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array),
                         offset=array.offset * dtype.itemsize)


class _Shard:
    """One memory-mapped shard: flat token values and doc-start lists per record batch."""

    def __init__(self, path: str, width: int) -> None:
        import pyarrow as pa

        self._source = pa.memory_map(path, "r")
        reader = pa.ipc.open_file(self._source)
        self.tokens: list[np.ndarray] = []
        self.start_offsets: list[np.ndarray] = []
        self.start_values: list[np.ndarray] = []
        counts = []
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)  # zero-copy over the memory map
            tok = batch.column(0)
            flat = _numpy_view(tok.values)
            self.tokens.append(flat[tok.offset * width:(tok.offset + len(tok)) * width]
                               .reshape(-1, width))
            st = batch.column(1)
            self.start_offsets.append(_numpy_view(st.offsets))
            self.start_values.append(_numpy_view(st.values))
            counts.append(len(tok))
        self.batch_offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        b = int(np.searchsorted(self.batch_offsets, i, side="right")) - 1
        r = i - int(self.batch_offsets[b])
        offs = self.start_offsets[b]
        return self.tokens[b][r], self.start_values[b][offs[r]:offs[r + 1]]


class TokenDataset:
    """Random access to the packed sequences listed in a manifest.

    ``sequence(i)`` returns ``(tokens, doc_ids)``: ``tokens`` uint32 of shape ``(seq_len + 1,)``
    and ``doc_ids`` int32 of the same shape, the index (0, 1, ...) of the document each token
    belongs to *within this sequence*. Shards are memory-mapped on first touch and at most
    ``max_open_shards`` stay open (LRU), so a dataset of any size uses bounded memory.
    """

    def __init__(self, manifest_path: str, max_open_shards: int = 16) -> None:
        self.manifest_path = os.path.abspath(manifest_path)
        self.manifest = read_manifest(self.manifest_path)
        root = os.path.dirname(self.manifest_path)
        self.seq_len: int = int(self.manifest["seq_len"])
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.eos_id: int = int(self.manifest.get("eos_id", 0))
        self._paths = [os.path.join(root, s["path"]) for s in self.manifest["shards"]]
        counts = [int(s["num_sequences"]) for s in self.manifest["shards"]]
        self._offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.num_sequences: int = int(self._offsets[-1])
        if self.num_sequences != int(self.manifest["num_sequences"]):
            raise ValueError(f"manifest={manifest_path!r}: num_sequences="
                             f"{self.manifest['num_sequences']} but shards sum to "
                             f"{self.num_sequences}")
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, _Shard] = OrderedDict()

    def __len__(self) -> int:
        return self.num_sequences

    def __getstate__(self) -> dict[str, Any]:
        # memory maps do not pickle; a copy sent to another process reopens shards on demand
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _shard(self, s: int) -> _Shard:
        shard = self._open.get(s)
        if shard is None:
            shard = _Shard(self._paths[s], self.seq_len + 1)
            self._open[s] = shard
            if len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(s)
        return shard

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``(seq_len + 1,) uint32`` and per-token doc ids ``(seq_len + 1,) int32``."""
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence index {i} out of range [0, {self.num_sequences})")
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        row = i - int(self._offsets[s])
        tokens, starts = self._shard(s).row(row)
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            at = int(np.argmax(tokens >= self.vocab_size))
            raise BadSampleError(
                f"{self._paths[s]} row {row} (sample index {i}): token id {int(tokens[at])} at "
                f"position {at} is not below the manifest's vocab_size {self.vocab_size} "
                f"({self.manifest_path}); re-run jobs/prepare_data.py or fix the manifest")
        flags = np.zeros(self.seq_len + 1, dtype=bool)
        flags[starts] = True
        return np.array(tokens, dtype=np.uint32), doc_ids_from_starts(flags)
