"""Fused Triton backward of gated-memory attention (FA2 structure), three kernels.

The attention's upstream gradient is dA = (1 - g) * dO.  Folding the row factor (1 - g)
into the probabilities, p' = (1 - g) * p = exp2(s * scale * log2(e) - lse'), with
lse' = lse * log2(e) - log2(1 - g), gives FA2's formulas with dO itself:
dV = p'^T dO, dS = p' * (dO V^T - delta') with delta' = rowsum(dO * attn) (FA2's delta is
rowsum(dA * attn) = (1 - g) * delta'), dQ_rot = dS K, dK = dS^T Q_rot.  So the key loops
stream exactly FA2's operands: the rotated query, dO, and two floats per row.

1. `preprocess_kernel`: per (batch, head, query) delta' = rowsum(dO * attn) and lse' (base 2,
   +inf for a row that sees no key or has g = 1, so p' = 0), and the rotated query in the
   input dtype [B, Hq, Nq, D] (rounded as the forward's QK^T operand was), once.
2. `dkdv_kernel`: one program per (batch x kv head, block of keys); it loops over the
   GROUP query heads that read this kv head and over their query blocks, so dK/dV of a GQA
   group are summed in registers (no per-query-head copies, no atomics).
3. `dq_kernel`: one program per (query tiles, query head): the attention part of dq
   (rotated back to the pre-RoPE query: R^T dq_rot), then the memory branch (dmem = g * dO)
   and the gate branch (dg = rowsum(dO * mem) - delta' + the gate output's own gradient,
   rowsum(dO * mem) summed chunk by chunk, so mem is never materialised) through both MLPs
   into the same dq.  For the weight gradients it writes each row's MLP activations once
   (d_hidden and g * act [B, Hq, Nq, M] in the operand dtype, the gate MLP's [.., R] in
   float32); the caller reduces them over batch and tokens with one batched GEMM (or sum)
   per weight, so there are no per-tile partials and no atomics, and every run is
   bit-identical for a given configuration.

Pointers and shapes are those of triton_fwd.py; DO is dout [B, Nq, Hq, D] (any strides),
GATE [B, Nq, Hq], LSE/LSE_BWD/DO_ATTN [B, Hq, Nq], ATTN [B, Nq, Hq, D] (contiguous, from
the forward), QROT [B, Hq, Nq, D] (contiguous, from the preprocess).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    ATTENTION_HEURISTICS, LOG2E, WEIGHT_HEURISTICS, WINDOW_ARGS, autotuned, band_blocks, configs,
    in_window, key_blocks, load_query, rope_partner, sequence, skip_gap, tanh)
from .triton_fwd import gate_hidden_tile


@triton.heuristics({"BLOCK_D": ATTENTION_HEURISTICS["BLOCK_D"],
                    "HAS_ROPE": ATTENTION_HEURISTICS["HAS_ROPE"]})
@triton.jit
def preprocess_kernel(Q, COS, SIN, DO, ATTN, GATE, LSE, DO_ATTN, LSE_BWD, QROT,
                      stride_qb, stride_qn, stride_qh, stride_qd,
                      stride_cb, stride_cn, stride_cd, stride_sb, stride_sn, stride_sd,
                      stride_ob, stride_on, stride_oh, stride_od, NQ, HQ,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_ROPE: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // HQ
    h = bh % HQ
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ
    mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    do = tl.load(DO + b * stride_ob + h * stride_oh + rows[:, None] * stride_on
                 + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    tok = (b * NQ + rows) * HQ + h
    attn = tl.load(ATTN + tok[:, None] * HEAD_DIM + offs_d[None, :], mask=mask,
                   other=0.0).to(tl.float32)
    tl.store(DO_ATTN + bh * NQ + rows, tl.sum(do * attn, 1), mask=m_ok)
    gate = tl.load(GATE + tok, mask=m_ok, other=0.0)
    lse = tl.load(LSE + bh * NQ + rows, mask=m_ok, other=0.0)
    lse_bwd = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E - tl.log2(1.0 - gate))
    tl.store(LSE_BWD + bh * NQ + rows, lse_bwd, mask=m_ok)
    _, q_rot = load_query(Q + b * stride_qb + h * stride_qh, COS, SIN, b,
                          tl.cast(start_m, tl.int64), offs_d, mask, stride_qn, stride_qd,
                          stride_cb, stride_cn, stride_cd, stride_sb, stride_sn, stride_sd,
                          BLOCK_M, HEAD_DIM, HAS_ROPE)
    tl.store(QROT + (bh * NQ + rows)[:, None] * HEAD_DIM + offs_d[None, :],
             q_rot.to(QROT.dtype.element_ty), mask=mask)


@triton.jit
def _query_side(QROT, DO, LSE_BWD, DO_ATTN, b, h, start_m, q0, nq, offs_d, NQ, HQ,
                stride_ob, stride_on, stride_oh, stride_od,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """What the key loops read about the query tile [start_m, start_m + BLOCK_M) of (b, h)
    in the sequence of nq rows from buffer row q0 (triton_common.sequence): the rotated
    query and dO in their stored dtype, lse' and delta' (module docstring).  Rows past nq
    load as zeros with lse' = +inf, so their p' is 0.  The tile start is an int64 scalar,
    offsets inside the tile int32."""
    rows = tl.arange(0, BLOCK_M)
    start = q0 + tl.cast(start_m, tl.int64)
    m_ok = start_m + rows < nq
    mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    row0 = (b * HQ + h) * NQ + start
    q_rot = tl.load(QROT + (row0 + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask,
                    other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + start * stride_on
                 + rows[:, None] * stride_on + offs_d[None, :] * stride_od, mask=mask,
                 other=0.0)
    lse = tl.load(LSE_BWD + row0 + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(DO_ATTN + row0 + rows, mask=m_ok, other=0.0)
    return q_rot, do, lse, delta


@triton.jit
def _dkdv_blocks(dk, dv, k, v, QROT, DO, LSE_BWD, DO_ATTN, b, h, offs_n, offs_d, lo, hi,
                 GAP_AT, GAP, q0, nq, nk, NQ, HQ, LEFT, RIGHT, qk_scale, cap_scale, cap_log2,
                 stride_ob, stride_on, stride_oh, stride_od,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, WINDOWED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dK/dV contributions of query blocks [lo, hi) of head h, in the transposed layout
    (keys are rows): pT = exp2(k q^T * scale - lse'), dv += pT dO,
    dk += pT * (v dO^T - delta') q (without the scale).  MASKED: the window's mask
    (WINDOWED, over both edges of the band: triton_common.skip_gap) or the causal one.
    Soft-capped scores t = tanh(k q^T * scale / cap) give pT = exp2(cap * log2(e) * t -
    lse') and the extra chain factor 1 - t^2 on dS."""
    for it in range(lo, hi, BLOCK_M):
        start_m = it
        if MASKED:
            if WINDOWED:
                start_m = skip_gap(it, GAP_AT, GAP)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_rot, do, lse, delta = _query_side(QROT, DO, LSE_BWD, DO_ATTN, b, h, start_m, q0, nq,
                                            offs_d, NQ, HQ, stride_ob, stride_on, stride_oh,
                                            stride_od, BLOCK_M, HEAD_DIM)
        s_t = tl.dot(k.to(DOT_DTYPE), tl.trans(q_rot).to(DOT_DTYPE), input_precision=PRECISION)
        if HAS_SOFTCAP:
            t_t = tanh(s_t * cap_scale)
            p_t = tl.exp2(t_t * cap_log2 - lse[None, :])
        else:
            p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            if WINDOWED:
                p_t = tl.where(in_window(offs_m[None, :], offs_n[:, None], nk - nq, LEFT, RIGHT),
                               p_t, 0.0)
            else:
                p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + (nk - nq), p_t, 0.0)
        dv = tl.dot(p_t.to(DOT_DTYPE), do.to(DOT_DTYPE), dv, input_precision=PRECISION)
        dp_t = tl.dot(v.to(DOT_DTYPE), tl.trans(do).to(DOT_DTYPE), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(DOT_DTYPE), q_rot.to(DOT_DTYPE), dk, input_precision=PRECISION)
    return dk, dv


