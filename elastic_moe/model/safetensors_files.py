"""Reading HF-layout checkpoints by byte range: headers first, then only the rows a rank needs.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, data offsets) and the raw row-major data. Rows ``[a, z)`` of a tensor are therefore one
contiguous byte range, and this module reads exactly that range (local files or any fsspec URL),
so a rank streams its FSDP / expert-parallel slices without mapping whole files or ever holding
a full tensor it does not own.

:class:`CheckpointFiles` opens a checkpoint directory (``config.json`` + one
``model.safetensors`` or ``model.safetensors.index.json`` with its shards), reads every shard's
header and checks the whole set up front -- a shard named by the index that does not exist, a
truncated file, an index entry missing from its shard -- so every rank reaches the same verdict
before any rank reads tensor data.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range of its data."""

    name: str
    file: str  # file name inside the checkpoint directory
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int

    @property
    def row_bytes(self) -> int:
        inner = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        return inner * torch.empty((), dtype=self.dtype).element_size()


class HFCheckpointError(ValueError):
    """The checkpoint's files are missing, truncated or inconsistent (a ``ValueError``)."""


class CheckpointFiles:
    """An HF-layout checkpoint at ``path`` (a directory or fsspec URL), headers read."""

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.path)
        self.config = self._read_config()
        self.tensors: dict[str, TensorEntry] = {}
        for file, names in self._files().items():
            entries = self._read_header(file)
            for name in names or []:
                if name not in entries:
                    raise HFCheckpointError(f"{self._where(INDEX_FILE)}: maps {name!r} to {file}, "
                                            "whose header has no such tensor; the index and the "
                                            "shards are from different checkpoints")
            # Every tensor of every listed shard counts, also ones the index forgot to list.
            for name, entry in entries.items():
                if name in self.tensors:
                    raise HFCheckpointError(f"{self.path}: tensor {name!r} is in both "
                                            f"{self.tensors[name].file} and {file}")
                self.tensors[name] = entry
        self._handles: dict[str, Any] = {}

    @staticmethod
    def read_config(path: str) -> dict[str, Any]:
        """``config.json`` of the checkpoint at ``path`` alone (no headers read)."""
        fs, base = fsspec.core.url_to_fs(path.rstrip("/"))
        if not fs.exists(f"{base}/{CONFIG_FILE}"):
            raise HFCheckpointError(f"{path.rstrip('/')}/{CONFIG_FILE}: not found; an HF-layout "
                                    "checkpoint is a directory with config.json and safetensors")
        with fs.open(f"{base}/{CONFIG_FILE}", "r") as f:
            return json.load(f)

    # ------------------------------------------------------------------ opening
    def _where(self, file: str) -> str:
        return f"{self.path}/{file}"

    def _read_config(self) -> dict[str, Any]:
        return self.read_config(self.path)

    def _files(self) -> dict[str, list[str] | None]:
        """File name -> tensor names the index puts there (``None``: all of a single file)."""
        index = f"{self.base}/{INDEX_FILE}"
        if self.fs.exists(index):
            with self.fs.open(index, "r") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (ValueError, KeyError) as exc:
                    raise HFCheckpointError(f"{self._where(INDEX_FILE)}: not a safetensors index "
                                            f"({exc!r})") from exc
            files: dict[str, list[str] | None] = {}
            for name, file in weight_map.items():
                names = files.setdefault(file, [])
                assert names is not None
                names.append(name)
            missing = sorted(f for f in files if not self.fs.exists(f"{self.base}/{f}"))
            if missing:
                raise HFCheckpointError(f"{self._where(INDEX_FILE)}: names {len(missing)} shard "
                                        f"file(s) that do not exist: {missing[:10]}; the download "
                                        "is incomplete or the index belongs to another checkpoint")
            return files
        if self.fs.exists(f"{self.base}/{SINGLE_FILE}"):
            return {SINGLE_FILE: None}
        raise HFCheckpointError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

    def _read_header(self, file: str) -> dict[str, TensorEntry]:
        where = self._where(file)
        size = int(self.fs.size(f"{self.base}/{file}"))
        with self.fs.open(f"{self.base}/{file}", "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise HFCheckpointError(f"{where}: {size} bytes, too short for a safetensors "
                                        "header (truncated download?)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER_BYTES, size - 8):
                raise HFCheckpointError(f"{where}: header length {length} exceeds the file "
                                        f"({size} bytes): truncated or not a safetensors file")
            try:
                header = json.loads(f.read(length))
            except ValueError as exc:
                raise HFCheckpointError(f"{where}: unreadable safetensors header ({exc})") from exc
        data_start = 8 + length
        entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise HFCheckpointError(f"{where}: tensor {name!r} has dtype {info['dtype']!r}, "
                                        f"not one of {sorted(DTYPES)}")
            begin, stop = info["data_offsets"]
            entry = TensorEntry(name=name, file=file, dtype=DTYPES[info["dtype"]],
                                shape=tuple(int(d) for d in info["shape"]),
                                start=data_start + int(begin), end=data_start + int(stop))
            expect = math.prod(entry.shape) * torch.empty((), dtype=entry.dtype).element_size()
            if entry.end - entry.start != expect:
                raise HFCheckpointError(f"{where}: tensor {name!r} spans {entry.end - entry.start} "
                                        f"bytes but its shape {entry.shape} needs {expect}")
            entries[name] = entry
        last = max((e.end for e in entries.values()), default=data_start)
        if last > size:
            raise HFCheckpointError(f"{where}: {size} bytes but its header describes {last}: the "
                                    "file is truncated (re-download it)")
        return entries

    # ------------------------------------------------------------------ reading
    def read_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``[lo, hi)`` of tensor ``name`` (dim 0), as stored (no dtype conversion)."""
        entry = self.tensors[name]
        if not entry.shape:
            lo, hi, row_bytes = 0, 1, entry.end - entry.start
        else:
            row_bytes = entry.row_bytes
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = self.fs.open(f"{self.base}/{entry.file}", "rb")
        handle.seek(entry.start + lo * row_bytes)
        count = (hi - lo) * row_bytes
        buffer = bytearray(count)
        view = memoryview(buffer)
        got = 0
        while got < count:  # reads from remote filesystems may come back short
            data = handle.read(count - got)
            view[got:got + len(data)] = data
            chunk = len(data)
            if not chunk:
                raise HFCheckpointError(f"{self._where(entry.file)}: ended while reading {name!r} "
                                        "(truncated while being read?)")
            got += chunk
        if count == 0:
            return torch.empty((0, *entry.shape[1:]), dtype=entry.dtype)
        flat = torch.frombuffer(buffer, dtype=entry.dtype)
        return flat.view(entry.shape if not entry.shape else (hi - lo, *entry.shape[1:]))

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
