"""Command-R (Cohere): parallel attention and MLP blocks (only the attention module is
patched), interleaved RoPE on every layer, optional LayerNorm on q and k per head
(use_qk_norm).  The op runs with q, k and the RoPE tables permuted (even features first, then
odd: see Cohere2Adapter); the memory reads the (normalised) q before RoPE in that order."""

from .cohere2 import Cohere2Adapter


class CohereAdapter(Cohere2Adapter):
    def project(self, module, hidden_states):
        q, k, v = super().project(module, hidden_states)
        if module.use_qk_norm:
            q, k = module.q_norm(q), module.k_norm(k)
        return q, k, v

    def rope(self, module, position_embeddings):
        return position_embeddings

    def sliding_window(self, module):
        return None


ADAPTER = CohereAdapter("cohere", "transformers.models.cohere.modeling_cohere.CohereAttention",
                        "parallel blocks, interleaved RoPE, optional q/k LayerNorm")
