"""Mixtral: Mistral's attention (model-wide sliding window) in front of a mixture of experts,
which the memory does not touch.  The memory reads q_proj's output before RoPE."""

from .adapter import ConfigWindowAdapter

ADAPTER = ConfigWindowAdapter(
    "mixtral", "transformers.models.mixtral.modeling_mixtral.MixtralAttention",
    "mixture of experts, sliding window (model-wide)")
