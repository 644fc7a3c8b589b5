"""A worker's warm-up: it runs a step of the run's model, and a join that comes first stops it
inside the step instead of waiting for it."""
import logging
import threading

import torch
from elastic_moe.actors.train_worker import _warm_up

from elastic_moe.config import debug


def _cfg():
    cfg = debug()
    cfg.train.micro_batch_size, cfg.train.seq_len = 2, 16
    return cfg


def test_warm_up_runs_the_step_and_reports_its_time(caplog):
    with caplog.at_level(logging.INFO):
        took = _warm_up(torch.device("cpu"), _cfg(), threading.Event())
    assert took is not None and took > 0
    assert "warmed up in" in caplog.text


def test_a_stop_already_set_skips_the_warm_up(caplog):
    stop = threading.Event()
    stop.set()
    with caplog.at_level(logging.INFO):
        assert _warm_up(torch.device("cpu"), _cfg(), stop) is None
    assert "a join came first" in caplog.text


def test_a_stop_set_inside_the_backward_ends_it_there(monkeypatch, caplog):
    """The stop is set as the backward starts: the backward must end at its first check,
    before it reaches the first layer or the embedding, and no optimizer step runs."""
    from elastic_moe.train import step as step_mod

    stop = threading.Event()
    built = []
    original_backward, original_build = torch.Tensor.backward, step_mod.build_optimizer

    def backward(self, *args, **kwargs):
        stop.set()  # as a join would, from another thread, while the backward runs
        return original_backward(self, *args, **kwargs)

    def build_optimizer(model, cfg):
        built.append(model)
        return original_build(model, cfg)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(step_mod, "build_optimizer", build_optimizer)
    with caplog.at_level(logging.INFO):
        assert _warm_up(torch.device("cpu"), _cfg(), stop) is None
    assert "a join came first" in caplog.text
    (model,) = built
    assert model.embed_tokens.weight.grad is None  # the backward stopped before the bottom
    # at its first check, the final norm's or the MTP's input, before any weight's gradient
    assert all(p.grad is None for p in model.parameters())
    assert not torch.distributed.is_initialized()  # its one-rank group is gone again


def test_a_stop_set_after_the_last_layer_ends_it_before_the_head(monkeypatch, caplog):
    """The stop is set as the final norm starts, after every layer's forward: the warm-up
    must end there, before the lm_head, the loss and any backward run. The head sat between
    two checks when only the layers had them, and a join landing there waited for it."""
    from elastic_moe.train import step as step_mod

    stop = threading.Event()
    built, heads = [], []
    original_build = step_mod.build_optimizer

    def build_optimizer(model, cfg):
        built.append(model)
        # registered before the warm-up's own hooks, so it runs first on the final norm
        model.norm.register_forward_pre_hook(lambda *_: stop.set())
        model.lm_head.register_forward_hook(lambda *_: heads.append(1))
        return original_build(model, cfg)

    monkeypatch.setattr(step_mod, "build_optimizer", build_optimizer)
    with caplog.at_level(logging.INFO):
        assert _warm_up(torch.device("cpu"), _cfg(), stop) is None
    assert "a join came first" in caplog.text
    (model,) = built
    assert heads == []  # the lm_head never ran
    assert all(p.grad is None for p in model.parameters())  # nor did any backward
    assert not torch.distributed.is_initialized()
