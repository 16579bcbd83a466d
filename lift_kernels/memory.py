"""The Gated Memory adapter as an nn.Module: it owns the seven per-head tensors and calls
the op.  GatedMemoryConfig is what the HF integration and the LIFT pipeline pass around."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .function import gated_memory_attention


@dataclass
class GatedMemoryConfig:
    """Sizes and gate constants of the adapter; None means the authors' default.

    mem_hidden: memory MLP hidden size M (default 2 * head_dim).
    gate_hidden: gate MLP hidden size R (default floor(sqrt(head_dim))).
    bias: biases on the memory layers and the first gate layer (b1, b2, c1).  None: follow
        the model (on where its attention projections have biases).  The last gate layer
        never has a bias.
    """

    mem_hidden: int | None = None
    gate_hidden: int | None = None
    bias: bool | None = None
    gate_scale: float = 3.0
    gate_shift: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def default_mem_hidden(head_dim: int) -> int:
    return 2 * head_dim


def default_gate_hidden(head_dim: int) -> int:
    return max(1, math.isqrt(head_dim))


class GatedMemory(nn.Module):
    """Per-head memory MLP and gate, blended with attention by ``gated_memory_attention``.

    Parameters (Hq = num_heads, D = head_dim, M = mem_hidden, R = gate_hidden):
        w1 [Hq, D, M], b1 [Hq, M], w2 [Hq, M, D], b2 [Hq, D], g1 [Hq, D, R], c1 [Hq, R],
        g2 [Hq, R]; the biases exist only with bias=True.  With num_slots=K each carries a
        leading slot dimension (w1 [K, Hq, D, M], ...): K memories, each initialised like
        one, and forward takes memory_index to say which slot each sequence uses.

    Initialisation reproduces the authors' effective start: the first layers are
    Kaiming-uniform per head exactly as ``nn.Linear`` would draw them, while the last
    memory layer (w2, b2) and the last gate layer (g2) start at zero.  So the memory adds
    nothing at first and the gate sits at sigmoid(-gate_scale * gate_shift) (0.047 with the
    defaults): the patched model starts as the original model with 4.7% of each head's
    attention output scaled away, and training grows the memory from there.  Zero last
    layers are also what keeps the first gradient steps well-posed: dW2 and dg2 are non-zero
    from step one, and the first layers start learning once those move.
    """

    def __init__(self, num_heads: int, head_dim: int, mem_hidden: int | None = None,
                 gate_hidden: int | None = None, bias: bool = False, gate_scale: float = 3.0,
                 gate_shift: float = 1.0, device=None, dtype=None, num_slots: int | None = None):
        super().__init__()
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_slots is not None and (isinstance(num_slots, bool) or not isinstance(
                num_slots, int) or num_slots <= 0):
            raise ValueError(f"num_slots must be a positive int or None, got {num_slots!r}")
        self.num_slots = num_slots
        mem_hidden = default_mem_hidden(head_dim) if mem_hidden is None else mem_hidden
        gate_hidden = default_gate_hidden(head_dim) if gate_hidden is None else gate_hidden
        for name, value in (("mem_hidden", mem_hidden), ("gate_hidden", gate_hidden)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.mem_hidden, self.gate_hidden = mem_hidden, gate_hidden
        self.gate_scale, self.gate_shift = float(gate_scale), float(gate_shift)
        kw = {"device": device, "dtype": dtype}
        h, d, m, r = num_heads, head_dim, mem_hidden, gate_hidden
        k = () if num_slots is None else (num_slots,)
        self.w1 = nn.Parameter(torch.empty(*k, h, d, m, **kw))
        self.w2 = nn.Parameter(torch.empty(*k, h, m, d, **kw))
        self.g1 = nn.Parameter(torch.empty(*k, h, d, r, **kw))
        self.g2 = nn.Parameter(torch.empty(*k, h, r, **kw))
        self.b1 = nn.Parameter(torch.empty(*k, h, m, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(*k, h, d, **kw)) if bias else None
        self.c1 = nn.Parameter(torch.empty(*k, h, r, **kw)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # nn.Linear(D, K) draws weight and bias from U(-1/sqrt(D), 1/sqrt(D)) (its
        # kaiming_uniform_(a=sqrt(5)) reduces to that); each head is its own Linear.
        bound = 1.0 / math.sqrt(self.head_dim)
        for first, first_bias in ((self.w1, self.b1), (self.g1, self.c1)):
            first.uniform_(-bound, bound)
            if first_bias is not None:
                first_bias.uniform_(-bound, bound)
        for last in (self.w2, self.b2, self.g2):
            if last is not None:
                last.zero_()

    def weights(self):
        """The seven tensors in the op's argument order (w1, b1, w2, b2, g1, c1, g2)."""
        return self.w1, self.b1, self.w2, self.b2, self.g1, self.c1, self.g2

    def forward(self, q, k, v, *, cos=None, sin=None, causal=True, softmax_scale=None,
                return_gate=False, backend="auto", deterministic=False, window_size=(-1, -1),
                softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                max_seqlen_k=None, memory_index=None):
        """q: [B, Nq, Hq, D] pre-RoPE (or packed [total_q, Hq, D]); k, v: [B, Nk, Hkv, D]
        (or [total_k, Hkv, D]).  See gated_memory_attention."""
        return gated_memory_attention(
            q, k, v, *self.weights(), cos=cos, sin=sin, causal=causal,
            softmax_scale=softmax_scale, gate_scale=self.gate_scale, gate_shift=self.gate_shift,
            return_gate=return_gate, backend=backend, deterministic=deterministic,
            window_size=window_size, softcap=softcap,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, memory_index=memory_index)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"mem_hidden={self.mem_hidden}, gate_hidden={self.gate_hidden}, "
                f"bias={self.b1 is not None}, gate_scale={self.gate_scale}, "
                f"gate_shift={self.gate_shift}"
                + ("" if self.num_slots is None else f", num_slots={self.num_slots}"))
