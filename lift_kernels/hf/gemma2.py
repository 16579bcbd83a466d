"""Gemma 2: tanh soft-capping of the attention logits (config.attn_logit_softcapping), local
sliding-window layers alternating with global ones, and the softmax scale
query_pre_attn_scalar ** -0.5 (the module's scaling).  Both kinds of layer run the fused
kernels (window and soft-capping are kernel features).  The memory reads q_proj's output
before RoPE on every layer."""

from .adapter import Adapter


class SoftcapAdapter(Adapter):
    def softcap(self, module):
        return module.attn_logit_softcapping


ADAPTER = SoftcapAdapter(
    "gemma2", "transformers.models.gemma2.modeling_gemma2.Gemma2Attention",
    "logit soft-capping, alternating sliding window, query_pre_attn_scalar")
