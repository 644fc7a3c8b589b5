"""In-place resharding on real gloo groups: the same processes re-form at other sizes and ranks.

Three processes train one step at W=3 (EP 1), keep peer copies, then rank 1 is "lost": ranks 2
and 0 re-form as a W=2 group (EP 2, renumbered) in the same processes and fill their new layout
from rank 0's and rank 2's own shards plus the copy of rank 1's shards that its buddy kept. Then
all three re-form at W=3 with permuted ranks. Each time the full weights (gathered by torch's own
state-dict API) and the full optimizer state equal the originals bit for bit.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from elastic_moe.config import apply_overrides, debug
from elastic_moe.parallel import full_state_dict, plan_mesh, setup_model
from elastic_moe.parallel.mesh import forget_layout_caches
from elastic_moe.train.shard_state import PeerCopies, ShardSet, fill_from_shards, take_shards
from elastic_moe.train.step import build_optimizer, train_step
from tests.integration.multiproc import free_port, launch

pytestmark = pytest.mark.integration

CFG = apply_overrides(debug(), ["parallel.min_workers=1", "parallel.max_workers=3",
                                "train.global_batch_size=6", "train.micro_batch_size=2"])


def _assemble(sources: list[ShardSet]) -> dict[str, torch.Tensor]:
    """Full tensors from blocks, written here independently of fill_from_shards."""
    out: dict[str, torch.Tensor] = {}
    for source in sources:
        for spec, block in zip(source.specs, source.tensors, strict=True):
            full = out.setdefault(spec.key, torch.full(spec.global_shape, float("nan"),
                                                       dtype=block.dtype)
                                  if block.is_floating_point()
                                  else torch.zeros(spec.global_shape, dtype=block.dtype))
            index = tuple(slice(o, o + n) for o, n in zip(spec.offset, spec.shape, strict=True))
            full[index] = block
    return out


def _group(rank: int, world: int, port: int) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def _build(world: int):
    forget_layout_caches()  # after the last use of the old layout, before building the new one
    plan = plan_mesh(world, CFG.parallel.gpus_per_node, CFG.model, CFG.parallel,
                     global_batch_size=CFG.train.global_batch_size)
    model = setup_model(CFG.model, plan, "cpu", seed=123)  # other values than the originals
    return plan, model, build_optimizer(model, CFG.train)


def _worker(rank: int, world_size: int, tmp: str, ports: list[int]) -> None:
    # ---- W=3: one real step (non-zero optimizer state and router biases), then peer copies
    _group(rank, 3, ports[0])
    plan = plan_mesh(3, CFG.parallel.gpus_per_node, CFG.model, CFG.parallel,
                     global_batch_size=CFG.train.global_batch_size)
    model = setup_model(CFG.model, plan, "cpu", seed=0)
    optimizer = build_optimizer(model, CFG.train)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, CFG.model.vocab_size, (2, CFG.train.seq_len), generator=gen)
    train_step(model, optimizer, [{"input_ids": ids, "labels": ids}], 0, CFG.train, CFG.model,
               batch_fraction=1 / 3)
    reference = full_state_dict(model)
    mine = take_shards(model, optimizer, rank=rank, step=1)
    peers = PeerCopies(rank, 3)
    peers.link(mine, ["node-a"] * 3)  # one node: rank r's copy lives on rank r + 1
    torch.save(mine, os.path.join(tmp, f"own{rank}.pt"))
    if rank == 2:  # rank 1 will be lost: its copy is the one rank 2 keeps
        assert peers.holdings() == ([1], {1: [1]})
        torch.save(peers.find(1, 1), os.path.join(tmp, "copy1.pt"))
    if rank == 0:
        torch.save(reference, os.path.join(tmp, "reference.pt"))
    dist.barrier()
    originals = [torch.load(os.path.join(tmp, f"own{r}.pt"), weights_only=False)
                 for r in range(3)]
    full_before = _assemble(originals)

    # ---- W=2 from ranks 2 and 0 (renumbered 0 and 1); rank 1's shards from its buddy's copy
    new_rank = {2: 0, 0: 1}.get(rank)
    if new_rank is not None:
        _group(new_rank, 2, ports[1])
        take_shards(model, optimizer, rank=rank, step=1)  # an export of the old layout, as
        # survivors do after a failure: it fills DTensor's caches with the old mesh again
        _, model2, optimizer2 = _build(2)
        sources = [originals[0], originals[2],
                   torch.load(os.path.join(tmp, "copy1.pt"), weights_only=False)]
        fill_from_shards(model2, optimizer2, sources)
        got = full_state_dict(model2)
        for name, tensor in reference.items():
            assert torch.equal(got[name], tensor), f"W=2: {name}"
        torch.save(take_shards(model2, optimizer2, rank=new_rank, step=1),
                   os.path.join(tmp, f"w2_{new_rank}.pt"))
        dist.barrier()
    # ---- back to W=3 with permuted ranks, filled from the W=2 layout's shards
    _group({0: 2, 1: 0, 2: 1}[rank], 3, ports[2])
    _, model3, optimizer3 = _build(3)
    w2 = [torch.load(os.path.join(tmp, f"w2_{r}.pt"), weights_only=False) for r in range(2)]
    fill_from_shards(model3, optimizer3, w2)
    got = full_state_dict(model3)
    for name, tensor in reference.items():
        assert torch.equal(got[name], tensor), f"W=3 permuted: {name}"
    shards3 = take_shards(model3, optimizer3, rank=dist.get_rank(), step=1)
    gathered: list = [None] * 3
    dist.all_gather_object(gathered, shards3)
    full_after = _assemble(gathered)
    assert full_after.keys() == full_before.keys()
    for key, tensor in full_before.items():
        assert torch.equal(full_after[key], tensor), f"optimizer/model state {key}"
    assert any(k.startswith("optim/") for k in full_before)


def test_state_moves_between_layouts_in_the_same_processes(tmp_path):
    launch(_worker, 3, str(tmp_path), [free_port(), free_port(), free_port()])


def _overlapped_copies(rank: int, world: int, tmp: str) -> None:
    """A refresh starts the transfer and the next step runs while it is in flight; the copy
    counts only once it is complete, and then equals the sender's snapshot bit for bit."""
    plan = plan_mesh(world, CFG.parallel.gpus_per_node, CFG.model, CFG.parallel,
                     global_batch_size=CFG.train.global_batch_size)
    model = setup_model(CFG.model, plan, "cpu", seed=0)
    optimizer = build_optimizer(model, CFG.train)
    gen = torch.Generator().manual_seed(rank)

    def one_step(step: int) -> None:
        ids = torch.randint(0, CFG.model.vocab_size, (2, CFG.train.seq_len), generator=gen)
        train_step(model, optimizer, [{"input_ids": ids, "labels": ids}], step, CFG.train,
                   CFG.model, batch_fraction=1 / world)

    one_step(0)
    peers = PeerCopies(rank, world)
    peers.link(take_shards(model, optimizer, rank=rank, step=1), ["node-a"] * world)
    one_step(1)
    mine = take_shards(model, optimizer, rank=rank, step=2)
    torch.save(mine, os.path.join(tmp, f"step2-{rank}.pt"))
    peers.refresh(mine)
    ward = (rank - 1) % world
    assert peers.holdings() == ([1, 2], {ward: [1]})  # step 2 not in yet
    one_step(2)  # runs while the copies travel; changes the live state, not the snapshot
    assert peers.settle()
    assert peers.holdings() == ([1, 2], {ward: [1, 2]})
    dist.barrier()
    sent = torch.load(os.path.join(tmp, f"step2-{ward}.pt"), weights_only=False)
    got = peers.find(ward, 2)
    assert [s.key for s in got.specs] == [s.key for s in sent.specs]
    for spec, a, b in zip(sent.specs, sent.tensors, got.tensors, strict=True):
        assert torch.equal(a, b), spec.key
    live = take_shards(model, optimizer, rank=rank, step=3)
    assert any(not torch.equal(a, b) for a, b in zip(live.tensors, mine.tensors, strict=True))


def test_peer_copies_travel_while_the_next_step_runs(tmp_path):
    launch(_overlapped_copies, 2, str(tmp_path))


def test_missing_shards_are_named(tmp_path):
    plan = plan_mesh(1, CFG.parallel.gpus_per_node, CFG.model, CFG.parallel,
                     global_batch_size=CFG.train.global_batch_size)
    model = setup_model(CFG.model, plan, "cpu", seed=0)
    optimizer = build_optimizer(model, CFG.train)
    shards = take_shards(model, optimizer, rank=0, step=3)
    keep = [i for i, s in enumerate(shards.specs) if s.key != "model/embed_tokens.weight"]
    partial = ShardSet(rank=0, step=3, specs=[shards.specs[i] for i in keep],
                       tensors=[shards.tensors[i] for i in keep])
    with pytest.raises(ValueError, match=r"not covered by the sources: model/embed_tokens\.weight"):
        fill_from_shards(model, optimizer, [partial])
