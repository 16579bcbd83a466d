"""Qwen2: the Llama layout with biases on q/k/v and a per-layer sliding window."""

from .adapter import Adapter


class Qwen2Adapter(Adapter):
    def attention_kwargs(self, module) -> dict:
        return {"sliding_window": module.sliding_window}


ADAPTER = Qwen2Adapter("qwen2", "transformers.models.qwen2.modeling_qwen2.Qwen2Attention")
