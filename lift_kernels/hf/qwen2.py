"""Qwen2: the Llama layout with biases on q/k/v and a per-layer sliding window (the module's
sliding_window).  The memory reads q_proj's output (with its bias) before RoPE."""

from .adapter import Adapter

ADAPTER = Adapter("qwen2", "transformers.models.qwen2.modeling_qwen2.Qwen2Attention",
                  "q/k/v biases, per-layer sliding window")
