"""Gemma: the Llama layout (head_dim from the config, often 256).  The memory reads q_proj's
output before RoPE."""

from .adapter import Adapter

ADAPTER = Adapter("gemma", "transformers.models.gemma.modeling_gemma.GemmaAttention",
                  "head_dim 256")
