// CUDA backward of gated-memory attention (the same per-tile math as csrc/cpu/bwd.cpp):
//   preprocess_kernel  per query tile: recompute the memory MLP; split dout into
//                      d(attn) = dout (1 - g) and d(mem) = dout g; delta; the gate's
//                      gradient; the branches' share of dq and the rows the weight
//                      gradients reduce (into the workspace)
//   dkdv_kernel        per 64-key block of a kv head: over its GQA group's query heads and
//                      the query tiles that see it, dV += P^T dA, dK += dS^T Q (registers)
//   dq_kernel          per query tile: over the visible key blocks, dQ += dS K (registers),
//                      then dq = branches + RoPE^T(scale dQ)
// The weight gradients are sums over all (batch, row) of outer products of the rows the
// preprocess leaves in the workspace: cext.py hands them to batched GEMMs (cuBLAS, tensor
// cores; workspace_offsets() says where each region is).
// No atomics anywhere: the backward is bit-reproducible whatever `deterministic` says.
#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace lift {
namespace cuda {
namespace {

// The workspace: per (batch, query row, query head) the rows the later kernels read.
template <class T>
struct Workspace {
  T* da;        // [B, Nq, Hq, D]  d(attn) = dout (1 - g)
  T* dmem;      // [B, Nq, Hq, D]  d(mem) = dout g
  T* a1;        // [B, Nq, Hq, M]  silu(q W1 + b1)
  T* dh1;       // [B, Nq, Hq, M]  d(pre-activation of the memory's hidden layer)
  float* ag;    // [B, Nq, Hq, R]  silu(q G1 + c1)
  float* dhg;   // [B, Nq, Hq, R]  d(pre-activation of the gate's hidden layer)
  float* dlogit;  // [B, Nq, Hq]
  float* delta;   // [B, Hq, Nq]
  float* dq;      // [B, Nq, Hq, D]  the branches' share of dq
  int64_t bytes;

