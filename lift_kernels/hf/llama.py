"""Llama 2/3: plain q/k/v/o projections, optional attention bias, no sliding window.  The
memory reads q_proj's output before RoPE."""

from .adapter import Adapter

ADAPTER = Adapter("llama", "transformers.models.llama.modeling_llama.LlamaAttention",
                  "optional attention bias")
