"""What differs between model families: how an attention module turns hidden states into
the pre-RoPE query, the key and the value, which RoPE tables, sliding window and
soft-capping a layer uses, and which extra arguments its attention function takes.  One
small subclass (or instance) per family, in a file named after it."""

from __future__ import annotations

import importlib


def _base(layer):
    """The wrapped layer of a PEFT LoRA layer, else the layer itself."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


class Adapter:
    """The Llama layout, which most families share.

    model_type: the ``config.model_type`` this adapter serves.
    attention_class: dotted path of the family's attention module class.
    features: what the README's family table says of it (short words).
    """

    features = ""

    def __init__(self, model_type: str, attention_class: str, features: str | None = None):
        self.model_type = model_type
        self.attention_class = attention_class
        if features is not None:
            self.features = features

    def load_attention_class(self):
        module, _, name = self.attention_class.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def project(self, module, hidden_states):
        """hidden_states [B, N, hidden] -> q [B, N, Hq, D] (before RoPE), k, v [B, N, Hkv, D]
        (k before RoPE).  Goes through the module's own projections, so a PEFT LoRA on them
        takes part.  The memory reads this q."""
        shape = (*hidden_states.shape[:-1], -1, module.head_dim)
        return (module.q_proj(hidden_states).view(shape),
                module.k_proj(hidden_states).view(shape),
                module.v_proj(hidden_states).view(shape))

    def rope(self, module, position_embeddings):
        """(cos, sin) this layer rotates q and k with, or (None, None) for a layer without
        RoPE.  The decoder hands each layer its own tables (local/global RoPE)."""
        return position_embeddings

    def rope_permutation(self, module):
        """None when the layer's RoPE is HF's rotate_half (the op's).  Otherwise the index
        [D] of head features that turns the layer's RoPE into rotate_half: q and k are
        permuted alike (q.k is unchanged), and so are the RoPE tables; the KV cache keeps
        the model's layout."""
        return None

    def sliding_window(self, module) -> int | None:
        """The layer's HF sliding window w (query i sees key j iff i - w < j <= i), or None."""
        return getattr(module, "sliding_window", None)

    def softcap(self, module) -> float | None:
        """The layer's attention-logit soft-capping, or None."""
        return None

    def attention_kwargs(self, module) -> dict:
        """Extra keyword arguments the family's own attention call passes (sliding window,
        soft-capping): the exact path hands them to the model's attention function."""
        kwargs = {}
        if self.sliding_window(module) is not None:
            kwargs["sliding_window"] = self.sliding_window(module)
        if self.softcap(module) is not None:
            kwargs["softcap"] = self.softcap(module)
        return kwargs

    def output(self, module, attn_output):
        """attn_output [B, N, Hq * D] -> the module's output [B, N, hidden]."""
        return module.o_proj(attn_output)

    def has_bias(self, module) -> bool:
        """Whether the attention projections carry biases (the memory follows the model)."""
        return getattr(_base(module.q_proj), "bias", None) is not None


class ConfigWindowAdapter(Adapter):
    """A model-wide sliding window read from config.sliding_window (Mistral, Mixtral, Phi-3,
    Starcoder2), where the module stores none."""

    def sliding_window(self, module) -> int | None:
        return getattr(module.config, "sliding_window", None)