  // `regions`, when given, receives (name, byte offset, dtype) of every region (for the
  // weight-gradient GEMMs in cext.py); the struct itself stays a plain kernel argument.
  Workspace(const AttnParams& p, void* base,
            std::vector<std::tuple<std::string, int64_t, DType>>* regions = nullptr) {
    const int64_t rows = p.batch * p.nq * p.hq;
    int64_t off = 0;
    const char* name = nullptr;
    DType dtype = p.dtype;
    auto take = [&](int64_t n_bytes) {
      const int64_t at = off;
      off += align128(n_bytes);
      if (regions) regions->emplace_back(name, at, dtype);
      return static_cast<unsigned char*>(base) + at;
    };
    auto take_t = [&](const char* n, int64_t width) {
      name = n, dtype = p.dtype;
      return reinterpret_cast<T*>(take(rows * width * sizeof(T)));
    };
    auto take_f = [&](const char* n, int64_t width) {
      name = n, dtype = DType::kFloat32;
      return reinterpret_cast<float*>(take(rows * width * 4));
    };
    da = take_t("da", p.head_dim);
    dmem = take_t("dmem", p.head_dim);
    a1 = take_t("a1", p.mem_hidden);
    dh1 = take_t("dh1", p.mem_hidden);
    ag = take_f("ag", p.gate_hidden);
    dhg = take_f("dhg", p.gate_hidden);
    dlogit = take_f("dlogit", 1);
    delta = take_f("delta", 1);
    dq = take_f("dq", p.head_dim);
    bytes = off;
  }
};

template <class T, int D>
struct PreSmem {
  static constexpr int64_t tile = align128(kTile * D * sizeof(T));
  static constexpr int64_t qf = 0;                                    // T [kTile][D]
  static constexpr int64_t dmem = qf + tile;                          // T [kTile][D]
  static constexpr int64_t w1c = dmem + tile;                         // T [D][kChunk]
  static constexpr int64_t w2c = w1c + tile;                          // T [kChunk][D]
  static constexpr int64_t hid = w2c + tile;                          // float [kTile][kChunk]
  static constexpr int64_t da1 = hid + align128(kTile * kChunk * 4);  // float [kTile][kChunk]
  static constexpr int64_t hid_t = da1 + align128(kTile * kChunk * 4);  // T [kTile][kChunk]
  static constexpr int64_t mem = hid_t + align128(kTile * kChunk * sizeof(T));  // float [kTile][D]
  static constexpr int64_t rows = mem + align128(kTile * D * 4);      // float [2][kTile]
  static constexpr int64_t bytes = rows + align128(2 * kTile * 4);
};

template <class T, int D>
__global__ void __launch_bounds__(kThreads) preprocess_kernel(const AttnParams p,
                                                              Workspace<T> ws) {
  using namespace nvcuda;
  using L = PreSmem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qf = reinterpret_cast<T*>(smem + L::qf);
  T* dmem = reinterpret_cast<T*>(smem + L::dmem);
  T* w1c = reinterpret_cast<T*>(smem + L::w1c);
  T* w2c = reinterpret_cast<T*>(smem + L::w2c);
  float* hid = reinterpret_cast<float*>(smem + L::hid);
  float* da1 = reinterpret_cast<float*>(smem + L::da1);
  T* hid_t = reinterpret_cast<T*>(smem + L::hid_t);
  float* mem = reinterpret_cast<float*>(smem + L::mem);  // later: the branches' dq
  float* dlogit = reinterpret_cast<float*>(smem + L::rows);

  const int64_t b = blockIdx.z, h = blockIdx.y, row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t M = p.mem_hidden, R = p.gate_hidden;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const T* attn = static_cast<const T*>(p.attn);
  load_rows<T, D>(q, b * p.q_stride.batch + h * p.q_stride.head, p.q_stride.row, row0, p.nq, qf);
  __syncthreads();
  memory_mlp_tile<T, D>(p, h, qf, w1c, w2c, hid, hid_t, mem);

  // Split dout; the gate's gradient; delta.  One thread per row.
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const int64_t row = row0 + r;
    const int64_t flat = (b * p.nq + row) * p.hq + h;  // [B, Nq, Hq] index
    if (row >= p.nq) {
      for (int c = 0; c < D; ++c) dmem[r * D + c] = from_float<T>(0.f);
      dlogit[r] = 0.f;
      continue;
    }
    const float g = p.gate[flat];
    float dgate = p.dgate ? p.dgate[flat] : 0.f, delta = 0.f;
    const int64_t dout_base = b * p.dout_stride.batch + row * p.dout_stride.row +
                              h * p.dout_stride.head;
    for (int c = 0; c < D; ++c) {
      const float d_out = to_float(dout[dout_base + c]);
      const float a = to_float(attn[flat * D + c]);
      dgate += d_out * (mem[r * D + c] - a);
      const float dm = d_out * g, da = d_out - d_out * g;
      dmem[r * D + c] = from_float<T>(dm);
      ws.dmem[flat * D + c] = from_float<T>(dm);
      ws.da[flat * D + c] = from_float<T>(da);
      delta += da * a;
    }
    dlogit[r] = dgate * gate_logit_grad(g, p.gate_scale);
    ws.dlogit[flat] = dlogit[r];
    ws.delta[(b * p.hq + h) * p.nq + row] = delta;
  }
  __syncthreads();
  float* dqd = mem;  // mem is no longer needed
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) dqd[idx] = 0.f;

  // Memory branch, kChunk hidden units at a time.
  const float* W1 = p.w1 + h * D * M;
  const float* W2 = p.w2 + h * M * D;
  for (int64_t c0 = 0; c0 < M; c0 += kChunk) {
    load_weight_chunk<T, D>(W1, W2, M, c0, w1c, w2c);
    __syncthreads();
    block_mma<T, kTile, kChunk, D, wmma::row_major, wmma::row_major, false>(qf, D, w1c, kChunk,
                                                                            hid, kChunk);
    // d(a1) = d(mem) W2^T: w2c [kChunk][D] read as a col-major [D][kChunk].
    block_mma<T, kTile, kChunk, D, wmma::row_major, wmma::col_major, false>(dmem, D, w2c, D,
                                                                            da1, kChunk);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
      const int r = idx / kChunk, j = idx % kChunk;
      const int64_t row = row0 + r;
      const float pre = hid[idx] + (p.b1 ? p.b1[h * M + c0 + j] : 0.f);
      const float dh = da1[idx] * silu_grad(pre);
      hid_t[idx] = from_float<T>(dh);
      if (row < p.nq) {
        const int64_t flat = (b * p.nq + row) * p.hq + h;
        ws.a1[flat * M + c0 + j] = from_float<T>(silu(pre));
        ws.dh1[flat * M + c0 + j] = from_float<T>(dh);
      }
    }
    __syncthreads();
    // dq += d(h1) W1^T: w1c [D][kChunk] read as a col-major [kChunk][D].
    block_mma<T, kTile, D, kChunk, wmma::row_major, wmma::col_major, true>(hid_t, kChunk, w1c,
                                                                           kChunk, dqd, D);
    __syncthreads();
  }

  // Gate branch, one thread per row.
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const int64_t row = row0 + r;
    if (row >= p.nq) continue;
    const int64_t flat = (b * p.nq + row) * p.hq + h;
    for (int64_t j = 0; j < R; ++j) {
      const float pre = gate_hidden<T, D>(p, h, qf, r, j);
      const float dhg = dlogit[r] * p.g2[h * R + j] * silu_grad(pre);
      ws.ag[flat * R + j] = silu(pre);
      ws.dhg[flat * R + j] = dhg;
      for (int d = 0; d < D; ++d) dqd[r * D + d] += dhg * p.g1[(h * D + d) * R + j];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
    const int64_t row = row0 + idx / D;
    if (row < p.nq) ws.dq[((b * p.nq + row) * p.hq + h) * D + idx % D] = dqd[idx];
  }
}

