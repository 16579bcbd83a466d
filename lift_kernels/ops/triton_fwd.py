"""Fused Triton forward of gated-memory attention (FA2 structure).

One program per (block of BLOCK_M queries, batch x query head).  It loads the pre-RoPE query
tile once, runs the memory MLP (streaming the hidden width M in BLOCK_H chunks, so W1/W2
never need to fit on-chip) and the gate on it, rotates it (fused q-RoPE), runs the online
softmax over key/value blocks of kv head h // GROUP (GQA by index arithmetic), and blends
``(1 - g) * attn + g * mem`` in the epilogue.  It saves for the backward the per-row
log-sum-exp (natural log, float32, -inf for a row that sees no key), the gate (float32)
and the attention-only output (q's dtype).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    ATTENTION_HEURISTICS, LOG2E, WEIGHT_HEURISTICS, WINDOW_ARGS, autotuned, configs, in_window,
    key_blocks, load_query, sequence, skip_gap, tanh)


@triton.jit
def add_gated_memory(acc, gate, q, W1, B1, W2, B2, h, offs_d, HEAD_DIM: tl.constexpr,
                     MEM_HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, HAS_B1: tl.constexpr,
                     HAS_B2: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + gate * (silu(q @ W1 + b1) @ W2 + b2) for one tile of head h, M streamed in
    BLOCK_H chunks; the gated memory goes straight into acc, so no second [BLOCK_M, BLOCK_D]
    accumulator is live.  acc [BLOCK_M, BLOCK_D] float32, gate [BLOCK_M], q [BLOCK_M, BLOCK_D].
    An absent bias is None, so its offset is taken only under its flag."""
    d_ok = offs_d < HEAD_DIM
    W1h = W1 + h * HEAD_DIM * MEM_HIDDEN
    W2h = W2 + h * MEM_HIDDEN * HEAD_DIM
    for m0 in range(0, MEM_HIDDEN, BLOCK_H):
        offs_h = m0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < MEM_HIDDEN
        w1 = tl.load(W1h + offs_d[:, None] * MEM_HIDDEN + offs_h[None, :],
                     mask=d_ok[:, None] & h_ok[None, :], other=0.0)
        hidden = tl.dot(q.to(DOT_DTYPE), w1.to(DOT_DTYPE), input_precision=PRECISION)
        if HAS_B1:
            b1 = tl.load(B1 + h * MEM_HIDDEN + offs_h, mask=h_ok, other=0.0)
            hidden += b1.to(tl.float32)[None, :]
        gated_act = (hidden * tl.sigmoid(hidden)) * gate[:, None]
        w2 = tl.load(W2h + offs_h[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(gated_act.to(DOT_DTYPE), w2.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_B2:
        b2 = tl.load(B2 + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        acc += gate[:, None] * b2[None, :]
    return acc


@triton.jit
def gate_hidden_tile(q, G1, C1, h, offs_d, HEAD_DIM: tl.constexpr, GATE_HIDDEN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, HAS_C1: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """(q @ G1 + c1 [BLOCK_M, BLOCK_R] float32, G1 tile [BLOCK_D, BLOCK_R]) for one tile of
    head h; padded columns are 0."""
    G1h = G1 + h * HEAD_DIM * GATE_HIDDEN
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < GATE_HIDDEN
    g1 = tl.load(G1h + offs_d[:, None] * GATE_HIDDEN + offs_r[None, :],
                 mask=(offs_d[:, None] < HEAD_DIM) & r_ok[None, :], other=0.0)
    hidden = tl.dot(q.to(DOT_DTYPE), g1.to(DOT_DTYPE), input_precision=PRECISION)
    if HAS_C1:
        c1 = tl.load(C1 + h * GATE_HIDDEN + offs_r, mask=r_ok, other=0.0)
        hidden += c1.to(tl.float32)[None, :]
    return hidden, g1


@triton.jit
def _attn_fwd_blocks(acc, m_i, l_i, q_rot, Kh, Vh, offs_m, offs_d, lo, hi, GAP_AT, GAP, NQ,
                     NK, LEFT, RIGHT, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                     cap_scale, cap_log2, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOWED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax (base 2) over key blocks [lo, hi), or with MASKED and WINDOWED over
    both edges of the window (triton_common.skip_gap).  MASKED adds the causal or window
    mask and the key-range mask; a row whose keys are all masked keeps m = -inf and l = 0.
    HAS_SOFTCAP: scores cap * tanh(qk * scale / cap) (cap_scale = scale / cap, cap_log2 =
    cap * log2(e)), else qk * scale."""
    d_ok = offs_d < HEAD_DIM
    for it in range(lo, hi, BLOCK_N):
        start_n = it
        if MASKED:
            if WINDOWED:
                start_n = skip_gap(it, GAP_AT, GAP)
        keys = tl.arange(0, BLOCK_N)  # int32 offsets inside the block, int64 block start
        offs_n = start_n + keys
        Kb = Kh + tl.cast(start_n, tl.int64) * stride_kn
        Vb = Vh + tl.cast(start_n, tl.int64) * stride_vn
        if MASKED:
            n_ok = offs_n < NK
        else:
            n_ok = offs_n >= 0
        kt = tl.load(Kb + keys[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q_rot.to(DOT_DTYPE), kt.to(DOT_DTYPE), input_precision=PRECISION)
        if HAS_SOFTCAP:
            s = tanh(s * cap_scale) * cap_log2
        else:
            s = s * qk_scale
        if MASKED:
            visible = n_ok[None, :]
            if WINDOWED:
                visible = visible & in_window(offs_m[:, None], offs_n[None, :], NK - NQ, LEFT,
                                              RIGHT)
            elif CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (NK - NQ))
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet has m_new = -inf: subtract 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Vb + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None],
                     input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


def _fwd(
    Q, K, V, W1, B1, W2, B2, G1, C1, G2, COS, SIN,  # inputs (weights contiguous)
    CU_Q, CU_K, SLOTS,  # packed sequences' cu_seqlens, memory slots (None: batch, shared)
    OUT, ATTN, GATE, LSE,  # outputs, contiguous: [B,NQ,HQ,D] x2, [B,NQ,HQ], [B,HQ,NQ]
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_cb, stride_cn, stride_cd, stride_sb, stride_sn, stride_sd,
    NQ, NK, HQ, GROUP, scale, gate_scale, gate_shift,
    LEFT, RIGHT, SOFTCAP,  # window (triton_attention.window_args) and soft-capping (0: off)
    SEQ_BUCKET,  # autotuning key only (triton_common.seq_bucket)
    HEAD_DIM: tl.constexpr, MEM_HIDDEN: tl.constexpr, GATE_HIDDEN: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_ROPE: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_C1: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SLOTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # (batch or sequence x head) on grid axis 0, which has no 65535 limit; blocks on axis 1.
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    h = bh % HQ
    kvh = h // GROUP
    # NQ, NK size the buffers, nq, nk this sequence; q0, k0 its first rows in them.
    b, q0, k0, nq, nk, slot = sequence(CU_Q, CU_K, SLOTS, bh // HQ, NQ, NK, IS_VARLEN,
                                       HAS_SLOTS)
    if IS_VARLEN:
        if start_m >= nq:  # a block past this sequence's end (the grid fits the longest)
            return
    if HAS_SLOTS:  # this sequence's memory: weights [K, HQ, ...]
        W1 += slot * HQ * HEAD_DIM * MEM_HIDDEN
        W2 += slot * HQ * MEM_HIDDEN * HEAD_DIM
        G1 += slot * HQ * HEAD_DIM * GATE_HIDDEN
        G2 += slot * HQ * GATE_HIDDEN
        if HAS_B1:
            B1 += slot * HQ * MEM_HIDDEN
        if HAS_B2:
            B2 += slot * HQ * HEAD_DIM
        if HAS_C1:
            C1 += slot * HQ * GATE_HIDDEN
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = q0 + offs_m.to(tl.int64)  # in the buffers
    m_ok = offs_m < nq
    d_ok = offs_d < HEAD_DIM
    tile_ok = m_ok[:, None] & d_ok[None, :]

    # Attention first: only the rotated query tile stays live through the key loop.
    _, q_rot = load_query(Q + b * stride_qb + h * stride_qh, COS, SIN, b,
                          q0 + tl.cast(start_m, tl.int64), offs_d, tile_ok, stride_qn, stride_qd,
                          stride_cb, stride_cn, stride_cd, stride_sb, stride_sn, stride_sd,
                          BLOCK_M, HEAD_DIM, HAS_ROPE)
    q_dot = q_rot.to(Q.dtype.element_ty)
    Kh = K + b * stride_kb + k0 * stride_kn + kvh * stride_kh
    Vh = V + b * stride_vb + k0 * stride_vn + kvh * stride_vh
    qk_scale = scale * LOG2E
    cap_scale = scale  # scale / cap and cap * log2(e) when soft-capped (_attn_fwd_blocks)
    cap_log2 = qk_scale
    if HAS_SOFTCAP:
        cap_scale = scale / SOFTCAP
        cap_log2 = SOFTCAP * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = key_blocks(start_m, nq, nk, LEFT, RIGHT, BLOCK_M, BLOCK_N,
                                          CAUSAL, WINDOWED)
    acc, m_i, l_i = _attn_fwd_blocks(acc, m_i, l_i, q_dot, Kh, Vh, offs_m, offs_d, full_lo,
                                     full_hi, 0, 0, nq, nk, LEFT, RIGHT, stride_kn, stride_kd,
                                     stride_vn, stride_vd, qk_scale, cap_scale, cap_log2,
                                     HEAD_DIM, BLOCK_M, BLOCK_N, False, CAUSAL, WINDOWED,
                                     HAS_SOFTCAP, DOT_DTYPE, PRECISION)
    gap = full_hi - full_lo
    if WINDOWED:  # both edges of the window in one masked loop
        hi = hi - gap
    else:
        lo = full_hi
    acc, m_i, l_i = _attn_fwd_blocks(acc, m_i, l_i, q_dot, Kh, Vh, offs_m, offs_d, lo, hi,
                                     full_lo, gap, nq, nk, LEFT, RIGHT, stride_kn, stride_kd,
                                     stride_vn, stride_vd, qk_scale, cap_scale, cap_log2,
                                     HEAD_DIM, BLOCK_M, BLOCK_N, True, CAUSAL, WINDOWED,
                                     HAS_SOFTCAP, DOT_DTYPE, PRECISION)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    attn = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) / LOG2E, float("-inf"))
    tok = (b * NQ + rows) * HQ + h  # [BLOCK_M] int64 token-head index
    ptrs = tok[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ATTN + ptrs, attn.to(ATTN.dtype.element_ty), mask=tile_ok)
    tl.store(LSE + (b * HQ + h) * NQ + rows, lse, mask=m_ok)

    # Epilogue: the gate and the memory MLP read the pre-RoPE tile, loaded again (an L2 hit)
    # rather than kept live through the loop; out = (1 - g) * attn + g * mem.
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)
    gate_hidden, _ = gate_hidden_tile(q, G1, C1, h, offs_d, HEAD_DIM, GATE_HIDDEN, BLOCK_M,
                                      BLOCK_R, HAS_C1, DOT_DTYPE, PRECISION)
    offs_r = tl.arange(0, BLOCK_R)
    g2 = tl.load(G2 + h * GATE_HIDDEN + offs_r, mask=offs_r < GATE_HIDDEN, other=0.0)
    gate_act = gate_hidden * tl.sigmoid(gate_hidden)
    logit = tl.sum(gate_act * g2.to(tl.float32)[None, :], 1)
    gate = tl.sigmoid(gate_scale * (logit - gate_shift))
    out = add_gated_memory((1.0 - gate)[:, None] * attn, gate, q, W1, B1, W2, B2, h, offs_d,
                           HEAD_DIM, MEM_HIDDEN, BLOCK_H, HAS_B1, HAS_B2, DOT_DTYPE, PRECISION)
    tl.store(OUT + ptrs, out.to(OUT.dtype.element_ty), mask=tile_ok)
    tl.store(GATE + tok, gate, mask=m_ok)


FWD_KEY = ["SEQ_BUCKET", "HEAD_DIM", "MEM_HIDDEN", "CAUSAL", "WINDOWED", "SOFTCAP"]
fwd_kernel = triton.heuristics({**ATTENTION_HEURISTICS, **WEIGHT_HEURISTICS})(
    triton.jit(_fwd, do_not_specialize=WINDOW_ARGS))
gated_attention_fwd_kernel = autotuned(fwd_kernel, "fwd", configs("fwd"), FWD_KEY)
