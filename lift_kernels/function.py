"""The public op: validation and dispatch, then either an autograd-native backend or the
fused backends behind one torch.library custom op with a registered backward.

The custom op makes the fused kernels opaque to torch.compile (no graph break, a fake
implementation gives shapes) and to activation checkpointing (it recomputes the op).

Fused backend contract (modules named in dispatch.FUSED_MODULES):
    forward(name, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale,
            gate_scale, gate_shift) -> (out, gate, lse, attn)
        out  [B, Nq, Hq, D] q's dtype    gate [B, Nq, Hq] float32
        lse  [B, Hq, Nq] float32 (log-sum-exp of the scaled scores; -inf for a row that
             sees no key)            attn [B, Nq, Hq, D] q's dtype (attention-only output)
    backward(name, dout, dgate, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, gate, lse,
             attn, causal, scale, gate_scale, gate_shift, deterministic)
        -> (dq, dk, dv, dw1, db1, dw2, db2, dg1, dc1, dg2), each in its input's dtype,
           None for an absent bias; dgate may be None.
    cos/sin arrive as [B, Nq, D] float32 (maybe batch-stride 0) or None.
    A call with a sliding window or soft-capping (issue 16) adds the keywords
    window_size=(left, right) and softcap=float to both; a backend whose unsupported_reason
    declines them never sees them.

Packed sequences and memory slots (issue 15) reach only a module with SUPPORTS_VARLEN = True
(dispatch declines them for the others); it gets the keywords cu_seqlens_q, cu_seqlens_k
(int32 [S+1]), max_seqlen_q, max_seqlen_k (int) and memory_index (int [S] or [B]) in both
calls, given only when one of them is set.  Packed: q [total_q, Hq, D], k, v [total_k, Hkv,
D], cos/sin [total_q, D] float32; out and attn like q, gate [total_q, Hq], lse [Hq, total_q].
With memory_index the seven weights are [K, Hq, ...] and so are their gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .ops.reference import gated_memory_attention_reference, gated_memory_attention_reference_varlen
from .ops.torch_composite import gated_memory_attention_torch, gated_memory_attention_torch_varlen

_AUTOGRAD_IMPLS = {
    "reference": gated_memory_attention_reference,
    "torch": gated_memory_attention_torch,
}
# The same backends for packed sequences and/or memory slots.
_AUTOGRAD_VARLEN_IMPLS = {
    "reference": gated_memory_attention_reference_varlen,
    "torch": gated_memory_attention_torch_varlen,
}


def _varlen_kwargs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, memory_index):
    """The packed/slot keywords a fused backend receives: none when none is set, so that
    the modules without SUPPORTS_VARLEN keep their plain signature."""
    kw = {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
          "max_seqlen_q": max_seqlen_q, "max_seqlen_k": max_seqlen_k,
          "memory_index": memory_index}
    return kw if any(x is not None for x in kw.values()) else {}


@torch.library.custom_op("lift_kernels::fused_forward", mutates_args=())
def _fused_forward(
    q: Tensor, k: Tensor, v: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
    b2: Optional[Tensor], g1: Tensor, c1: Optional[Tensor], g2: Tensor,
    cos: Optional[Tensor], sin: Optional[Tensor], causal: bool, scale: float,
    gate_scale: float, gate_shift: float, backend: str, deterministic: bool,
    window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
    memory_index: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(dispatch.fused_backend(backend).forward(
        backend, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale,
        gate_scale, gate_shift, **_extras(window_left, window_right, softcap),
        **_varlen_kwargs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, memory_index)))


def _extras(window_left, window_right, softcap) -> dict:
    """The optional backend keywords, present only when the feature is on."""
    extras = {}
    if (window_left, window_right) != (-1, -1):
        extras["window_size"] = (window_left, window_right)
    if softcap:
        extras["softcap"] = softcap
    return extras


@_fused_forward.register_fake
def _(q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale, gate_scale, gate_shift,
      backend, deterministic, window_left=-1, window_right=-1, softcap=0.0, cu_seqlens_q=None,
      cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, memory_index=None):
    if q.dim() == 3:  # packed: gate [total_q, Hq], lse [Hq, total_q]
        total_q, hq, _ = q.shape
        return (torch.empty_like(q), q.new_empty((total_q, hq), dtype=torch.float32),
                q.new_empty((hq, total_q), dtype=torch.float32), torch.empty_like(q))
    b, nq, hq, _ = q.shape
    return (torch.empty_like(q), q.new_empty((b, nq, hq), dtype=torch.float32),
            q.new_empty((b, hq, nq), dtype=torch.float32), torch.empty_like(q))


@torch.library.custom_op("lift_kernels::fused_backward", mutates_args=())
def _fused_backward(
    dout: Tensor, dgate: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, w1: Tensor,
    b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], g1: Tensor, c1: Optional[Tensor],
    g2: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], gate: Tensor, lse: Tensor,
    attn: Tensor, causal: bool, scale: float, gate_scale: float, gate_shift: float,
    backend: str, deterministic: bool, window_left: int = -1, window_right: int = -1,
    softcap: float = 0.0, cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None, memory_index: Optional[Tensor] = None,
) -> list[Tensor]:
    grads = dispatch.fused_backend(backend).backward(
        backend, dout, dgate, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, gate, lse, attn,
        causal, scale, gate_scale, gate_shift, deterministic,
        **_extras(window_left, window_right, softcap),
        **_varlen_kwargs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, memory_index))
    # A custom op returns tensors only: an absent bias gets an empty placeholder.
    return [g if g is not None else q.new_empty(0) for g in grads]


@_fused_backward.register_fake
def _(dout, dgate, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, gate, lse, attn, causal,
      scale, gate_scale, gate_shift, backend, deterministic, window_left=-1, window_right=-1,
      softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
      memory_index=None):
    inputs = (q, k, v, w1, b1, w2, b2, g1, c1, g2)
    return [torch.empty_like(t) if t is not None else q.new_empty(0) for t in inputs]


_DIFFERENTIABLE = ("q", "k", "v", "w1", "b1", "w2", "b2", "g1", "c1", "g2")


def _setup_context(ctx, inputs, output):
    (q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, *config, cu_seqlens_q, cu_seqlens_k,
     max_seqlen_q, max_seqlen_k, memory_index) = inputs
    _, gate, lse, attn = output
    ctx.save_for_backward(q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, gate, lse, attn,
                          cu_seqlens_q, cu_seqlens_k, memory_index)
    # causal, scale, gate_scale, gate_shift, backend, deterministic, and the window/softcap
    ctx.config = tuple(config)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.mark_non_differentiable(lse, attn)


def _backward(ctx, dout, dgate, _dlse, _dattn):
    (q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, gate, lse, attn, cu_seqlens_q,
     cu_seqlens_k, memory_index) = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(q)
    grads = _fused_backward(dout.contiguous(), dgate, q, k, v, w1, b1, w2, b2, g1, c1, g2,
                            cos, sin, gate, lse, attn, *ctx.config, cu_seqlens_q, cu_seqlens_k,
                            *ctx.max_seqlens, memory_index)
    present = (q, k, v, w1, b1, w2, b2, g1, c1, g2)
    grads = [g if t is not None else None for g, t in zip(grads, present)]
    # None for cos, sin, the settings and the five packed/slot arguments.
    return (*grads, *[None] * (2 + len(ctx.config) + 5))


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def gated_memory_attention(
    q, k, v, w1, b1, w2, b2, g1, c1, g2, *, cos=None, sin=None, causal=True,
    softmax_scale=None, gate_scale=3.0, gate_shift=1.0, return_gate=False, backend="auto",
    deterministic=False, window_size=(-1, -1), softcap=0.0, cu_seqlens_q=None,
    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, memory_index=None,
):
    """Gated-memory attention (SPEC section 1): ``(1 - g) * attn + g * mem`` per head.

    Args:
        q: [B, Nq, Hq, D] pre-RoPE queries.  k, v: [B, Nk, Hkv, D] (k already rotated);
            Hq a multiple of Hkv (GQA: head h reads kv head h // (Hq / Hkv)).
        w1: [Hq, D, M], b1: [Hq, M] or None, w2: [Hq, M, D], b2: [Hq, D] or None:
            the memory MLP ``silu(q @ w1 + b1) @ w2 + b2``.
        g1: [Hq, D, R], c1: [Hq, R] or None, g2: [Hq, R]: the gate
            ``sigmoid(gate_scale * (silu(q @ g1 + c1) @ g2 - gate_shift))``.
        cos, sin: [Nq, D] or [B, Nq, D] RoPE tables for q's positions, or None.
        causal: bottom-right aligned causal mask when Nq != Nk.
        softmax_scale: defaults to 1 / sqrt(D).
        return_gate: also return the gate [B, Nq, Hq] (float32).
        backend: "auto", "reference", "torch", "triton", "cuda" or "cpu".
        deterministic: bit-reproducible backward (fused backends).
        window_size: (left, right) sliding window, FlashAttention's convention: query i sees
            key j iff i + Nk - Nq - left <= j <= i + Nk - Nq + right, -1 unbounded; with
            causal=True the right side is 0 whatever is given.  (-1, -1): no window.
        softcap: > 0 replaces the scaled scores s by softcap * tanh(s / softcap) (Gemma 2);
            0 turns it off.
        cu_seqlens_q, cu_seqlens_k: int32 [S+1] (FlashAttention's varlen convention): packed
            sequences.  Then q is [total_q, Hq, D], k, v [total_k, Hkv, D] and cos, sin
            [total_q, D]; sequence s is q[cu_seqlens_q[s]:cu_seqlens_q[s+1]] with keys
            k[cu_seqlens_k[s]:cu_seqlens_k[s+1]], causal (and windowed) bottom-right within
            the sequence, no attention across sequences.  Sequences may be empty.
        max_seqlen_q, max_seqlen_k: ints, at least the longest query / key sequence
            (required with cu_seqlens_q/k).
        memory_index: int [S] (packed) or [B]: sequence s reads and trains memory slot
            memory_index[s]; the seven weights then carry a leading slot dimension K
            (w1 [K, Hq, D, M], b1 [K, Hq, M], ..., g2 [K, Hq, R]).  Slots may be shared by
            several sequences or used by none (zero gradient).

    Returns:
        out like q (q's dtype), or (out, gate) with return_gate=True: the gate [B, Nq, Hq]
        ([total_q, Hq] packed), float32 (float64 for float64 inputs, the test oracle).
    """
    problem = dispatch.validate(
        q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal=causal,
        softmax_scale=softmax_scale, gate_scale=gate_scale, gate_shift=gate_shift,
        return_gate=return_gate, backend=backend, deterministic=deterministic,
        window_size=window_size, softcap=softcap, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        memory_index=memory_index)
    name = dispatch.choose_backend(backend, problem)
    cos, sin = dispatch.normalize_rope(cos, sin, problem.batch, packed=problem.varlen)
    scale = float(softmax_scale) if softmax_scale is not None else problem.head_dim ** -0.5
    varlen = _varlen_kwargs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            memory_index)
    if name in _AUTOGRAD_IMPLS:
        impl = _AUTOGRAD_VARLEN_IMPLS[name] if varlen else _AUTOGRAD_IMPLS[name]
        if name == "reference":  # the definition loops over the sequences: no grid size
            varlen = {n: x for n, x in varlen.items() if not n.startswith("max_seqlen")}
        out, gate = impl(
            q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal=causal, softmax_scale=scale,
            gate_scale=float(gate_scale), gate_shift=float(gate_shift),
            window_size=problem.window_size, softcap=problem.softcap, **varlen)
    else:
        out, gate, _, _ = _fused_forward(
            q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale, float(gate_scale),
            float(gate_shift), name, deterministic, *problem.window_size, problem.softcap,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, memory_index)
    return (out, gate) if return_gate else out
