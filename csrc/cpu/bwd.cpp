// CPU backward of gated-memory attention, the FlashAttention-2 backward with the memory and
// gate branches (the same per-tile math as csrc/cuda/bwd.cu):
//   1. per query tile (the "preprocess"): recompute the memory MLP, split dout into
//      d(attn) = dout (1 - g) and d(mem) = dout g, delta = rowsum(d(attn) * attn), the gate's
//      gradient, and the memory/gate branches' gradients (weights and their share of dq);
//   2. per key block, over the query tiles that see it: recompute P = exp(S - lse) and
//      accumulate dV, dK in registers-sized tiles and dQ in the head's own buffer;
//   3. dq = the branches' share + RoPE^T(scale * dQ).
// Work item = (sequence, query head): a batch element, or a packed sequence with its own
// rows, lengths and memory slot.  dq belongs to one item; dK/dV (shared by the query heads
// of a GQA group) and the weight gradients (shared by the sequences of a memory slot) are
// written as per-item partials and summed afterwards in a fixed order.  No atomics, so the backward is always
// bit-reproducible: deterministic=True costs nothing here.
// Scheduling differs from the GPU, not the math: one CPU thread owns a whole head, so it
// accumulates dQ during the key-block loop (FA2's loop order) where the CUDA code, whose
// blocks own key blocks, runs a separate dQ kernel instead of atomics.
#include "cpu/cpu_common.h"

