"""Starcoder2: q/k/v/o biases (config.use_bias), a model-wide sliding window, and dropout on
the attention output (residual_dropout, training only).  The memory reads q_proj's output
(with its bias) before RoPE."""

import torch

from .adapter import ConfigWindowAdapter


class Starcoder2Adapter(ConfigWindowAdapter):
    def output(self, module, attn_output):
        return torch.nn.functional.dropout(module.o_proj(attn_output), p=module.residual_dropout,
                                           training=module.training)


ADAPTER = Starcoder2Adapter(
    "starcoder2", "transformers.models.starcoder2.modeling_starcoder2.Starcoder2Attention",
    "biases, sliding window (model-wide), residual dropout")
