// Device building blocks of the CUDA kernels: tile sizes, error checks, and the WMMA helpers
// of the backward's preprocess (bwd_preprocess.cuh; the CuTe kernels use kernel_traits.h).
//
// A thread block is 4 warps and works on 64-row tiles.  Operands live in shared memory in
// the 16-bit input type T (half or bfloat16); products accumulate in float32.  Offsets into
// global memory are int64 (B * N * H * D can pass 2^31).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>
#include <stdexcept>
#include <string>

#include "gated_attention.h"

namespace lift {
namespace cuda {

constexpr int kTile = 64;      // query rows and keys per tile
constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 64;     // memory-MLP hidden units per step (M must be a multiple)

#define LIFT_CUDA_CHECK(expr)                                                              \
  do {                                                                                     \
    const cudaError_t err_ = (expr);                                                       \
    if (err_ != cudaSuccess)                                                               \
      throw std::runtime_error(std::string("CUDA error in ") + #expr + ": " +              \
                               cudaGetErrorString(err_));                                  \
  } while (0)

// After every launch: a bad configuration shows up here, not as a silent no-op.
#define LIFT_CUDA_CHECK_LAUNCH(name)                                                      \
  do {                                                                                     \
    const cudaError_t err_ = cudaGetLastError();                                           \
    if (err_ != cudaSuccess)                                                               \
      throw std::runtime_error(std::string("CUDA error launching ") + name + ": " +        \
                               cudaGetErrorString(err_));                                  \
  } while (0)

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Copies a [kTile][D] tile (rows row0.., of a [.., N, H, D] tensor at head h) into shared
// memory as T, zero-filling rows >= n.
template <class T, int D>
__device__ __forceinline__ void load_rows(const T* __restrict__ src, int64_t base,
                                          int64_t row_stride, int64_t row0, int64_t n,
                                          T* dst) {
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    dst[idx] = row0 + r < n ? src[base + (row0 + r) * row_stride + c] : from_float<T>(0.f);
  }
}

// C[MT][NT] (float, shared, ldc) = (Accumulate ? C : 0) + A[MT][KT] @ B[KT][NT], A and B in
// shared memory as T.  LayoutA row_major: A[m * lda + k]; col_major: A[k * lda + m].
// LayoutB row_major: B[k * ldb + n]; col_major: B[n * ldb + k].  The 16 x 16 output tiles
// are spread over the warps.
template <class T, int MT, int NT, int KT, class LayoutA, class LayoutB, bool Accumulate>
__device__ __forceinline__ void block_mma(const T* A, int lda, const T* B, int ldb, float* C,
                                          int ldc) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  constexpr bool a_row = std::is_same<LayoutA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LayoutB, wmma::row_major>::value;
  for (int tile = warp; tile < (MT / 16) * (NT / 16); tile += kWarps) {
    const int tm = tile / (NT / 16), tn = tile % (NT / 16);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    float* c = C + tm * 16 * ldc + tn * 16;
    if (Accumulate)
      wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
    else
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int k = 0; k < KT / 16; ++k) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
      wmma::load_matrix_sync(a, a_row ? A + tm * 16 * lda + k * 16 : A + k * 16 * lda + tm * 16,
                             lda);
      wmma::load_matrix_sync(b, b_row ? B + k * 16 * ldb + tn * 16 : B + tn * 16 * ldb + k * 16,
                             ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
  }
}

// Sizes of shared-memory regions in bytes, 128-byte aligned.
__host__ __device__ constexpr int64_t align128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

// Loads hidden units [c0, c0 + kChunk) of the memory MLP's weights, converted to T:
// w1c [D][kChunk] from W1 [D][M] and w2c [kChunk][D] from W2 [M][D] (both float32).
// The caller synchronises before reading them.
template <class T, int D>
__device__ __forceinline__ void load_weight_chunk(const float* W1, const float* W2, int64_t M,
                                                  int64_t c0, T* w1c, T* w2c) {
  for (int idx = threadIdx.x; idx < D * kChunk; idx += kThreads) {
    w1c[idx] = from_float<T>(W1[(idx / kChunk) * M + c0 + idx % kChunk]);
    w2c[idx] = from_float<T>(W2[(c0 + idx / D) * D + idx % D]);
  }
}

// The memory MLP of a query tile: mem[kTile][D] (float, shared) = silu(qf @ W1 + b1) @ W2
// + b2, qf [kTile][D] in shared memory as T.  The hidden layer goes kChunk units at a time
// through w1c [D][kChunk], w2c [kChunk][D] (weights converted to T), hid (float) and hid_t
// (T) [kTile][kChunk], all shared.  Ends with a barrier.
template <class T, int D>
__device__ void memory_mlp_tile(const AttnParams& p, int64_t h, const T* qf, T* w1c, T* w2c,
                                float* hid, T* hid_t, float* mem) {
  using namespace nvcuda;
  const int64_t M = p.mem_hidden;
  const float* W1 = p.w1 + h * D * M;
  const float* W2 = p.w2 + h * M * D;
  for (int64_t c0 = 0; c0 < M; c0 += kChunk) {
    load_weight_chunk<T, D>(W1, W2, M, c0, w1c, w2c);
    __syncthreads();
    block_mma<T, kTile, kChunk, D, wmma::row_major, wmma::row_major, false>(qf, D, w1c, kChunk,
                                                                            hid, kChunk);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
      const float bias = p.b1 ? p.b1[h * M + c0 + idx % kChunk] : 0.f;
      hid_t[idx] = from_float<T>(silu(hid[idx] + bias));
    }
    __syncthreads();
    if (c0 == 0)
      block_mma<T, kTile, D, kChunk, wmma::row_major, wmma::row_major, false>(hid_t, kChunk, w2c,
                                                                              D, mem, D);
    else
      block_mma<T, kTile, D, kChunk, wmma::row_major, wmma::row_major, true>(hid_t, kChunk, w2c,
                                                                             D, mem, D);
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads)
    mem[idx] += p.b2 ? p.b2[h * D + idx % D] : 0.f;
  __syncthreads();
}

// The gate's pre-activation of row r (qf [kTile][D] in shared memory), hidden unit j.
template <class T, int D>
__device__ __forceinline__ float gate_hidden(const AttnParams& p, int64_t h, const T* qf, int r,
                                             int64_t j) {
  const int64_t R = p.gate_hidden;
  float acc = p.c1 ? p.c1[h * R + j] : 0.f;
  for (int d = 0; d < D; ++d) acc += to_float(qf[r * D + d]) * p.g1[(h * D + d) * R + j];
  return acc;
}

// Sets the dynamic shared-memory limit of a kernel (needed above 48 KB), checked.
inline void set_smem_limit(const void* kernel, int64_t bytes) {
  LIFT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace lift
