"""Granite: the Llama layout with the softmax scale config.attention_multiplier (the
module's scaling, which the op takes as softmax_scale).  The memory reads q_proj's output
before RoPE."""

from .adapter import Adapter

ADAPTER = Adapter("granite", "transformers.models.granite.modeling_granite.GraniteAttention",
                  "attention multiplier as softmax scale")
