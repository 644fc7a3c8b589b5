"""A pause (for a join or a stop) waits for a checkpoint save in flight, but not for long.

The rebuild after a pause starts with every rank leaving its process group, and a rank leaves
only once its async save has ended: a pause voted in the middle of a save, or in a step whose
save is due, would make the whole group wait for the storage. The vote holds back while a save
is in flight or due, for at most ``PAUSE_DEFER_S``. A real :class:`Trainer` (one rank, no
process group) and a real async :class:`Checkpointer`, whose writer is held until the test lets
it go.
"""

from __future__ import annotations

import threading

import torch

import elastic_moe.train.trainer as trainer_mod
from elastic_moe.checkpoint import Checkpointer, TrainState
from elastic_moe.config import apply_overrides, debug
from elastic_moe.parallel import plan_mesh
from tests.integration.faults import HeldWriter


def _trainer(tmp_path, started, release, every_steps=0):
    cfg = apply_overrides(debug(), ["parallel.min_workers=1", "parallel.max_workers=1",
                                    "train.steps=100"])
    ckpt = Checkpointer(str(tmp_path), async_save=True, every_steps=every_steps,
                        wrap_writer=lambda w, step: HeldWriter(w, started=started, release=release))
    plan = plan_mesh(1, 1, cfg.model, cfg.parallel)
    return trainer_mod.Trainer(cfg, rank=0, plan=plan, device=torch.device("cpu"),
                               checkpointer=ckpt, batches=None)  # type: ignore[arg-type]


def test_the_pause_vote_waits_for_a_save_in_flight(tmp_path):
    started, release = threading.Event(), threading.Event()
    trainer = _trainer(tmp_path, started, release)
    assert not trainer._pause_now()  # nothing asked
    trainer.pause_requested = True
    assert trainer._pause_now()  # asked, nothing in flight
    trainer.checkpointer.save(1, trainer.model, trainer.optimizer, TrainState(step=1))
    assert started.wait(30)
    assert trainer.checkpointer.saving()
    assert not trainer._pause_now()  # held back by the save
    release.set()
    trainer.checkpointer.wait()
    assert not trainer.checkpointer.saving()
    assert trainer.checkpointer.committed_steps() == [1]
    assert trainer._pause_now()


def test_the_pause_vote_waits_no_longer_than_its_bound(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    trainer = _trainer(tmp_path, started, release)
    trainer.pause_requested = True
    trainer.checkpointer.save(1, trainer.model, trainer.optimizer, TrainState(step=1))
    assert started.wait(30)
    try:
        assert not trainer._pause_now()  # the wait starts here
        monkeypatch.setattr(trainer_mod, "PAUSE_DEFER_S", 0.0)
        assert trainer.checkpointer.saving() and trainer._pause_now()
    finally:
        release.set()
        trainer.checkpointer.wait()


def test_the_pause_vote_waits_out_a_step_whose_save_is_due(tmp_path):
    trainer = _trainer(tmp_path, threading.Event(), threading.Event(), every_steps=10)
    trainer.pause_requested = True
    trainer.step = 8
    assert trainer._pause_now()  # step 9 saves nothing
    trainer.step = 9
    assert not trainer._pause_now()  # step 10 is due for a save: pause a step later
    trainer.step = 10
    assert trainer._pause_now()  # (its save ended: nothing in flight here)
    trainer.step = 99
    assert trainer._pause_now()  # the last step: the run ends there, nothing to wait out
