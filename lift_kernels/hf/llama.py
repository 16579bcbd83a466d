"""Llama 2/3: plain q/k/v/o projections, optional attention bias, no sliding window."""

from .adapter import Adapter

ADAPTER = Adapter("llama", "transformers.models.llama.modeling_llama.LlamaAttention")
