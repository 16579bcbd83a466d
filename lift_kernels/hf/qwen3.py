"""Qwen3: per-head RMSNorm on q and k (q_norm, k_norm) before RoPE, per-layer sliding window.
The memory reads the normalised query, as the attention does."""

from .adapter import Adapter


class HeadNormAdapter(Adapter):
    """q_norm and k_norm over each head (Qwen3, Qwen3-MoE, Gemma 3)."""

    def project(self, module, hidden_states):
        shape = (*hidden_states.shape[:-1], -1, module.head_dim)
        return (module.q_norm(module.q_proj(hidden_states).view(shape)),
                module.k_norm(module.k_proj(hidden_states).view(shape)),
                module.v_proj(hidden_states).view(shape))


ADAPTER = HeadNormAdapter("qwen3", "transformers.models.qwen3.modeling_qwen3.Qwen3Attention",
                          "q/k norm per head, per-layer sliding window")
