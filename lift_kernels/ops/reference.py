"""The naive gated-memory attention: the definition of correct.

This is the authors' algorithm written plainly: the memory MLP and the gate as batched
einsums, then ordinary attention with the full ``Nq x Nk`` score matrix materialised.
Every fast backend is tested against this function (and against a float64 run of it).

Shapes (SPEC section 1):
    q: [B, Nq, Hq, D] (pre-RoPE)   k, v: [B, Nk, Hkv, D] (k already rotated)
    w1: [Hq, D, M]  b1: [Hq, M] | None   w2: [Hq, M, D]  b2: [Hq, D] | None
    g1: [Hq, D, R]  c1: [Hq, R] | None   g2: [Hq, R]
    cos, sin: [B, Nq, D], [Nq, D] or None
    window_size: (left, right) key offsets around the diagonal, -1 unbounded (FlashAttention)
    softcap: scores -> softcap * tanh(scores / softcap) after scaling; 0 means off

Packed sequences and memory slots (``gated_memory_attention_reference_varlen``) are defined
sequence by sequence through the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation everywhere, float64 when the inputs are float64 (the oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's non-interleaved convention: cat(-x[D/2:], x[:D/2])."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """q: [B, N, H, D]; cos, sin: [B, N, D] or [N, D] (or None: no rotation)."""
    if cos is None:
        return q
    cos = cos.to(q.dtype).unsqueeze(-2)
    sin = sin.to(q.dtype).unsqueeze(-2)
    return q * cos + rotate_half(q) * sin


def causal_mask(nq: int, nk: int, device) -> torch.Tensor:
    """Bottom-right aligned: query i sees key j iff j <= i + nk - nq.  [nq, nk] bool."""
    return visible_mask(nq, nk, True, device=device)


def visible_mask(nq: int, nk: int, causal: bool, window_size=(-1, -1), device=None):
    """Which keys each query sees, or None when it sees all of them.  [nq, nk] bool.

    Bottom-right aligned (FlashAttention): with diagonal d(i) = i + nk - nq, query i sees key
    j iff d(i) - left <= j <= d(i) + right, a bound of -1 being unbounded; causal=True makes
    the right bound 0 whatever window_size says (as FlashAttention does)."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    i = torch.arange(nq, device=device).unsqueeze(1)
    j = torch.arange(nk, device=device).unsqueeze(0)
    offset = j - (i + nk - nq)
    visible = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= offset >= -left
    if right >= 0:
        visible &= offset <= right
    return visible


def _bias(bias, per_batch: bool):
    """A bias [H, X], or [B, H, X] per batch element, broadcast over [B, N, H, X]."""
    return bias.unsqueeze(1) if per_batch else bias


def memory_mlp(q, w1, b1, w2, b2):
    """silu(q @ W1 + b1) @ W2 + b2, per head.  q: [B, N, H, D] -> [B, N, H, D].
    Weights [H, D, M], [H, M], [H, M, D], [H, D], or per batch element [B, H, ...]."""
    per_batch = w1.dim() == 4
    hidden = torch.einsum("bnhd,bhdm->bnhm" if per_batch else "bnhd,hdm->bnhm", q, w1)
    if b1 is not None:
        hidden = hidden + _bias(b1, per_batch)
    mem = torch.einsum("bnhm,bhme->bnhe" if per_batch else "bnhm,hme->bnhe", F.silu(hidden), w2)
    if b2 is not None:
        mem = mem + _bias(b2, per_batch)
    return mem


def gate_mlp(q, g1, c1, g2, gate_scale: float, gate_shift: float):
    """sigmoid(gate_scale * (silu(q @ G1 + c1) @ g2 - gate_shift)).  [B, N, H, D] -> [B, N, H].
    Weights [H, D, R], [H, R], [H, R], or per batch element [B, H, ...]."""
    per_batch = g1.dim() == 4
    hidden = torch.einsum("bnhd,bhdr->bnhr" if per_batch else "bnhd,hdr->bnhr", q, g1)
    if c1 is not None:
        hidden = hidden + _bias(c1, per_batch)
    logit = torch.einsum("bnhr,bhr->bnh" if per_batch else "bnhr,hr->bnh", F.silu(hidden), g2)
    return torch.sigmoid(gate_scale * (logit - gate_shift))