// Shared memory of the two attention kernels: qs/da (a query tile) and ks/vs (a key
// block) as T, scores and probabilities, per-row lse and delta.
template <class T, int D>
struct AttnBwdSmem {
  static constexpr int64_t tile = align128(kTile * D * sizeof(T));
  static constexpr int64_t qs = 0;
  static constexpr int64_t da = qs + tile;  // qs and da together hold the float [kTile][D] result
  static constexpr int64_t ks = da + tile;
  static constexpr int64_t vs = ks + tile;
  static constexpr int64_t s = vs + tile;                             // float [kTile][kTile]
  static constexpr int64_t pt = s + align128(kTile * kTile * 4);      // T P
  static constexpr int64_t ds = pt + align128(kTile * kTile * sizeof(T));  // T dS
  static constexpr int64_t rows = ds + align128(kTile * kTile * sizeof(T));  // float lse, delta
  static constexpr int64_t bytes = rows + align128(2 * kTile * 4);
  static_assert(2 * tile >= kTile * D * 4, "qs + da must hold a float tile");

  struct Tiles {
    T *qs, *da, *ks, *vs;
    float* s;
    T *pt, *ds;
    float *lse, *delta;
  };
  // The tiles inside a block's dynamic shared memory (both backward kernels use this layout).
  static __device__ __forceinline__ Tiles carve(unsigned char* smem) {
    float* rows_ = reinterpret_cast<float*>(smem + rows);
    return {reinterpret_cast<T*>(smem + qs), reinterpret_cast<T*>(smem + da),
            reinterpret_cast<T*>(smem + ks), reinterpret_cast<T*>(smem + vs),
            reinterpret_cast<float*>(smem + s), reinterpret_cast<T*>(smem + pt),
            reinterpret_cast<T*>(smem + ds), rows_, rows_ + kTile};
  }
};

// Loads a query tile (rotated) with its d(attn), lse (+inf for rows that see no key, so
// that P = exp(S - lse) = 0) and delta.
template <class T, int D>
__device__ __forceinline__ void load_query_side(const AttnParams& p, const Workspace<T>& ws,
                                                int64_t b, int64_t h, int64_t row0, T* qs,
                                                T* da, float* lse, float* delta) {
  const T* q = static_cast<const T*>(p.q);
  load_rotated_q<T, D>(p, q, b * p.q_stride.batch + h * p.q_stride.head, b, row0, qs);
  load_rows<T, D>(ws.da, (b * p.nq * p.hq + h) * D, p.hq * D, row0, p.nq, da);
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const int64_t row = row0 + r;
    const float l = row < p.nq ? p.lse[(b * p.hq + h) * p.nq + row] : -INFINITY;
    lse[r] = l == -INFINITY ? INFINITY : l;
    delta[r] = row < p.nq ? ws.delta[(b * p.hq + h) * p.nq + row] : 0.f;
  }
}