namespace lift {
namespace cpu {
namespace {

// Per-item partial gradients, float32 and padded: dK/dV [Hq][Nk][Dp] per sequence, the
// sequences in row order (dk_offset), and the weight gradients per (sequence, head) in
// PackedWeights' layout.
struct Partials {
  int64_t dp, mp, rp, hq;
  std::vector<float> dk, dv, dw1, db1, dw2, db2, dg1, dc1, dg2;
  Partials(const AttnParams& p, const PackedWeights& w)
      : dp(w.dp), mp(w.mp), rp(w.rp), hq(p.hq),
        dk(total_rows_k(p) * p.hq * w.dp), dv(total_rows_k(p) * p.hq * w.dp),
        dw1(p.batch * p.hq * w.dp * w.mp), db1(p.batch * p.hq * w.mp),
        dw2(p.batch * p.hq * w.dp * w.mp), db2(p.batch * p.hq * w.dp),
        dg1(p.batch * p.hq * w.dp * w.rp), dc1(p.batch * p.hq * w.rp),
        dg2(p.batch * p.hq * w.rp) {}
  int64_t dk_offset(const Sequence& seq, int64_t h) const {
    return (seq.k_row * hq + h * seq.nk) * dp;
  }
};

// One work item's buffers: per query row of the head (padded to whole tiles) the scaled
// rotated query qs, d(attn) da, both also transposed per tile ([Dp][kBM]), delta, lse, dQ
// of the attention (dqr) and of the branches (dqd); plus one tile's temporaries.
struct BwdScratch {
  int64_t nblocks;
  std::vector<float> qs, qst, da, dat, delta, lse, dqr, dqd;
  std::vector<float> qf, dout, attn, h1, a1, mem, dmem, da1, hg, dhg, dlogit;
  std::vector<float> st, dpt, slope, dk, dv;
  BwdScratch(const Sequence& seq, const AttnParams& p, const PackedWeights& w)
      : nblocks((seq.nq + kBM - 1) / kBM),
        qs(nblocks * kBM * w.dp), qst(qs.size()), da(qs.size()), dat(qs.size()),
        delta(nblocks * kBM), lse(nblocks * kBM), dqr(qs.size()), dqd(qs.size()),
        qf(kBM * w.dp), dout(kBM * w.dp), attn(kBM * w.dp), h1(kBM * w.mp), a1(kBM * w.mp),
        mem(kBM * w.dp), dmem(kBM * w.dp), da1(kBM * w.mp), hg(kBM * w.rp), dhg(kBM * w.rp),
        dlogit(kBM), st(kBN * kBM), dpt(kBN * kBM), slope(p.softcap > 0.f ? kBN * kBM : 0),
        dk(kBN * w.dp), dv(kBN * w.dp) {}
};

// Phase 1 for the query tile starting at row i0 of sequence `seq`, query head h.
template <DType T>
LIFT_INLINE void query_tile(const AttnParams& p, const PackedWeights& w, const Sequence& seq,
                            int64_t h, int64_t i0, BwdScratch& s, float* dw1, float* db1,
                            float* dw2, float* db2, float* dg1, float* dc1, float* dg2) {
  const int D = static_cast<int>(p.head_dim), dp = w.dp, mp = w.mp, rp = w.rp, half = D / 2;
  const int rows = static_cast<int>(std::min<int64_t>(kBM, seq.nq - i0));
  const int64_t blk = i0 / kBM, mh = w.head(seq.slot, h);
  load_tile<T>(p.q, seq.q_off + i0 * p.q_stride.row + h * p.q_stride.head, p.q_stride.row,
               rows, D, s.qf.data(), dp, kBM);
  load_tile<T>(p.dout, seq.dout_off + i0 * p.dout_stride.row + h * p.dout_stride.head,
               p.dout_stride.row, rows, D, s.dout.data(), dp, kBM);
  load_tile<T>(p.attn, ((seq.q_row + i0) * p.hq + h) * D, p.hq * D, rows, D, s.attn.data(), dp,
               kBM);

  // Recompute the memory MLP (pre-activation h1, activation a1, output mem) and the gate's
  // pre-activation hg.
  gemm_nn(kBM, mp, dp, s.qf.data(), dp, w.W1(mh), mp, s.h1.data(), mp, false);
  const float* b1 = w.B1(mh);
  for (int r = 0; r < kBM; ++r)
    for (int c = 0; c < mp; ++c) {
      s.h1[r * mp + c] += b1[c];
      s.a1[r * mp + c] = silu(s.h1[r * mp + c]);
    }
  gemm_nn(kBM, dp, mp, s.a1.data(), mp, w.W2(mh), dp, s.mem.data(), dp, false);
  const float* b2 = w.B2(mh);
  gemm_nn(kBM, rp, dp, s.qf.data(), dp, w.G1(mh), rp, s.hg.data(), rp, false);
  const float* c1 = w.C1(mh);
  for (int r = 0; r < kBM; ++r)
    for (int c = 0; c < rp; ++c) s.hg[r * rp + c] += c1[c];

  // Split dout between the branches; the gate's gradient; delta.
  float* da = s.da.data() + i0 * dp;
  for (int r = 0; r < kBM; ++r) {
    const int64_t row = (seq.q_row + i0 + r) * p.hq + h;
    const float g = r < rows ? p.gate[row] : 0.f;
    float dgate = r < rows && p.dgate ? p.dgate[row] : 0.f, delta = 0.f;
    for (int c = 0; c < dp; ++c) {
      const float dout = s.dout[r * dp + c], attn = s.attn[r * dp + c];
      dgate += dout * (s.mem[r * dp + c] + b2[c] - attn);
      s.dmem[r * dp + c] = dout * g;
      da[r * dp + c] = dout - dout * g;
      delta += da[r * dp + c] * attn;
    }
    s.dlogit[r] = r < rows ? dgate * gate_logit_grad(g, p.gate_scale) : 0.f;
    s.delta[i0 + r] = delta;
    const float lse = r < rows ? p.lse[seq.lse_off + h * seq.lse_head_stride + i0 + r] : -INFINITY;
    // A row that sees no key has P = 0: exp(S - (+inf)) = 0.
    s.lse[i0 + r] = lse == -INFINITY ? INFINITY : lse;
  }

  // Memory branch: dW2, db2, then through silu to dW1, db1 and dq.
  gemm_tn(mp, dp, kBM, s.a1.data(), mp, s.dmem.data(), dp, dw2, dp, true);
  gemm_nn(kBM, mp, dp, s.dmem.data(), dp, w.W2t(mh), mp, s.da1.data(), mp, false);
  for (int r = 0; r < kBM; ++r) {
    for (int c = 0; c < dp; ++c) db2[c] += s.dmem[r * dp + c];
    for (int c = 0; c < mp; ++c) {
      s.da1[r * mp + c] *= silu_grad(s.h1[r * mp + c]);
      db1[c] += s.da1[r * mp + c];
    }
  }
  gemm_tn(dp, mp, kBM, s.qf.data(), dp, s.da1.data(), mp, dw1, mp, true);
  float* dqd = s.dqd.data() + i0 * dp;
  gemm_nn(kBM, dp, mp, s.da1.data(), mp, w.W1t(mh), dp, dqd, dp, false);

  // Gate branch: dg2, then through silu to dG1, dc1 and dq.
  const float* g2 = w.G2(mh);
  for (int r = 0; r < kBM; ++r)
    for (int c = 0; c < rp; ++c) {
      const float x = s.hg[r * rp + c];
      dg2[c] += silu(x) * s.dlogit[r];
      s.dhg[r * rp + c] = s.dlogit[r] * g2[c] * silu_grad(x);
      dc1[c] += s.dhg[r * rp + c];
    }
  gemm_tn(dp, rp, kBM, s.qf.data(), dp, s.dhg.data(), rp, dg1, rp, true);
  gemm_nn(kBM, dp, rp, s.dhg.data(), rp, w.G1t(mh), dp, dqd, dp, true);

  // The scaled rotated query and d(attn), row-major and transposed per tile.
  float* qs = s.qs.data() + i0 * dp;
  float* qst = s.qst.data() + blk * dp * kBM;
  float* dat = s.dat.data() + blk * dp * kBM;
  for (int r = 0; r < kBM; ++r) {
    const float* x = s.qf.data() + r * dp;
    for (int e = 0; e < dp; ++e) {
      float y = x[e];
      if (p.cos && r < rows && e < D) {
        const int64_t off = seq.rope_off + (i0 + r) * p.rope_row_stride;
        y = rope_element(x, p.cos + off, p.sin + off, e, half);
      }
      qs[r * dp + e] = y * p.scale;
      qst[e * kBM + r] = y * p.scale;
      dat[e * kBM + r] = da[r * dp + e];
    }
  }
}

// Phase 2 for the key block starting at j0: dK, dV into the item's partials, dQ into dqr.
LIFT_INLINE void key_block(const AttnParams& p, const Sequence& seq, const float* K,
                           const float* V, int64_t j0, BwdScratch& s, int dp, float* dk_out,
                           float* dv_out) {
  const int cols = static_cast<int>(std::min<int64_t>(kBN, seq.nk - j0));
  std::fill(s.dk.begin(), s.dk.end(), 0.f);
  std::fill(s.dv.begin(), s.dv.end(), 0.f);
  const float* Kj = K + j0 * dp;
  const float* Vj = V + j0 * dp;
  // Only the query tiles that see some key of the block (causal diagonal, sliding window).
  const int64_t diag = seq.nk - seq.nq, right = right_bound(p);
  const int64_t first = right < 0 ? 0 : std::max<int64_t>(0, j0 - diag - right) / kBM;
  int64_t end = s.nblocks;
  if (p.window_left >= 0) {
    const int64_t last_row = j0 + cols - 1 - diag + p.window_left;
    end = last_row < 0 ? 0 : std::min<int64_t>(end, last_row / kBM + 1);
  }
  float* slope = p.softcap > 0.f ? s.slope.data() : nullptr;
  for (int64_t blk = first; blk < end; ++blk) {
    const int64_t i0 = blk * kBM;
    float *st = s.st.data(), *dpt = s.dpt.data();
    gemm_nn(cols, kBM, dp, Kj, dp, s.qst.data() + blk * dp * kBM, kBM, st, kBM, false);
    if (slope) softcap_scores(p.softcap, st, cols * kBM, slope);
    mask_scores(p, seq, i0, kBM, j0, cols, st);
    gemm_nn(cols, kBM, dp, Vj, dp, s.dat.data() + blk * dp * kBM, kBM, dpt, kBM, false);
    const float* lse = s.lse.data() + i0;
    const float* delta = s.delta.data() + i0;
    for (int jj = 0; jj < cols; ++jj)
      for (int r = 0; r < kBM; ++r) {
        const float prob = exp_neg(st[jj * kBM + r] - lse[r]);
        st[jj * kBM + r] = prob;
        dpt[jj * kBM + r] = prob * (dpt[jj * kBM + r] - delta[r]);  // dS
      }
    if (slope)  // through the soft-capping: dS of the scaled scores
      for (int i = 0; i < cols * kBM; ++i) dpt[i] *= slope[i];
    gemm_nn(cols, dp, kBM, st, kBM, s.da.data() + i0 * dp, dp, s.dv.data(), dp, true);
    gemm_nn(cols, dp, kBM, dpt, kBM, s.qs.data() + i0 * dp, dp, s.dk.data(), dp, true);
    gemm_tn(kBM, dp, cols, dpt, kBM, Kj, dp, s.dqr.data() + i0 * dp, dp, true);
  }
  std::copy(s.dk.begin(), s.dk.begin() + cols * dp, dk_out + j0 * dp);
  std::copy(s.dv.begin(), s.dv.begin() + cols * dp, dv_out + j0 * dp);
}

template <DType T>
LIFT_INLINE void backward_head(const AttnParams& p, const PackedWeights& w, const PackedKV& kv,
                               Partials& part, int64_t b, int64_t h) {
  const int D = static_cast<int>(p.head_dim), dp = w.dp, half = D / 2;
  const int64_t item = b * p.hq + h;
  const Sequence seq = sequence(p, b);
  BwdScratch s(seq, p, w);
  for (int64_t i0 = 0; i0 < seq.nq; i0 += kBM)
    query_tile<T>(p, w, seq, h, i0, s, part.dw1.data() + item * dp * w.mp,
                  part.db1.data() + item * w.mp, part.dw2.data() + item * dp * w.mp,
                  part.db2.data() + item * dp, part.dg1.data() + item * dp * w.rp,
                  part.dc1.data() + item * w.rp, part.dg2.data() + item * w.rp);

  const int64_t kvh = h / (p.hq / p.hkv);
  float* dk = part.dk.data() + part.dk_offset(seq, h);
  float* dv = part.dv.data() + part.dk_offset(seq, h);
  for (int64_t j0 = 0; j0 < seq.nk; j0 += kBN)
    key_block(p, seq, kv.K(seq, kvh), kv.V(seq, kvh), j0, s, dp, dk, dv);

  std::vector<float> dy(dp);
  for (int64_t i = 0; i < seq.nq; ++i) {
    const float* dqr = s.dqr.data() + i * dp;
    const float* dqd = s.dqd.data() + i * dp;
    for (int e = 0; e < dp; ++e) dy[e] = dqr[e] * p.scale;
    const int64_t row = ((seq.q_row + i) * p.hq + h) * D;
    const int64_t off = seq.rope_off + i * p.rope_row_stride;
    for (int e = 0; e < D; ++e) {
      const float drot =
          p.cos ? rope_element_grad(dy.data(), p.cos + off, p.sin + off, e, half) : dy[e];
      store_elem<T>(p.dq, row + e, dqd[e] + drot);
    }
  }
}

#define LIFT_BACKWARD_HEAD(NAME, TYPE)                                                    \
  LIFT_CPU_MULTIVERSION void NAME(const AttnParams& p, const PackedWeights& w,           \
                                  const PackedKV& kv, Partials& part, int64_t b,          \
                                  int64_t h) {                                            \
    backward_head<TYPE>(p, w, kv, part, b, h);                                            \
  }
LIFT_BACKWARD_HEAD(backward_head_f32, DType::kFloat32)
LIFT_BACKWARD_HEAD(backward_head_bf16, DType::kBFloat16)
LIFT_BACKWARD_HEAD(backward_head_f16, DType::kFloat16)
#undef LIFT_BACKWARD_HEAD

// dk, dv [rows, Hkv, D] = the sums of the partials of each GQA group, in head order.
template <DType T>
void reduce_dkdv(const AttnParams& p, const Partials& part) {
  const int64_t group = p.hq / p.hkv, dp = part.dp, D = p.head_dim;
  parallel_for(p.batch * p.hkv, [&](int64_t item) {
    const Sequence seq = sequence(p, item / p.hkv);
    const int64_t kvh = item % p.hkv;
    std::vector<float> dk(dp), dv(dp);
    for (int64_t j = 0; j < seq.nk; ++j) {
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        const int64_t src = part.dk_offset(seq, h) + j * dp;
        for (int64_t e = 0; e < dp; ++e) {
          dk[e] += part.dk[src + e];
          dv[e] += part.dv[src + e];
        }
      }
      const int64_t dst = ((seq.k_row + j) * p.hkv + kvh) * D;
      for (int64_t e = 0; e < D; ++e) {
        store_elem<T>(p.dk, dst + e, dk[e]);
        store_elem<T>(p.dv, dst + e, dv[e]);
      }
    }
  });
}

// The weight gradients: per (memory slot, head), the sum of the partials of the slot's
// sequences in sequence order (exactly zero for a slot no sequence reads), unpadded into the
// weights' [K, Hq, rows, cols] layout (K = 1 without memory slots).
void reduce_weights(const AttnParams& p, const Partials& part) {
  const int64_t H = p.hq, D = p.head_dim, M = p.mem_hidden, R = p.gate_hidden;
  const int64_t dp = part.dp, mp = part.mp, rp = part.rp;
  std::vector<std::vector<int64_t>> readers(p.num_slots);
  for (int64_t b = 0; b < p.batch; ++b) readers[sequence(p, b).slot].push_back(b);
  parallel_for(p.num_slots * H, [&](int64_t item) {
    const int64_t slot = item / H, h = item % H;
    const std::vector<int64_t>& seqs = readers[slot];
    auto sum = [&](const std::vector<float>& src, int64_t per_item, int64_t idx) {
      float acc = 0.f;
      for (const int64_t b : seqs) acc += src[(b * H + h) * per_item + idx];
      return acc;
    };
    float *dw1 = p.dw1 + item * D * M, *dw2 = p.dw2 + item * M * D, *dg1 = p.dg1 + item * D * R;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t m = 0; m < M; ++m) {
        dw1[d * M + m] = sum(part.dw1, dp * mp, d * mp + m);
        dw2[m * D + d] = sum(part.dw2, dp * mp, m * dp + d);
      }
      for (int64_t r = 0; r < R; ++r) dg1[d * R + r] = sum(part.dg1, dp * rp, d * rp + r);
      if (p.db2) p.db2[item * D + d] = sum(part.db2, dp, d);
    }
    for (int64_t m = 0; m < M; ++m)
      if (p.db1) p.db1[item * M + m] = sum(part.db1, mp, m);
    for (int64_t r = 0; r < R; ++r) {
      if (p.dc1) p.dc1[item * R + r] = sum(part.dc1, rp, r);
      p.dg2[item * R + r] = sum(part.dg2, rp, r);
    }
  });
}

}  // namespace

void backward(const AttnParams& p) {
  const PackedWeights w(p);
  const PackedKV kv(p);
  Partials part(p, w);
  auto head = p.dtype == DType::kFloat32    ? backward_head_f32
              : p.dtype == DType::kBFloat16 ? backward_head_bf16
                                            : backward_head_f16;
  parallel_for(p.batch * p.hq,
               [&](int64_t item) { head(p, w, kv, part, item / p.hq, item % p.hq); });
  switch (p.dtype) {
    case DType::kFloat32: reduce_dkdv<DType::kFloat32>(p, part); break;
    case DType::kBFloat16: reduce_dkdv<DType::kBFloat16>(p, part); break;
    case DType::kFloat16: reduce_dkdv<DType::kFloat16>(p, part); break;
  }
  reduce_weights(p, part);
}

}  // namespace cpu
}  // namespace lift
