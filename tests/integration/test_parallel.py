"""Multi-process (gloo, CPU) tests of FSDP2/HSDP + expert parallelism against one process.

Each world size is one spawn of W processes that runs every check for that size, to keep the
total runtime to tens of seconds on a 2-core machine. The single-process reference is computed
once in the test process and handed to the workers through a file.
"""

from __future__ import annotations

import dataclasses

import elastic_moe.kernels as kernels
import pytest
import torch
from torch.distributed.tensor import DTensor

from elastic_moe.config import ParallelConfig, debug
from elastic_moe.model.moe import RoutedExperts
from elastic_moe.model.transformer import Transformer
from elastic_moe.parallel import (
    ExpertParallelExperts,
    build_mesh,
    full_state_dict,
    plan_mesh,
    reduce_expert_grads,
    setup_model,
)
from elastic_moe.train.step import build_optimizer, train_step
from tests.integration.multiproc import launch

pytestmark = pytest.mark.integration

SEED = 7
GLOBAL_BATCH = 8
SEQ_LEN = 32
STEP = 3
# (gpus_per_node, ep, sequences per rank) per world size: FSDP and HSDP, ep = 1, 2 and world,
# and an uneven split of the global batch (as after a resize), weighted by batch_fraction.
LAYOUTS = {2: [(2, 1, (4, 4)), (2, 2, (4, 4)), (2, 2, (5, 3))],
           4: [(2, 1, (2, 2, 2, 2)), (2, 2, (2, 2, 2, 2)), (4, 4, (2, 2, 2, 2))]}


def _cfgs():
    cfg = debug()
    # No warmup (full lr) and a small clip threshold, so the step is sensitive and clipping runs.
    train = dataclasses.replace(cfg.train, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH,
                                warmup_steps=0, grad_clip=0.05)
    return cfg.model, train


def _global_batch() -> dict[str, torch.Tensor]:
    model_cfg, _ = _cfgs()
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, model_cfg.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)
    doc_ids = (torch.arange(SEQ_LEN) >= SEQ_LEN // 3).long().expand(GLOBAL_BATCH, -1).clone()
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_ids": doc_ids}


def _micro_batches(batch: dict[str, torch.Tensor], rows: range, size: int):
    return [{k: v[i:min(i + size, rows.stop)] for k, v in batch.items()}
            for i in range(rows.start, rows.stop, size)]


def _reference() -> dict:
    model_cfg, train_cfg = _cfgs()
    model = Transformer(model_cfg)
    model.init_weights(SEED)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, train_cfg)
    grads = _capture_grads(model, optimizer)
    metrics = train_step(model, optimizer, _micro_batches(_global_batch(), range(GLOBAL_BATCH), 4),
                         STEP, train_cfg, model_cfg)
    return {"init": init_state, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "grads": grads, "loss": metrics.loss, "lm_loss": metrics.lm_loss,
            "grad_norm": metrics.grad_norm}


