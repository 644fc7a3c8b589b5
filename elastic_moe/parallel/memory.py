"""Per-worker memory estimate at launch: will the plan at this world size fit on a worker?

A worker holds, for the mesh plan of its world size (``mesh.py``):

* **training state** -- its FSDP shard of the dense weights and its EP shard of the routed
  experts as fp32 master weights (4 B/param), fp32 gradients (4 B/param) and two fp32 AdamW
  moments (8 B/param); the planner's ``TRAIN_BYTES_PER_PARAM`` (16) is the sum; with
  ``parallel.expert_replicas`` also its copies of other ranks' experts, at the same 16 B/param;
* **unsharded working set** -- FSDP2 all-gathers one unit (a transformer block) at a time in the
  parameter dtype and prefetches the next; backward holds one unit's unsharded gradient in the
  reduce dtype before the reduce-scatter;
* **activations** saved for backward at ``train.micro_batch_size`` (no activation checkpointing):
  per token and layer the attention projections, the MoE's dispatched copies of each token, the
  logits and their fp32 cross-entropy; on CPU, ``scaled_dot_product_attention`` with the packed
  document mask runs the math kernel, which keeps the ``heads x S x S`` scores and probabilities;
* on host memory only: the async checkpoint's staging copy of the state (``checkpoint.py``'s
  ``StagingBuffers`` keeps fp32 weights + moments resident) and a fixed per-process runtime cost
  (Python, torch, Ray worker).

:func:`init_bytes_per_rank` is exact rather than estimated: what each rank holds right after
``setup_model`` (the ``--init-dry-run`` report of ``jobs/train.py``), from shapes alone.

The other numbers are estimates, meant to refuse plans that are off by a wide margin before any worker
starts (tests check them against measured peaks within a factor); they are not a substitute for
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from elastic_moe.config import Config, ModelConfig, TrainConfig
from elastic_moe.model.init import rows_per_block
from elastic_moe.model.transformer import Transformer
from elastic_moe.parallel.mesh import (
    TRAIN_BYTES_PER_PARAM,
    MeshPlan,
    param_counts,
    plan_mesh,
    replica_slots,
)

logger = logging.getLogger(__name__)

GIB = 2**30
# Python + torch + a Ray worker process, measured as ~0.4-0.6 GiB RSS on CPU; CUDA context ~0.5.
RUNTIME_BYTES_PER_WORKER = GIB
# fp32 weights + two fp32 Adam moments: what the async checkpoint stager keeps on the host.
STAGED_BYTES_PER_PARAM = 12
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """Memory a worker may use: ``bytes_per_device`` shared by up to ``max_sharing`` workers.

    An accelerator's memory serves one worker (``max_sharing=1``); a CPU node's RAM is shared by
    all workers placed on it (``max_sharing`` = worker slots per node), so at world size W each
    worker gets ``bytes_per_device / min(W, max_sharing)``.
    """

    bytes_per_device: int
    max_sharing: int
    where: str  # e.g. "host RAM of this machine", "GPU memory (parallel.memory_per_gpu_gib)"
    host: bool  # host RAM (counts checkpoint staging) rather than accelerator memory

    def per_worker(self, world_size: int) -> int:
        return self.bytes_per_device // max(1, min(world_size, self.max_sharing))

    def describe(self, world_size: int) -> str:
        sharing = min(world_size, self.max_sharing)
        shared = f" / {sharing} workers" if sharing > 1 else ""
        return (f"{self.per_worker(world_size) / GIB:.1f} GiB per worker "
                f"({self.bytes_per_device / GIB:.1f} GiB {self.where}{shared})")


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes one worker needs, by kind."""

    world_size: int
    micro_batch_size: int
    parameters: int
    gradients: int
    optimizer: int
    unsharded: int  # FSDP all-gather / reduce-scatter working set
    activations: int
    staging: int  # async checkpoint staging copy (host budgets only)
    runtime: int
    expert_copies: int = 0  # parallel.expert_replicas: the copies' weights, grads and moments

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.unsharded
                + self.activations + self.staging + self.runtime + self.expert_copies)

    def describe(self) -> str:
        parts = [("params", self.parameters), ("grads", self.gradients),
                 ("optimizer", self.optimizer), ("unsharded", self.unsharded),
                 (f"activations@micro_batch={self.micro_batch_size}", self.activations),
                 ("ckpt staging", self.staging), ("runtime", self.runtime),
                 ("expert copies", self.expert_copies)]
        inner = ", ".join(f"{name} {value / GIB:.2f}" for name, value in parts if value)
        return f"{self.total / GIB:.1f} GiB per worker at W={self.world_size} ({inner} GiB)"


