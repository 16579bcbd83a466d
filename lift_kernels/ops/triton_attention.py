"""The `triton` fused backend: allocation, launch grids and the fused backend contract of
function.py (unsupported_reason, forward, backward).  The kernels are in triton_fwd.py and
triton_bwd.py, their shared tile math and tuning configurations in triton_common.py.

Shapes: q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D] (any strides); w1 [Hq, D, M], b1 [Hq, M],
w2 [Hq, M, D], b2 [Hq, D], g1 [Hq, D, R], c1 [Hq, R], g2 [Hq, R]; cos/sin [B, Nq, D] float32
(the batch stride may be 0) or None.  window_size=(left, right) (-1 unbounded) and
softcap (0: off) as in dispatch.validate; the kernels specialise on both (constexpr flags),
so calls without them run the plain kernels.

Packed sequences (cu_seqlens_q/k, max_seqlen_q/k; q [total_q, Hq, D], k/v [total_k, Hkv, D],
cos/sin [total_q, D]) and memory slots (memory_index [S] or [B], weights [K, Hq, ...]): the
same kernels with IS_VARLEN/HAS_SLOTS specialisations; the grid spans the longest sequence
and blocks past a sequence's end exit at once.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # the backend then reports itself unavailable
    triton = None

if triton is not None:
    from .triton_bwd import (
        dkdv_kernel, dkdv_kernel_tuned, dq_kernel, dq_kernel_tuned, preprocess_kernel)
    from .triton_common import INTERPRETED, configs, prune_configs, seq_bucket
    from .triton_fwd import gated_attention_fwd_kernel


# dispatch routes packed sequences and memory slots here (function.py's contract).
SUPPORTS_VARLEN = True


def unsupported_reason(name, problem):
    """None when the Triton kernels can serve `problem` (a dispatch.Problem), else why not."""
    if triton is None:
        return "triton is not installed"
    device = problem.device.type
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1" or not INTERPRETED:
            return ("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 "
                    "before triton is first imported")
    elif device != "cuda":
        return f"triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), not {device}"
    if problem.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"triton kernels take float16, bfloat16 or float32, not {problem.dtype}"
    if problem.head_dim > 256:
        return f"head dim {problem.head_dim} > 256 does not fit the Triton tiles"
    if device == "cuda" and problem.dtype == torch.float32 and problem.head_dim > 128:
        # Found by sm_90a compiles (tests/test_triton_compile.py): the fp32 dK/dV tile at
        # D=256 exceeds shared memory even with the smallest configuration.
        return (f"float32 inputs with head dim {problem.head_dim} > 128 do not fit the Triton "
                f"tiles on GPU; use bfloat16/float16 or another backend")
    return None


def _rope_strides(t):
    return (0, 0, 0) if t is None else t.stride()


def _launch_args(q, k, v, cos, sin):
    """The strides and sizes every kernel takes, in kernel argument order."""
    return (*q.stride(), *k.stride(), *v.stride(), *_rope_strides(cos), *_rope_strides(sin))


def _constants(q, w1, g1, causal, windowed):
    return dict(HEAD_DIM=q.shape[3], MEM_HIDDEN=w1.shape[-1], GATE_HIDDEN=g1.shape[-1],
                CAUSAL=causal, WINDOWED=windowed)


def window_args(window_size, causal, nq, nk):
    """(WINDOWED, left, right) for the kernels: WINDOWED when the window bounds more than
    `causal` does; then causal makes right 0 and an unbounded (-1) side becomes nq + nk,
    wider than any key offset, so the kernels need no case for it.  Without a window both
    are 0 (unread)."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and (causal or right < 0):
        return False, 0, 0
    unbounded = nq + nk
    return True, (left if left >= 0 else unbounded), (right if right >= 0 else unbounded)


def _new(shape, dtype, device):
    """Every buffer a kernel must fully write (tests poison it through this one place)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _sequences(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(S, longest query rows, longest key rows): the programs' batch and the grid's rows.
    Packed input (q [1, total_q, ...] here): S sequences of cu_seqlens_q; else the batch."""
    if cu_seqlens_q is not None:
        return cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
    return q.shape[0], q.shape[1], k.shape[1]


def _batched(*tensors):
    """Packed tensors as a batch of one ([total, ...] -> [1, total, ...]; lse [Hq, total] ->
    [1, Hq, total]): the kernels address packed rows as batch 0 plus each sequence's first
    row (triton_common.sequence)."""
    return [None if t is None else t.unsqueeze(0) for t in tensors]


