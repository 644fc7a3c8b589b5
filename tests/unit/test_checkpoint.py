"""Single-process checkpoint behaviour: commit, retention, partial saves, corruption, export."""

import json
import logging
import os

import pytest
import torch

from elastic_moe.checkpoint import COMMIT_FILE, Checkpointer, CheckpointError, TrainState
from elastic_moe.config import debug
from elastic_moe.model import Transformer, hf
from elastic_moe.train.step import build_optimizer, train_step
from tests.integration.faults import HeldWriter

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _trained(seed=0, steps=1, shard=None):
    """The debug model and its optimizer after ``steps`` steps; ``shard(model)`` parallelizes
    the model first (FSDP: DTensor parameters)."""
    cfg = debug()
    model = Transformer(cfg.model)
    model.init_weights(seed)
    if shard is not None:
        shard(model)
    opt = build_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=gen)
        train_step(model, opt, [{"input_ids": x[:, :-1], "labels": x[:, 1:]}], step, cfg.train,
                   cfg.model)
    return model, opt


def _assert_same(model_a, opt_a, model_b, opt_b):
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[k][field]), torch.as_tensor(sb[k][field]))


@pytest.mark.parametrize("async_save", [False, True])
def test_save_restore_round_trip(tmp_path, async_save):
    model, opt = _trained(steps=2)
    ckpt = Checkpointer(str(tmp_path), async_save=async_save)
    position = {"epoch": 0, "index": 16, "seed": 0}
    ckpt.save(2, model, opt, TrainState(step=2, tokens_seen=128, data_position=position))
    ckpt.wait()
    assert ckpt.committed_steps() == [2]
    fresh, fresh_opt = _trained(seed=9, steps=1)  # different values, same structure
    state = ckpt.restore(fresh, fresh_opt)
    assert state.step == 2 and state.tokens_seen == 128 and state.data_position == position
    _assert_same(model, opt, fresh, fresh_opt)
    bias = [m for n, m in fresh.state_dict().items() if n.endswith("e_score_correction_bias")]
    assert any(b.abs().sum() > 0 for b in bias)  # router biases travelled too


def test_retention_keeps_last_k_and_every_nth(tmp_path):
    model, opt = _trained()
    ckpt = Checkpointer(str(tmp_path), keep_last=2, keep_every=4, async_save=False)
    for step in range(1, 10):
        ckpt.save(step, model, opt, TrainState(step=step))
    assert ckpt.committed_steps() == [4, 8, 9]


def test_partial_checkpoint_is_ignored_and_removed(tmp_path):
    model, opt = _trained()
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, model, opt, TrainState(step=1))
    ckpt.save(2, model, opt, TrainState(step=2))
    os.remove(tmp_path / "step_00000002" / COMMIT_FILE)  # as if rank 0 died before committing
    assert ckpt.committed_steps() == [1]
    fresh, fresh_opt = _trained(seed=3)
    assert ckpt.restore(fresh, fresh_opt).step == 1
    assert not (tmp_path / "step_00000002").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_falls_back_with_a_clear_error(tmp_path, caplog, damage):
    model1, opt1 = _trained(steps=1)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, model1, opt1, TrainState(step=1))
    model2, opt2 = _trained(steps=2)
    ckpt.save(2, model2, opt2, TrainState(step=2))
    shard = next(p for p in (tmp_path / "step_00000002").iterdir() if p.suffix == ".distcp")
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        shard.unlink()
    fresh, fresh_opt = _trained(seed=7)
    with caplog.at_level(logging.ERROR):
        state = ckpt.restore(fresh, fresh_opt)
    assert state.step == 1  # the previous committed checkpoint, loudly
    _assert_same(model1, opt1, fresh, fresh_opt)
    assert shard.name in caplog.text and "falling back" in caplog.text
    with pytest.raises(CheckpointError, match=shard.name):
        ckpt.restore(fresh, fresh_opt, step=2)


def test_fsspec_url_storage(tmp_path):
    model, opt = _trained(steps=1)
    url = f"file://{tmp_path}/remote"
    ckpt = Checkpointer(url, async_save=False)
    ckpt.save(1, model, opt, TrainState(step=1))
    assert ckpt.committed_steps() == [1]
    fresh, fresh_opt = _trained(seed=4)
    assert Checkpointer(url).restore(fresh, fresh_opt).step == 1
    _assert_same(model, opt, fresh, fresh_opt)


def test_export_to_hf_round_trip_gives_identical_logits(tmp_path):
    import dataclasses

    from elastic_moe.jobs.export import main as export_main

    model, opt = _trained(steps=2)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(2, model, opt, TrainState(step=2, model_config=dataclasses.asdict(model.cfg)))
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"),
                        "--max-shard-gb", "0.0005"]) == 0
    assert len(json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))["weight_map"]) > 0
    assert len([p for p in (tmp_path / "hf").iterdir() if p.suffix == ".safetensors"]) > 1
    loaded = hf.load(str(tmp_path / "hf"))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_export_rejects_a_directory_without_checkpoints(tmp_path, capsys):
    from elastic_moe.jobs.export import main as export_main

    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")])
    assert "no committed checkpoint" in capsys.readouterr().err


