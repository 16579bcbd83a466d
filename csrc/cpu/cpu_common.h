// Building blocks of the CPU kernels: dtype conversion, a vectorisable exp, a small
// register-blocked matrix multiply on float32 tiles, and the tile sizes.
//
// Speed without -march flags: the matrix multiplies (gemm.cpp) and the per-work-item
// functions of fwd.cpp/bwd.cpp are compiled several times with LIFT_CPU_MULTIVERSION (GCC
// function multiversioning: AVX-512, x86-64-v3 (AVX2 with FMA) and a baseline clone, picked
// at load time by the CPU), and the element-wise helpers here are force-inlined into each
// clone, so one binary runs everywhere and uses the widest vectors the machine has.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gated_attention.h"

#define LIFT_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LIFT_CPU_MULTIVERSION \
  __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define LIFT_CPU_MULTIVERSION
#endif

namespace lift {
namespace cpu {

// Tile sizes: BM query rows x BN keys.  Feature dims are padded to multiples of kVec so
// every inner loop runs over whole vectors (the padding holds zeros).
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kVec = 16;

inline int64_t pad16(int64_t n) { return (n + kVec - 1) / kVec * kVec; }

// ---- dtype conversion (round to nearest even, like torch) ---------------------------------

LIFT_INLINE float bf16_to_float(uint16_t h) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16);
}

