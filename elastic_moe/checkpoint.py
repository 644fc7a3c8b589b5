"""Distributed checkpoints: sharded save, atomic commit, async save, restore at any world size.

Every rank writes its own shards with ``torch.distributed.checkpoint`` (DCP); DCP records global
tensor layouts in ``.metadata``, so a checkpoint written at one world size / expert-parallel
degree loads at any other (resharding happens on read). A checkpoint *exists* only once rank 0
has written its ``COMMITTED`` manifest (file names, sizes, CRC32), after every rank's data and
DCP's metadata are on storage; anything without the marker is a partial save from a crash and is
ignored and removed. Restores verify the manifest first and fall back to the previous committed
checkpoint, loudly, when a file is missing, truncated or corrupted.

A save that fails (storage full, read-only or unreachable; one rank's write failing fails it on
every rank, as DCP gathers every rank's write result before rank 0 writes the metadata) is
never committed: its directory stays without the marker and the next commit's retention pass
removes it. The failure is a value handed to ``on_failure``; the caller decides what to do.

Layout under ``root`` (a local path or any fsspec URL)::

    step_00000120/  __0_0.distcp ... .metadata  train_state.json  COMMITTED
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._state_dict_utils import _copy_state_dict
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from elastic_moe.storage import COMMIT_FILE, committed_in, step_dirs

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"


class CheckpointError(RuntimeError):
    """A save failed, or no usable committed checkpoint could be restored."""


class CommitRefused(CheckpointError):
    """The ``admit`` check before the commit marker refused it (e.g. the writer's membership
    epoch is over): the save is not committed."""


SAVE_WAIT_LOG_S = 30.0  # while waiting on a save in flight, say so this often (never silently)


@dataclass
class TrainState:
    """Everything besides tensors that a restore needs; world-size independent."""

    step: int  # completed optimizer steps: training continues at this step
    tokens_seen: int = 0
    data_position: dict[str, Any] = field(default_factory=dict)
    mesh_plan: dict[str, Any] = field(default_factory=dict)  # the plan it was saved under
    model_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _crc32(fs: fsspec.AbstractFileSystem, path: str) -> int:
    crc = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


class Checkpointer:
    """Save/restore training state under ``root``; collective calls on every rank."""

    def __init__(self, root: str, keep_last: int = 3, keep_every: int = 0, async_save: bool = True,
                 process_group: dist.ProcessGroup | None = None, every_steps: int = 0,
                 wrap_writer: Callable[[dcp.StorageWriter, int], dcp.StorageWriter] | None = None,
                 storage_options: dict[str, Any] | None = None,
                 staging: StagingBuffers | None = None) -> None:
        """``every_steps``: the save interval :meth:`due` answers by (0 = only when asked).
        ``wrap_writer(writer, step)`` may wrap each save's storage writer (tests hand in one
        that fails part-way). ``storage_options``: fsspec options for ``root`` (timeouts:
        :func:`elastic_moe.storage.storage_options`). ``staging``: the async saves' staging
        buffers of an earlier checkpointer of this process (:meth:`handover`), reused when
        this rank's shards keep their shapes; None: new ones."""
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: must be >= 1 (the latest is always kept)")
        self.root = root
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.every_steps = every_steps
        self.wrap_writer = wrap_writer
        self.storage_options = dict(storage_options or {})
        self.fs, self.base = fsspec.core.url_to_fs(root, **self.storage_options)
        self._is_url = "://" in root
        # (future, step, event set once the outcome is known on this rank)
        self._pending: tuple[Future, int, threading.Event] | None = None
        # the newest step this process saw committed (the outcome every rank got from rank 0)
        self.last_committed: int | None = None
        self._commit_error: BaseException | None = None
        self._lock = threading.Lock()
        # DCP's async writer runs collectives from a background thread: give it its own group so
        # they never interleave with the training step's collectives on the default group.
        if process_group is None and _distributed() and async_save:
            process_group = dist.new_group(backend="gloo")
        self.group = process_group
        self._stager = (staging or StagingBuffers()) if async_save else None
        # nothing touches storage here: a rebuild during a storage outage must not fail on it
        # (DCP's writer creates the directories of each save)

    # ------------------------------------------------------------------ paths
    def _path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def _url(self, step: int) -> str:
        if self._is_url:
            return self.root.rstrip("/") + "/" + step_dir_name(step)
        return self._path(step_dir_name(step))

    def _step_dirs(self) -> dict[int, str]:
        return step_dirs(self.fs, self.base)

    def committed_steps(self) -> list[int]:
        """Steps with a complete (committed) checkpoint, ascending."""
        return committed_in(self.fs, self.base)

    def latest_step(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save
    def due(self, step: int, final_step: int) -> bool:
        """Whether the state after ``step`` completed steps should be saved: every
        ``every_steps`` steps and at the end of training."""
        return step == final_step or (self.every_steps > 0 and step % self.every_steps == 0)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             state: TrainState, on_commit: Callable[[int, str], None] | None = None,
             on_failure: Callable[[int, str], None] | None = None,
             admit: Callable[[int], None] | None = None) -> None:
        """Checkpoint after ``step`` completed steps. Async: returns once state is staged; every
        storage request runs in the background (the training thread never waits on storage).

        At most one save is in flight: a new save first waits for (and commits) the previous one,
        and raises its failure (:meth:`collect` takes it as a value instead).
        ``on_commit(step, path)`` runs on rank 0 right after the commit marker is written;
        ``on_failure(step, error)`` runs on every rank when the save failed (nothing committed).
        ``admit(step)`` runs on rank 0 right before the marker is written; it raises
        :class:`CommitRefused` to refuse the commit (the save then fails on every rank).
        Synchronous saves raise :class:`CheckpointError` instead.
        """
        self.wait()
        state_dict = self._state_dict(model, optimizer)
        writer = self._writer(step)
        kwargs: dict[str, Any] = {"storage_writer": writer, "process_group": self.group,
                                  "no_dist": not _distributed()}
        if self.async_save:
            future = dcp.async_save(state_dict, async_stager=self._stager, **kwargs)
            if not isinstance(future, Future):  # AsyncSaveResponse in newer torch
                future = future.upload_completion
            committed = threading.Event()
            with self._lock:
                self._pending = (future, step, committed)
            pending_state = TrainState(**asdict(state))
            future.add_done_callback(
                lambda f: self._on_written(f, step, pending_state, on_commit, on_failure,
                                           committed, admit))
        else:
            try:
                dcp.save(state_dict, **kwargs)
                write_error = None
            except Exception as exc:  # DCP fails the save on every rank when one fails
                write_error = _describe(exc)
            error = self._commit_everywhere(step, state, on_commit, write_error, admit)
            if error:
                raise CheckpointError(f"checkpoint save at step {step} failed: {error}")

    def _on_written(self, future: Future, step: int, state: TrainState,
                    on_commit: Callable[[int, str], None] | None,
                    on_failure: Callable[[int, str], None] | None,
                    committed: threading.Event,
                    admit: Callable[[int], None] | None = None) -> None:
        try:
            try:
                future.result()
                write_error = None
            except BaseException as exc:  # DCP fails the save on every rank when one fails
                write_error = _describe(exc)
            error = self._commit_everywhere(step, state, on_commit, write_error, admit)
            if error:
                log.error("checkpoint save at step %d failed, nothing committed: %s", step, error)
                self._commit_error = CheckpointError(
                    f"checkpoint save at step {step} failed: {error}")
                if on_failure is not None:
                    on_failure(step, error)
        except BaseException as exc:  # a dead peer breaks the broadcast: surfaced by wait()
            self._commit_error = exc
        finally:
            committed.set()

    def _commit_everywhere(self, step: int, state: TrainState,
                           on_commit: Callable[[int, str], None] | None,
                           write_error: str | None,
                           admit: Callable[[int], None] | None = None) -> str | None:
        """Rank 0 commits (unless the write failed) and tells every rank the outcome.

        The broadcast makes ``save``/``wait`` return on every rank only after the marker is on
        storage, so any rank may rely on ``committed_steps()`` (and on a retention pass that
        has finished) right away.
        """
        error = write_error
        if error is None and _rank() == 0:
            try:
                self._commit(step, state, on_commit, admit)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.error("checkpoint commit at step %d failed: %s", step, error)
        if _distributed():
            outcome = [error]
            dist.broadcast_object_list(outcome, group=self.group, group_src=0)
            error = outcome[0]
        if error is None:
            self.last_committed = step
        return error

    def handover(self) -> StagingBuffers | None:
        """This checkpointer's staging buffers for the next one of this process (a new
        layout), or None while a save is in flight: its write may still read them."""
        return None if self._stager is None or self.saving() else self._stager

    def saving(self) -> bool:
        """Whether a save is in flight: staged, not yet committed or failed everywhere."""
        with self._lock:
            pending = self._pending
        return pending is not None and not pending[2].is_set()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is written and committed on every rank;
        raise :class:`CheckpointError` if it failed."""
        error = self.collect()
        if error is not None:
            raise error

    def collect(self) -> CheckpointError | None:
        """Block until the in-flight save (if any) has ended on every rank; its failure, as a
        value. Bounded by the storage's request timeouts (``storage_options``); a longer wait is
        logged every ``SAVE_WAIT_LOG_S``."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            _, step, committed = pending
            started = time.monotonic()
            while not committed.wait(SAVE_WAIT_LOG_S):
                log.warning("still waiting for the checkpoint save at step %d after %.0f s "
                            "(storage slow or unreachable?)", step, time.monotonic() - started)
        error, self._commit_error = self._commit_error, None
        if error is None or isinstance(error, CheckpointError):
            return error
        wrapped = CheckpointError(f"checkpoint save failed: {error}")
        wrapped.__cause__ = error
        return wrapped

    def _commit(self, step: int, state: TrainState,
                on_commit: Callable[[int, str], None] | None = None,
                admit: Callable[[int], None] | None = None) -> None:
        """Rank 0, after every rank's shards and DCP's metadata are written."""
        if _rank() != 0:
            return
        directory = self._path(step_dir_name(step))
        with self.fs.open(f"{directory}/{STATE_FILE}", "w") as f:
            json.dump(asdict(state), f, indent=1)
        files = {}
        for entry in self.fs.ls(directory, detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            files[name] = {"size": int(entry["size"]), "crc32": _crc32(self.fs, entry["name"])}
        tmp = f"{directory}/{COMMIT_FILE}.tmp"
        with self.fs.open(tmp, "w") as f:
            json.dump({"step": step, "files": files}, f, indent=1)
        if admit is not None:  # last, so that nothing slow runs between it and the marker
            admit(step)
        self.fs.mv(tmp, f"{directory}/{COMMIT_FILE}")  # the commit point
        log.info("checkpoint committed: %s (%d files)", directory, len(files))
        if on_commit is not None:
            on_commit(step, self._url(step))
        try:  # committed whatever happens now: a failed clean-up is not a failed save
            self._apply_retention()
        except Exception as exc:
            log.error("retention pass after the commit of step %d failed (the next commit "
                      "tries again): %s", step, _describe(exc))

    def _apply_retention(self) -> None:
        committed = self.committed_steps()
        keep = set(committed[-self.keep_last:])
        if self.keep_every > 0:
            keep |= {s for s in committed if s % self.keep_every == 0}
        newest = committed[-1] if committed else -1
        for step, path in self._step_dirs().items():
            partial = step not in committed
            if (not partial and step not in keep) or (partial and step < newest):
                self.fs.rm(path, recursive=True)

    def _writer(self, step: int) -> dcp.StorageWriter:
        if self._is_url:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            writer: dcp.StorageWriter = FsspecWriter(self._url(step), **self.storage_options)
        else:
            writer = dcp.FileSystemWriter(self._url(step))
        writer = _FreshDirectory(writer, self.fs, self._path(step_dir_name(step)))
        return self.wrap_writer(writer, step) if self.wrap_writer is not None else writer

    @staticmethod
    def _state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            sd: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        else:
            sd = {"model": get_state_dict(model, [])[0]}
        sd["rng"] = {"cpu": torch.get_rng_state()}
        return sd

    # ------------------------------------------------------------------ restore
    def train_state(self, step: int) -> TrainState:
        """The non-tensor state committed with ``step`` (no tensors are read)."""
        with self.fs.open(self._path(step_dir_name(step), STATE_FILE)) as f:
            return TrainState(**json.load(f))

    def verify(self, step: int) -> None:
        """Raise CheckpointError naming the first missing, truncated or corrupted file."""
        directory = self._path(step_dir_name(step))
        try:
            with self.fs.open(f"{directory}/{COMMIT_FILE}") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{directory}/{COMMIT_FILE}: unreadable ({exc})") from exc
        for name, expect in manifest["files"].items():
            path = f"{directory}/{name}"
            if not self.fs.exists(path):
                raise CheckpointError(f"{path}: missing (listed in {COMMIT_FILE})")
            size = int(self.fs.size(path))
            if size != expect["size"]:
                raise CheckpointError(f"{path}: {size} bytes, committed with {expect['size']} "
                                      "(truncated or overwritten)")
            if _crc32(self.fs, path) != expect["crc32"]:
                raise CheckpointError(f"{path}: CRC32 mismatch (corrupted)")

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                step: int | None = None, max_step: int | None = None) -> TrainState | None:
        """Load the newest committed checkpoint (or exactly ``step``, or the newest at or below
        ``max_step``) into model/optimizer, resharding to their current layout.

        Without ``step``, a checkpoint that fails verification or loading is reported (file and
        reason) and the previous committed one is tried; ``None`` when there is none at all.
        """
        self.wait()
        committed = candidates = self.committed_steps()
        if max_step is not None:
            candidates = [s for s in candidates if s <= max_step]
        if step is not None:
            if step not in candidates:
                raise CheckpointError(f"{self.root}: no committed checkpoint at step {step}; "
                                      f"committed: {candidates}")
            candidates = [step]
        if _rank() == 0:
            newest = committed[-1] if committed else -1
            for s, path in self._step_dirs().items():
                if s not in committed and s > newest:
                    log.warning("removing partial checkpoint %s (never committed)", path)
                    self.fs.rm(path, recursive=True)
        failures: list[str] = []
        for candidate in reversed(candidates):
            error = self._try_load(candidate, model, optimizer)
            if error is None:
                with self.fs.open(self._path(step_dir_name(candidate), STATE_FILE)) as f:
                    state = TrainState(**json.load(f))
                if failures:
                    log.error("restored step %d after skipping: %s", candidate, "; ".join(failures))
                return state
            failures.append(error)
            log.error("checkpoint at step %d unusable, falling back: %s", candidate, error)
        if failures:
            raise CheckpointError("no committed checkpoint could be restored: "
                                  + "; ".join(failures))
        return None

    def _try_load(self, step: int, model: nn.Module,
                  optimizer: torch.optim.Optimizer | None) -> str | None:
        error = None
        try:
            self.verify(step)
        except CheckpointError as exc:
            error = str(exc)
        if _distributed():  # every rank must agree before the collective load
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
        if error:
            return error
        state_dict = self._state_dict(model, optimizer)
        try:
            if self._is_url:
                from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

                reader: dcp.StorageReader = FsspecReader(self._url(step),
                                                         **self.storage_options)
            else:
                reader = dcp.FileSystemReader(self._url(step))
            dcp.load(state_dict, storage_reader=reader, process_group=self.group,
                     no_dist=not _distributed())
        except Exception as exc:  # DCP raises on every rank when any rank fails
            return f"{self._url(step)}: load failed ({type(exc).__name__}: {exc})"
        options = StateDictOptions(strict=True)
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state_dict["model"],
                           optim_state_dict=state_dict["optim"], options=options)
        else:
            set_state_dict(model, [], model_state_dict=state_dict["model"],
                           optim_state_dict={}, options=options)
        torch.set_rng_state(state_dict["rng"]["cpu"])
        return None


