"""Load-driven expert replicas on a real gloo group of two processes (two failure domains).

With ``ep = 2`` each expert lives on one rank; ``parallel.expert_replicas = 4`` gives each rank a
copy of all four of the other rank's experts. The checks, each against an independent reference:

* training with the copies matches the same steps without them (the same batches, the same
  initial weights): the copies only move where a token's expert is computed;
* after every step each copy equals its owner's expert bit for bit, weights and Adam moments;
* the peer-copy plan copies no expert block (every expert has a copy on the other rank), and
  a lost rank is restored from the survivor alone: its experts from the survivor's copies, its
  dense shards from the survivor's buddy copy. The restored single-process state equals the
  two-rank state gathered by torch's own state-dict API.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from elastic_moe.config import apply_overrides, debug
from elastic_moe.parallel import full_state_dict, plan_mesh, setup_model
from elastic_moe.parallel.expert_parallel import expert_parallel_modules
from elastic_moe.parallel.expert_replicas import assign_replicas
from elastic_moe.train.elastic import Holdings, decide_restore
from elastic_moe.train.peer_copies import PeerCopies
from elastic_moe.train.shard_state import (
    ShardLayout,
    ensure_optimizer_state,
    fill_from_shards,
    needed_sources,
)
from elastic_moe.train.step import build_optimizer, train_step
from tests.integration.multiproc import launch

pytestmark = pytest.mark.integration

NODES = ["node-a", "node-b"]
STEPS = 4


def _config(replicas: int, world: int = 2):
    return apply_overrides(debug(), ["parallel.min_workers=1", f"parallel.max_workers={world}",
                                     "parallel.gpus_per_node=2",
                                     f"parallel.expert_replicas={replicas}",
                                     "train.global_batch_size=8", "train.micro_batch_size=2",
                                     "train.grad_clip=0.05"])  # clipping on: copies clip too


def _copies_equal_owners(model, optimizer) -> None:
    """Every copy against its owner's rows, gathered from the owner rank (bit for bit)."""
    for module in expert_parallel_modules(model):
        replicas = module.replicas
        assert replicas is not None and replicas.num_slots == 4
        for param, copy in ((module.w13, replicas.w13_CHD), (module.w2, replicas.w2_CDI)):
            owned = [param.to_local(), optimizer.state[param]["exp_avg"].to_local(),
                     optimizer.state[param]["exp_avg_sq"].to_local()]
            mine = [copy.detach(), replicas.optimizer.state[copy]["exp_avg"],
                    replicas.optimizer.state[copy]["exp_avg_sq"]]
            for owned_t, mine_t in zip(owned, mine, strict=True):
                other = [torch.empty_like(owned_t) for _ in range(module.ep_degree)]
                dist.all_gather(other, owned_t.contiguous(), group=module.ep_group)
                for j, expert in enumerate(replicas.table[module.ep_rank]):
                    owner = expert // module.num_local_experts
                    assert owner != module.ep_rank
                    assert torch.equal(mine_t[j], other[owner][expert % module.num_local_experts])


def _train(rank: int, replicas: int, nodes: list[str] = NODES):
    world = len(nodes)
    cfg = _config(replicas, world)
    plan = plan_mesh(world, cfg.parallel.gpus_per_node, cfg.model, cfg.parallel,
                     global_batch_size=cfg.train.global_batch_size)
    assert plan.expert_parallel_degree == 2
    model = setup_model(cfg.model, plan, "cpu", seed=0)
    optimizer = build_optimizer(model, cfg.train)
    ensure_optimizer_state(optimizer)
    assert assign_replicas(model, optimizer, replicas, nodes) == replicas
    layout = ShardLayout(model, optimizer)
    peers = PeerCopies(rank, world)
    peers.link(model, optimizer, layout, node_of_rank=nodes, step=0, meta={})
    gen = torch.Generator().manual_seed(100 + rank)
    losses = []

    def vote(nonfinite: bool) -> bool:
        peers.forward_grads()
        return not nonfinite

    for step in range(STEPS):
        ids = torch.randint(0, cfg.model.vocab_size, (4, cfg.train.seq_len), generator=gen)
        metrics = train_step(model, optimizer, [{"input_ids": ids[:2], "labels": ids[:2]},
                                                {"input_ids": ids[2:], "labels": ids[2:]}],
                             step, cfg.train, cfg.model, batch_fraction=1 / world,
                             commit_vote=vote)
        assert not metrics.skipped
        peers.apply(optimizer, step + 1, {"step": step + 1})
        losses.append(metrics.loss)
        if replicas:
            _copies_equal_owners(model, optimizer)
    return cfg, model, optimizer, layout, peers, losses