// P = exp(scale S - lse) (masked: 0) into pt, then, with dP = dA V^T in s, dS = P (dP - delta)
// into ds.  s holds S on entry.  Ends with a barrier.
template <class T, int D>
__device__ __forceinline__ void probs_and_dscores(const AttnParams& p, int64_t row0, int64_t j0,
                                                  float* s, T* pt, T* ds, const T* da,
                                                  const T* vs, const float* lse,
                                                  const float* delta) {
  using namespace nvcuda;
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    const int r = idx / kTile, c = idx % kTile;
    const int64_t row = row0 + r, j = j0 + c;
    const bool visible = row < p.nq && j < p.nk &&
                         (!p.causal || causal_visible(row, j, p.nq, p.nk));
    pt[idx] = from_float<T>(visible ? lift_exp(s[idx] * p.scale - lse[r]) : 0.f);
  }
  __syncthreads();
  block_mma<T, kTile, kTile, D, wmma::row_major, wmma::col_major, false>(da, D, vs, D, s, kTile);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads)
    ds[idx] = from_float<T>(to_float(pt[idx]) * (s[idx] - delta[idx / kTile]));
  __syncthreads();
}

// Writes a block's register accumulators (warp w: key rows 16 w ..) times `mul` to
// dst [B, Nk, Hkv, D], staged through the float tile `result` in shared memory.
template <class T, int D>
__device__ __forceinline__ void store_key_rows(
    const AttnParams& p, nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[D / 16],
    float* result, T* dst, int64_t b, int64_t kvh, int64_t j0, float mul) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int t = 0; t < D / 16; ++t)
    wmma::store_matrix_sync(result + warp * 16 * D + t * 16, acc[t], D, wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
    const int64_t j = j0 + idx / D;
    if (j < p.nk) dst[((b * p.nk + j) * p.hkv + kvh) * D + idx % D] = from_float<T>(result[idx] * mul);
  }
  __syncthreads();
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const AttnParams p, Workspace<T> ws) {
  using namespace nvcuda;
  using L = AttnBwdSmem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const auto [qs, da, ks, vs, s, pt, ds, lse, delta] = L::carve(smem);

  const int64_t b = blockIdx.z, kvh = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t group = p.hq / p.hkv;
  load_rows<T, D>(static_cast<const T*>(p.k), b * p.k_stride.batch + kvh * p.k_stride.head,
                  p.k_stride.row, j0, p.nk, ks);
  load_rows<T, D>(static_cast<const T*>(p.v), b * p.v_stride.batch + kvh * p.v_stride.head,
                  p.v_stride.row, j0, p.nk, vs);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[D / 16], dv[D / 16];
#pragma unroll
  for (int t = 0; t < D / 16; ++t) {
    wmma::fill_fragment(dk[t], 0.f);
    wmma::fill_fragment(dv[t], 0.f);
  }
  int64_t first = 0;
  if (p.causal) first = max(int64_t(0), j0 - (p.nk - p.nq)) / kTile * kTile;
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t row0 = first; row0 < p.nq; row0 += kTile) {
      __syncthreads();
      load_query_side<T, D>(p, ws, b, h, row0, qs, da, lse, delta);
      __syncthreads();
      block_mma<T, kTile, kTile, D, wmma::row_major, wmma::col_major, false>(qs, D, ks, D, s,
                                                                             kTile);
      __syncthreads();
      probs_and_dscores<T, D>(p, row0, j0, s, pt, ds, da, vs, lse, delta);
      // P and dS are [query][key]: read as col-major [key][query] they are P^T and dS^T.
      warp_rows_mma<T, D, kTile, wmma::col_major>(dv, pt, kTile, da, D);
      warp_rows_mma<T, D, kTile, wmma::col_major>(dk, ds, kTile, qs, D);
    }
  }
  __syncthreads();
  float* result = reinterpret_cast<float*>(smem + L::qs);
  store_key_rows<T, D>(p, dv, result, static_cast<T*>(p.dv), b, kvh, j0, 1.f);
  store_key_rows<T, D>(p, dk, result, static_cast<T*>(p.dk), b, kvh, j0, p.scale);
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const AttnParams p, Workspace<T> ws) {
  using namespace nvcuda;
  using L = AttnBwdSmem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const auto [qs, da, ks, vs, s, pt, ds, lse, delta] = L::carve(smem);

  const int64_t b = blockIdx.z, h = blockIdx.y, row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t kvh = h / (p.hq / p.hkv);
  load_query_side<T, D>(p, ws, b, h, row0, qs, da, lse, delta);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq[D / 16];
#pragma unroll
  for (int t = 0; t < D / 16; ++t) wmma::fill_fragment(dq[t], 0.f);
  int64_t kend = p.nk;
  if (p.causal) kend = max(int64_t(0), min(p.nk, row0 + kTile + p.nk - p.nq));
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    __syncthreads();
    load_rows<T, D>(static_cast<const T*>(p.k), b * p.k_stride.batch + kvh * p.k_stride.head,
                    p.k_stride.row, j0, p.nk, ks);
    load_rows<T, D>(static_cast<const T*>(p.v), b * p.v_stride.batch + kvh * p.v_stride.head,
                    p.v_stride.row, j0, p.nk, vs);
    __syncthreads();
    block_mma<T, kTile, kTile, D, wmma::row_major, wmma::col_major, false>(qs, D, ks, D, s, kTile);
    __syncthreads();
    probs_and_dscores<T, D>(p, row0, j0, s, pt, ds, da, vs, lse, delta);
    warp_rows_mma<T, D, kTile, wmma::row_major>(dq, ds, kTile, ks, D);
  }
  __syncthreads();
  float* result = reinterpret_cast<float*>(smem + L::qs);
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int t = 0; t < D / 16; ++t)
    wmma::store_matrix_sync(result + warp * 16 * D + t * 16, dq[t], D, wmma::mem_row_major);
  __syncthreads();
  T* out = static_cast<T*>(p.dq);
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    const int64_t row = row0 + r;
    if (row >= p.nq) continue;
    float g = result[idx];
    if (p.cos) {
      const int64_t off = b * p.rope_batch_stride + row * p.rope_row_stride;
      g = rope_element_grad(result + r * D, p.cos + off, p.sin + off, c, D / 2);
    }
    const int64_t flat = ((b * p.nq + row) * p.hq + h) * D + c;
    out[flat] = from_float<T>(ws.dq[flat] + g * p.scale);
  }
}

}  // namespace