def forward(name, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale, gate_scale,
            gate_shift, window_size=(-1, -1), softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None, memory_index=None):
    """-> (out [B, Nq, Hq, D] q's dtype, gate [B, Nq, Hq] float32, lse [B, Hq, Nq] float32,
    attn [B, Nq, Hq, D] q's dtype); packed: out, attn [total_q, Hq, D], gate [total_q, Hq],
    lse [Hq, total_q]."""
    packed = cu_seqlens_q is not None
    if packed:
        q, k, v, cos, sin = _batched(q, k, v, cos, sin)
    seqs, max_q, max_k = _sequences(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    batch, nq, hq, _ = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    windowed, left, right = window_args(window_size, causal, max_q, max_k)
    w1, b1, w2, b2, g1, c1, g2, memory_index = _contiguous(w1, b1, w2, b2, g1, c1, g2,
                                                           memory_index)
    out = _new(q.shape, q.dtype, q.device)
    attn = _new(q.shape, q.dtype, q.device)
    gate = _new((batch, nq, hq), torch.float32, q.device)
    lse = _new((batch, hq, nq), torch.float32, q.device)

    def grid(meta):
        return (seqs * hq, triton.cdiv(max_q, meta["BLOCK_M"]))

    gated_attention_fwd_kernel[grid](
        q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, cu_seqlens_q, cu_seqlens_k, memory_index,
        out, attn, gate, lse, *_launch_args(q, k, v, cos, sin), nq, nk, hq, hq // hkv, scale,
        gate_scale, gate_shift, left, right, float(softcap), seq_bucket(max_q, max_k),
        **_constants(q, w1, g1, causal, windowed))
    if packed:
        return out[0], gate[0], lse[0], attn[0]
    return out, gate, lse, attn


def _fixed_config(kind, q, windowed):
    """The configuration deterministic mode uses: the first one autotuning would try."""
    config = prune_configs(kind, configs(kind), {"Q": q}, HEAD_DIM=q.shape[3],
                           WINDOWED=windowed)[0]
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def backward(name, dout, dgate, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, gate, lse, attn,
             causal, scale, gate_scale, gate_shift, deterministic, window_size=(-1, -1),
             softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
             max_seqlen_k=None, memory_index=None):
    """-> (dq, dk, dv, dw1, db1, dw2, db2, dg1, dc1, dg2), each in its input's dtype and shape,
    None for an absent bias.  dout like q; dgate like gate, or None."""
    packed = cu_seqlens_q is not None
    if packed:
        q, k, v, cos, sin, dout, dgate, gate, lse, attn = _batched(
            q, k, v, cos, sin, dout, dgate, gate, lse, attn)
    seqs, max_q, max_k = _sequences(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    batch, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    weights = _contiguous(w1, b1, w2, b2, g1, c1, g2)
    w1, b1, w2, b2, g1, c1, g2 = weights
    slots = None if memory_index is None else memory_index.contiguous()
    if dgate is not None:
        dgate = dgate.contiguous()
    windowed, left, right = window_args(window_size, causal, max_q, max_k)
    consts = _constants(q, w1, g1, causal, windowed)
    strides = (*_launch_args(q, k, v, cos, sin), *dout.stride())

    # rowsum(dout * attn), lse' [B, Hq, Nq] and the rotated query [B, Hq, Nq, D]
    # (triton_bwd.py's docstring); row by row, so packed rows need no sequence bounds.
    do_attn = _new(lse.shape, torch.float32, q.device)
    lse_bwd = _new(lse.shape, torch.float32, q.device)
    q_rot = _new((batch, hq, nq, d), q.dtype, q.device)
    pre_block = 16 if INTERPRETED else 64
    preprocess_kernel[(batch * hq, triton.cdiv(nq, pre_block))](
        q, cos, sin, dout, attn, gate, lse, do_attn, lse_bwd, q_rot, *q.stride(),
        *_rope_strides(cos), *_rope_strides(sin), *dout.stride(), nq, hq, HEAD_DIM=d,
        BLOCK_M=pre_block)

    dk = _new(k.shape, k.dtype, k.device)
    dv = _new(v.shape, v.dtype, v.device)
    dkdv_args = (q_rot, k, v, dout, lse_bwd, do_attn, dk, dv, cu_seqlens_q, cu_seqlens_k,
                 *k.stride(), *v.stride(), *dout.stride(), nq, nk, hq, hq // hkv, scale, left,
                 right, float(softcap), seq_bucket(max_q, max_k))
    dkdv_consts = dict(HEAD_DIM=d, CAUSAL=causal, WINDOWED=windowed)
    if deterministic:
        fixed = _fixed_config("dkdv", q, windowed)
        dkdv_kernel[(seqs * hkv, triton.cdiv(max_k, fixed["BLOCK_N"]))](
            *dkdv_args, **dkdv_consts, **fixed)
    else:
        dkdv_kernel_tuned[lambda meta: (seqs * hkv, triton.cdiv(max_k, meta["BLOCK_N"]))](
            *dkdv_args, **dkdv_consts)

    dq = _new(q.shape, q.dtype, q.device)
    # Each row's MLP activations for the weight gradients (triton_bwd.py's docstring):
    # d_hidden and g * act [B, Hq, Nq, M] in the dtype of the weight GEMMs' operands, the gate
    # MLP's d_hidden and dz * act [B, Hq, Nq, R] in float32.
    act_dtype = torch.promote_types(q.dtype, w1.dtype)
    m, r = w1.shape[-1], g1.shape[-1]
    hid = _new((batch, hq, nq, m), act_dtype, q.device)
    gact = _new((batch, hq, nq, m), act_dtype, q.device)
    ghid = _new((batch, hq, nq, r), torch.float32, q.device)
    gz = _new((batch, hq, nq, r), torch.float32, q.device)
    dq_args = (q, q_rot, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, cu_seqlens_q, cu_seqlens_k,
               slots, dout, dgate, gate, lse_bwd, do_attn, dq, hid, gact, ghid, gz, *strides,
               nq, nk, hq, hq // hkv, scale, gate_scale, max_q, left, right, float(softcap),
               seq_bucket(max_q, max_k))
    if deterministic:
        fixed = _fixed_config("dq", q, windowed)
        dq_kernel[(seqs * triton.cdiv(max_q, fixed["BLOCK_M"]), hq)](*dq_args, **consts,
                                                                     **fixed)
    else:
        dq_kernel_tuned[lambda meta: (seqs * triton.cdiv(max_q, meta["BLOCK_M"]), hq)](
            *dq_args, **consts)
    activations = (q, dout, gate, hid, gact, ghid, gz)
    if slots is None:
        weight_grads = _weight_gradients(*activations, weights)
    else:
        rows = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long() if packed else nq
        row_slots = slots.long().repeat_interleave(rows, output_size=batch * nq)
        weight_grads = _slot_weight_gradients(*activations, weights, row_slots)
    if packed:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return (dq, dk, dv, *weight_grads)


def _weight_gradients(q, dout, gate, hid, gact, ghid, gz, weights):
    """(dw1, db1, dw2, db2, dg1, dc1, dg2) from the activations the dq kernel wrote: one
    batched GEMM per weight matrix (contracting batch and tokens, float32 accumulation) and
    one sum per bias, in the weights' dtypes; None for an absent bias."""
    w1, b1, w2, b2, g1, c1, g2 = weights
    f32 = torch.float32
    x = q.to(hid.dtype)
    dw1 = torch.einsum("bnhd,bhnm->hdm", x, hid)
    dw2 = torch.einsum("bhnm,bnhd->hmd", gact, dout.to(gact.dtype))
    dg1 = torch.einsum("bnhd,bhnr->hdr", q.to(f32), ghid)
    grads = (dw1, None if b1 is None else hid.sum((0, 2), dtype=f32),
             dw2, None if b2 is None else torch.einsum("bnh,bnhd->hd", gate, dout.to(f32)),
             dg1, None if c1 is None else ghid.sum((0, 2)), gz.sum((0, 2)))
    return [None if g is None else g.to(t.dtype) for g, t in zip(grads, weights)]


def _slot_weight_gradients(q, dout, gate, hid, gact, ghid, gz, weights, row_slots):
    """Weight gradients [K, Hq, ...] with memory slots: the rows (B * Nq of them, slot
    row_slots[row]) grouped by slot with a stable sort (so the sums' order is fixed) and
    _weight_gradients on each slot's rows; a slot no row reads gets exact zeros."""
    def rows_first(t):  # [B, N, H, ...] -> [B * N, H, ...]
        return t.reshape(-1, *t.shape[2:])

    def heads_first(t):  # [B, H, N, X] -> [H, B * N, X]
        return t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[3])

    order = torch.argsort(row_slots, stable=True)
    counts = torch.bincount(row_slots, minlength=weights[0].shape[0]).tolist()
    q, dout, gate = (rows_first(t)[order] for t in (q, dout, gate))
    hid, gact, ghid, gz = (heads_first(t)[:, order] for t in (hid, gact, ghid, gz))
    grads = [None if w is None else torch.zeros_like(w) for w in weights]
    start = 0
    for slot, count in enumerate(counts):
        if not count:
            continue
        mine = slice(start, start + count)
        start += count
        per_slot = _weight_gradients(
            q[None, mine], dout[None, mine], gate[None, mine], hid[None, :, mine],
            gact[None, :, mine], ghid[None, :, mine], gz[None, :, mine],
            [None if w is None else w[slot] for w in weights])
        for grad, part in zip(grads, per_slot):
            if grad is not None:
                grad[slot] = part
    return grads