def _attention_elements_per_token(cfg: ModelConfig, seq_len: int, materialized_scores: bool) -> int:
    heads = cfg.num_heads
    q = (2 * cfg.q_lora_rank if cfg.q_lora_rank else 0) + heads * cfg.qk_head_dim
    kv = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim + heads * (cfg.qk_nope_head_dim
                                                                  + cfg.v_head_dim)
    full = 2 * heads * cfg.qk_head_dim + 2 * heads * cfg.v_head_dim  # q/k after RoPE, v, out
    scores = 2 * heads * seq_len if materialized_scores else 0  # scores + probs, per query
    return 3 * cfg.dim + q + kv + full + scores  # + norm in/out, residual


def _moe_elements_per_token(cfg: ModelConfig) -> int:
    k, ffn = cfg.num_activated_experts, cfg.moe_inter_dim
    routed = k * (2 * cfg.dim + 4 * ffn)  # dispatched input + output, gate/up/act/product
    shared = cfg.num_shared_experts * 4 * ffn + cfg.dim
    router = 3 * cfg.num_routed_experts  # fp32 logits, scores, biased scores (element-counted)
    return 2 * cfg.dim + routed + shared + router


def _dense_ffn_elements_per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.dim + 4 * cfg.inter_dim


def activation_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig, micro_batch_size: int,
                     *, materialized_scores: bool) -> int:
    """Activations saved for backward by one micro-batch of ``micro_batch_size`` sequences."""
    act = DTYPE_BYTES[train_cfg.mixed_precision]
    tokens = micro_batch_size * train_cfg.seq_len
    attn = _attention_elements_per_token(model_cfg, train_cfg.seq_len, materialized_scores)
    per_token = (model_cfg.num_layers * attn
                 + model_cfg.num_moe_layers * _moe_elements_per_token(model_cfg)
                 + model_cfg.num_dense_layers * _dense_ffn_elements_per_token(model_cfg)
                 # each MTP module: projection of [norm(h), norm(emb)] + one MoE block
                 + model_cfg.num_mtp_modules * (4 * model_cfg.dim + attn
                                                + _moe_elements_per_token(model_cfg)))
    heads = 1 + model_cfg.num_mtp_modules
    # logits in the compute dtype, then fp32 logits + log-softmax in the cross entropy
    logits = heads * model_cfg.vocab_size * (act + 8)
    return tokens * (per_token * act + logits)


