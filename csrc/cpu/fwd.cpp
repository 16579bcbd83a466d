// CPU forward of gated-memory attention: the FlashAttention-2 online softmax over key blocks,
// with the memory MLP, the gate and q-RoPE fused on each query tile.  The same algorithm
// as csrc/cuda/fwd.cu, tile for tile; O(N) memory: a query tile's scores live in one
// kBN x kBM buffer, never an Nq x Nk matrix.
//
// Work item = (sequence, query head): a batch element, or a packed sequence with its own
// rows, lengths and memory slot (gated_attention.h's Sequence).  Each runs its query tiles in
// order and writes its own rows of out/attn/gate/lse, so the result is the same whatever the
// thread count.
#include "cpu/cpu_common.h"

namespace lift {
namespace cpu {
namespace {

// One thread's buffers for one query tile (kBM rows).  Scores are kept transposed,
// st[key][row], so the per-row softmax statistics vectorise across rows.
struct FwdScratch {
  std::vector<float> qf, h1, mem, hg, qrt, st, o, m, l, alpha, msafe, gate;
  FwdScratch(int64_t dp, int64_t mp, int64_t rp)
      : qf(kBM * dp), h1(kBM * mp), mem(kBM * dp), hg(kBM * rp), qrt(dp * kBM),
        st(kBN * kBM), o(kBM * dp), m(kBM), l(kBM), alpha(kBM), msafe(kBM), gate(kBM) {}
};

// The memory MLP and the gate of the first np rows of a query tile: mem [np][Dp], gate [np];
// h is the memory head (PackedWeights::head: the sequence's slot and the query head).
LIFT_INLINE void memory_and_gate(const AttnParams& p, const PackedWeights& w, int64_t h, int np,
                                 FwdScratch& s) {
  const int dp = w.dp, mp = w.mp, rp = w.rp;
  gemm_nn(np, mp, dp, s.qf.data(), dp, w.W1(h), mp, s.h1.data(), mp, false);
  const float* b1 = w.B1(h);
  for (int r = 0; r < np; ++r)
    for (int c = 0; c < mp; ++c) s.h1[r * mp + c] = silu(s.h1[r * mp + c] + b1[c]);
  gemm_nn(np, dp, mp, s.h1.data(), mp, w.W2(h), dp, s.mem.data(), dp, false);
  const float* b2 = w.B2(h);
  for (int r = 0; r < np; ++r)
    for (int c = 0; c < dp; ++c) s.mem[r * dp + c] += b2[c];

  gemm_nn(np, rp, dp, s.qf.data(), dp, w.G1(h), rp, s.hg.data(), rp, false);
  const float *c1 = w.C1(h), *g2 = w.G2(h);
  for (int r = 0; r < np; ++r) {
    float logit = 0.f;
    for (int c = 0; c < rp; ++c) logit += silu(s.hg[r * rp + c] + c1[c]) * g2[c];
    s.gate[r] = gate_from_logit(logit, p.gate_scale, p.gate_shift);
  }
}

template <DType T>
LIFT_INLINE void forward_head(const AttnParams& p, const PackedWeights& w, const PackedKV& kv,
                              int64_t b, int64_t h) {
  const int D = static_cast<int>(p.head_dim), dp = w.dp, half = D / 2;
  const Sequence seq = sequence(p, b);
  if (seq.nq == 0) return;
  FwdScratch s(w.dp, w.mp, w.rp);
  const float* K = kv.K(seq, h / (p.hq / p.hkv));
  const float* V = kv.V(seq, h / (p.hq / p.hkv));

  for (int64_t i0 = 0; i0 < seq.nq; i0 += kBM) {
    const int rows = static_cast<int>(std::min<int64_t>(kBM, seq.nq - i0));
    // Rows computed: whole vectors, so a short tile (decode: Nq = 1) costs 16 rows, not 64.
    const int np = static_cast<int>(pad16(rows));
    load_tile<T>(p.q, seq.q_off + i0 * p.q_stride.row + h * p.q_stride.head, p.q_stride.row,
                 rows, D, s.qf.data(), dp, kBM);
    memory_and_gate(p, w, w.head(seq.slot, h), np, s);

    // The rotated query, times the softmax scale, transposed: qrt[e][r].
    std::fill(s.qrt.begin(), s.qrt.end(), 0.f);
    for (int r = 0; r < rows; ++r) {
      const float* x = s.qf.data() + r * dp;
      if (p.cos) {
        const int64_t off = seq.rope_off + (i0 + r) * p.rope_row_stride;
        for (int e = 0; e < D; ++e)
          s.qrt[e * kBM + r] = rope_element(x, p.cos + off, p.sin + off, e, half) * p.scale;
      } else {
        for (int e = 0; e < D; ++e) s.qrt[e * kBM + r] = x[e] * p.scale;
      }
    }

    std::fill(s.m.begin(), s.m.end(), -INFINITY);
    std::fill(s.l.begin(), s.l.end(), 0.f);
    std::fill(s.o.begin(), s.o.end(), 0.f);
    // Only the keys the tile's rows can see (the causal diagonal, the sliding window).
    const int64_t kend = visible_key_end(p, seq, i0, rows);
    for (int64_t j0 = visible_key_begin(p, seq, i0); j0 < kend; j0 += kBN) {
      const int cols = static_cast<int>(std::min<int64_t>(kBN, kend - j0));
      float* st = s.st.data();
      gemm_nn(cols, np, dp, K + j0 * dp, dp, s.qrt.data(), kBM, st, kBM, false);
      if (p.softcap > 0.f) softcap_scores(p.softcap, st, cols * kBM, nullptr);
      mask_scores(p, seq, i0, np, j0, cols, st);

      // Online softmax: new row max, rescale factor, exponentials, row sums.
      float mb[kBM], rowsum[kBM];
      for (int r = 0; r < np; ++r) mb[r] = s.m[r];
      for (int jj = 0; jj < cols; ++jj)
        for (int r = 0; r < np; ++r) mb[r] = mb[r] > st[jj * kBM + r] ? mb[r] : st[jj * kBM + r];
      for (int r = 0; r < np; ++r) {
        s.alpha[r] = softmax_rescale(s.m[r], mb[r]);
        s.m[r] = mb[r];
        s.msafe[r] = softmax_safe_max(mb[r]);
        rowsum[r] = 0.f;
      }
      for (int jj = 0; jj < cols; ++jj)
        for (int r = 0; r < np; ++r) {
          const float e = exp_neg(st[jj * kBM + r] - s.msafe[r]);
          st[jj * kBM + r] = e;
          rowsum[r] += e;
        }
      for (int r = 0; r < np; ++r) {
        s.l[r] = s.l[r] * s.alpha[r] + rowsum[r];
        for (int c = 0; c < dp; ++c) s.o[r * dp + c] *= s.alpha[r];
      }
      gemm_tn(np, dp, cols, st, kBM, V + j0 * dp, dp, s.o.data(), dp, true);
    }

    for (int r = 0; r < rows; ++r) {
      const int64_t row = (seq.q_row + i0 + r) * p.hq + h;  // [rows, Hq] index
      const float inv = s.l[r] > 0.f ? 1.f / s.l[r] : 0.f;
      const float g = s.gate[r];
      p.gate[row] = g;
      p.lse[seq.lse_off + h * seq.lse_head_stride + i0 + r] = softmax_lse(s.m[r], s.l[r]);
      for (int e = 0; e < D; ++e) {
        const float a = s.o[r * dp + e] * inv;
        store_elem<T>(p.attn, row * D + e, a);
        store_elem<T>(p.out, row * D + e, gated_mix(a, s.mem[r * dp + e], g));
      }
    }
  }
}

// One multiversioned entry per dtype (GCC clones non-template functions only).
#define LIFT_FORWARD_HEAD(NAME, TYPE)                                                     \
  LIFT_CPU_MULTIVERSION void NAME(const AttnParams& p, const PackedWeights& w,           \
                                  const PackedKV& kv, int64_t b, int64_t h) {             \
    forward_head<TYPE>(p, w, kv, b, h);                                                   \
  }
LIFT_FORWARD_HEAD(forward_head_f32, DType::kFloat32)
LIFT_FORWARD_HEAD(forward_head_bf16, DType::kBFloat16)
LIFT_FORWARD_HEAD(forward_head_f16, DType::kFloat16)
#undef LIFT_FORWARD_HEAD

}  // namespace

void forward(const AttnParams& p) {
  const PackedWeights w(p);
  const PackedKV kv(p);
  auto head = p.dtype == DType::kFloat32    ? forward_head_f32
              : p.dtype == DType::kBFloat16 ? forward_head_bf16
                                            : forward_head_f16;
  parallel_for(p.batch * p.hq, [&](int64_t item) { head(p, w, kv, item / p.hq, item % p.hq); });
}

}  // namespace cpu
}  // namespace lift