def _describe(exc: BaseException) -> str:
    """``Type: message`` of a failed save; DCP's CheckpointException names each failed rank."""
    return f"{type(exc).__name__}: {str(exc)[:2000]}"


class _FreshDirectory(dcp.StorageWriter):
    """DCP's writer, with rank 0 emptying the step's directory of an earlier attempt at the same
    step (a partial save before a rollback) before any rank writes: in the global planning step,
    which DCP runs in the save's background thread between the ranks' planning and their writes.
    Files, not the directory: each rank's writer has created it already."""

    def __init__(self, inner: dcp.StorageWriter, fs: fsspec.AbstractFileSystem,
                 directory: str) -> None:
        self.inner, self.fs, self.directory = inner, fs, directory

    def reset(self, checkpoint_id: Any = None) -> None:
        self.inner.reset(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.inner.set_up_storage_writer(is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: Any) -> Any:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        for path in self.fs.ls(self.directory, detail=False) if self.fs.exists(
                self.directory) else []:
            log.warning("removing %s of an earlier, uncommitted save of this step", path)
            self.fs.rm(path, recursive=True)
        return self.inner.prepare_global_plan(plans)

    def write_data(self, plan: Any, planner: Any) -> Any:
        return self.inner.write_data(plan, planner)

    def finish(self, metadata: Any, results: list[Any]) -> None:
        self.inner.finish(metadata, results)

    def storage_meta(self) -> Any:
        return self.inner.storage_meta()

    @property
    def checkpoint_id(self) -> Any:
        return getattr(self.inner, "checkpoint_id", None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


def _layout(obj: Any, path: str = "") -> list[tuple]:
    """What a staging buffer depends on: keys, tensor shapes/dtypes, DTensor meshes/placements."""
    if isinstance(obj, dict):
        return [item for key, value in obj.items() for item in _layout(value, f"{path}/{key}")]
    if isinstance(obj, list | tuple):
        return [item for i, value in enumerate(obj) for item in _layout(value, f"{path}/{i}")]
    if isinstance(obj, DTensor):
        return [(path, obj.dtype, obj.shape, id(obj.device_mesh), obj.placements)]
    if isinstance(obj, torch.Tensor):
        return [(path, obj.dtype, obj.shape)]
    return [(path, type(obj))]


def _local_buffers(buffers: Any, path: str) -> dict[str, torch.Tensor]:
    """``{path: local CPU tensor}`` of a staging structure (a DTensor's local shard)."""
    if isinstance(buffers, dict):
        return {k: v for key, value in buffers.items()
                for k, v in _local_buffers(value, f"{path}/{key}").items()}
    if isinstance(buffers, list | tuple):
        return {k: v for i, value in enumerate(buffers)
                for k, v in _local_buffers(value, f"{path}/{i}").items()}
    if isinstance(buffers, DTensor):
        return {path: buffers._local_tensor}
    if isinstance(buffers, torch.Tensor):
        return {path: buffers}
    return {}


def _buffers_like(obj: Any, path: str, spare: dict[str, torch.Tensor], pin: bool) -> Any:
    """A CPU staging structure for ``obj``: each tensor (a DTensor's local shard) takes the
    buffer ``spare`` holds at its path when dtype and shape match, else a new one; DTensors
    are wrapped with ``obj``'s own spec (mesh, placements, global shape)."""
    if isinstance(obj, dict):
        return {key: _buffers_like(value, f"{path}/{key}", spare, pin)
                for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        out = [_buffers_like(value, f"{path}/{i}", spare, pin) for i, value in enumerate(obj)]
        return tuple(out) if isinstance(obj, tuple) else out
    if isinstance(obj, DTensor):
        return DTensor(_buffer_like(obj._local_tensor, spare.get(path), pin), obj._spec,
                       requires_grad=False)
    if isinstance(obj, torch.Tensor):
        return _buffer_like(obj, spare.get(path), pin)
    return obj


def _buffer_like(tensor: torch.Tensor, old: torch.Tensor | None, pin: bool) -> torch.Tensor:
    if old is not None and old.dtype == tensor.dtype and old.shape == tensor.shape:
        return old
    if tensor.dim() == 0:
        return torch.tensor(0, dtype=tensor.dtype)
    if tensor.numel() == 0:  # nothing to pin
        return torch.zeros(tensor.shape, dtype=tensor.dtype)
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)


class StagingBuffers(AsyncStager):
    """Stages async saves into CPU buffers allocated once and reused by every later save.

    DCP's default staging allocates a fresh copy per save and deep-copies each DTensor (mesh and
    placement metadata included) on the way; that Python overhead, not the memory copy, was most
    of what async save blocked the training loop for (benchmarks/results/checkpoint-cpu.md).
    Reuse is safe because a save starts only after the previous one is written (``wait``). Cost:
    one resident copy of the state (pinned on CUDA hosts, as DCP's own cache option does).

    A new layout (another mesh, another optimizer) needs new DTensor wrappers, but a rank whose
    shards keep their shapes (a survivor after a replacement, any rank after a same-size
    rebuild) keeps the memory under them: only what changed shape is allocated again. On a GPU
    host that is a pinned copy of the whole training state, which takes seconds to allocate,
    and it would otherwise fall on the first save after every rebuild.
    """

    _synchronize_after_execute = False  # ``stage`` returns only once the copy is complete

    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None
        self._layout: list[tuple] | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        layout = _layout(state_dict)
        if self._buffers is None or layout != self._layout:
            spare = _local_buffers(self._buffers, "") if self._buffers is not None else {}
            self._buffers = _buffers_like(state_dict, "", spare, torch.cuda.is_available())
            self._layout = layout
        return _copy_state_dict(state_dict, self._buffers)

    def synchronize_staging(self) -> None:
        """Staging copies synchronously (see ``stage``): nothing to wait for."""
        return None

    def close(self) -> None:
        self._buffers = self._layout = None

