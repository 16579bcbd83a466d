"""SmolLM3: some layers have no RoPE (config.no_rope_layers: 0 means NoPE); those rotate
neither q nor k, and the op gets no RoPE tables for them.  Optional per-layer sliding window.
The memory reads q_proj's output (never rotated) on every layer."""

from .adapter import Adapter


class SmolLM3Adapter(Adapter):
    def rope(self, module, position_embeddings):
        return position_embeddings if module.use_rope else (None, None)


ADAPTER = SmolLM3Adapter("smollm3", "transformers.models.smollm3.modeling_smollm3.SmolLM3Attention",
                         "layers without RoPE (NoPE), sliding window")
