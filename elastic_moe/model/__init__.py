"""The DeepSeek-V3 model: attention (MLA), moe (DeepSeekMoE), mtp, transformer, init (per-shard
seeded init), hf_adapter (HF config and tensor names), hf / hf_sharded / safetensors_files (HF
checkpoints in and out, sharded import)."""

from elastic_moe.model.transformer import LossOutput, Transformer, count_parameters

__all__ = ["LossOutput", "Transformer", "count_parameters"]
