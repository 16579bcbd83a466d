"""A stand-in fused backend for testing function.py's custom-op plumbing alone: it honours
the fused backend contract (forward -> out, gate, lse, attn; backward -> ten grads) with the
reference math, its backward by recomputation and autograd.  It also takes packed sequences
and memory slots (SUPPORTS_VARLEN), through the reference's sequence-by-sequence definition."""

import torch

from lift_kernels.ops import reference as ref

SUPPORTS_VARLEN = True


def unsupported_reason(name, problem):
    return None


def _varlen_reference(varlen):
    """The reference for these packed/slot keywords (it needs no max_seqlen)."""
    kw = {n: x for n, x in varlen.items() if not n.startswith("max_seqlen")}

    def fn(*args, **kwargs):
        return ref.gated_memory_attention_reference_varlen(*args, **kwargs, **kw)

    return fn


def forward(name, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale, gate_scale,
            gate_shift, **varlen):
    if varlen:
        out, gate = _varlen_reference(varlen)(
            q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal=causal, softmax_scale=scale,
            gate_scale=gate_scale, gate_shift=gate_shift)
        # This stand-in's backward recomputes everything, so it leaves lse and attn unset
        # (NaN, so that a reader of them would notice).
        lse_shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1])
        return (out, gate.float(), q.new_full(lse_shape, float("nan"), dtype=torch.float32),
                torch.full_like(q, float("nan")))
    out, gate = ref.gated_memory_attention_reference(
        q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal=causal, softmax_scale=scale,
        gate_scale=gate_scale, gate_shift=gate_shift)
    qf = ref.apply_rope(q.float(), cos, sin)
    kf = k.float().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if causal:
        scores = scores.masked_fill(~ref.causal_mask(q.shape[1], k.shape[1], q.device), -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)
    attn = ref.attention(qf, k.float(), v.float(), causal, scale).to(q.dtype)
    return out, gate.float(), lse, attn


def backward(name, dout, dgate, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, gate, lse, attn,
             causal, scale, gate_scale, gate_shift, deterministic, **varlen):
    inputs = (q, k, v, w1, b1, w2, b2, g1, c1, g2)
    present = [i for i, t in enumerate(inputs) if t is not None]
    impl = _varlen_reference(varlen) if varlen else ref.gated_memory_attention_reference

    def fn(*tensors):
        args = list(inputs)
        for i, t in zip(present, tensors):
            args[i] = t
        return impl(
            *args, cos, sin, causal=causal, softmax_scale=scale, gate_scale=gate_scale,
            gate_shift=gate_shift)

    # Autograd is off inside a custom op's body; torch.func transforms still work there.
    (out, g), vjp = torch.func.vjp(fn, *(inputs[i] for i in present))
    grads = iter(vjp((dout.to(out.dtype), torch.zeros_like(g) if dgate is None else dgate.to(g.dtype))))
    return tuple(None if t is None else next(grads) for t in inputs)