def _capture_grads(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Record full (gathered) gradients as the optimizer sees them: reduced and clipped.

    Adam's first update is nearly scale-free (g / |g|), so comparing parameters alone would miss
    a wrong gradient scale; the gradients themselves are compared too.
    """
    grads: dict[str, torch.Tensor] = {}

    def hook(*_args) -> None:
        for name, param in model.named_parameters():
            grad = param.grad
            if isinstance(grad, DTensor):
                grad = grad.full_tensor()  # collective; same parameter order on every rank
            grads[name] = grad.detach().clone()

    optimizer.register_step_pre_hook(hook)
    return grads


def _assert_state_close(got: dict, want: dict, what: str, atol: float = 0.0) -> None:
    assert set(got) == set(want), f"{what}: keys differ {set(got) ^ set(want)}"
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=atol,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


# ----------------------------------------------------------------------------- workers
def _equivalence_worker(rank: int, world_size: int, ref_path: str) -> None:
    ref = torch.load(ref_path)
    model_cfg, train_cfg = _cfgs()
    batch = _global_batch()
    for gpus_per_node, ep, shares in LAYOUTS[world_size]:
        first = sum(shares[:rank])
        mine = _micro_batches(batch, range(first, first + shares[rank]), 2)
        prefs = ParallelConfig(max_workers=world_size, gpus_per_node=gpus_per_node,
                               expert_parallel_degree=ep)
        plan = plan_mesh(world_size, gpus_per_node, model_cfg, prefs,
                         global_batch_size=GLOBAL_BATCH)
        model = setup_model(model_cfg, plan, "cpu", SEED)
        what = f"W={world_size} {plan.describe()}"
        if ep > 1:
            assert any(isinstance(m, ExpertParallelExperts) for m in model.modules()), what
        _assert_state_close(full_state_dict(model), ref["init"], f"{what} init")
        optimizer = build_optimizer(model, train_cfg)
        grads = _capture_grads(model, optimizer)
        metrics = train_step(model, optimizer, mine, STEP, train_cfg, model_cfg,
                             batch_fraction=shares[rank] / GLOBAL_BATCH)
        what += f" shares {shares}"
        assert metrics.tokens == GLOBAL_BATCH * SEQ_LEN, f"{what}: tokens {metrics.tokens}"
        for field in ("loss", "lm_loss", "grad_norm"):
            got, want = getattr(metrics, field), ref[field]
            assert abs(got - want) <= 1e-5 * abs(want), f"{what}: {field} {got} != {want}"
        assert set(grads) == set(ref["grads"]), what
        for name, want in ref["grads"].items():
            torch.testing.assert_close(grads[name], want, rtol=1e-4,
                                       atol=1e-5 * float(want.abs().max()),
                                       msg=lambda m, n=name, w=what: f"{w} grad {n}: {m}")
        # atol 1e-5 ~ lr / 300: Adam's first step divides by |g| + eps, so gradients near eps
        # amplify summation-order differences; the gradient check above is the strict one.
        _assert_state_close(full_state_dict(model), ref["state"], f"{what} after step",
                            atol=1e-5)


def _dispatch_worker(rank: int, world_size: int) -> None:
    """ExpertParallelExperts vs the single-process reference on adversarial routings."""
    model_cfg, _ = _cfgs()
    num_experts, dim, top_k = model_cfg.num_routed_experts, model_cfg.dim, 2
    plan = plan_mesh(world_size, world_size, model_cfg,
                     ParallelConfig(max_workers=world_size, gpus_per_node=world_size,
                                    expert_parallel_degree=world_size))
    meshes = build_mesh(plan, "cpu")
    gen = torch.Generator().manual_seed(0)
    full = RoutedExperts(num_experts, dim, model_cfg.moe_inter_dim, "torch")
    with torch.no_grad():
        full.w13.normal_(0, 0.1, generator=gen)
        full.w2.normal_(0, 0.1, generator=gen)
    tokens_per_rank = [5, 3, 7, 1][:world_size]
    cases = {
        # every token of every rank goes to the experts of EP rank 0
        "all_to_rank0": lambda t: torch.stack(
            [torch.randperm(plan.experts_per_rank, generator=gen)[:top_k] for _ in range(t)]),
        # the last rank has no tokens at all; the others route uniformly
        "zero_tokens": lambda t: torch.stack(
            [torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(t)]),
        # only the last rank's experts receive tokens (others get zero rows)
        "all_to_last": lambda t: torch.stack(
            [num_experts - 1 - torch.randperm(plan.experts_per_rank, generator=gen)[:top_k]
             for _ in range(t)]),
    }
    for case, make_ids in cases.items():
        # Every rank draws every rank's inputs (same generator) to build the global reference.
        inputs = []
        for r in range(world_size):
            t = 0 if case == "zero_tokens" and r == world_size - 1 else tokens_per_rank[r]
            ids = make_ids(t) if t else torch.zeros(0, top_k, dtype=torch.long)
            inputs.append((torch.randn(t, dim, generator=gen), ids,
                           torch.rand(t, top_k, generator=gen), torch.randn(t, dim, generator=gen)))
        w13 = full.w13.detach().clone().requires_grad_()
        w2 = full.w2.detach().clone().requires_grad_()
        ref_loss = 0.0
        ref_out = []
        for x, ids, weights, cot in inputs:
            out = (kernels.routed_experts(x, ids, weights, w13, w2, backend="torch")
                   if len(x) else x.new_zeros(0, dim))
            ref_out.append(out)
            ref_loss = ref_loss + (out * cot).sum()
        ref_loss.backward()

        module = ExpertParallelExperts(full, meshes.ep, meshes.expert_replicate)
        x, ids, weights, cot = inputs[rank]
        x = x.clone().requires_grad_()
        out = module(x, ids, weights)
        torch.testing.assert_close(out, ref_out[rank].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, c=case: f"{c} forward: {m}")
        (out * cot).sum().backward()
        reduce_expert_grads(module)
        if len(x):
            x_ref = inputs[rank][0].clone().requires_grad_()
            out_ref = kernels.routed_experts(x_ref, ids, weights, full.w13.detach(),
                                             full.w2.detach(), backend="torch")
            (out_ref * cot).sum().backward()
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, c=case: f"{c} dx: {m}")
        else:
            assert out.shape == (0, dim)
        start = rank * plan.experts_per_rank
        local = slice(start, start + plan.experts_per_rank)
        torch.testing.assert_close(module.w13.grad.to_local(), w13.grad[local], rtol=1e-5,
                                   atol=1e-6, msg=lambda m, c=case: f"{c} dw13: {m}")
        torch.testing.assert_close(module.w2.grad.to_local(), w2.grad[local], rtol=1e-5,
                                   atol=1e-6, msg=lambda m, c=case: f"{c} dw2: {m}")


def _world_worker(rank: int, world_size: int, ref_path: str) -> None:
    _dispatch_worker(rank, world_size)
    _equivalence_worker(rank, world_size, ref_path)


@pytest.fixture(scope="module")
def reference_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("parallel") / "reference.pt")
    torch.save(_reference(), path)
    return path


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_matches_single_process(world_size: int, reference_path: str) -> None:
    """Dispatch edge cases with ep = world, then one train step per layout in LAYOUTS."""
    launch(_world_worker, world_size, reference_path)