LIFT_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t x = __builtin_bit_cast(uint32_t, f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

LIFT_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return __builtin_bit_cast(float, sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float value = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return __builtin_bit_cast(float, sign | __builtin_bit_cast(uint32_t, value));
  }
  return __builtin_bit_cast(float, sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

LIFT_INLINE uint16_t float_to_half(float f) {
  const uint32_t x = __builtin_bit_cast(uint32_t, f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to +-inf
  if (a >= 0x38800000u) {  // a normal half: rebias the exponent, round the mantissa
    const uint32_t r = a - 0x38000000u;
    return sign | static_cast<uint16_t>((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
  }
  // subnormal half (or zero): the value in units of 2^-24, rounded to nearest even
  const float units = __builtin_bit_cast(float, a) * 16777216.f;
  return sign | static_cast<uint16_t>(std::nearbyint(units));
}

template <DType T>
LIFT_INLINE float load_elem(const void* p, int64_t i) {
  if constexpr (T == DType::kFloat32) return static_cast<const float*>(p)[i];
  if constexpr (T == DType::kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  if constexpr (T == DType::kFloat16) return half_to_float(static_cast<const uint16_t*>(p)[i]);
}

template <DType T>
LIFT_INLINE void store_elem(void* p, int64_t i, float x) {
  if constexpr (T == DType::kFloat32) static_cast<float*>(p)[i] = x;
  if constexpr (T == DType::kBFloat16) static_cast<uint16_t*>(p)[i] = float_to_bf16(x);
  if constexpr (T == DType::kFloat16) static_cast<uint16_t*>(p)[i] = float_to_half(x);
}

// Reads `rows` rows of `width` elements (row stride `ld`) into a float32 tile with row
// stride `ldt`, zero-filling padded columns up to ldt and rows up to `rows_pad`.
template <DType T>
LIFT_INLINE void load_tile(const void* src, int64_t offset, int64_t ld, int rows, int width,
                           float* tile, int ldt, int rows_pad) {
  for (int r = 0; r < rows_pad; ++r) {
    float* t = tile + static_cast<int64_t>(r) * ldt;
    if (r < rows) {
      const int64_t base = offset + r * ld;
      for (int c = 0; c < width; ++c) t[c] = load_elem<T>(src, base + c);
      for (int c = width; c < ldt; ++c) t[c] = 0.f;
    } else {
      for (int c = 0; c < ldt; ++c) t[c] = 0.f;
    }
  }
}

// ---- exp ----------------------------------------------------------------------------------

// exp(x) for x <= 0 as plain arithmetic, so loops over it vectorise (libm's expf does not
// without -ffast-math, which would also break -inf).  Range reduction x = n ln2 + r with
// |r| <= ln2/2 and a degree-6 polynomial (Cephes' expf coefficients): relative error about
// 1e-7.  x < -87.3 (including -inf, a masked score) gives exactly 0; NaN stays NaN.
LIFT_INLINE float exp_neg(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + magic;
  const int32_t n = static_cast<int32_t>(__builtin_bit_cast(uint32_t, t) -
                                         __builtin_bit_cast(uint32_t, magic));
  const float nf = t - magic;
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const float y = __builtin_bit_cast(
      float, __builtin_bit_cast(uint32_t, p) + (static_cast<uint32_t>(n) << 23));
  return x != x ? x : (x < -87.3f ? 0.f : y);  // NaN propagates
}

// ---- matrix multiply on float32 tiles (gemm.cpp) --------------------------------------------

// C[M][N] = (accumulate ? C : 0) + A[M][K] @ B[K][N], all float32, row-major with leading
// dims lda, ldb, ldc; N a multiple of kVec.
void gemm_nn(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
             float* C, int64_t ldc, bool accumulate);
// The same with A stored transposed: op(A)[m][k] = A[k * lda + m].
void gemm_tn(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
             float* C, int64_t ldc, bool accumulate);

// ---- weights, padded and packed once per call ----------------------------------------------

// The weights, float32 and zero-padded to Dp = pad16(D), Mp = pad16(M), Rp = pad16(R), so
// padded hidden units stay exactly zero.  Per memory head mh = slot * Hq + h (slot 0 without
// memory slots): w1 [Dp][Mp], w2 [Mp][Dp], g1 [Dp][Rp], their transposes w1t [Mp][Dp],
// w2t [Dp][Mp], g1t [Rp][Dp], and b1 [Mp], b2 [Dp], c1, g2 [Rp].
struct PackedWeights {
  int64_t dp, mp, rp, hq;
  std::vector<float> w1, w2, g1, w1t, w2t, g1t, b1, b2, c1, g2;

  explicit PackedWeights(const AttnParams& p);
  int64_t head(int64_t slot, int64_t h) const { return slot * hq + h; }
  const float* W1(int64_t mh) const { return w1.data() + mh * dp * mp; }
  const float* W2(int64_t mh) const { return w2.data() + mh * dp * mp; }
  const float* G1(int64_t mh) const { return g1.data() + mh * dp * rp; }
  const float* W1t(int64_t mh) const { return w1t.data() + mh * dp * mp; }
  const float* W2t(int64_t mh) const { return w2t.data() + mh * dp * mp; }
  const float* G1t(int64_t mh) const { return g1t.data() + mh * dp * rp; }
  const float* B1(int64_t mh) const { return b1.data() + mh * mp; }
  const float* B2(int64_t mh) const { return b2.data() + mh * dp; }
  const float* C1(int64_t mh) const { return c1.data() + mh * rp; }
  const float* G2(int64_t mh) const { return g2.data() + mh * rp; }
};

// Keys and values as float32 [Nk][Dp] blocks, one per (sequence, kv head), zero-padded;
// sequence by sequence in row order, so the blocks of a sequence start at k_row * Hkv rows.
struct PackedKV {
  int64_t dp, hkv;
  std::vector<float> k, v;

  explicit PackedKV(const AttnParams& p);
  int64_t offset(const Sequence& seq, int64_t kvh) const {
    return (seq.k_row * hkv + kvh * seq.nk) * dp;
  }
  const float* K(const Sequence& seq, int64_t kvh) const { return k.data() + offset(seq, kvh); }
  const float* V(const Sequence& seq, int64_t kvh) const { return v.data() + offset(seq, kvh); }
};

// Rows of q (and of k) over all sequences: total_q (total_k) when packed, else B * Nq (Nk).
inline int64_t total_rows_q(const AttnParams& p) {
  return p.cu_seqlens_q ? p.total_q : p.batch * p.nq;
}
inline int64_t total_rows_k(const AttnParams& p) {
  return p.cu_seqlens_k ? p.total_k : p.batch * p.nk;
}

// The right bound of the visible keys as an offset from the diagonal, -1 for none.
inline int64_t right_bound(const AttnParams& p) {
  if (!p.causal) return p.window_right;
  return p.window_right < 0 ? 0 : std::min<int64_t>(p.window_right, 0);
}

// The visible keys of a sequence's query rows [i0, i0 + rows): from visible_key_begin (that
// of row i0) to one past visible_key_end (that of the last row); keys outside are never
// touched.  Bottom-right within the sequence (its own nq, nk).
inline int64_t visible_key_begin(const AttnParams& p, const Sequence& seq, int64_t i0) {
  if (p.window_left < 0) return 0;
  return std::clamp<int64_t>(i0 + seq.nk - seq.nq - p.window_left, 0, seq.nk);
}

inline int64_t visible_key_end(const AttnParams& p, const Sequence& seq, int64_t i0,
                               int64_t rows) {
  const int64_t right = right_bound(p);
  if (right < 0) return seq.nk;
  return std::clamp<int64_t>(i0 + rows + seq.nk - seq.nq + right, 0, seq.nk);
}

// Sets the scores st[key][row] (row stride kBM) of rows [i0, i0 + rows) x keys
// [j0, j0 + cols) that are not visible to -inf; a block wholly inside is left as it is.
LIFT_INLINE void mask_scores(const AttnParams& p, const Sequence& seq, int64_t i0, int rows,
                             int64_t j0, int cols, float* st) {
  const int64_t diag = seq.nk - seq.nq, right = right_bound(p);
  const bool left_inside = p.window_left < 0 || j0 >= i0 + rows - 1 + diag - p.window_left;
  const bool right_inside = right < 0 || j0 + cols - 1 <= i0 + diag + right;
  if (left_inside && right_inside) return;
  for (int jj = 0; jj < cols; ++jj)
    for (int r = 0; r < rows; ++r)
      if (!key_visible(i0 + r, j0 + jj, seq.nq, seq.nk, p.causal, p.window_left,
                       p.window_right))
        st[jj * kBM + r] = -INFINITY;
}

// Soft-capping of n scaled scores in place, s -> cap tanh(s / cap); with `slope`, also
// stores d(capped)/ds = 1 - tanh^2 (the backward's chain factor).
LIFT_INLINE void softcap_scores(float cap, float* st, int n, float* slope) {
  const float inv = 1.f / cap;
  for (int i = 0; i < n; ++i) {
    const float t = std::tanh(st[i] * inv);
    st[i] = cap * t;
    if (slope) slope[i] = 1.f - t * t;
  }
}

// Runs f(i) for i in [0, n) over the OpenMP threads.  Each i owns its outputs and scratch,
// so the result does not depend on which thread ran which i (the kernels are deterministic).
template <class F>
void parallel_for(int64_t n, F&& f) {
#ifdef LIFT_KERNELS_WITH_OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
  for (int64_t i = 0; i < n; ++i) f(i);
}

void forward(const AttnParams& p);
void backward(const AttnParams& p);

}  // namespace cpu
}  // namespace lift
