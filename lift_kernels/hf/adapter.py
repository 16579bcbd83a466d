"""What differs between model families: how an attention module turns hidden states into
the pre-RoPE query, the key and the value, and which extra arguments its attention
function takes.  One small subclass (or instance) per family, in a file named after it."""

from __future__ import annotations

import importlib


class Adapter:
    """The Llama layout, which most families share.

    model_type: the ``config.model_type`` this adapter serves.
    attention_class: dotted path of the family's attention module class.
    """

    def __init__(self, model_type: str, attention_class: str):
        self.model_type = model_type
        self.attention_class = attention_class

    def load_attention_class(self):
        module, _, name = self.attention_class.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def project(self, module, hidden_states):
        """hidden_states [B, N, hidden] -> q [B, N, Hq, D] (before RoPE), k, v [B, N, Hkv, D]
        (k before RoPE).  Goes through the module's own projections, so a PEFT LoRA on them
        takes part."""
        shape = (*hidden_states.shape[:-1], -1, module.head_dim)
        return (module.q_proj(hidden_states).view(shape),
                module.k_proj(hidden_states).view(shape),
                module.v_proj(hidden_states).view(shape))

    def attention_kwargs(self, module) -> dict:
        """Extra keyword arguments the family's own attention call passes (sliding window)."""
        return {}

    def has_bias(self, module) -> bool:
        """Whether the attention projections carry biases (the memory follows the model)."""
        q_proj = module.q_proj
        base = q_proj.get_base_layer() if hasattr(q_proj, "get_base_layer") else q_proj
        return getattr(base, "bias", None) is not None