def _worker(rank: int, world_size: int, tmp: str) -> None:
    _, plain, _, _, _, plain_losses = _train(rank, 0)
    plain_state = full_state_dict(plain)
    cfg, model, optimizer, layout, peers, losses = _train(rank, 4)
    # the same training: only where each token's expert runs has moved
    for got, want in zip(losses, plain_losses, strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (losses, plain_losses)
    state = full_state_dict(model)
    for key, tensor in plain_state.items():
        # float sums in another order (rows computed on the other rank): Adam turns the last
        # bits of a near-zero gradient into up to lr-sized steps, so compare to the scale
        scale = float(tensor.abs().max())
        assert float((state[key] - tensor).abs().max()) <= 1e-4 * scale, key
    # no expert block needs a buddy copy: each has a copy on the other rank
    for plan in peers.plans:
        assert plan.copied, "the dense FSDP shards have no replica: they are copied"
    copied_keys = [layout.specs[i].key for i in peers.plans[rank].copied]
    assert not [k for k in copied_keys if ".experts." in k], copied_keys
    assert any(".experts." in layout.specs[i].key and layout.specs[i].replica
               for i in range(len(layout.specs)))
    torch.save({"own": layout.take(rank=rank, step=STEPS, meta={}),
                "copy": peers.find(1 - rank, STEPS),
                "holdings": Holdings(rank=rank, live=STEPS, wards=peers.holdings()),
                "plans": peers.plans, "state": state},
               os.path.join(tmp, f"rank{rank}.pt"))


def _two_ep_groups(rank: int, world_size: int) -> None:
    """W=4 in two EP groups of 2 (the owners' gradients are also summed over the groups)."""
    nodes = ["node-a", "node-a", "node-b", "node-b"]
    _, plain, _, _, _, plain_losses = _train(rank, 0, nodes)
    plain_state = full_state_dict(plain)
    _, model, _, _, _, losses = _train(rank, 4, nodes)  # checks the copies after every step
    for got, want in zip(losses, plain_losses, strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (losses, plain_losses)
    state = full_state_dict(model)
    for key, tensor in plain_state.items():
        assert float((state[key] - tensor).abs().max()) <= 1e-4 * float(tensor.abs().max()), key


def test_copies_follow_their_owners_across_two_ep_groups():
    launch(_two_ep_groups, 4)


def test_expert_replicas_train_like_their_owners_and_restore_a_lost_rank(tmp_path):
    launch(_worker, 2, str(tmp_path))
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reference = saved[0]["state"]
    for lost in (0, 1):
        survivor = saved[1 - lost]
        decision = decide_restore(2, {1 - lost: survivor["holdings"]}, survivor["plans"])
        assert decision.step == STEPS, decision.reason
        # the survivor's own shards (its experts and its copies of the lost rank's) and its
        # buddy copy of the lost rank's dense shards; no expert bytes in that copy
        copy = survivor["copy"]
        assert not [s.key for s in copy.specs if ".experts." in s.key]
        cfg = _config(4)
        plan = plan_mesh(1, cfg.parallel.gpus_per_node, cfg.model, cfg.parallel,
                         global_batch_size=cfg.train.global_batch_size)
        model = setup_model(cfg.model, plan, "cpu", seed=7)  # other values than the originals
        optimizer = build_optimizer(model, cfg.train)
        sources = [survivor["own"], copy]
        assert needed_sources(model, optimizer, [s.manifest() for s in sources]) == [0, 1]
        fill_from_shards(model, optimizer, sources)
        for key, tensor in reference.items():
            assert torch.equal(model.state_dict()[key], tensor), f"lost rank {lost}: {key}"