def test_async_saves_reuse_staging_buffers_without_mixing_steps(tmp_path):
    """The async stager copies into the same CPU buffers every save: each committed step must
    still hold exactly the state of its own step (and training may mutate the model meanwhile)."""
    cfg = debug()
    model, opt = _trained(steps=1)
    ckpt = Checkpointer(str(tmp_path), async_save=True, keep_last=5)
    snapshots = []
    for step in (1, 2, 3):
        ckpt.save(step, model, opt, TrainState(step=step))
        snapshots.append(({k: v.clone() for k, v in model.state_dict().items()},
                          {i: {k: torch.as_tensor(v).clone() for k, v in s.items()}
                           for i, s in opt.state_dict()["state"].items()}))
        x = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(step))
        train_step(model, opt, [{"input_ids": x[:, :-1], "labels": x[:, 1:]}], step, cfg.train,
                   cfg.model)  # mutates parameters while the save may still be writing
    ckpt.wait()
    assert ckpt.committed_steps() == [1, 2, 3]
    assert not torch.equal(snapshots[0][0]["embed_tokens.weight"],
                           snapshots[2][0]["embed_tokens.weight"])
    for step, (want_model, want_optim) in zip((1, 2, 3), snapshots, strict=True):
        fresh, fresh_opt = _trained(seed=5)
        assert ckpt.restore(fresh, fresh_opt, step=step).step == step
        for name, got in fresh.state_dict().items():
            assert torch.equal(got, want_model[name]), (step, name)
        got_optim = fresh_opt.state_dict()["state"]
        assert got_optim.keys() == want_optim.keys()
        for i, moments in want_optim.items():
            for key, value in moments.items():
                assert torch.equal(torch.as_tensor(got_optim[i][key]), value), (step, i, key)


def _layout_in_new_group(seed: int, steps: int):
    """A model and optimizer sharded by FSDP (DTensor parameters) over a new one-rank gloo
    group and mesh, trained ``steps`` steps: what a worker builds for each layout."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from elastic_moe.parallel.mesh import forget_layout_caches
    from elastic_moe.train.shard_state import ensure_optimizer_state

    if dist.is_initialized():
        dist.destroy_process_group()
    forget_layout_caches()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model, opt = _trained(seed, steps, shard=lambda m: fully_shard(
        m, mesh=init_device_mesh("cpu", (1,))))
    ensure_optimizer_state(opt)
    return model, opt


def _values(model, opt) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    flat = {f"model/{k}": v for k, v in model_sd.items()}
    flat.update({f"optim/{k}/{m}": v for k, state in optim_sd["state"].items()
                 for m, v in state.items()})
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else torch.as_tensor(v)).clone()
            for k, v in flat.items()}


def test_the_next_layout_keeps_the_staging_memory_and_saves_its_own_values(tmp_path):
    """A rebuild makes a new checkpointer for a new model, optimizer and mesh. Handed the old
    one's staging buffers, it stages into the same memory where the shard shapes match, wrapped
    for the new mesh, and each save holds its own layout's values; while a save is in flight
    there is nothing to hand over (its write still reads the buffers)."""
    import threading

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    try:
        model, opt = _layout_in_new_group(seed=0, steps=1)
        want = {1: _values(model, opt)}
        release = threading.Event()
        first = Checkpointer(str(tmp_path), async_save=True, keep_last=5,
                             wrap_writer=lambda w, step: HeldWriter(w, release=release))
        first.save(1, model, opt, TrainState(step=1))
        assert first.handover() is None  # the write is held: its buffers are still read
        release.set()
        first.wait()
        staging = first.handover()
        assert staging is not None
        before = {k: v._local_tensor.data_ptr()
                  for k, v in staging._buffers["model"].items() if isinstance(v, DTensor)}
        assert before

        model, opt = _layout_in_new_group(seed=3, steps=2)  # the next layout, other values
        want[2] = _values(model, opt)
        second = Checkpointer(str(tmp_path), async_save=True, keep_last=5, staging=staging)
        second.save(2, model, opt, TrainState(step=2))
        second.wait()
        buffers = staging._buffers["model"]
        assert {k: buffers[k]._local_tensor.data_ptr() for k in before} == before
        mesh = next(p for p in model.parameters() if isinstance(p, DTensor)).device_mesh
        assert all(buffers[k].device_mesh is mesh for k in before)  # wrapped for the new mesh

        fresh, fresh_opt = _layout_in_new_group(seed=9, steps=1)
        reader = Checkpointer(str(tmp_path), async_save=False)  # of the group now
        for step in (1, 2):
            assert reader.restore(fresh, fresh_opt, step=step).step == step
            got = _values(fresh, fresh_opt)
            assert got.keys() == want[step].keys()
            for key, value in want[step].items():
                assert torch.equal(got[key], value), (step, key)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
