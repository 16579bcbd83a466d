"""OLMo 2: RMSNorm on the whole q and k projections (q_norm, k_norm over all heads, not per
head) before RoPE.  The memory reads the normalised query, as the attention does."""

from .adapter import Adapter


class Olmo2Adapter(Adapter):
    def project(self, module, hidden_states):
        shape = (*hidden_states.shape[:-1], -1, module.head_dim)
        return (module.q_norm(module.q_proj(hidden_states)).view(shape),
                module.k_norm(module.k_proj(hidden_states)).view(shape),
                module.v_proj(hidden_states).view(shape))


ADAPTER = Olmo2Adapter("olmo2", "transformers.models.olmo2.modeling_olmo2.Olmo2Attention",
                       "q/k norm over the whole projection")
