"""The DeepSeek-V3 model: attention (MLA), moe (DeepSeekMoE), mtp, transformer, hf (interop)."""

from elastic_moe.model.transformer import LossOutput, Transformer, count_parameters

__all__ = ["LossOutput", "Transformer", "count_parameters"]
