// The CUDA backward's first kernel, per 64-row query tile (the same per-tile math as
// query_tile() in csrc/cpu/bwd.cpp): recompute the memory MLP; split dout into the branches
// (d(mem) = dout g; the attention's share is folded into the probabilities, below); the
// gate's gradient; the memory and gate branches' share of dq and the rows the weight
// gradients reduce; and, per query row, what the attention kernels (bwd_kernel.cuh) stream:
//   lse' = lse log2(e) - log2(1 - g)   (+inf for a row that sees no key, or g = 1; and for
//                                      the padding rows up to a whole tile)
//   delta' = rowsum(dout * attn)
//   q_rot = RoPE(q) in the input dtype (only with RoPE; otherwise they read q itself).
// With p' = (1 - g) p = exp2(s scale log2(e) - lse'), FA2's formulas hold with dout itself:
// dV = p'^T dout, dS = p' (dout V^T - delta'), as in the Triton backward.
// Still WMMA with shared-memory staging and one thread per row for the row sums (issue 12's
// remaining work: this kernel on CuTe); it is O(N) work, the attention kernels O(N^2).
// The weight gradients are sums over all (batch, row) of outer products of the rows it
// leaves in the workspace: cext.py hands them to batched GEMMs (cuBLAS, tensor cores;
// backward_workspace_regions() says where each region is).
#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace lift {
namespace cuda {
namespace bwd {

// Query rows rounded up to whole 64-row tiles: lse' and delta' are padded so that the
// attention kernels copy whole tiles of them without predicates.
__host__ __device__ inline int64_t nq_pad(const AttnParams& p) { return (p.nq + kTile - 1) / kTile * kTile; }

// The workspace: per (batch, query row, query head) the rows the later kernels read.
template <class T>
struct Workspace {
  T* dmem;      // [B, Nq, Hq, D]  d(mem) = dout g
  T* a1;        // [B, Nq, Hq, M]  silu(q W1 + b1)
  T* dh1;       // [B, Nq, Hq, M]  d(pre-activation of the memory's hidden layer)
  float* ag;    // [B, Nq, Hq, R]  silu(q G1 + c1)
  float* dhg;   // [B, Nq, Hq, R]  d(pre-activation of the gate's hidden layer)
  float* dlogit;  // [B, Nq, Hq]
  float* lse2;    // [B, Hq, Nq_pad]  lse' (base 2), Nq_pad = Nq rounded up to whole tiles
  float* delta2;  // [B, Hq, Nq_pad]  delta' = rowsum(dout * attn)
  float* dq;      // [B, Nq, Hq, D]  the branches' share of dq
  T* qrot;        // [B, Nq, Hq, D]  RoPE(q) (with RoPE only; else null)
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
    dmem = take_t("dmem", p.head_dim);
    a1 = take_t("a1", p.mem_hidden);
    dh1 = take_t("dh1", p.mem_hidden);
    ag = take_f("ag", p.gate_hidden);
    dhg = take_f("dhg", p.gate_hidden);
    dlogit = take_f("dlogit", 1);
    const int64_t rows_pad = p.batch * p.hq * nq_pad(p);
    name = "lse2", dtype = DType::kFloat32;
    lse2 = reinterpret_cast<float*>(take(rows_pad * 4));
    name = "delta2";
    delta2 = reinterpret_cast<float*>(take(rows_pad * 4));
    dq = take_f("dq", p.head_dim);
    qrot = p.cos ? take_t("qrot", p.head_dim) : nullptr;
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

  // Split dout; the gate's gradient; lse' and delta' (module comment).  One thread per row.
  const int64_t row_pad = (b * p.hq + h) * nq_pad(p);  // [B, Hq, Nq_pad] index of row 0
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const int64_t row = row0 + r;
    const int64_t flat = (b * p.nq + row) * p.hq + h;  // [B, Nq, Hq] index
    if (row >= p.nq) {
      for (int c = 0; c < D; ++c) dmem[r * D + c] = from_float<T>(0.f);
      dlogit[r] = 0.f;
      ws.lse2[row_pad + row] = INFINITY;  // padding: p' = 0
      ws.delta2[row_pad + row] = 0.f;
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
      const float dm = d_out * g;
      dmem[r * D + c] = from_float<T>(dm);
      ws.dmem[flat * D + c] = from_float<T>(dm);
      delta += d_out * a;
    }
    dlogit[r] = dgate * gate_logit_grad(g, p.gate_scale);
    ws.dlogit[flat] = dlogit[r];
    const float lse = p.lse[(b * p.hq + h) * p.nq + row];
    ws.lse2[row_pad + row] = lse_fold_gate(lse, g) * 1.4426950408889634f;  // base 2
    ws.delta2[row_pad + row] = delta;
  }
  // The rotated query the attention kernels stream (rows of this tile only).
  if (p.cos) {
    for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
      const int r = idx / D, c = idx % D;
      const int64_t row = row0 + r;
      if (row >= p.nq) continue;
      const int64_t off = b * p.rope_batch_stride + row * p.rope_row_stride;
      const float x = to_float(qf[r * D + c]);
      const float rot = c < D / 2 ? -to_float(qf[r * D + c + D / 2]) : to_float(qf[r * D + c - D / 2]);
      ws.qrot[((b * p.nq + row) * p.hq + h) * D + c] = from_float<T>(x * p.cos[off + c] + rot * p.sin[off + c]);
    }
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

}  // namespace bwd
}  // namespace cuda
}  // namespace lift
