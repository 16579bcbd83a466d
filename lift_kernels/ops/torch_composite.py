"""The strongest off-the-shelf composite: PyTorch SDPA for attention + batched MLPs.

Unfused: the memory and gate MLPs run as separate batched matmuls and the blend is one
more elementwise pass, but attention goes through SDPA (FlashAttention / memory-efficient
kernels where PyTorch has them), so memory stays O(N) where SDPA's does.
Differentiable through autograd.  SDPA has neither sliding windows nor soft-capping: a
window becomes an explicit boolean mask (O(Nq x Nk) memory) and soft-capping runs the
reference's materialised attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .reference import attention, apply_rope, compute_dtype, gate_mlp, memory_mlp, visible_mask


def sdpa_attention(q_rot, k, v, causal: bool, scale: float, window_size=(-1, -1)):
    """q_rot: [B, Nq, Hq, D], k, v: [B, Nk, Hkv, D] -> [B, Nq, Hq, D], bottom-right causal
    (and windowed: see reference.visible_mask)."""
    nq, nk = q_rot.shape[1], k.shape[1]
    gqa = q_rot.shape[2] != k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q_rot, k, v))

    def sdpa(query, **mask):
        return F.scaled_dot_product_attention(query, kt, vt, scale=scale, enable_gqa=gqa, **mask)

    if window_size != (-1, -1):
        visible = visible_mask(nq, nk, causal, window_size, q_rot.device)
        # A row that sees no key would make SDPA's softmax NaN: it sees every key instead and
        # its output is zeroed, which also gives it zero gradients.
        seen = visible.any(dim=1, keepdim=True)
        out = sdpa(qt, attn_mask=visible | ~seen) * seen.to(qt.dtype)
    elif not causal:
        out = sdpa(qt)
    elif nq == nk:
        out = sdpa(qt, is_causal=True)
    elif nq < nk:
        out = sdpa(qt, attn_mask=causal_lower_right(nq, nk))
    else:
        # The first nq - nk queries see no key (attention 0); the last nk are square-causal.
        seen = sdpa(qt[:, :, nq - nk:], is_causal=True)
        out = torch.cat((seen.new_zeros(*seen.shape[:2], nq - nk, seen.shape[-1]), seen), dim=2)
    return out.transpose(1, 2)


def gated_memory_attention_torch(
    q, k, v, w1, b1, w2, b2, g1, c1, g2, cos=None, sin=None, *,
    causal=True, softmax_scale=None, gate_scale=3.0, gate_shift=1.0, window_size=(-1, -1),
    softcap=0.0,
):
    """Same contract as ``reference.gated_memory_attention_reference``; attention and memory
    in q's dtype (matmuls accumulate in float32), the gate in float32."""
    dt = q.dtype

    def cast(t):
        return None if t is None else t.to(dt)

    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mem = memory_mlp(q, cast(w1), cast(b1), cast(w2), cast(b2))
    ct = compute_dtype(dt)  # the gate is a float32 output (float64 for the oracle)
    gate = gate_mlp(q.to(ct), g1.to(ct), None if c1 is None else c1.to(ct), g2.to(ct),
                    gate_scale, gate_shift)
    q_rot = apply_rope(q, cos, sin)
    if softcap:
        attn = attention(q_rot.to(ct), k.to(ct), v.to(ct), causal, scale, window_size,
                         softcap).to(dt)
    else:
        attn = sdpa_attention(q_rot, k, v, causal, scale, window_size)
    g = gate.unsqueeze(-1).to(dt)
    return (1 - g) * attn + g * mem, gate
