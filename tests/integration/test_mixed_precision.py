"""``train.mixed_precision`` end to end on CPU (torch runs bf16 there): FSDP2 policy + autocast.

Two gloo ranks, the debug model with expert parallelism over both. For ``bf16`` and ``fp32`` the
observed facts, not the config, are checked: the dtype of the unsharded weight a layer computes
with (FSDP2's all-gather in ``param_dtype``), the dtype of that layer's output (autocast), the
FSDP state's reduce dtype, the expert-parallel experts' compute dtype, and fp32 master weights
and gradients after a real ``train_step``. The bf16 loss must differ from the fp32 loss (another
numeric path really ran) but stay close to it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from elastic_moe.config import ParallelConfig, debug
from elastic_moe.parallel import ExpertParallelExperts, plan_mesh, setup_model
from elastic_moe.train.step import autocast_dtype, build_optimizer, train_step
from tests.integration.multiproc import launch

pytestmark = pytest.mark.integration

SEQ_LEN = 32


def test_autocast_dtype_follows_the_config_on_cpu() -> None:
    train = debug().train
    cpu = torch.device("cpu")
    assert autocast_dtype(dataclasses.replace(train, mixed_precision="bf16"), cpu) is torch.bfloat16
    assert autocast_dtype(dataclasses.replace(train, mixed_precision="fp32"), cpu) is None


def _batches(rank: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, debug().model.vocab_size, (4, SEQ_LEN + 1), generator=gen)
    mine = tokens[rank * 2:(rank + 1) * 2]
    return [{"input_ids": mine[:, :-1], "labels": mine[:, 1:]}]


def _worker(rank: int, world_size: int, results) -> None:
    cfg = debug()
    for name in ("bf16", "fp32"):
        train = dataclasses.replace(cfg.train, seq_len=SEQ_LEN, mixed_precision=name,
                                    warmup_steps=0)
        plan = plan_mesh(world_size, 2, cfg.model,
                         ParallelConfig(max_workers=2, gpus_per_node=2, expert_parallel_degree=2))
        model = setup_model(cfg.model, plan, "cpu", seed=3, mixed_precision=name)
        seen: dict[str, torch.dtype] = {}
        o_proj = model.layers[0].self_attn.o_proj

        def before(mod, _args, seen=seen) -> None:  # the unsharded weight it computes with
            seen.setdefault("weight", mod.weight.dtype)

        def after(_mod, _args, out, seen=seen) -> None:
            seen.setdefault("output", out.dtype)

        o_proj.register_forward_pre_hook(before)
        o_proj.register_forward_hook(after)
        optimizer = build_optimizer(model, train)
        grads: dict[str, torch.dtype] = {}

        def record(*_args, grads=grads, model=model) -> None:
            for pname, param in model.named_parameters():
                if param.grad is not None:
                    grads[pname] = param.grad.dtype

        optimizer.register_step_pre_hook(record)
        metrics = train_step(model, optimizer, _batches(rank), 0, train, cfg.model,
                             batch_fraction=0.5)
        experts = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
        policy = model._get_fsdp_state()._mp_policy
        masters = {p.dtype for p in model.parameters()}
        local = {p.to_local().dtype for p in model.parameters() if isinstance(p, DTensor)}
        results.put((rank, name, {
            "weight": seen["weight"], "output": seen["output"],
            "param_dtype": policy.param_dtype, "reduce_dtype": policy.reduce_dtype,
            "expert_compute": {e.compute_dtype for e in experts},
            "masters": masters | local, "grads": set(grads.values()), "loss": metrics.loss}))


def test_mixed_precision_sets_fsdp_policy_and_autocast() -> None:
    results = mp.get_context("spawn").SimpleQueue()
    launch(_worker, 2, results)
    got = {}
    while not results.empty():
        rank, name, facts = results.get()
        got[(rank, name)] = facts
    assert len(got) == 4
    for rank in (0, 1):
        bf16, fp32 = got[(rank, "bf16")], got[(rank, "fp32")]
        assert bf16["weight"] == torch.bfloat16 and bf16["output"] == torch.bfloat16
        assert bf16["param_dtype"] == torch.bfloat16 and bf16["reduce_dtype"] == torch.float32
        assert bf16["expert_compute"] == {torch.bfloat16}
        assert fp32["weight"] == torch.float32 and fp32["output"] == torch.float32
        assert fp32["param_dtype"] == torch.float32 and fp32["reduce_dtype"] == torch.float32
        assert fp32["expert_compute"] == {None}
        for facts in (bf16, fp32):  # master weights and their gradients stay fp32
            assert facts["masters"] == {torch.float32} and facts["grads"] == {torch.float32}
        assert bf16["loss"] != fp32["loss"]
        assert abs(bf16["loss"] - fp32["loss"]) < 0.05 * abs(fp32["loss"])