int64_t backward_workspace_bytes(const AttnParams& p) {
  return Workspace<__half>(p, nullptr).bytes;  // the layout does not depend on T's 2 bytes
}

std::vector<std::tuple<std::string, int64_t, DType>> backward_workspace_regions(
    const AttnParams& p) {
  std::vector<std::tuple<std::string, int64_t, DType>> regions;
  Workspace<__half>(p, nullptr, &regions);
  return regions;
}

template <class T, int D>
void launch_backward(const AttnParams& p) {
  if (p.workspace == nullptr) throw std::invalid_argument("the CUDA backward needs a workspace");
  const Workspace<T> ws(p, p.workspace);
  const auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  const dim3 q_grid(static_cast<unsigned>((p.nq + kTile - 1) / kTile), static_cast<unsigned>(p.hq),
                    static_cast<unsigned>(p.batch));
  const dim3 k_grid(static_cast<unsigned>((p.nk + kTile - 1) / kTile), static_cast<unsigned>(p.hkv),
                    static_cast<unsigned>(p.batch));

  const auto pre = preprocess_kernel<T, D>;
  set_smem_limit(reinterpret_cast<const void*>(pre), PreSmem<T, D>::bytes);
  pre<<<q_grid, kThreads, PreSmem<T, D>::bytes, stream>>>(p, ws);
  LIFT_CUDA_CHECK_LAUNCH("preprocess_kernel");

  using A = AttnBwdSmem<T, D>;
  const auto dkdv = dkdv_kernel<T, D>;
  set_smem_limit(reinterpret_cast<const void*>(dkdv), A::bytes);
  dkdv<<<k_grid, kThreads, A::bytes, stream>>>(p, ws);
  LIFT_CUDA_CHECK_LAUNCH("dkdv_kernel");
  const auto dq = dq_kernel<T, D>;
  set_smem_limit(reinterpret_cast<const void*>(dq), A::bytes);
  dq<<<q_grid, kThreads, A::bytes, stream>>>(p, ws);
  LIFT_CUDA_CHECK_LAUNCH("dq_kernel");
}

template <class T, int D>
int64_t backward_smem_bytes() {
  return std::max(PreSmem<T, D>::bytes, AttnBwdSmem<T, D>::bytes);
}

#define LIFT_INSTANTIATE_BACKWARD(T, D)                          \
  template void launch_backward<T, D>(const AttnParams&);       \
  template int64_t backward_smem_bytes<T, D>();
LIFT_CUDA_CONFIGS(LIFT_INSTANTIATE_BACKWARD)

}  // namespace cuda
}  // namespace lift
