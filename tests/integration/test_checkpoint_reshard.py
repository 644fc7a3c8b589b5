"""Multi-process (gloo, CPU) checkpoint tests: reshard on restore, crash in the middle of a save.

Save at W=4 with expert parallelism over all 4 ranks (2 of the debug recipe's 8 experts each),
after one training step; restore at W=2 (ep=2), W=3 (the planner's choice: ep=1, FSDP over 3
ranks with uneven shards) and W=1 (a plain ``Transformer``, no process group).

What "correct" means, and the references it is checked against:

* **Bit-equal state.** At save time every rank gathers the full model and optimizer tensors in
  memory (``get_*_state_dict(full_state_dict=True)``: all-gathers, no files) and rank 0 writes
  them with ``torch.save``. After a restore at another size the same gather must give
  ``torch.equal`` tensors, step counters and router biases included.
* **The next step, at the new size.** The uninterrupted reference at the new size is a second
  model in the same process group, same layout, loaded from those gathered in-memory tensors
  (``set_*_state_dict``; no checkpoint files involved). Both take the next step on the same
  micro-batches: loss and updated parameters must be bit-equal (same layout, same reduction
  order). A single-process plain-torch model whose parameters and Adam moments are assigned by
  hand from the gathered tensors (no torch.distributed code at all) takes the same step too:
  losses agree to 1e-5 relative, parameters to 1e-5 absolute (summation order differs across
  world sizes, see test_parallel.py).

Each world size is one ``mp.spawn`` (the launcher from test_parallel.py) that runs every check
for that size, to keep the whole file to well under a minute of a 2-core machine.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from elastic_moe.checkpoint import COMMIT_FILE, Checkpointer, TrainState
from elastic_moe.config import ParallelConfig, debug
from elastic_moe.model.transformer import Transformer
from elastic_moe.parallel import ExpertParallelExperts, plan_mesh, setup_model
from elastic_moe.train.step import build_optimizer, train_step
from tests.integration.faults import die_during_save
from tests.integration.multiproc import launch

pytestmark = pytest.mark.integration

SEED = 11
GLOBAL_BATCH = 12  # divisible by 4, 3, 2 and 1: an even split at every size tested
SEQ_LEN = 32
FULL = StateDictOptions(full_state_dict=True)


def _cfgs():
    cfg = debug()
    train = dataclasses.replace(cfg.train, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH,
                                warmup_steps=0, grad_clip=0.05)
    return cfg.model, train


def _batch(step: int) -> dict[str, torch.Tensor]:
    """The global batch of ``step``: the same on every rank and in the test process."""
    model_cfg, _ = _cfgs()
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, model_cfg.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)
    doc_ids = (torch.arange(SEQ_LEN) >= SEQ_LEN // 3).long().expand(GLOBAL_BATCH, -1).clone()
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_ids": doc_ids}


def _my_micro_batches(step: int, rank: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    per_rank = GLOBAL_BATCH // world_size
    batch = _batch(step)
    return [{k: v[i:i + 2] for k, v in batch.items()}
            for i in range(rank * per_rank, (rank + 1) * per_rank, 2)]


def _plan(world_size: int, ep: int = 0):
    model_cfg, _ = _cfgs()
    prefs = ParallelConfig(max_workers=world_size, gpus_per_node=world_size,
                           expert_parallel_degree=ep)
    return plan_mesh(world_size, world_size, model_cfg, prefs, global_batch_size=GLOBAL_BATCH)


def _build(world_size: int, seed: int, ep: int = 0):
    model_cfg, train_cfg = _cfgs()
    plan = _plan(world_size, ep)
    model = setup_model(model_cfg, plan, "cpu", seed)
    return plan, model, build_optimizer(model, train_cfg)


def _step(model, optimizer, step: int, world_size: int, rank: int) -> float:
    model_cfg, train_cfg = _cfgs()
    metrics = train_step(model, optimizer, _my_micro_batches(step, rank, world_size), step,
                         train_cfg, model_cfg, dp_size=world_size)
    return metrics.loss


def _gather(model, optimizer) -> dict:
    """Full (unsharded) model and optimizer tensors, gathered in memory; collective."""
    def plain(value):
        if isinstance(value, DTensor):
            value = value.full_tensor()
        return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value

    model_sd = get_model_state_dict(model, options=FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL)
    return {"model": {k: plain(v) for k, v in model_sd.items()},
            "optim": {fqn: {k: plain(v) for k, v in state.items()}
                      for fqn, state in optim_sd["state"].items()},
            "param_groups": optim_sd["param_groups"]}


def _assert_bit_equal(got: dict, want: dict, what: str) -> None:
    assert got["model"].keys() == want["model"].keys(), what
    for name, ref in want["model"].items():
        assert torch.equal(got["model"][name], ref), f"{what}: model tensor {name} differs"
    assert got["optim"].keys() == want["optim"].keys() and len(want["optim"]) > 0, what
    for fqn, ref in want["optim"].items():
        assert got["optim"][fqn].keys() == ref.keys(), f"{what}: {fqn}"
        for key, value in ref.items():
            assert torch.equal(torch.as_tensor(got["optim"][fqn][key]), torch.as_tensor(value)), \
                f"{what}: optimizer {fqn}.{key} differs"


# ----------------------------------------------------------------------------- workers
def _save_worker(rank: int, world_size: int, root: str, ref_path: str) -> None:
    """W=4, ep=4: step 0, then an async save of step 1; rank 0 records the gathered state."""
    plan, model, optimizer = _build(world_size, SEED, ep=world_size)
    assert plan.expert_parallel_degree == world_size, plan.describe()
    assert any(isinstance(m, ExpertParallelExperts) for m in model.modules())
    _step(model, optimizer, 0, world_size, rank)
    ckpt = Checkpointer(root, async_save=True)
    state = TrainState(step=1, tokens_seen=GLOBAL_BATCH * SEQ_LEN, mesh_plan=plan.to_dict(),
                       data_position={"epoch": 0, "index": GLOBAL_BATCH})
    ckpt.save(1, model, optimizer, state)
    gathered = _gather(model, optimizer)  # overlaps the background write, like training would
    ckpt.wait()
    if rank == 0:
        torch.save(gathered, ref_path)


def _restore_worker(rank: int, world_size: int, root: str, ref_path: str, out_path: str) -> None:
    want = torch.load(ref_path)
    # A different init seed: everything the checks see must come from the checkpoint.
    plan, model, optimizer = _build(world_size, seed=SEED + 1)
    what = f"restore at {plan.describe()}"
    state = Checkpointer(root, async_save=False).restore(model, optimizer)
    assert state is not None and state.step == 1, what
    assert state.mesh_plan["world_size"] == 4 and state.mesh_plan["expert_parallel_degree"] == 4
    _assert_bit_equal(_gather(model, optimizer), want, what)

    # The uninterrupted reference at this size: same layout, state set from memory, no files.
    _, ref_model, ref_optimizer = _build(world_size, seed=SEED + 2)
    set_model_state_dict(ref_model, want["model"], options=FULL)
    set_optimizer_state_dict(ref_model, ref_optimizer,
                             {"state": want["optim"], "param_groups": want["param_groups"]},
                             options=FULL)
    loss = _step(model, optimizer, state.step, world_size, rank)
    ref_loss = _step(ref_model, ref_optimizer, state.step, world_size, rank)
    assert loss == ref_loss, f"{what}: next-step loss {loss} != uninterrupted {ref_loss}"
    after = _gather(model, optimizer)
    _assert_bit_equal(after, _gather(ref_model, ref_optimizer), f"{what}, after the next step")
    if rank == 0:
        torch.save({"loss": loss, "model": after["model"]}, out_path)


def _single_process_next_step(want: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """Plain torch: parameters and Adam moments assigned by hand, then the next step."""
    model_cfg, train_cfg = _cfgs()
    model = Transformer(model_cfg)
    model.load_state_dict(want["model"], strict=True)
    optimizer = build_optimizer(model, train_cfg)
    params = dict(model.named_parameters())
    assert want["optim"].keys() == params.keys()
    for name, moments in want["optim"].items():
        optimizer.state[params[name]] = {k: torch.as_tensor(v).clone() for k, v in moments.items()}
    metrics = train_step(model, optimizer, [_batch(1)], 1, train_cfg, model_cfg)
    return metrics.loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def saved_at_4(tmp_path_factory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("reshard")
    root, ref_path = str(tmp / "ckpt"), str(tmp / "gathered.pt")
    launch(_save_worker, 4, root, ref_path)
    assert Checkpointer(root, async_save=False).committed_steps() == [1]
    return root, ref_path


@pytest.mark.parametrize("world_size", [2, 3, 1])
def test_restore_at_another_world_size(world_size: int, saved_at_4, tmp_path) -> None:
    """Saved at W=4/ep=4, restored at W=2/ep=2, W=3/ep=1 and W=1: state bit-equal, and the
    next step equals an uninterrupted run at that size (bitwise) and a plain single process."""
    root, ref_path = saved_at_4
    want = torch.load(ref_path)
    expected_ep = {2: 2, 3: 1, 1: 1}[world_size]
    assert _plan(world_size).expert_parallel_degree == expected_ep
    out_path = str(tmp_path / "next_step.pt")
    if world_size == 1:
        _restore_worker(0, 1, root, ref_path, out_path)  # no process group at all
    else:
        launch(_restore_worker, world_size, root, ref_path, out_path)
    got = torch.load(out_path)
    ref_loss, ref_state = _single_process_next_step(want)
    assert abs(got["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (got["loss"], ref_loss)
    assert got["model"].keys() == ref_state.keys()
    for name, ref in ref_state.items():
        torch.testing.assert_close(got["model"][name], ref, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"W={world_size} next step {n}: {m}")


# ----------------------------------------------------------------------------- crash mid-save
def _dying_save_worker(rank: int, world_size: int, root: str, ref_path: str) -> None:
    """Commit step 1, then start an async save of step 2 during which rank 1 exits (its
    storage writer, handed in by the test, ends the process half-way)."""
    plan, model, optimizer = _build(world_size, SEED, ep=world_size)
    ckpt = Checkpointer(root, async_save=True, wrap_writer=die_during_save(step=2, rank=1))
    _step(model, optimizer, 0, world_size, rank)
    ckpt.save(1, model, optimizer, TrainState(step=1, mesh_plan=plan.to_dict()))
    ckpt.wait()
    gathered = _gather(model, optimizer)
    if rank == 0:
        torch.save(gathered, ref_path)
    _step(model, optimizer, 1, world_size, rank)
    ckpt.save(2, model, optimizer, TrainState(step=2, mesh_plan=plan.to_dict()))
    ckpt.wait()  # rank 1 never gets here; rank 0 fails or is terminated by the launcher
    raise AssertionError(f"rank {rank}: the save of step 2 completed despite the dying rank")


def _restore_after_crash_worker(rank: int, world_size: int, root: str, ref_path: str) -> None:
    _, model, optimizer = _build(world_size, seed=SEED + 1)
    ckpt = Checkpointer(root, async_save=False)
    state = ckpt.restore(model, optimizer)
    assert state is not None and state.step == 1, state
    _assert_bit_equal(_gather(model, optimizer), torch.load(ref_path), "restore after crash")
    # Training goes on from there and re-takes step 2's checkpoint over the removed partial one.
    _step(model, optimizer, 1, world_size, rank)
    ckpt.save(2, model, optimizer, TrainState(step=2))
    assert ckpt.committed_steps() == [1, 2]


def test_rank_dies_in_the_middle_of_a_save(tmp_path) -> None:
    """A rank exits half-way through writing its shards of an async save (W=2, ep=2): step 1
    stays the latest committed checkpoint, restores bit-equal in a fresh group, and the partial
    step-2 directory is ignored and then removed."""
    root, ref_path = str(tmp_path / "ckpt"), str(tmp_path / "gathered.pt")
    with pytest.raises(mp.ProcessExitedException) as excinfo:
        launch(_dying_save_worker, 2, root, ref_path)
    assert excinfo.value.exit_code == 17 and excinfo.value.error_index == 1, excinfo.value

    partial = tmp_path / "ckpt" / "step_00000002"
    assert partial.is_dir() and not (partial / COMMIT_FILE).exists()
    assert any(p.suffix == ".distcp" for p in partial.iterdir()), "the hook wrote nothing"
    assert Checkpointer(root, async_save=False).committed_steps() == [1]
    launch(_restore_after_crash_worker, 2, root, ref_path)
    assert Checkpointer(root, async_save=False).committed_steps() == [1, 2]
