"""Qwen3-MoE: Qwen3's attention (q/k norm per head, sliding window) in front of a mixture
of experts.  The memory reads the normalised query before RoPE."""

from .qwen3 import HeadNormAdapter

ADAPTER = HeadNormAdapter(
    "qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeAttention",
    "mixture of experts, q/k norm per head, sliding window")
