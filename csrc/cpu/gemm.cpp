// Register-blocked matrix multiply on float32 tiles, the CPU kernels' inner loop.  Written
// with GCC vector extensions (kVec floats: one AVX-512 register, two AVX2 ones) and cloned
// per instruction set.
#include "cpu/cpu_common.h"

// The vector type never crosses a call boundary (all helpers are inlined), so the ABI note
// GCC gives for it does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lift {
namespace cpu {
namespace {

typedef float vfloat __attribute__((vector_size(kVec * sizeof(float))));

LIFT_INLINE vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LIFT_INLINE void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// R rows x CV vectors of C, accumulated over K in registers.
template <int R, int CV, bool TransA>
LIFT_INLINE void gemm_micro(int K, const float* A, int64_t lda, const float* B, int64_t ldb,
                            float* C, int64_t ldc, bool accumulate) {
  vfloat acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c)
      acc[r][c] = accumulate ? vload(C + r * ldc + c * kVec) : vfloat{};
  for (int k = 0; k < K; ++k) {
    vfloat b[CV];
    for (int c = 0; c < CV; ++c) b[c] = vload(B + k * ldb + c * kVec);
    for (int r = 0; r < R; ++r) {
      const float a = TransA ? A[k * lda + r] : A[r * lda + k];
      for (int c = 0; c < CV; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) vstore(C + r * ldc + c * kVec, acc[r][c]);
}

template <int R, bool TransA>
LIFT_INLINE void gemm_rows(int N, int K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int n = 0;
  for (; n + 4 * kVec <= N; n += 4 * kVec)
    gemm_micro<R, 4, TransA>(K, A, lda, B + n, ldb, C + n, ldc, accumulate);
  switch ((N - n) / kVec) {
    case 3: gemm_micro<R, 3, TransA>(K, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    case 2: gemm_micro<R, 2, TransA>(K, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    case 1: gemm_micro<R, 1, TransA>(K, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    default: break;
  }
}

// C[M][N] = (accumulate ? C : 0) + op(A)[M][K] @ B[K][N], all float32, row-major;
// op(A)[m][k] = A[m * lda + k], or A[k * lda + m] when TransA.  N is a multiple of kVec.
template <bool TransA>
LIFT_INLINE void gemm(int M, int N, int K, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t step = TransA ? 1 : lda;
  int m = 0;
  for (; m + 4 <= M; m += 4)
    gemm_rows<4, TransA>(N, K, A + m * step, lda, B, ldb, C + m * ldc, ldc, accumulate);
  const float* a = A + m * step;
  float* c = C + m * ldc;
  switch (M - m) {
    case 3: gemm_rows<3, TransA>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_rows<2, TransA>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_rows<1, TransA>(N, K, a, lda, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

}  // namespace

LIFT_CPU_MULTIVERSION void gemm_nn(int M, int N, int K, const float* A, int64_t lda,
                                   const float* B, int64_t ldb, float* C, int64_t ldc,
                                   bool accumulate) {
  gemm<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

LIFT_CPU_MULTIVERSION void gemm_tn(int M, int N, int K, const float* A, int64_t lda,
                                   const float* B, int64_t ldb, float* C, int64_t ldc,
                                   bool accumulate) {
  gemm<true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace cpu
}  // namespace lift