def estimate_worker_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, plan: MeshPlan, *,
                           device_type: str, host: bool, async_save: bool = True,
                           micro_batch_size: int | None = None,
                           expert_replicas: int = 0) -> MemoryEstimate:
    """Bytes one worker of ``plan`` needs (see the module docstring for what is counted).

    ``device_type`` ``"cpu"`` or ``"cuda"`` (decides the attention kernel's memory); ``host``:
    the budget is host RAM, which also holds the checkpoint staging copy. ``expert_replicas``:
    ``parallel.expert_replicas``, copies of other ranks' experts (with ``ep > 1``), each with
    the training state of the expert it copies (never checkpointed: no staging).
    """
    micro = micro_batch_size or train_cfg.micro_batch_size
    dense, routed = param_counts(model_cfg)
    local = math.ceil(dense / plan.dp_shard_degree) + math.ceil(routed / plan.expert_parallel_degree)
    param_bytes = 2 if train_cfg.mixed_precision == "bf16" else 4
    unsharded = 0
    if plan.dp_shard_degree > 1:
        # the biggest FSDP unit: one block (its experts too unless EP holds them), or the root
        block_dense = dense / max(model_cfg.num_layers + model_cfg.num_mtp_modules, 1)
        block_routed = (0 if plan.expert_parallel_degree > 1 else
                        routed / max(model_cfg.num_moe_layers + model_cfg.num_mtp_modules, 1))
        unit = max(block_dense + block_routed, 2 * model_cfg.vocab_size * model_cfg.dim)
        unsharded = int(unit * (2 * param_bytes + 4))  # current + prefetched, fp32 grads
    # Scores are materialized on CPU (math SDPA with a mask); CUDA uses a fused kernel.
    activations = activation_bytes(model_cfg, train_cfg, micro,
                                   materialized_scores=device_type == "cpu")
    per_param = TRAIN_BYTES_PER_PARAM // 4  # 4 fp32 copies: weights, grads, 2 moments
    experts = model_cfg.num_routed_experts
    copies = replica_slots(experts, plan.expert_parallel_degree, expert_replicas)
    return MemoryEstimate(
        expert_copies=TRAIN_BYTES_PER_PARAM * copies * (routed // max(experts, 1)),
        world_size=plan.world_size, micro_batch_size=micro,
        parameters=local * 4, gradients=local * 4, optimizer=local * 4 * (per_param - 2),
        unsharded=unsharded, activations=activations,
        staging=local * STAGED_BYTES_PER_PARAM if (host and async_save) else 0,
        runtime=RUNTIME_BYTES_PER_WORKER)


def _plan_within(cfg: Config, world_size: int, budget: MemoryBudget) -> MeshPlan:
    """The planner's plan at ``world_size`` with the worker budget as its memory budget."""
    prefs = dataclasses.replace(
        cfg.parallel, min_workers=1, max_workers=max(world_size, cfg.parallel.max_workers),
        memory_per_gpu_gib=budget.per_worker(world_size) / GIB)
    return plan_mesh(world_size, cfg.parallel.gpus_per_node, cfg.model, prefs,
                     global_batch_size=cfg.train.global_batch_size)


def _fits(cfg: Config, world_size: int, budget: MemoryBudget, device_type: str,
          micro_batch_size: int | None = None) -> MemoryEstimate | None:
    try:
        plan = _plan_within(cfg, world_size, budget)
    except ValueError:
        return None
    estimate = estimate_worker_memory(cfg.model, cfg.train, plan, device_type=device_type,
                                      host=budget.host, async_save=cfg.checkpoint.async_save,
                                      micro_batch_size=micro_batch_size,
                                      expert_replicas=cfg.parallel.expert_replicas)
    return estimate if estimate.total <= budget.per_worker(world_size) else None


def _plan_or_unbounded(cfg: Config, world_size: int) -> MeshPlan:
    prefs = dataclasses.replace(cfg.parallel, min_workers=1,
                                max_workers=max(world_size, cfg.parallel.max_workers),
                                memory_per_gpu_gib=0.0)
    return plan_mesh(world_size, cfg.parallel.gpus_per_node, cfg.model, prefs,
                     global_batch_size=cfg.train.global_batch_size)


def check_memory(cfg: Config, world_size: int, budget: MemoryBudget, *,
                 device_type: str, max_search: int = 4096) -> MemoryEstimate:
    """Estimate one worker's memory at ``world_size``; ``ValueError`` if it exceeds ``budget``.

    The planner gets the per-worker budget (``parallel.memory_per_gpu_gib``) so that it picks an
    expert-parallel degree whose training state fits; the estimate then adds activations and
    working sets. The error names both numbers and what would fit: the nearest world size (with
    the number of such nodes it needs when workers share a node's RAM) and the largest
    ``train.micro_batch_size`` that fits at this world size.
    """
    budget_bytes = budget.per_worker(world_size)
    try:
        plan = _plan_within(cfg, world_size, budget)
    except ValueError as exc:  # no expert-parallel degree keeps the training state in budget
        plan = _plan_or_unbounded(cfg, world_size)
        logger.debug("planner within %.1f GiB: %s", budget_bytes / GIB, exc)
    estimate = estimate_worker_memory(cfg.model, cfg.train, plan, device_type=device_type,
                                      host=budget.host, async_save=cfg.checkpoint.async_save,
                                      expert_replicas=cfg.parallel.expert_replicas)
    if estimate.total <= budget_bytes:
        logger.debug("memory check: ~%s fits %s", estimate.describe(), budget.describe(world_size))
        return estimate
    advice = []
    micro = next((m for m in range(cfg.train.micro_batch_size - 1, 0, -1)
                  if _fits(cfg, world_size, budget, device_type, m)), None)
    if micro:
        advice.append(f"--set train.micro_batch_size={micro} fits at W={world_size}")
    limit = min(max_search, cfg.train.global_batch_size)
    sizes = range(world_size + 1, limit + 1)
    bigger = next((w for w in sizes if _fits(cfg, w, budget, device_type)), None)
    if bigger:
        nodes = -(-bigger // budget.max_sharing)
        where = (f" ({nodes} nodes like this one)" if budget.max_sharing > 1 and nodes > 1
                 else "")
        advice.append(f"--workers {bigger} fits{where}")
    if not advice:
        best = estimate_worker_memory(
            cfg.model, cfg.train, _plan_or_unbounded(cfg, limit), device_type=device_type,
            host=budget.host, async_save=cfg.checkpoint.async_save, micro_batch_size=1,
            expert_replicas=cfg.parallel.expert_replicas)
        advice.append(f"no world size up to {limit} (train.global_batch_size) and no "
                      f"micro-batch fits: even W={limit} at micro_batch_size=1 needs "
                      f"{best.describe()} > {budget.describe(limit)}; choose a smaller "
                      "recipe, a shorter train.seq_len or bigger machines")
    raise ValueError(
        f"not enough memory for this plan: estimated {estimate.describe()} > "
        f"{budget.describe(world_size)}; {'; '.join(advice)}"
        + ("; parallel.memory_per_gpu_gib overrides the detected budget" if not budget.host
           else ""))


# ---------------------------------------------------------------------------------------------
# init dry run: what each rank holds right after initialisation, from shapes alone


@dataclass(frozen=True)
class InitReport:
    """Per-rank bytes of initialised parameters and buffers for one mesh plan."""

    world_size: int
    dp_shard_degree: int
    expert_parallel_degree: int
    bytes_per_rank: tuple[int, ...]  # parameters held by each rank (plus replicated buffers)
    transient_bytes: int  # the largest row block drawn at once
    total_bytes: int  # the whole model, for comparison

    def describe(self) -> str:
        gib = 2**30
        most, least = max(self.bytes_per_rank), min(self.bytes_per_rank)
        return (f"init at W={self.world_size} (dp_shard={self.dp_shard_degree}, "
                f"ep={self.expert_parallel_degree}): {most / gib:.2f} GiB on the fullest rank "
                f"({least / gib:.2f} GiB on the emptiest) + {self.transient_bytes / 2**20:.1f} "
                f"MiB transient per drawn block; whole model {self.total_bytes / gib:.1f} GiB")


def _chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of chunk ``index`` when ``torch.chunk`` splits ``rows`` into ``parts`` (FSDP2)."""
    size = -(-rows // parts)
    return max(0, min(size, rows - index * size))


def init_bytes_per_rank(model_cfg: ModelConfig, plan: MeshPlan,
                        dtype: torch.dtype = torch.float32) -> InitReport:
    """What each rank of ``plan`` holds after ``setup_model``; allocates nothing.

    Routed experts are split over ``ep`` ranks (then replicated); with ``ep == 1`` FSDP shards
    them like the dense weights: dim 0 in ``torch.chunk`` pieces over ``dp_shard``.
    """
    with torch.device("meta"):
        model = Transformer(model_cfg)
    element = torch.empty((), dtype=dtype).element_size()
    per_rank = [0] * plan.world_size
    transient = 0
    total = 0
    ep = plan.expert_parallel_degree
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        total += math.prod(shape) * element
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        transient = max(transient, rows_per_block(shape) * row * 4)
        for rank in range(plan.world_size):
            dp_shard_rank = rank % plan.dp_shard_degree
            if ".experts." in name and ep > 1:
                rows = shape[0] // ep
            else:
                rows = _chunk_rows(shape[0], plan.dp_shard_degree, dp_shard_rank)
            per_rank[rank] += rows * row * element
    buffers = sum(b.numel() * 4 for n, b in model.named_buffers())
    return InitReport(world_size=plan.world_size, dp_shard_degree=plan.dp_shard_degree,
                      expert_parallel_degree=ep,
                      bytes_per_rank=tuple(b + buffers for b in per_rank),
                      transient_bytes=transient, total_bytes=total)


__all__ = ["InitReport", "MemoryBudget", "MemoryEstimate", "activation_bytes",
           "check_memory", "estimate_worker_memory", "init_bytes_per_rank"]
