"""Validation loss on a fixed set of held-out sequences, the same at every world size.

The validation set is the first ``num_sequences`` packed sequences of a validation manifest
(documents held out by ``prepare_data.py --val-fraction``, or named with ``--val-data``). Each
rank evaluates a contiguous share of them (:func:`~elastic_moe.data.sampler.rank_share`); the
per-token cross-entropy *sums* and token counts are summed over ranks, so ``val_loss`` is the
token mean over the whole set whatever the world size, expert-parallel degree or micro-batch
size -- only the float summation order changes.

``val_mtp_loss`` is the MTP modules' loss on the same sequences (mean over depths, as in
training), 0 for a model without MTP. Evaluation leaves the router-load counters untouched, so
it never moves the aux-loss-free biases.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from elastic_moe.config import Config
from elastic_moe.data.sampler import make_batch, rank_share, split_batch
from elastic_moe.model.moe import moe_layers
from elastic_moe.model.transformer import IGNORE_INDEX
from elastic_moe.train.step import max_over_ranks

logger = logging.getLogger(__name__)

WEIGHT_KEY = "eval_weight"  # a micro-batch with weight 0 only joins the collectives


def validation_manifest(cfg: Config, train_manifest: str) -> str | None:
    """The validation manifest a run evaluates on, checked against the training data; ``None``
    when ``train.eval_every`` is 0. Raises ``ValueError`` naming the fix when there is none."""
    import json
    import os

    from elastic_moe.data.shards import TokenDataset

    if cfg.train.eval_every == 0:
        return None
    path = cfg.data.val_manifest
    if not path and not cfg.data.manifest:
        from elastic_moe.data.sample_corpus import ensure_validation

        path = ensure_validation(cfg.data.cache_dir, cfg.data.tokenizer_vocab_size,
                                 cfg.train.seq_len)
    elif not path:
        with open(train_manifest) as fh:
            named = json.load(fh).get("val_manifest")
        if not named:
            raise ValueError(f"train.eval_every={cfg.train.eval_every}: {train_manifest} has no "
                             "validation split; prepare it with jobs/prepare_data.py "
                             "--val-fraction F, pass --val-data MANIFEST, or --set "
                             "train.eval_every=0")
        path = os.path.join(os.path.dirname(os.path.abspath(train_manifest)), named)
    if not os.path.exists(path):
        raise ValueError(f"data.val_manifest={path!r}: no such file")
    val, train = TokenDataset(path), TokenDataset(train_manifest)
    if val.seq_len != train.seq_len or val.vocab_size != train.vocab_size:
        raise ValueError(f"data.val_manifest={path!r}: seq_len {val.seq_len} / vocab "
                         f"{val.vocab_size}, but the training data has {train.seq_len} / "
                         f"{train.vocab_size}: prepare both with the same --seq-len and tokenizer")
    return path


def val_micro_batches(manifest: str, num_sequences: int, rank: int, world_size: int,
                      micro_batch_size: int) -> list[dict[str, Any]]:
    """This rank's micro-batches of the first ``num_sequences`` sequences of ``manifest``.

    With more ranks than sequences, the ranks past the end get one zero-weight micro-batch:
    FSDP and expert parallelism need every rank in every forward.
    """
    from elastic_moe.data.shards import TokenDataset

    dataset = TokenDataset(manifest)
    count = min(num_sequences, dataset.num_sequences)
    if count <= 0:
        raise ValueError(f"validation manifest {manifest}: no sequences to evaluate on")
    if world_size <= count:
        start, mine = rank_share(count, rank, world_size)
        batch = make_batch(dataset, [(0, i) for i in range(start, start + mine)])
        return split_batch(batch, micro_batch_size)
    batch = make_batch(dataset, [(0, rank % count)])
    if rank >= count:
        batch[WEIGHT_KEY] = 0.0
    return [batch]


@torch.no_grad()
def evaluate(model: nn.Module, micro_batches: Sequence[dict[str, Any]], *,
             group: dist.ProcessGroup | None = None,
             amp: torch.dtype | None = None) -> dict[str, float]:
    """``{"val_loss", "val_mtp_loss", "val_tokens"}`` over every rank's ``micro_batches``.

    Collective over ``group`` (default: the world) when a process group exists: every rank
    calls it, each with its own share (:func:`val_micro_batches`).
    """
    if not micro_batches:
        raise ValueError("micro_batches=[]: every rank needs at least one (possibly "
                         f"{WEIGHT_KEY}=0) micro-batch")
    was_training = model.training
    model.eval()
    loads = [(m, m.tokens_per_expert.clone()) for m in moe_layers(model)]
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64)  # lm sum, lm tokens, mtp sum, mtp tokens
    has_mtp = len(getattr(model, "mtp", ())) > 0
    try:
        for index in range(max_over_ranks(len(micro_batches), group)):
            batch = micro_batches[min(index, len(micro_batches) - 1)]
            weight = float(batch.get(WEIGHT_KEY, 1.0)) if index < len(micro_batches) else 0.0
            labels = batch["labels"].to(device)
            doc_ids = batch.get("doc_ids")
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = model(batch["input_ids"].to(device), labels,
                            doc_ids.to(device) if doc_ids is not None else None)
            lm_tokens = float((labels != IGNORE_INDEX).sum())
            mtp_tokens = float((labels[:, 1:] != IGNORE_INDEX).sum()) if has_mtp else 0.0
            sums += weight * torch.tensor([float(out.lm_loss) * lm_tokens, lm_tokens,
                                           float(out.mtp_loss) * mtp_tokens, mtp_tokens],
                                          dtype=torch.float64)
    finally:
        for module, counts in loads:
            module.tokens_per_expert.copy_(counts)
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    lm_sum, lm_tokens, mtp_sum, mtp_tokens = sums.tolist()
    return {"val_loss": lm_sum / max(lm_tokens, 1.0),
            "val_mtp_loss": mtp_sum / mtp_tokens if mtp_tokens else 0.0,
            "val_tokens": lm_tokens}
