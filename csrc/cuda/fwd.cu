// CUDA forward of gated-memory attention: one thread block per (64-row query tile, query
// head, batch).  The memory MLP and the gate run first on the tile (tensor cores for the
// MLP), then the FlashAttention-2 online softmax over 64-key blocks (tensor cores for
// Q K^T and P V), then the gated epilogue.  The same algorithm, tile for tile, as
// csrc/cpu/fwd.cpp, which checks its math on machines without a GPU.
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace lift {
namespace cuda {
namespace {

// Shared-memory layout (byte offsets).  The MLP phase borrows the attention's regions:
// W2 chunks in qs, the unrotated query in ks, W1 chunks in vs, the hidden layer in s/pt.
template <class T, int D>
struct FwdSmem {
  static constexpr int64_t tile = align128(kTile * D * sizeof(T));
  static constexpr int64_t qs = 0;                                      // T [kTile][D]
  static constexpr int64_t ks = qs + tile;                              // T [kTile][D]
  static constexpr int64_t vs = ks + tile;                              // T [kTile][D]
  static constexpr int64_t s = vs + tile;                               // float [kTile][kTile]
  static constexpr int64_t pt = s + align128(kTile * kTile * 4);        // T [kTile][kTile]
  static constexpr int64_t o = pt + align128(kTile * kTile * sizeof(T));  // float [kTile][D]
  static constexpr int64_t mem = o + align128(kTile * D * 4);           // float [kTile][D]
  static constexpr int64_t rows = mem + align128(kTile * D * 4);        // float [4][kTile]
  static constexpr int64_t bytes = rows + align128(4 * kTile * 4);
};

template <class T, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(const AttnParams p) {
  using namespace nvcuda;
  using L = FwdSmem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + L::qs);
  T* ks = reinterpret_cast<T*>(smem + L::ks);
  T* vs = reinterpret_cast<T*>(smem + L::vs);
  float* s = reinterpret_cast<float*>(smem + L::s);
  T* pt = reinterpret_cast<T*>(smem + L::pt);
  float* o = reinterpret_cast<float*>(smem + L::o);
  float* mem = reinterpret_cast<float*>(smem + L::mem);
  float* row_max = reinterpret_cast<float*>(smem + L::rows);
  float* row_sum = row_max + kTile;
  float* gate = row_sum + kTile;
  float* alpha = gate + kTile;

  const int64_t b = blockIdx.z, h = blockIdx.y, row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t kvh = h / (p.hq / p.hkv);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const int64_t q_base = b * p.q_stride.batch + h * p.q_stride.head;
  const int64_t k_base = b * p.k_stride.batch + kvh * p.k_stride.head;
  const int64_t v_base = b * p.v_stride.batch + kvh * p.v_stride.head;

  // 1. Memory MLP and gate on the pre-RoPE query tile.
  load_rows<T, D>(q, q_base, p.q_stride.row, row0, p.nq, ks);
  __syncthreads();
  memory_mlp_tile<T, D>(p, h, ks, vs, qs, s, pt, mem);
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    float logit = 0.f;
    for (int64_t j = 0; j < p.gate_hidden; ++j)
      logit += silu(gate_hidden<T, D>(p, h, ks, r, j)) * p.g2[h * p.gate_hidden + j];
    gate[r] = gate_from_logit(logit, p.gate_scale, p.gate_shift);
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  __syncthreads();

  // 2. Online softmax over the visible key blocks.
  load_rotated_q<T, D>(p, q, q_base, b, row0, qs);
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) o[idx] = 0.f;
  int64_t kend = p.nk;
  if (p.causal) kend = max(int64_t(0), min(p.nk, row0 + kTile + p.nk - p.nq));
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    __syncthreads();
    load_rows<T, D>(k, k_base, p.k_stride.row, j0, p.nk, ks);
    load_rows<T, D>(v, v_base, p.v_stride.row, j0, p.nk, vs);
    __syncthreads();
    block_mma<T, kTile, kTile, D, wmma::row_major, wmma::col_major, false>(qs, D, ks, D, s,
                                                                           kTile);
    __syncthreads();
    for (int r = threadIdx.x; r < kTile; r += kThreads) {
      const int64_t row = row0 + r;
      float mx = row_max[r];
      for (int c = 0; c < kTile; ++c) {
        const int64_t j = j0 + c;
        const bool visible = j < p.nk && (!p.causal || causal_visible(row, j, p.nq, p.nk));
        const float x = visible ? s[r * kTile + c] * p.scale : -INFINITY;
        s[r * kTile + c] = x;
        mx = fmaxf(mx, x);
      }
      const float safe = softmax_safe_max(mx);
      float sum = 0.f;
      for (int c = 0; c < kTile; ++c) {
        const float e = lift_exp(s[r * kTile + c] - safe);
        pt[r * kTile + c] = from_float<T>(e);
        sum += e;
      }
      alpha[r] = softmax_rescale(row_max[r], mx);
      row_sum[r] = row_sum[r] * alpha[r] + sum;
      row_max[r] = mx;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) o[idx] *= alpha[idx / D];
    __syncthreads();
    block_mma<T, kTile, D, kTile, wmma::row_major, wmma::row_major, true>(pt, kTile, vs, D, o,
                                                                          D);
  }
  __syncthreads();

  // 3. Epilogue: attn, out = (1 - g) attn + g mem, gate and lse.
  T* out = static_cast<T*>(p.out);
  T* attn = static_cast<T*>(p.attn);
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    const int64_t row = row0 + r;
    if (row >= p.nq) continue;
    const float l = row_sum[r];
    const float a = l > 0.f ? o[idx] / l : 0.f;
    const int64_t dst = ((b * p.nq + row) * p.hq + h) * D + c;
    attn[dst] = from_float<T>(a);
    out[dst] = from_float<T>(gated_mix(a, mem[idx], gate[r]));
  }
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const int64_t row = row0 + r;
    if (row >= p.nq) continue;
    p.gate[(b * p.nq + row) * p.hq + h] = gate[r];
    p.lse[(b * p.hq + h) * p.nq + row] = softmax_lse(row_max[r], row_sum[r]);
  }
}

}  // namespace

template <class T, int D>
void launch_forward(const AttnParams& p) {
  using L = FwdSmem<T, D>;
  const auto kernel = forward_kernel<T, D>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), L::bytes);
  const dim3 grid(static_cast<unsigned>((p.nq + kTile - 1) / kTile), static_cast<unsigned>(p.hq),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, L::bytes, reinterpret_cast<cudaStream_t>(p.stream)>>>(p);
  LIFT_CUDA_CHECK_LAUNCH("forward_kernel");
}

#define LIFT_INSTANTIATE_FORWARD(T, D) template void launch_forward<T, D>(const AttnParams&);
LIFT_CUDA_CONFIGS(LIFT_INSTANTIATE_FORWARD)

}  // namespace cuda
}  // namespace lift
