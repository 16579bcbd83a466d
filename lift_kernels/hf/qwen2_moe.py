"""Qwen2-MoE: Qwen2's attention (q/k/v biases, per-layer sliding window) in front of a
mixture of experts.  The memory reads q_proj's output (with its bias) before RoPE."""

from .adapter import Adapter

ADAPTER = Adapter("qwen2_moe", "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeAttention",
                  "mixture of experts, q/k/v biases, per-layer sliding window")