def slot_weights(memory_index, *weights):
    """The weights of slot memory_index[b] for each b: [K, H, ...] -> [B, H, ...] (None stays
    None).  Indexing is differentiable: each slot's gradient sums its rows' gradients."""
    return tuple(None if w is None else w[memory_index] for w in weights)


def attention(q_rot, k, v, causal: bool, scale: float, window_size=(-1, -1), softcap=0.0):
    """Plain softmax attention with materialised scores.  Rows that see no key give 0."""
    hq, hkv = q_rot.shape[2], k.shape[2]
    group = hq // hkv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q_rot, k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visible_mask(q_rot.shape[1], k.shape[1], causal, window_size, q_rot.device)
    if visible is not None:
        # A finite fill (not -inf) keeps fully masked rows NaN-free; multiplying by the
        # mask afterwards zeroes them, forward and backward.
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1) * visible
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def gated_memory_attention_reference(
    q, k, v, w1, b1, w2, b2, g1, c1, g2, cos=None, sin=None, *,
    causal=True, softmax_scale=None, gate_scale=3.0, gate_shift=1.0, window_size=(-1, -1),
    softcap=0.0,
):
    """Returns (out [B, Nq, Hq, D] in q's dtype, gate [B, Nq, Hq] in float32 or float64)."""
    ct = compute_dtype(q.dtype)

    def up(t):
        return None if t is None else t.to(ct)

    qf, kf, vf = up(q), up(k), up(v)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mem = memory_mlp(qf, up(w1), up(b1), up(w2), up(b2))
    gate = gate_mlp(qf, up(g1), up(c1), up(g2), gate_scale, gate_shift)
    attn = attention(apply_rope(qf, up(cos), up(sin)), kf, vf, causal, scale, window_size,
                     softcap)
    g = gate.unsqueeze(-1)
    out = (1 - g) * attn + g * mem
    return out.to(q.dtype), gate


def gated_memory_attention_reference_varlen(
    q, k, v, w1, b1, w2, b2, g1, c1, g2, cos=None, sin=None, *, cu_seqlens_q=None,
    cu_seqlens_k=None, memory_index=None, causal=True, softmax_scale=None, gate_scale=3.0,
    gate_shift=1.0, window_size=(-1, -1), softcap=0.0,
):
    """Packed sequences and/or memory slots, by definition: every sequence on its own through
    ``gated_memory_attention_reference``, with the weights of its slot.

    Packed (cu_seqlens_q/k int32 [S+1]): q [total_q, Hq, D], k, v [total_k, Hkv, D],
    cos, sin [total_q, D]; sequence s is rows cu_seqlens_q[s]:cu_seqlens_q[s+1] of q and
    cu_seqlens_k[s]:cu_seqlens_k[s+1] of k and v (causal and window bottom-right within it).
    Otherwise every batch element of the 4-D layout is a sequence (cos, sin [B, Nq, D]).
    memory_index [S] or [B]: sequence s uses slot memory_index[s] of weights [K, Hq, ...];
    None: the weights are shared ([Hq, ...]).
    Returns (out like q, gate [total_q, Hq] or [B, Nq, Hq]).
    """
    packed = cu_seqlens_q is not None
    if packed:
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        rows_q, rows_k = list(zip(bounds_q, bounds_q[1:])), list(zip(bounds_k, bounds_k[1:]))
    else:
        rows_q = rows_k = [(b, b + 1) for b in range(q.shape[0])]
    slots = None if memory_index is None else memory_index.tolist()

    def part(t, a, b):  # a packed sequence becomes a batch of one
        if t is None:
            return None
        return t[a:b].unsqueeze(0) if packed else t[a:b]

    weights = (w1, b1, w2, b2, g1, c1, g2)
    outs, gates = [], []
    for s, ((qa, qb), (ka, kb)) in enumerate(zip(rows_q, rows_k)):
        mine = weights if slots is None else tuple(
            None if w is None else w[slots[s]] for w in weights)
        out, gate = gated_memory_attention_reference(
            part(q, qa, qb), part(k, ka, kb), part(v, ka, kb), *mine, part(cos, qa, qb),
            part(sin, qa, qb), causal=causal, softmax_scale=softmax_scale,
            gate_scale=gate_scale, gate_shift=gate_shift, window_size=window_size,
            softcap=softcap)
        outs.append(out[0] if packed else out)
        gates.append(gate[0] if packed else gate)
    if not outs:  # no sequence at all
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1], dtype=compute_dtype(q.dtype))
    return torch.cat(outs), torch.cat(gates)
