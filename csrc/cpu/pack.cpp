// Packing shared by the CPU forward and backward: padded float32 weights and keys/values.
#include "cpu/cpu_common.h"

namespace lift {
namespace cpu {

PackedWeights::PackedWeights(const AttnParams& p)
    : dp(pad16(p.head_dim)), mp(pad16(p.mem_hidden)), rp(pad16(p.gate_hidden)), hq(p.hq) {
  // Memory slots are [K, Hq, ...]: as K * Hq heads, memory head mh = slot * Hq + h.
  const int64_t H = p.num_slots * p.hq, D = p.head_dim, M = p.mem_hidden, R = p.gate_hidden;
  w1.assign(H * dp * mp, 0.f);
  w2.assign(H * dp * mp, 0.f);
  w1t.assign(H * dp * mp, 0.f);
  w2t.assign(H * dp * mp, 0.f);
  g1.assign(H * dp * rp, 0.f);
  g1t.assign(H * dp * rp, 0.f);
  b1.assign(H * mp, 0.f);
  b2.assign(H * dp, 0.f);
  c1.assign(H * rp, 0.f);
  g2.assign(H * rp, 0.f);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t m = 0; m < M; ++m) {
        const float a = p.w1[(h * D + d) * M + m];  // w1[h, d, m]
        const float b = p.w2[(h * M + m) * D + d];  // w2[h, m, d]
        w1[(h * dp + d) * mp + m] = a;
        w1t[(h * mp + m) * dp + d] = a;
        w2[(h * mp + m) * dp + d] = b;
        w2t[(h * dp + d) * mp + m] = b;
      }
      for (int64_t r = 0; r < R; ++r) {
        const float a = p.g1[(h * D + d) * R + r];
        g1[(h * dp + d) * rp + r] = a;
        g1t[(h * rp + r) * dp + d] = a;
      }
    }
    for (int64_t m = 0; m < M; ++m) b1[h * mp + m] = p.b1 ? p.b1[h * M + m] : 0.f;
    for (int64_t d = 0; d < D; ++d) b2[h * dp + d] = p.b2 ? p.b2[h * D + d] : 0.f;
    for (int64_t r = 0; r < R; ++r) {
      c1[h * rp + r] = p.c1 ? p.c1[h * R + r] : 0.f;
      g2[h * rp + r] = p.g2[h * R + r];
    }
  }
}

namespace {

template <DType T>
void pack_kv(const AttnParams& p, PackedKV& kv) {
  const int D = static_cast<int>(p.head_dim), dp = static_cast<int>(kv.dp);
  parallel_for(p.batch * p.hkv, [&](int64_t item) {
    const Sequence seq = sequence(p, item / p.hkv);
    const int64_t h = item % p.hkv;
    float* k = kv.k.data() + kv.offset(seq, h);
    float* v = kv.v.data() + kv.offset(seq, h);
    for (int64_t j0 = 0; j0 < seq.nk; j0 += kBN) {
      const int rows = static_cast<int>(std::min<int64_t>(kBN, seq.nk - j0));
      load_tile<T>(p.k, seq.k_off + j0 * p.k_stride.row + h * p.k_stride.head,
                   p.k_stride.row, rows, D, k + j0 * dp, dp, rows);
      load_tile<T>(p.v, seq.v_off + j0 * p.v_stride.row + h * p.v_stride.head,
                   p.v_stride.row, rows, D, v + j0 * dp, dp, rows);
    }
  });
}

}  // namespace

PackedKV::PackedKV(const AttnParams& p)
    : dp(pad16(p.head_dim)), hkv(p.hkv),
      k(static_cast<size_t>(total_rows_k(p) * p.hkv * dp)),
      v(static_cast<size_t>(total_rows_k(p) * p.hkv * dp)) {
  switch (p.dtype) {
    case DType::kFloat32: pack_kv<DType::kFloat32>(p, *this); break;
    case DType::kBFloat16: pack_kv<DType::kBFloat16>(p, *this); break;
    case DType::kFloat16: pack_kv<DType::kFloat16>(p, *this); break;
  }
}

}  // namespace cpu
}  // namespace lift
