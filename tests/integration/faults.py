"""Faults the tests hand to production code from outside: checkpoint writers that die, fail
or stall (``Checkpointer(wrap_writer=...)``, ``run_training(wrap_writer=...)``), and model code
that raises or produces a non-finite gradient at a chosen step (``run_training(wrap_model=...)``).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)


class _Delegating(dcp.StorageWriter):
    """A DCP storage writer that passes every call to ``inner``."""

    def __init__(self, inner: dcp.StorageWriter) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def reset(self, checkpoint_id=None):  # type: ignore[no-untyped-def]
        return self.inner.reset(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner.set_up_storage_writer(is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan):  # type: ignore[no-untyped-def]
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans):  # type: ignore[no-untyped-def]
        return self.inner.prepare_global_plan(plans)

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        return self.inner.write_data(plan, planner)

    def finish(self, metadata, results):  # type: ignore[no-untyped-def]
        return self.inner.finish(metadata, results)

    def storage_meta(self):  # type: ignore[no-untyped-def]
        return self.inner.storage_meta()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:  # type: ignore[no-untyped-def]
        return True


def _write_half(inner: dcp.StorageWriter, plan, planner) -> None:  # type: ignore[no-untyped-def]
    half = plan.items[: max(len(plan.items) // 2, 1)]
    half_plan = type(plan)(items=half, storage_data=plan.storage_data,
                           planner_data=plan.planner_data)
    inner.write_data(half_plan, planner).wait()


class DyingWriter(_Delegating):
    """Ends the process after writing half of its items."""

    def __init__(self, inner: dcp.StorageWriter, exit_code: int = 17) -> None:
        super().__init__(inner)
        self.exit_code = exit_code

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        _write_half(self.inner, plan, planner)
        log.error("rank %d exits in the middle of its save", dist.get_rank())
        os._exit(self.exit_code)


class FullDiskWriter(_Delegating):
    """Writes half of its items, then fails as a full disk does (ENOSPC); the process lives."""

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        _write_half(self.inner, plan, planner)
        raise OSError(errno.ENOSPC, f"rank {dist.get_rank()}: No space left on device (test)")


class HeldWriter(_Delegating):
    """Writes only once ``release`` is set (a save kept in flight); sets ``started`` first."""

    def __init__(self, inner: dcp.StorageWriter, *, release: threading.Event,
                 started: threading.Event | None = None) -> None:
        super().__init__(inner)
        self.started, self.release = started, release

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        if self.started is not None:
            self.started.set()
        assert self.release.wait(30), "the test never released the save"
        return self.inner.write_data(plan, planner)


class AnnouncedSlowWriter(_Delegating):
    """Touches ``<signal_dir>/step_<S>.rank<R>`` and sleeps ``delay_s`` before writing: the
    test sees the save in flight and can take the storage away in the middle of it."""

    def __init__(self, inner: dcp.StorageWriter, signal: Path, delay_s: float) -> None:
        super().__init__(inner)
        self.signal, self.delay_s = signal, delay_s

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        self.signal.touch()
        time.sleep(self.delay_s)
        return self.inner.write_data(plan, planner)


def fail_during_save(step: int, rank: int):
    """A ``Checkpointer(wrap_writer=...)`` argument: ``rank``'s writes of ``step`` fail with
    ENOSPC half-way."""

    def wrap(writer: dcp.StorageWriter, save_step: int) -> dcp.StorageWriter:
        if save_step == step and dist.get_rank() == rank:
            return FullDiskWriter(writer)
        return writer

    return wrap


def announce_saves(signal_dir: str, delay_s: float):
    """A ``run_training(wrap_writer=...)`` argument: every save announces itself in
    ``signal_dir`` and waits ``delay_s`` before writing (a wide window to fault it in)."""

    def wrap(writer: dcp.StorageWriter, save_step: int) -> dcp.StorageWriter:
        signal = Path(signal_dir) / f"step_{save_step:08d}.rank{dist.get_rank()}"
        return AnnouncedSlowWriter(writer, signal, delay_s)

    return wrap


def die_during_save(step: int, rank: int):
    """A ``Checkpointer(wrap_writer=...)`` argument: ``rank`` dies half-way through ``step``."""

    def wrap(writer: dcp.StorageWriter, save_step: int) -> dcp.StorageWriter:
        if save_step == step and dist.get_rank() == rank:
            return DyingWriter(writer)
        return writer

    return wrap


class PlantedBug(Exception):
    """The exception planted in model code: the run must report it, not retry it as a fault."""


def _middle_module(model):  # type: ignore[no-untyped-def]
    """A block in the middle of the model: the step raises after some collectives ran."""
    layers = getattr(model, "layers", None)
    return layers[len(layers) // 2] if layers is not None and len(layers) else model


def raise_in_forward(step: int, rank: int):
    """A ``wrap_model`` argument: on ``rank``, the forward of step ``step`` raises, every time
    that step is run (a bug that the retry does not cure)."""

    def wrap(model, model_rank, current_step):  # type: ignore[no-untyped-def]
        if model_rank != rank:
            return

        def hook(module, args):  # type: ignore[no-untyped-def]
            if current_step() == step:
                raise PlantedBug(f"planted bug in model code at step {step} on rank {rank}")

        _middle_module(model).register_forward_pre_hook(hook)

    return wrap


def nan_gradient(step: int, rank: int):
    """A ``wrap_model`` argument: on ``rank``, the backward of step ``step`` turns one block's
    input gradient into NaN. The loss stays finite there; only the gradient is poisoned."""
    import torch

    class _PoisonGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):  # type: ignore[no-untyped-def]
            return torch.full_like(grad, float("nan"))

    def wrap(model, model_rank, current_step):  # type: ignore[no-untyped-def]
        if model_rank != rank:
            return

        def hook(module, args, output):  # type: ignore[no-untyped-def]
            if current_step() == step:
                return _PoisonGrad.apply(output)
            return None

        _middle_module(model).register_forward_hook(hook)

    return wrap


def die_in_join(trigger: str):
    """A ``wrap_model`` argument: once the file ``trigger`` exists, the next worker to build its
    model for a new membership epoch (inside its join, after the rendezvous) deletes it and
    exits -- a fault during recovery, planted from outside. One worker dies per trigger."""

    def wrap(model, model_rank, current_step):  # type: ignore[no-untyped-def]
        try:
            os.unlink(trigger)  # only one worker wins the unlink
        except FileNotFoundError:
            return
        log.error("rank %d exits in the middle of its join", model_rank)
        os._exit(19)

    return wrap


def die_in_evaluation(step: int, rank: int):
    """A ``wrap_model`` argument: on ``rank``, the validation pass that follows the commit of
    step ``step`` kills its own process (SIGKILL) at its first forward -- a peer lost after a
    step committed and before the step ended. The trainer's step is already ``step`` then, so
    ``current_step()`` (the step being run) reads ``step + 1``; the model is in eval mode."""
    import signal

    def wrap(model, model_rank, current_step):  # type: ignore[no-untyped-def]
        if model_rank != rank:
            return

        def hook(module, args):  # type: ignore[no-untyped-def]
            if not module.training and current_step() == step + 1:
                log.error("rank %d kills itself inside the evaluation after step %d", rank, step)
                os.kill(os.getpid(), signal.SIGKILL)

        model.register_forward_pre_hook(hook)

    return wrap
