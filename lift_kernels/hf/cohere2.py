"""Cohere 2 (Command R7B / Command A): parallel attention and MLP blocks (nothing to do
here: only the attention module is patched), sliding-window layers with interleaved RoPE
(pairs 2i, 2i+1) among global layers without RoPE.  The op rotates with rotate_half, so on
the sliding layers q, k and the RoPE tables are permuted (even features first, then odd),
which turns the interleaved rotation into rotate_half and leaves q.k unchanged.  The memory
reads q_proj's output before RoPE, in that permuted order on sliding layers (a fixed
relabelling of the memory's input features)."""

import torch

from .adapter import Adapter


class Cohere2Adapter(Adapter):
    def rope(self, module, position_embeddings):
        return position_embeddings if module.sliding_window is not None else (None, None)

    def rope_permutation(self, module):
        d = module.head_dim
        return torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))


ADAPTER = Cohere2Adapter(
    "cohere2", "transformers.models.cohere2.modeling_cohere2.Cohere2Attention",
    "parallel blocks, sliding-window layers with interleaved RoPE, global layers without")
