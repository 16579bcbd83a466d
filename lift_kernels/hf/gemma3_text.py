"""Gemma 3 (text): q/k RMSNorm per head, local sliding-window layers with their own RoPE
(base 10k) among global layers (base 1M), query_pre_attn_scalar, optional soft-capping.  The
decoder hands each layer the RoPE tables of its kind, so the op rotates q as that layer's
attention does; the memory reads the normalised query before RoPE on every layer."""

from .gemma2 import SoftcapAdapter
from .qwen3 import HeadNormAdapter


class Gemma3Adapter(HeadNormAdapter, SoftcapAdapter):
    pass


ADAPTER = Gemma3Adapter(
    "gemma3_text", "transformers.models.gemma3.modeling_gemma3.Gemma3Attention",
    "q/k norm per head, local/global layers with own RoPE, sliding window")
