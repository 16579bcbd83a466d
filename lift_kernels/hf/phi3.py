"""Phi-3: one fused qkv_proj (q, then k, then v along the output features) and a model-wide
sliding window.  The memory reads the q part of qkv_proj's output before RoPE.  Partial
rotary embeddings (partial_rotary_factor < 1) are not served: the op rotates whole heads, so
such a model fails on its first forward with a ValueError saying so."""

from .adapter import ConfigWindowAdapter, _base


class Phi3Adapter(ConfigWindowAdapter):
    def project(self, module, hidden_states):
        shape = (*hidden_states.shape[:-1], -1, module.head_dim)
        q_size = module.config.num_attention_heads * module.head_dim
        kv_size = module.num_key_value_heads * module.head_dim
        q, k, v = module.qkv_proj(hidden_states).split((q_size, kv_size, kv_size), dim=-1)
        return q.view(shape), k.view(shape), v.view(shape)

    def has_bias(self, module) -> bool:
        return getattr(_base(module.qkv_proj), "bias", None) is not None


ADAPTER = Phi3Adapter("phi3", "transformers.models.phi3.modeling_phi3.Phi3Attention",
                      "fused qkv_proj, sliding window (model-wide)")
