// Register-blocked matrix multiply on float32 tiles, the CPU kernels' inner loop.  Written
// with GCC vector extensions and cloned per instruction set (LIFT_CPU_MULTIVERSION), each
// clone with a vector type and register block that its register file holds.
#include "cpu/cpu_common.h"

// The vector types never cross a call boundary (all helpers are inlined), so the ABI note
// GCC gives for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lift {
namespace cpu {
namespace {

// One AVX-512 register, one AVX2 register.  A 16-float vector on AVX2 is not two registers
// of clean code: GCC splits it through the stack, about 10x slower than 8-float vectors.
typedef float vfloat16 __attribute__((vector_size(16 * sizeof(float))));
typedef float vfloat8 __attribute__((vector_size(8 * sizeof(float))));

template <class V>
LIFT_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class V>
LIFT_INLINE void vstore(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

// R rows x CV vectors (of W floats) of C, accumulated over K in registers.
template <class V, int R, int CV, bool TransA>
LIFT_INLINE void gemm_micro(int K, const float* A, int64_t lda, const float* B, int64_t ldb,
                            float* C, int64_t ldc, bool accumulate) {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c)
      acc[r][c] = accumulate ? vload<V>(C + r * ldc + c * W) : V{};
  for (int k = 0; k < K; ++k) {
    V b[CV];
    for (int c = 0; c < CV; ++c) b[c] = vload<V>(B + k * ldb + c * W);
    for (int r = 0; r < R; ++r) {
      const float a = TransA ? A[k * lda + r] : A[r * lda + k];
      for (int c = 0; c < CV; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) vstore<V>(C + r * ldc + c * W, acc[r][c]);
}

// Columns in blocks of CV vectors, the rest (fewer than CV vectors) in one narrower block.
template <class V, int R, int CV, bool TransA>
LIFT_INLINE void gemm_rows(int N, int K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int W = sizeof(V) / sizeof(float);
  int n = 0;
  for (; n + CV * W <= N; n += CV * W)
    gemm_micro<V, R, CV, TransA>(K, A, lda, B + n, ldb, C + n, ldc, accumulate);
  switch ((N - n) / W) {
    case 3: gemm_micro<V, R, 3, TransA>(K, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    case 2: gemm_micro<V, R, 2, TransA>(K, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    case 1: gemm_micro<V, R, 1, TransA>(K, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    default: break;
  }
}

// C[M][N] = (accumulate ? C : 0) + op(A)[M][K] @ B[K][N], all float32, row-major;
// op(A)[m][k] = A[m * lda + k], or A[k * lda + m] when TransA.  N is a multiple of kVec.
// Register block: 4 rows x CV vectors of C, plus CV vectors of B and a broadcast per k.
template <class V, int CV, bool TransA>
LIFT_INLINE void gemm(int M, int N, int K, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t step = TransA ? 1 : lda;
  int m = 0;
  for (; m + 4 <= M; m += 4)
    gemm_rows<V, 4, CV, TransA>(N, K, A + m * step, lda, B, ldb, C + m * ldc, ldc, accumulate);
  const float* a = A + m * step;
  float* c = C + m * ldc;
  switch (M - m) {
    case 3: gemm_rows<V, 3, CV, TransA>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_rows<V, 2, CV, TransA>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_rows<V, 1, CV, TransA>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

// Per clone (the check is a load of the CPU's feature bits, once per call): AVX-512 takes
// 4 x 4 vectors of 16 floats (16 + 4 + 1 of its 32 registers), the others 4 x 2 vectors of
// 8 floats (8 + 2 + 1 of AVX2's 16).  Each clone sums over k in the same order.
template <bool TransA>
LIFT_INLINE void gemm_dispatch(int M, int N, int K, const float* A, int64_t lda,
                               const float* B, int64_t ldb, float* C, int64_t ldc,
                               bool accumulate) {
  if (__builtin_cpu_supports("avx512f"))
    gemm<vfloat16, 4, TransA>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    gemm<vfloat8, 2, TransA>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace

LIFT_CPU_MULTIVERSION void gemm_nn(int M, int N, int K, const float* A, int64_t lda,
                                   const float* B, int64_t ldb, float* C, int64_t ldc,
                                   bool accumulate) {
  gemm_dispatch<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

LIFT_CPU_MULTIVERSION void gemm_tn(int M, int N, int K, const float* A, int64_t lda,
                                   const float* B, int64_t ldb, float* C, int64_t ldc,
                                   bool accumulate) {
  gemm_dispatch<true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace cpu
}  // namespace lift
