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
from elastic_moe.train.peer_copies import PeerCopies
from elastic_moe.train.shard_state import ShardLayout, ShardSet, fill_from_shards, take_shards
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
    # one node: rank r's copy lives on rank r + 1; it holds the FSDP shards, not the blocks
    # every rank holds (those have replicas on the other ranks)
    peers.link(model, optimizer, ShardLayout(model, optimizer), node_of_rank=["node-a"] * 3,
               step=1, meta={})
    torch.save(mine, os.path.join(tmp, f"own{rank}.pt"))
    if rank == 2:  # rank 1 will be lost: its copy is the one rank 2 keeps
        assert list(peers.holdings()) == [1] and peers.holdings()[1].step == 1
        copy = peers.find(1, 1)
        assert copy is not None and copy.specs
            # replicated on every rank (router biases, Adam step counts): never copied
        assert not any(s.key.endswith(("e_score_correction_bias", "/step")) for s in copy.specs)
        torch.save(copy, os.path.join(tmp, "copy1.pt"))
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


def _copies_follow_the_steps(rank: int, world: int, tmp: str, nodes: list[str],
                             replicate: int) -> None:
    """Each buddy applies its ward's forwarded updates; after several steps its copy equals the
    ward's own state bit for bit (and holds only what has no replica in another domain)."""
    cfg = apply_overrides(debug(), [f"parallel.max_workers={world}", "parallel.gpus_per_node=2",
                                    f"parallel.dp_replicate_degree={replicate}",
                                    "train.global_batch_size=8", "train.micro_batch_size=2"])
    plan = plan_mesh(world, cfg.parallel.gpus_per_node, cfg.model, cfg.parallel,
                     global_batch_size=cfg.train.global_batch_size)
    model = setup_model(cfg.model, plan, "cpu", seed=0)
    optimizer = build_optimizer(model, cfg.train)
    layout = ShardLayout(model, optimizer)
    peers = PeerCopies(rank, world)
    peers.link(model, optimizer, layout, node_of_rank=nodes, step=0, meta={"at": 0})
    gen = torch.Generator().manual_seed(rank)

    def vote(nonfinite: bool) -> bool:
        peers.forward_grads()
        return not nonfinite

    for step in range(3):
        ids = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len), generator=gen)
        metrics = train_step(model, optimizer, [{"input_ids": ids, "labels": ids}], step,
                             cfg.train, cfg.model, batch_fraction=1 / world, commit_vote=vote)
        assert not metrics.skipped
        peers.apply(optimizer, step + 1, {"at": step + 1})
    torch.save(layout.take(rank=rank, step=3), os.path.join(tmp, f"live{rank}.pt"))
    dist.barrier()
    held = peers.holdings()
    if replicate > 1:  # every block has a replica on the other node: nothing is copied
        assert peers.nbytes() == 0 and peers.bytes_per_step() == 0
        assert all(c.replicated_on for c in held.values())
        return
    (ward, copy_info), = held.items()
    assert copy_info.step == 3
    live = torch.load(os.path.join(tmp, f"live{ward}.pt"), weights_only=False)
    copy = peers.find(ward, 3)
    assert copy is not None and copy.meta == {"at": 3}
    by_key = {s.key: t for s, t in zip(live.specs, live.tensors, strict=True)}
    assert any(s.key.startswith("optim/") for s in copy.specs)
    for spec, tensor in zip(copy.specs, copy.tensors, strict=True):
        assert torch.equal(tensor, by_key[spec.key]), spec.key
    copied = sum(t.numel() * t.element_size() for t in copy.tensors)
    params = sum(t.numel() * t.element_size()
                 for s, t in zip(copy.specs, copy.tensors, strict=True) if s.key.startswith("model/"))
    assert peers.nbytes() == copied + params  # the copy and one gradient buffer


def test_a_buddy_copy_follows_every_step_bit_for_bit(tmp_path):
    launch(_copies_follow_the_steps, 2, str(tmp_path), ["node-a", "node-b"], 1)


def test_replicas_on_another_node_need_no_copy(tmp_path):
    launch(_copies_follow_the_steps, 4, str(tmp_path), ["node-a"] * 2 + ["node-b"] * 2, 2)


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