def _dkdv(QROT, K, V, DO, LSE_BWD, DO_ATTN, DK, DV, CU_Q, CU_K,
          stride_kb, stride_kn, stride_kh, stride_kd,
          stride_vb, stride_vn, stride_vh, stride_vd,
          stride_ob, stride_on, stride_oh, stride_od,
          NQ, NK, HQ, GROUP, scale,
          LEFT, RIGHT, SOFTCAP,  # window (triton_attention.window_args), soft-capping (0: off)
          SEQ_BUCKET,  # autotuning key only (triton_common.seq_bucket)
          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          HAS_SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_DTYPE: tl.constexpr,
          PRECISION: tl.constexpr):
    bkv = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    hkv = HQ // GROUP
    kvh = bkv % hkv
    # NQ, NK size the buffers, nq, nk this sequence; q0, k0 its first rows in them.
    b, q0, k0, nq, nk, _ = sequence(CU_Q, CU_K, None, bkv // hkv, NQ, NK, IS_VARLEN, False)
    if IS_VARLEN:
        if start_n >= nk:  # a block past this sequence's keys (the grid fits the longest)
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keys = k0 + offs_n.to(tl.int64)  # in the buffers
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n[:, None] < nk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + keys[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=mask, other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + keys[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_blocks_end = tl.cdiv(nq, BLOCK_M) * BLOCK_M
    if WINDOWED:
        # Row i sees key j iff j - RIGHT <= i + nk - nq <= j + LEFT: the rows that see some
        # key of this block, and those that see all of them (triton_common.key_blocks).
        first = start_n - (nk - nq)
        last = first + BLOCK_N - 1
        lo, full_lo, full_hi, hi = band_blocks(first - RIGHT, last + LEFT + 1, last - RIGHT,
                                               first + LEFT + 1, nq, BLOCK_M)
    elif CAUSAL:
        # Query i sees key j iff j <= i + nk - nq: rows below `lo` see none of this block,
        # rows from `full_lo` on see all of it.
        lo = tl.maximum(start_n - (nk - nq), 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (nk - nq), 0), BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, q_blocks_end)
        full_lo = tl.minimum(full_lo, q_blocks_end)
    else:
        lo = 0
        full_lo = 0
    gap = 0
    if WINDOWED:  # both edges of the band in one masked loop
        gap = full_hi - full_lo
        masked_hi = hi - gap
    else:
        full_hi = q_blocks_end
        masked_hi = full_lo
    qk_scale = scale * LOG2E
    cap_scale = scale  # scale / cap and cap * log2(e) when soft-capped (_dkdv_blocks)
    cap_log2 = qk_scale
    if HAS_SOFTCAP:
        cap_scale = scale / SOFTCAP
        cap_log2 = SOFTCAP * LOG2E
    for g in range(GROUP):
        h = kvh * GROUP + g
        dk, dv = _dkdv_blocks(dk, dv, k, v, QROT, DO, LSE_BWD, DO_ATTN, b, h, offs_n, offs_d,
                              lo, masked_hi, full_lo, gap, q0, nq, nk, NQ, HQ, LEFT, RIGHT,
                              qk_scale, cap_scale, cap_log2, stride_ob, stride_on, stride_oh,
                              stride_od, HEAD_DIM, BLOCK_M, BLOCK_N, True, WINDOWED,
                              HAS_SOFTCAP, DOT_DTYPE, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, QROT, DO, LSE_BWD, DO_ATTN, b, h, offs_n, offs_d,
                              full_lo, full_hi, 0, 0, q0, nq, nk, NQ, HQ, LEFT, RIGHT,
                              qk_scale, cap_scale, cap_log2, stride_ob, stride_on, stride_oh,
                              stride_od, HEAD_DIM, BLOCK_M, BLOCK_N, False, WINDOWED,
                              HAS_SOFTCAP, DOT_DTYPE, PRECISION)
    ptrs = ((b * NK + keys) * hkv + kvh)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_attention_blocks(dq, q_rot, do, lse, delta, Kh, Vh, offs_m, offs_d, lo, hi, GAP_AT,
                         GAP, NQ, NK, LEFT, RIGHT, stride_kn, stride_kd, stride_vn, stride_vd,
                         qk_scale, cap_scale, cap_log2, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                         CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         PRECISION: tl.constexpr):
    """dq_rot += (p' * (dO v^T - delta')) k over key blocks [lo, hi), without the scale
    (window edges and soft-capping as in _dkdv_blocks)."""
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
        vt = tl.load(Vb + keys[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q_rot.to(DOT_DTYPE), kt.to(DOT_DTYPE), input_precision=PRECISION)
        if HAS_SOFTCAP:
            t = tanh(s * cap_scale)
            p = tl.exp2(t * cap_log2 - lse[:, None])
        else:
            p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            visible = n_ok[None, :]
            if WINDOWED:
                visible = visible & in_window(offs_m[:, None], offs_n[None, :], NK - NQ, LEFT,
                                              RIGHT)
            elif CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (NK - NQ))
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do.to(DOT_DTYPE), vt.to(DOT_DTYPE), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(DOT_DTYPE), tl.trans(kt).to(DOT_DTYPE), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _memory_backward(dq, q, do, gate, W1, B1, W2, HID, GACT, h, row0, m_ok, offs_d,
                     HEAD_DIM: tl.constexpr, MEM_HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_H: tl.constexpr, HAS_B1: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Backward of g * mem, mem = silu(q W1 + b1) W2 (+ b2), for one tile, M streamed in
    chunks, with e = dO W2^T per chunk: d_hidden = g * e * silu'(hidden).  Returns
    (dq + d_hidden W1^T, rowsum(dO * (mem - b2)) = sum over chunks of rowsum(act * e)) and
    writes the tile's rows of d_hidden and g * act into HID/GACT [B, Hq, Nq, M] (row row0 is
    the tile's first), from which the caller forms dW1 = q^T d_hidden, db1 and
    dW2 = (g * act)^T dO as batched GEMMs: no partial weight gradient per tile, no atomics.
    q, do [BLOCK_M, BLOCK_D]; gate [BLOCK_M]."""
    d_ok = offs_d < HEAD_DIM
    rows = tl.arange(0, BLOCK_M)
    do_mem = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(0, MEM_HIDDEN, BLOCK_H):
        offs_h = m0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < MEM_HIDDEN
        w1 = tl.load(W1 + h * HEAD_DIM * MEM_HIDDEN + offs_d[:, None] * MEM_HIDDEN
                     + offs_h[None, :], mask=d_ok[:, None] & h_ok[None, :], other=0.0)
        hidden = tl.dot(q.to(DOT_DTYPE), w1.to(DOT_DTYPE), input_precision=PRECISION)
        if HAS_B1:
            hidden += tl.load(B1 + h * MEM_HIDDEN + offs_h, mask=h_ok,
                              other=0.0).to(tl.float32)[None, :]
        sig = tl.sigmoid(hidden)
        act = hidden * sig
        w2 = tl.load(W2 + h * MEM_HIDDEN * HEAD_DIM + offs_h[:, None] * HEAD_DIM
                     + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        e = tl.dot(do.to(DOT_DTYPE), tl.trans(w2).to(DOT_DTYPE), input_precision=PRECISION)
        do_mem += tl.sum(act * e, 1)
        d_hidden = gate[:, None] * e * (sig * (1.0 + hidden * (1.0 - sig)))  # silu'
        dq = tl.dot(d_hidden.to(DOT_DTYPE), tl.trans(w1).to(DOT_DTYPE), dq,
                    input_precision=PRECISION)
        ptrs = (row0 + rows)[:, None] * MEM_HIDDEN + offs_h[None, :]
        mask = m_ok[:, None] & h_ok[None, :]
        tl.store(HID + ptrs, d_hidden.to(HID.dtype.element_ty), mask=mask)
        tl.store(GACT + ptrs, (act * gate[:, None]).to(GACT.dtype.element_ty), mask=mask)
    return dq, do_mem


def _dq(Q, QROT, K, V, W1, B1, W2, B2, G1, C1, G2, COS, SIN, CU_Q, CU_K, SLOTS, DO, DGATE,
        GATE, LSE_BWD, DO_ATTN, DQ, HID, GACT, GHID, GZ,
        stride_qb, stride_qn, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_cb, stride_cn, stride_cd, stride_sb, stride_sn, stride_sd,
        stride_ob, stride_on, stride_oh, stride_od,
        NQ, NK, HQ, GROUP, scale, gate_scale,
        MAX_NQ,  # the longest sequence's query rows (NQ without packed sequences)
        LEFT, RIGHT, SOFTCAP,  # window (triton_attention.window_args), soft-capping (0: off)
        SEQ_BUCKET,  # autotuning key only (triton_common.seq_bucket)
        HEAD_DIM: tl.constexpr, MEM_HIDDEN: tl.constexpr, GATE_HIDDEN: tl.constexpr,
        CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_ROPE: tl.constexpr,
        HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_C1: tl.constexpr,
        HAS_DGATE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr,
        HAS_SLOTS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    h = tl.program_id(1).to(tl.int64)
    kvh = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < GATE_HIDDEN
    qk_scale = scale * LOG2E
    m_blocks = tl.cdiv(MAX_NQ, BLOCK_M)
    tile = tl.program_id(0)
    start_m = (tile % m_blocks) * BLOCK_M
    # NQ, NK size the buffers, nq, nk this sequence; q0, k0 its first rows in them.
    b, q0, k0, nq, nk, slot = sequence(CU_Q, CU_K, SLOTS, (tile // m_blocks).to(tl.int64), NQ,
                                       NK, IS_VARLEN, HAS_SLOTS)
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
    rows = q0 + offs_m.to(tl.int64)  # in the buffers
    m_ok = offs_m < nq
    tile_ok = m_ok[:, None] & d_ok[None, :]
    # Attention part, in the rotated frame; only what the key loop needs stays live.
    q_rot, do, lse, delta = _query_side(QROT, DO, LSE_BWD, DO_ATTN, b, h, start_m, q0, nq,
                                        offs_d, NQ, HQ, stride_ob, stride_on, stride_oh,
                                        stride_od, BLOCK_M, HEAD_DIM)
    Kh = K + b * stride_kb + k0 * stride_kn + kvh * stride_kh
    Vh = V + b * stride_vb + k0 * stride_vn + kvh * stride_vh
    cap_scale = scale  # scale / cap and cap * log2(e) when soft-capped (_dkdv_blocks)
    cap_log2 = qk_scale
    if HAS_SOFTCAP:
        cap_scale = scale / SOFTCAP
        cap_log2 = SOFTCAP * LOG2E
    lo, full_lo, full_hi, hi = key_blocks(start_m, nq, nk, LEFT, RIGHT, BLOCK_M, BLOCK_N,
                                          CAUSAL, WINDOWED)
    dq_rot = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq_rot = _dq_attention_blocks(dq_rot, q_rot, do, lse, delta, Kh, Vh, offs_m, offs_d,
                                  full_lo, full_hi, 0, 0, nq, nk, LEFT, RIGHT, stride_kn,
                                  stride_kd, stride_vn, stride_vd, qk_scale, cap_scale,
                                  cap_log2, HEAD_DIM, BLOCK_M, BLOCK_N, False, CAUSAL,
                                  WINDOWED, HAS_SOFTCAP, DOT_DTYPE, PRECISION)
    gap = full_hi - full_lo
    if WINDOWED:  # both edges of the window in one masked loop
        hi = hi - gap
    else:
        lo = full_hi
    dq_rot = _dq_attention_blocks(dq_rot, q_rot, do, lse, delta, Kh, Vh, offs_m, offs_d,
                                  lo, hi, full_lo, gap, nq, nk, LEFT, RIGHT, stride_kn,
                                  stride_kd, stride_vn, stride_vd, qk_scale, cap_scale,
                                  cap_log2, HEAD_DIM, BLOCK_M, BLOCK_N, True, CAUSAL, WINDOWED,
                                  HAS_SOFTCAP, DOT_DTYPE, PRECISION)
    dq_rot = dq_rot * scale
    if HAS_ROPE:
        # q_rot = q*cos + rotate_half(q)*sin, so dq = dq_rot*cos + rotate_half^T(dq_rot*sin)
        # with rotate_half^T(y)[d] = -sign[d] * y[partner[d]].
        partner, sign = rope_partner(offs_d, HEAD_DIM)
        cos = tl.load(COS + b * stride_cb + rows[:, None] * stride_cn
                      + offs_d[None, :] * stride_cd, mask=tile_ok, other=0.0)
        sin = tl.load(SIN + b * stride_sb + rows[:, None] * stride_sn
                      + offs_d[None, :] * stride_sd, mask=tile_ok, other=0.0)
        swapped = tl.gather(dq_rot * sin,
                            tl.broadcast_to(partner[None, :], (BLOCK_M, BLOCK_D)), 1)
        dq = dq_rot * cos - sign[None, :] * swapped
    else:
        dq = dq_rot

    # Memory branch (dmem = g * dO): the pre-RoPE query and dO are loaded again (L2 hits)
    # rather than kept live through the key loop.
    tok = (b * NQ + rows) * HQ + h
    row0 = (b * HQ + h) * NQ + q0 + start_m  # this tile's first row of HID/GACT/GHID/GZ
    gate = tl.load(GATE + tok, mask=m_ok, other=0.0)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + rows[:, None] * stride_on
                 + offs_d[None, :] * stride_od, mask=tile_ok, other=0.0)
    dq, do_mem = _memory_backward(dq, q, do, gate, W1, B1, W2, HID, GACT, h, row0, m_ok,
                                  offs_d, HEAD_DIM, MEM_HIDDEN, BLOCK_M, BLOCK_H, HAS_B1,
                                  DOT_DTYPE, PRECISION)
    if HAS_B2:
        b2 = tl.load(B2 + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        do_mem += tl.sum(do.to(tl.float32) * b2[None, :], 1)

    # Gate branch: out = attn + g * (mem - attn), gate = sigmoid(gate_scale * (z - shift)).
    d_gate = do_mem - delta
    if HAS_DGATE:
        d_gate += tl.load(DGATE + tok, mask=m_ok, other=0.0).to(tl.float32)
    dz = d_gate * gate * (1.0 - gate) * gate_scale
    gate_hidden, g1 = gate_hidden_tile(q, G1, C1, h, offs_d, HEAD_DIM, GATE_HIDDEN, BLOCK_M,
                                       BLOCK_R, HAS_C1, DOT_DTYPE, PRECISION)
    gate_sig = tl.sigmoid(gate_hidden)
    gate_act = gate_hidden * gate_sig
    gate_dact = gate_sig * (1.0 + gate_hidden * (1.0 - gate_sig))
    g2 = tl.load(G2 + h * GATE_HIDDEN + offs_r, mask=r_ok, other=0.0).to(tl.float32)
    d_gate_hidden = dz[:, None] * g2[None, :] * gate_dact
    # dG1 = q^T d_gate_hidden, dc1 and dg2 = sum of dz * gate_act: reduced by the caller.
    r_ptrs = (row0 + tl.arange(0, BLOCK_M))[:, None] * GATE_HIDDEN + offs_r[None, :]
    r_mask = m_ok[:, None] & r_ok[None, :]
    tl.store(GHID + r_ptrs, d_gate_hidden, mask=r_mask)
    tl.store(GZ + r_ptrs, dz[:, None] * gate_act, mask=r_mask)
    dq = tl.dot(d_gate_hidden.to(DOT_DTYPE), tl.trans(g1).to(DOT_DTYPE), dq,
                input_precision=PRECISION)
    tl.store(DQ + tok[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=tile_ok)


DKDV_KEY = ["SEQ_BUCKET", "HEAD_DIM", "CAUSAL", "WINDOWED", "SOFTCAP"]
DQ_KEY = ["SEQ_BUCKET", "HEAD_DIM", "MEM_HIDDEN", "CAUSAL", "WINDOWED", "SOFTCAP"]
# The plain kernels (fixed configuration: deterministic mode, where the tile sizes must not
# depend on timing) and their autotuned twins (default mode).
# The dK/dV kernel reads the rotated query (QROT) where the others read Q.
dkdv_kernel = triton.heuristics({
    name: (lambda a, rule=ATTENTION_HEURISTICS[name]: rule({**a, "Q": a["QROT"]}))
    for name in ("BLOCK_D", "DOT_DTYPE", "PRECISION", "HAS_SOFTCAP", "IS_VARLEN")})(
    triton.jit(_dkdv, do_not_specialize=WINDOW_ARGS))
dq_kernel = triton.heuristics({**ATTENTION_HEURISTICS, **WEIGHT_HEURISTICS,
                               "HAS_DGATE": lambda a: a["DGATE"] is not None})(
    triton.jit(_dq, do_not_specialize=WINDOW_ARGS))
dkdv_kernel_tuned = autotuned(dkdv_kernel, "dkdv", configs("dkdv"), DKDV_KEY)
dq_kernel_tuned = autotuned(dq_kernel, "dq", configs("dq"), DQ_KEY)
