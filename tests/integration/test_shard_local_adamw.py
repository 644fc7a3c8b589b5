"""ShardLocalAdamW: the update of DTensor parameters on their local shards is the same, bit for
bit, as torch's AdamW through DTensor, on 2 real gloo processes, for sharded and replicated
parameters on a 1-D and a 2-D mesh, with weight decay, through a restore of the state."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.integration.multiproc import launch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _params(mesh_1d, mesh_2d):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(8, 6, generator=gen), torch.randn(6, generator=gen),
            torch.randn(4, 8, 2, generator=gen)]
    return [
        torch.nn.Parameter(distribute_tensor(full[0], mesh_1d, [Shard(0)])),
        torch.nn.Parameter(distribute_tensor(full[1], mesh_1d, [Replicate()])),
        torch.nn.Parameter(distribute_tensor(full[2], mesh_2d, [Shard(0), Replicate()])),
    ]


def _run(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from elastic_moe.train.step import ShardLocalAdamW

    mesh_1d = init_device_mesh("cpu", (world_size,))
    mesh_2d = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("a", "b"))
    ours, theirs = _params(mesh_1d, mesh_2d), _params(mesh_1d, mesh_2d)

    def groups(params):
        return [{"params": [params[0], params[2]], "weight_decay": 0.1},
                {"params": [params[1]], "weight_decay": 0.0}]

    opt_ours = ShardLocalAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    opt_theirs = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                   foreach=False)
    gen = torch.Generator().manual_seed(1 + rank)
    for step in range(4):
        for a, b in zip(ours, theirs, strict=True):
            grad = DTensor.from_local(torch.randn(a.to_local().shape, generator=gen),
                                      a.device_mesh, a.placements)
            a.grad, b.grad = grad, grad.clone()
        for opt in (opt_ours, opt_theirs):
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)
            opt.step()
        if step == 1:  # a restored optimizer (the state dict of the other) goes on alike
            state = copy.deepcopy(opt_theirs.state_dict())  # shares no tensor with it
            opt_ours = ShardLocalAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                       foreach=False)
            opt_ours.load_state_dict(state)
            for a, b in zip(ours, theirs, strict=True):
                a.data.copy_(b.data)
    for a, b in zip(ours, theirs, strict=True):
        assert isinstance(a.data, DTensor) and a.placements == b.placements
        assert torch.equal(a.to_local(), b.to_local()), (a.to_local() - b.to_local()).abs().max()
        for key in ("exp_avg", "exp_avg_sq"):
            mine, ref = opt_ours.state[a][key], opt_theirs.state[b][key]
            assert isinstance(mine, DTensor), f"{key} left its DTensor layout"
            assert torch.equal(mine.to_local(), ref.to_local())
        assert float(opt_ours.state[a]["step"]) == float(opt_theirs.state[b]["step"]) == 4
    # and the update really moved the parameters (not a comparison of two untouched copies)
    start = _params(mesh_1d, mesh_2d)
    assert all(not torch.equal(a.to_local(), s.to_local()) for a, s in zip(ours, start, strict=True))


def test_shard_local_adamw_equals_adamw_through_dtensor_bit_for_bit():
    launch(_run, 2)
