"""Mistral: the Llama layout plus a model-wide sliding window (config.sliding_window)."""

from .adapter import Adapter


class MistralAdapter(Adapter):
    def attention_kwargs(self, module) -> dict:
        return {"sliding_window": getattr(module.config, "sliding_window", None)}


ADAPTER = MistralAdapter("mistral", "transformers.models.mistral.modeling_mistral.MistralAttention")
