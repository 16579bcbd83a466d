"""Mistral: the Llama layout plus a model-wide sliding window (config.sliding_window).  The
memory reads q_proj's output before RoPE."""

from .adapter import ConfigWindowAdapter

ADAPTER = ConfigWindowAdapter(
    "mistral", "transformers.models.mistral.modeling_mistral.MistralAttention",
    "sliding window (model-wide)")
