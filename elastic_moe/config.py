"""Dataclass configs and named recipes.

A recipe is a plain function returning the root :class:`Config`; the CLI picks one by name and
applies ``--set section.field=value`` overrides (unknown keys are rejected). Every config validates
itself in ``__post_init__`` and raises ``ValueError`` naming the field, its value and the rule.

Model field names follow DeepSeek-V3's inference code where they exist, with counts prefixed
``num_`` (the project's one name for a count): ``num_routed_experts`` is DeepSeek's
``n_routed_experts``, ``num_expert_groups`` its ``n_expert_groups`` (HF ``n_group``),
``num_limited_groups`` its ``n_limited_groups`` (HF ``topk_group``), ``num_activated_experts``
its ``n_activated_experts`` (HF ``num_experts_per_tok``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


def _require(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: {rule}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """DeepSeek-V3 architecture hyper-parameters (arXiv:2412.19437, section 2)."""

    vocab_size: int = 129280
    dim: int = 7168  # residual stream width
    inter_dim: int = 18432  # hidden width of the dense-layer SwiGLU FFN
    num_layers: int = 61
    num_dense_layers: int = 3  # the first layers use a dense FFN instead of MoE (V3 sec. 4.2)
    num_heads: int = 128
    norm_eps: float = 1e-6
    # moe
    moe_inter_dim: int = 2048  # hidden width of one routed/shared expert
    num_routed_experts: int = 256
    num_shared_experts: int = 1
    num_activated_experts: int = 8  # top-k routed experts per token
    num_expert_groups: int = 8  # routing groups (one per node in V3's deployment)
    num_limited_groups: int = 4  # a token may only use experts from this many groups
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    route_scale: float = 2.5  # gate weights are normalized over the k chosen, then scaled
    bias_update_speed: float = 1e-3  # gamma of aux-loss-free balancing (V3 sec. 2.1.2)
    seq_aux_alpha: float = 1e-4  # complementary sequence-wise balance loss weight
    # auto: the fastest measured on the device (kernels.resolve_backend); torch on CPU
    expert_backend: Literal["torch", "triton", "grouped_mm", "auto"] = "auto"
    # mla
    q_lora_rank: int = 1536  # 0 = full-rank query projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # decoupled RoPE key, shared across heads
    v_head_dim: int = 128
    # yarn (long-context RoPE scaling, arXiv:2309.00071)
    max_seq_len: int = 4096  # longest sequence the RoPE tables are built for
    original_seq_len: int = 4096  # pre-training context; YaRN applies when max_seq_len exceeds it
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # mtp
    num_mtp_modules: int = 1  # depth D of multi-token prediction (V3 sec. 2.2)
    init_std: float = 0.006  # V3 sec. 4.2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "inter_dim", "num_layers", "num_heads", "moe_inter_dim",
                     "num_routed_experts", "num_activated_experts", "num_expert_groups",
                     "num_limited_groups", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                     "max_seq_len", "original_seq_len"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        for name in ("num_shared_experts", "q_lora_rank", "num_mtp_modules", "num_dense_layers",
                     "qk_rope_head_dim"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        _require(self.num_dense_layers <= self.num_layers, "num_dense_layers",
                 self.num_dense_layers, f"must be <= num_layers ({self.num_layers})")
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim,
                 "must be even (RoPE rotates pairs)")
        _require(self.score_func in ("sigmoid", "softmax"), "score_func", self.score_func,
                 "must be 'sigmoid' or 'softmax'")
        _require(self.expert_backend in ("torch", "triton", "grouped_mm", "auto"),
                 "expert_backend", self.expert_backend,
                 "must be 'torch', 'triton', 'grouped_mm' or 'auto'")
        _require(self.num_activated_experts <= self.num_routed_experts, "num_activated_experts",
                 self.num_activated_experts,
                 f"top-k cannot exceed num_routed_experts ({self.num_routed_experts})")
        _require(self.num_routed_experts % self.num_expert_groups == 0, "num_routed_experts",
                 self.num_routed_experts,
                 f"must be divisible by num_expert_groups ({self.num_expert_groups})")
        _require(self.num_limited_groups <= self.num_expert_groups, "num_limited_groups",
                 self.num_limited_groups,
                 f"must be <= num_expert_groups ({self.num_expert_groups})")
        per_group = self.num_routed_experts // self.num_expert_groups
        _require(self.num_activated_experts <= per_group * self.num_limited_groups,
                 "num_activated_experts", self.num_activated_experts,
                 f"must be <= experts reachable in the allowed groups "
                 f"({self.num_limited_groups} groups x {per_group} experts)")
        if self.num_expert_groups > 1:
            _require(per_group >= 2, "num_expert_groups", self.num_expert_groups,
                     "each group needs >= 2 experts (group score = sum of its top-2)")
        _require(self.bias_update_speed >= 0, "bias_update_speed", self.bias_update_speed,
                 "must be >= 0")
        _require(self.seq_aux_alpha >= 0, "seq_aux_alpha", self.seq_aux_alpha, "must be >= 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Optimizer, schedule and batch; the global batch stays fixed across resizes by default."""

    steps: int = 1000
    seq_len: int = 4096
    global_batch_size: int = 16  # sequences per optimizer step, across all data-parallel ranks
    micro_batch_size: int = 1  # sequences per forward/backward on one rank
    lr: float = 2.2e-4
    min_lr: float = 2.2e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    mtp_loss_weight: float = 0.3  # lambda (0.3 early in V3, 0.1 later)
    # bf16: FSDP2 gathers bf16 params and reduces grads in fp32, autocast bf16 (CUDA and CPU);
    # fp32 master weights and optimizer state either way.
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    log_freq: int = 1
    eval_every: int = 0  # steps between validation-loss evaluations (val_loss to MLflow); 0 = off
    eval_sequences: int = 32  # the fixed validation set: the first N sequences of its manifest
    # What happens to the global batch when the data-parallel size changes: "constant_batch"
    # keeps it (grad accumulation adapts), "scale_lr" keeps the per-rank batch and scales LR.
    resize_policy: Literal["constant_batch", "scale_lr"] = "constant_batch"
    # A step with a non-finite loss or gradient norm on any rank is skipped on every rank. After
    # this many skipped in a row the group rolls back to the last checkpoint from before them
    # and skips the batches since (PaLM's answer to loss spikes).
    max_skipped_steps: int = 5
    max_rollbacks: int = 2  # rollbacks a run survives before it fails as diverged (exit 6)

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "global_batch_size", "micro_batch_size", "log_freq",
                     "eval_sequences"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        _require(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0 (0 = off)")
        # lr = 0 freezes the weights: a round trip through training, or evaluation only
        _require(self.lr >= 0, "lr", self.lr, "must be >= 0")
        _require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr,
                 f"must be in [0, lr={self.lr}]")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _require(self.max_skipped_steps >= 1, "max_skipped_steps", self.max_skipped_steps,
                 "must be >= 1")
        _require(self.max_rollbacks >= 0, "max_rollbacks", self.max_rollbacks, "must be >= 0")
        _require(self.mtp_loss_weight >= 0, "mtp_loss_weight", self.mtp_loss_weight, "must be >= 0")
        _require(self.mixed_precision in ("bf16", "fp32"), "mixed_precision",
                 self.mixed_precision, "must be 'bf16' or 'fp32'")
        _require(self.resize_policy in ("constant_batch", "scale_lr"), "resize_policy",
                 self.resize_policy, "must be 'constant_batch' or 'scale_lr'")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where training data comes from; an empty manifest means the bundled sample corpus."""

    manifest: str = ""  # path of a prepared manifest.json; "" = prepare the bundled corpus
    # Validation manifest for train.eval_every; "" = the one prepare_data.py --val-fraction
    # wrote beside data.manifest, or the bundled corpus's held-out set.
    val_manifest: str = ""
    cache_dir: str = "outputs/data"  # where the bundled corpus is prepared
    tokenizer_vocab_size: int = 102400  # BPE vocab when a tokenizer is trained on the corpus
    num_workers: int = 1  # data-worker actors
    prefetch: int = 4  # batches each consumer keeps in flight
    # A sequence that cannot be trained on (a token id >= the manifest's vocab_size): "stop"
    # the run (exit 3, naming shard, row and value), or "skip" it -- the step trains on the rest
    # of its batch, and the sample is counted (MLflow bad_samples) and named in the log.
    bad_samples: Literal["stop", "skip"] = "stop"

    def __post_init__(self) -> None:
        _require(self.tokenizer_vocab_size >= 260, "tokenizer_vocab_size",
                 self.tokenizer_vocab_size, "must be >= 260 (256 bytes + special tokens)")
        _require(self.num_workers > 0, "num_workers", self.num_workers, "must be positive")
        _require(self.prefetch >= 0, "prefetch", self.prefetch, "must be >= 0")
        _require(self.bad_samples in ("stop", "skip"), "bad_samples", self.bad_samples,
                 "must be 'stop' or 'skip'")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Elastic sizes and placement preferences for the mesh planner."""

    min_workers: int = 1
    max_workers: int = 1
    gpus_per_node: int = 8
    expert_parallel_degree: int = 0  # 0 = let the planner choose
    dp_replicate_degree: int = 0  # 0 = let the planner choose (HSDP replicas across nodes)
    # Training-state budget per accelerator for the planner (fp32 weights + grads + Adam);
    # 0 = no check. Big MoEs need it: without it the planner keeps EP inside a node even when
    # the experts then cannot fit.
    memory_per_gpu_gib: float = 0.0
    # Load-driven expert replication: each expert-parallel rank holds this many extra routed
    # experts per MoE layer, copies of the hottest experts owned by ranks in other failure
    # domains (nodes). Tokens for a replicated expert are split between its copies, and a lost
    # node leaves every replicated expert a live copy (no buddy copy needed for those experts).
    # 0 = off; used only when expert parallelism spans several ranks (ep > 1).
    expert_replicas: int = 0

    def __post_init__(self) -> None:
        _require(self.min_workers > 0, "min_workers", self.min_workers, "must be positive")
        _require(self.max_workers >= self.min_workers, "max_workers", self.max_workers,
                 f"must be >= min_workers ({self.min_workers})")
        _require(self.gpus_per_node > 0, "gpus_per_node", self.gpus_per_node, "must be positive")
        _require(self.expert_parallel_degree >= 0, "expert_parallel_degree",
                 self.expert_parallel_degree, "must be >= 0 (0 = auto)")
        _require(self.dp_replicate_degree >= 0, "dp_replicate_degree",
                 self.dp_replicate_degree, "must be >= 0 (0 = auto)")
        _require(self.memory_per_gpu_gib >= 0, "memory_per_gpu_gib", self.memory_per_gpu_gib,
                 "must be >= 0 (0 = no check)")
        _require(self.expert_replicas >= 0, "expert_replicas", self.expert_replicas,
                 "must be >= 0 (0 = no replicas)")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Distributed checkpoints: where, how often, how many kept."""

    dir: str = "outputs/checkpoints"  # local path or fsspec URL
    every_steps: int = 100
    keep_last: int = 3  # retention: the last K committed checkpoints ...
    keep_every: int = 0  # ... plus every N-th step (0 = none extra)
    async_save: bool = True
    # A new run starts from these HF-layout weights (directory or fsspec URL; jobs/train.py
    # --init-from) instead of random init, until it has committed its first checkpoint.
    init_from: str = ""
    # One request to object storage (s3://: connect, send, read) that takes longer fails, and is
    # tried storage_attempts times: a save against a storage server that stopped answering
    # fails within about 5 * storage_attempts * storage_timeout_s (s3fs retries 5 times on top)
    # instead of hanging. The run goes on; the next due save retries (docs/troubleshooting.md).
    storage_timeout_s: float = 30.0
    storage_attempts: int = 2

    def __post_init__(self) -> None:
        _require(self.every_steps > 0, "every_steps", self.every_steps, "must be positive")
        _require(self.storage_timeout_s > 0, "storage_timeout_s", self.storage_timeout_s,
                 "must be positive")
        _require(self.storage_attempts >= 1, "storage_attempts", self.storage_attempts,
                 "must be >= 1")
        _require(self.keep_last > 0, "keep_last", self.keep_last,
                 "must be positive (the latest checkpoint is always kept)")
        _require(self.keep_every >= 0, "keep_every", self.keep_every, "must be >= 0 (0 = off)")


@dataclass(kw_only=True, slots=True)
class ElasticConfig:
    """Failure handling and resizing of the elastic worker group (actors/worker_group.py)."""

    # faults (lost, hung or cut-off workers) the run survives in any failure_window_s; -1 = no
    # limit. Errors (exceptions in our code or data) are not faults and are not counted.
    max_failures: int = 3
    failure_window_s: float = 3600.0  # the budget's window; 0 = the whole run
    # Warmed workers kept outside the group (each in its own slot, holding no state): a lost
    # member's place is taken by a spare at once, and the spare is replaced in the background.
    spares: int = 0
    # Process-group timeout: the last resort for a collective that never completes. Dead and
    # hung ranks are found much sooner (connection loss; missed pings, hang_timeout_s).
    collective_timeout_s: float = 120.0
    hang_timeout_s: float = 5.0  # a worker silent this long is hung: fenced off (killed)
    # How often each worker renews its lease with the coordinator. A worker without an answer
    # for hang_timeout_s (cut off by a partition, which no kill reaches) stops itself; several
    # renewals must fit in that time, or one slow answer would end a healthy worker.
    lease_interval_s: float = 1.0
    resize_check_s: float = 10.0  # how often the group looks for capacity to grow
    # How long to wait for min_workers to fit (at launch, and after losses below the minimum;
    # autoscaler nodes take minutes to boot) before giving up with what is missing;
    # --wait-for-capacity sets it.
    capacity_wait_s: float = 600.0
    # live: survivors keep their processes and state and rebuild in place (peer copies in
    # memory; DCP only when every copy of a shard is gone); restart: every change restarts
    # every worker from the last committed checkpoint (the slower path, for comparison).
    recovery: Literal["live", "restart"] = "live"
    # Each rank's buddy (on another node) keeps a copy of the blocks that have no replica on
    # another node and applies the rank's updates to it every step (train/peer_copies.py).
    # False: no copies; a lost worker whose blocks have no live replica means the checkpoint.
    peer_copies: bool = True
    # Stragglers (train/stragglers.py): a rank without which the steps would be >=
    # straggler_ratio x shorter, over a window of straggler_steps steps, is flagged (its own
    # compute against the other ranks', and the time it stalled); it is evicted when the
    # goodput model says the group is faster without it (0 = no straggler handling).
    straggler_ratio: float = 1.5
    straggler_steps: int = 10
    # The network interface the process groups (gloo, NCCL) bind to on every node, e.g. "ens5"
    # for the fast NIC of a multi-homed node; "" = the interface that holds the node's Ray
    # address (ray start --node-ip-address). Never what the hostname resolves to (127.0.0.1 or
    # 127.0.1.1 on many machines). A node without it fails the run (docs/elastic.md).
    network_interface: str = ""

    def __post_init__(self) -> None:
        _require(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= -1")
        _require(self.failure_window_s >= 0, "failure_window_s", self.failure_window_s,
                 "must be >= 0 (seconds; 0 = the whole run)")
        _require(self.spares >= 0, "spares", self.spares, "must be >= 0")
        _require(self.collective_timeout_s > 0, "collective_timeout_s",
                 self.collective_timeout_s, "must be positive (seconds)")
        _require(self.hang_timeout_s > 0, "hang_timeout_s", self.hang_timeout_s,
                 "must be positive (seconds)")
        _require(0 < self.lease_interval_s <= self.hang_timeout_s / 3, "lease_interval_s",
                 self.lease_interval_s, f"must be positive and at most hang_timeout_s / 3 "
                 f"({self.hang_timeout_s / 3:g} s): several renewals fit in one hang_timeout_s")
        _require(self.resize_check_s >= 0, "resize_check_s", self.resize_check_s, "must be >= 0")
        _require(self.capacity_wait_s >= 0, "capacity_wait_s", self.capacity_wait_s,
                 "must be >= 0 (seconds)")
        _require(self.straggler_ratio == 0 or self.straggler_ratio > 1, "straggler_ratio",
                 self.straggler_ratio, "must be > 1 (x the step time without the rank), or 0 = off")
        _require(self.straggler_steps >= 1, "straggler_steps", self.straggler_steps,
                 "must be >= 1")
        _require(self.recovery in ("live", "restart"), "recovery", self.recovery,
                 "must be 'live' or 'restart'")
        _require(len(self.network_interface) < 16 and not any(
            c.isspace() or c in ",/" for c in self.network_interface), "network_interface",
            self.network_interface, "must be one interface name (at most 15 characters, no "
            "spaces, commas or slashes), or empty for the Ray address's interface")


@dataclass(kw_only=True, slots=True)
class TrackingConfig:
    """MLflow; an empty tracking_uri means $MLFLOW_TRACKING_URI or sqlite in the working dir."""

    tracking_uri: str = ""
    experiment: str = "elastic-moe"
    run_name: str = ""
    # Dense bf16 peak of one accelerator in TFLOP/s for the logged MFU; 0 = known GPUs by name
    # (elastic_moe.model.flops), no MFU elsewhere.
    peak_tflops: float = 0.0
    # The coordinator's tracker sends to MLflow from a background thread, so training never waits
    # on it. While the server is unreachable, records stay buffered and are retried after
    # retry_s, 2*retry_s, ..., at most max_retry_s apart: a restarted server gets the backlog
    # within max_retry_s.
    retry_s: float = 2.0
    max_retry_s: float = 30.0
    # At the end of the run, how long to keep trying to send what is still buffered (and to mark
    # the run FINISHED / FAILED) before reporting it unsent and exiting.
    flush_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _require(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "must be >= 0")
        _require(self.retry_s > 0, "retry_s", self.retry_s, "must be positive (seconds)")
        _require(self.max_retry_s >= self.retry_s, "max_retry_s", self.max_retry_s,
                 f"must be >= retry_s ({self.retry_s})")
        _require(self.flush_timeout_s >= 0, "flush_timeout_s", self.flush_timeout_s,
                 "must be >= 0 (seconds)")


@dataclass(kw_only=True, slots=True)
class Config:
    """The root config: one per run."""

    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _require(self.train.seq_len <= self.model.max_seq_len, "train.seq_len",
                 self.train.seq_len, f"must be <= model.max_seq_len ({self.model.max_seq_len})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict` (configs travel to Ray workers as plain dicts)."""
        sections = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "name"}
        types = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig,
                 "parallel": ParallelConfig, "checkpoint": CheckpointConfig,
                 "elastic": ElasticConfig, "tracking": TrackingConfig}
        assert set(types) == set(sections), "Config.from_dict is missing a section"
        return cls(name=d.get("name", "custom"),
                   **{name: types[name](**d[name]) for name in types if name in d})

    def flat(self) -> dict[str, Any]:
        """``{"model.dim": 7168, ...}``: the form MLflow params and ``--set`` use."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    out[f"{section}.{key}"] = value
            else:
                out[section] = values
        return out


# ---------------------------------------------------------------------------------------------
# recipes


def deepseek_v3_671b() -> Config:
    """The published DeepSeek-V3 configuration (arXiv:2412.19437 sec. 4.2, HF config.json)."""
    model = ModelConfig(max_seq_len=16384, original_seq_len=4096, rope_factor=40.0)
    return Config(
        name="deepseek_v3_671b",
        model=model,
        train=TrainConfig(steps=100_000, seq_len=4096, global_batch_size=15360, lr=2.2e-4,
                          min_lr=2.2e-5, warmup_steps=2000),
        parallel=ParallelConfig(min_workers=256, max_workers=2048, gpus_per_node=8),
    )


def small() -> Config:
    """DeepSeek-V2-Lite / Moonlight-sized MoE (~16B total, ~2.7B active) for one or a few GPUs."""
    model = ModelConfig(
        vocab_size=102400, dim=2048, inter_dim=10944, num_layers=27, num_dense_layers=1,
        num_heads=16, moe_inter_dim=1408, num_routed_experts=64, num_shared_experts=2,
        num_activated_experts=6, num_expert_groups=1, num_limited_groups=1, route_scale=2.446,
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_seq_len=4096, original_seq_len=4096, rope_factor=1.0,
    )
    return Config(
        name="small", model=model,
        train=TrainConfig(steps=10_000, seq_len=4096, global_batch_size=64, lr=4.2e-4,
                          min_lr=4.2e-5, warmup_steps=500),
        parallel=ParallelConfig(min_workers=1, max_workers=8, gpus_per_node=8),
    )


def debug() -> Config:
    """A tiny model with every architectural feature, trained on CPU in seconds."""
    model = ModelConfig(
        vocab_size=2048, dim=64, inter_dim=192, num_layers=3, num_dense_layers=1, num_heads=4,
        moe_inter_dim=32, num_routed_experts=8, num_shared_experts=1, num_activated_experts=2,
        num_expert_groups=4, num_limited_groups=2, route_scale=2.5,
        bias_update_speed=1e-2,  # V3's 1e-3 is tuned for 14.8T tokens; a demo has a few thousand
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_seq_len=256, original_seq_len=128, rope_factor=2.0, num_mtp_modules=1,
        init_std=0.02, expert_backend="torch",
    )
    return Config(
        name="debug", model=model,
        train=TrainConfig(steps=40, seq_len=128, global_batch_size=8, micro_batch_size=4,
                          lr=3e-3, min_lr=3e-4, warmup_steps=5, mixed_precision="fp32",
                          eval_every=10, eval_sequences=16),
        data=DataConfig(tokenizer_vocab_size=2048),
        parallel=ParallelConfig(min_workers=2, max_workers=2, gpus_per_node=2),
        checkpoint=CheckpointConfig(every_steps=10, keep_last=2),
        elastic=ElasticConfig(max_failures=3, collective_timeout_s=30.0, resize_check_s=5.0),
    )


RECIPES: dict[str, Callable[[], Config]] = {
    "debug": debug,
    "small": small,
    "deepseek_v3_671b": deepseek_v3_671b,
}


def get_recipe(name: str) -> Config:
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r}: unknown recipe; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    ann = annotation if not isinstance(annotation, str) else annotation
    if ann in ("bool", bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={text!r}: expected a boolean (true/false)")
    if ann in ("int", int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key}={text!r}: expected an integer") from None
    if ann in ("float", float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}={text!r}: expected a number") from None
    return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a new config with ``section.field=value`` overrides applied and re-validated."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. model.dim=128")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] == "name":
            top["name"] = text
            continue
        if len(parts) != 2:
            raise ValueError(f"--set {key!r}: expected section.field (e.g. train.steps)")
        section, name = parts
        sub = getattr(cfg, section, None)
        if sub is None or not dataclasses.is_dataclass(sub):
            valid = [f.name for f in dataclasses.fields(cfg) if f.name != "name"]
            raise ValueError(f"--set {key!r}: unknown section {section!r}; one of {valid}")
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            raise ValueError(f"--set {key!r}: {type(sub).__name__} has no field {name!r}; "
                             f"valid: {sorted(f.name for f in dataclasses.fields(sub))}")
        hint = hints[name]
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            if text not in allowed:
                raise ValueError(f"{key}={text!r}: must be one of {list(allowed)}")
            value: Any = text
        else:
            value = _parse_value(text, hint, key)
        sections.setdefault(section, {})[name] = value
    changes: dict[str, Any] = dict(top)
    for section, values in sections.items():
        changes[section] = dataclasses.replace(getattr(cfg, section), **values)
    return dataclasses.replace(cfg, **changes)
