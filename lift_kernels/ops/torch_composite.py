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

from .reference import (apply_rope, attention, compute_dtype, gate_mlp, memory_mlp,
                        slot_weights, visible_mask)


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
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5

    def attend(q_rot):
        if softcap:
            ct = compute_dtype(q.dtype)
            return attention(q_rot.to(ct), k.to(ct), v.to(ct), causal, scale, window_size,
                             softcap).to(q.dtype)
        return sdpa_attention(q_rot, k, v, causal, scale, window_size)

    return _blend(q, (w1, b1, w2, b2, g1, c1, g2), cos, sin, gate_scale, gate_shift, attend)


def _blend(q, weights, cos, sin, gate_scale, gate_shift, attend):
    """(1 - gate) * attend(rope(q)) + gate * memory, and the gate: the memory MLP and the
    blend in q's dtype, the gate in float32 (float64 for the oracle).  Weights [Hq, ...] or,
    per batch element, [B, Hq, ...]."""
    dt = q.dtype
    w1, b1, w2, b2 = (None if t is None else t.to(dt) for t in weights[:4])
    mem = memory_mlp(q, w1, b1, w2, b2)
    ct = compute_dtype(dt)
    gate = gate_mlp(q.to(ct), *(None if t is None else t.to(ct) for t in weights[4:]),
                    gate_scale, gate_shift)
    attn = attend(apply_rope(q, cos, sin))
    g = gate.unsqueeze(-1).to(dt)
    return (1 - g) * attn + g * mem, gate


# ------------------------------------------------ packed sequences and memory slots (issue 15)
#
# Packed sequences are laid out on a padded [S, max_seqlen] grid by index gathers (no host
# synchronisation: the grid's size is the max_seqlen the caller gave), computed there with a
# per-sequence mask, and gathered back.  So torch.compile traces it as one graph.

def gated_memory_attention_torch_varlen(
    q, k, v, w1, b1, w2, b2, g1, c1, g2, cos=None, sin=None, *, cu_seqlens_q=None,
    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, memory_index=None, causal=True,
    softmax_scale=None, gate_scale=3.0, gate_shift=1.0, window_size=(-1, -1), softcap=0.0,
):
    """Same contract as ``reference.gated_memory_attention_reference_varlen`` (plus the
    max_seqlen_q/k of packed input): the memory MLP batched with each sequence's gathered
    slot weights, attention by SDPA."""
    weights = (w1, b1, w2, b2, g1, c1, g2)
    if memory_index is not None:
        weights = slot_weights(memory_index, *weights)
    if cu_seqlens_q is None:
        return gated_memory_attention_torch(
            q, k, v, *weights, cos, sin, causal=causal, softmax_scale=softmax_scale,
            gate_scale=gate_scale, gate_shift=gate_shift, window_size=window_size,
            softcap=softcap)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    grid_q, grid_k = _Grid(cu_seqlens_q, max_seqlen_q), _Grid(cu_seqlens_k, max_seqlen_k)
    k_pad, v_pad = grid_k.pad(k), grid_k.pad(v)
    out, gate = _blend(grid_q.pad(q), weights, grid_q.pad(cos), grid_q.pad(sin), gate_scale,
                       gate_shift, lambda q_rot: _grid_attention(
                           q_rot, k_pad, v_pad, grid_q, grid_k, causal, scale, window_size,
                           softcap))
    return grid_q.unpad(out, q.shape[0]), grid_q.unpad(gate, q.shape[0])


class _Grid:
    """Packed rows (cu_seqlens [S+1]) <-> a padded [S, max_seqlen] grid."""

    def __init__(self, cu_seqlens, max_seqlen: int):
        self.cu = cu_seqlens.long()
        self.lengths = self.cu[1:] - self.cu[:-1]  # [S]
        pos = torch.arange(max_seqlen, device=self.cu.device)
        self.valid = pos < self.lengths[:, None]  # [S, L]
        # Padding cells read row 0 (any row would do: pad() zeroes them).
        self.index = torch.where(self.valid, self.cu[:-1, None] + pos, 0)

    def pad(self, x):
        """[total, ...] -> [S, L, ...], zeros (and no gradient) in the padding."""
        if x is None:
            return None
        valid = self.valid.view(*self.valid.shape, *([1] * (x.dim() - 1)))
        return torch.where(valid, x[self.index], 0)

    def unpad(self, x, total: int):
        """[S, L, ...] -> [total, ...]: each packed row from its sequence's cell."""
        rows = torch.arange(total, device=self.cu.device)
        seq = torch.searchsorted(self.cu[1:], rows, right=True)
        return x[seq, rows - self.cu[seq]]


def _grid_attention(q_rot, k, v, grid_q: _Grid, grid_k: _Grid, causal: bool, scale: float,
                    window_size, softcap: float):
    """q_rot [S, Lq, Hq, D], k, v [S, Lk, Hkv, D] on padded grids: each sequence attends to
    its own keys, causal and windowed bottom-right within its lengths (as
    reference.visible_mask).  Rows that see no key give 0."""
    rows = torch.arange(q_rot.shape[1], device=q_rot.device)[None, :, None]
    cols = torch.arange(k.shape[1], device=k.device)[None, None, :]
    len_q, len_k = grid_q.lengths[:, None, None], grid_k.lengths[:, None, None]
    offset = cols - (rows + len_k - len_q)  # key offset from the sequence's diagonal
    left, right = window_size
    right = 0 if causal else right
    visible = cols < len_k  # [S, Lq, Lk]
    if left >= 0:
        visible = visible & (offset >= -left)
    if right >= 0:
        visible = visible & (offset <= right)
    if softcap:  # SDPA cannot soft-cap: materialised scores, as the reference
        ct = compute_dtype(q_rot.dtype)
        group = q_rot.shape[2] // k.shape[2]
        kf, vf = (t.to(ct).repeat_interleave(group, dim=2) for t in (k, v))
        scores = torch.einsum("sqhd,skhd->shqk", q_rot.to(ct), kf) * scale
        scores = softcap * torch.tanh(scores / softcap)
        mask = visible[:, None]
        scores = scores.masked_fill(~mask, torch.finfo(ct).min)
        probs = torch.softmax(scores, dim=-1) * mask
        return torch.einsum("shqk,skhd->sqhd", probs, vf).to(q_rot.dtype)
    # SDPA turns a row with every key masked into NaN: such rows see every key instead and
    # their output is zeroed (so they pass no gradient either).
    has_key = visible.any(-1)  # [S, Lq]
    visible = visible | ~has_key[..., None]
    qt, kt, vt = (t.transpose(1, 2) for t in (q_rot, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible[:, None], scale=scale,
                                         enable_gqa=qt.shape[1] != kt.shape[1])
    return out.transpose(1, 2) * has_key[..., None, None]
