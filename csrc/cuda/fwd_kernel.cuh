// The CUDA forward of gated-memory attention on CuTe, FlashAttention-2's design (the tiles,
// MMA and layouts are in kernel_traits.h).  One block of 4 warps per (64-row query tile,
// query head, batch entry); each warp owns 16 query rows end to end, so the softmax needs
// no barrier and no shared memory:
//   prologue  cp.async the unrotated query tile and G1^T; the gate as one 64x16 MMA tile
//             (D -> R, zero-padded to 16) with the SiLU, the g2 dot and a quad shuffle;
//             q-RoPE from shared memory into the rotated tile (none without RoPE).
//   loop      over the visible key blocks, last to first: S = Q K^T (ldmatrix + mma.sync)
//             while V's cp.async lands; the next K's cp.async overlaps the softmax and P V.
//             The scores stay in registers, scaled to base 2; masked blocks (the diagonal
//             and the ragged key edge, KeyBlockRange) get -inf, full blocks skip the mask.
//             Row max and sum by shuffles among the 4 lanes that share a row; the score
//             accumulator is reused as P V's A operand (acc_to_a_operand).
//   epilogue  lse and gate; attn (rounded to 16 bits) parks in shared memory; the memory
//             MLP as the same two-GEMM pipeline over 64-unit hidden chunks (W1^T chunks in
//             K's buffer, W2 chunks in V's): H = silu(Q W1 + b1) in registers, mem += H W2;
//             then out = attn + g (mem + b2 - attn); attn and out stored from shared memory
//             with 16-byte writes.
// GQA: query head h reads kv head h / (Hq / Hkv).  The same algorithm as csrc/cpu/fwd.cpp
// (the CPU twin, which checks the math on machines without a GPU), except that the gate and
// the memory MLP run on tensor cores with the weights and the query rounded to 16 bits, the
// gated mix reads attn rounded to 16 bits, and the key blocks go last to first (the online
// softmax's result is the same up to float rounding).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/kernel_traits.h"
#include "cuda/launch.h"
#include "gated_attention.h"

namespace lift {
namespace cute_fwd {

template <class T>
struct CuteElement;
template <>
struct CuteElement<__half> {
  using type = cute::half_t;
};
template <>
struct CuteElement<__nv_bfloat16> {
  using type = cute::bfloat16_t;
};

// Copies the rows of a (CPY, CPY_M, CPY_K) partition whose row coordinate is below
// rows_left with the tiled copy, and zero-fills the others (the ragged edge of a tile).
template <class TiledCopy, class Src, class Dst, class Coord>
__device__ __forceinline__ void copy_rows(TiledCopy const& tiled_copy, Src const& src, Dst&& dst,
                                          Coord const& coord, int64_t rows_left) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coord(0, m, 0)) < rows_left) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(src); ++k) cute::copy(tiled_copy, src(_, m, k), dst(_, m, k));
    } else {
      cute::clear(dst(_, m, _));
    }
  }
}

// A register fragment viewed in the tiled copy's (CPY, CPY_M, CPY_K) tiling.
template <class TiledCopy, class Frag>
__device__ __forceinline__ auto retiled(TiledCopy const&, Frag& frag) {
  return make_tensor(frag.data(), TiledCopy::retile(frag.layout()));
}

// acc += A B with both operands in shared memory: ldmatrix of k-slice k + 1 is issued
// before the MMAs of slice k.
template <class Acc, class RA, class RB, class SA, class SB, class Mma, class CopyA,
          class CopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& rA, RB& rB, SA const& sA, SB const& sB,
                                        Mma const& mma, CopyA const& copy_a,
                                        CopyB const& copy_b) {
  Tensor rA_view = retiled(copy_a, rA);
  Tensor rB_view = retiled(copy_b, rB);
  cute::copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
  cute::copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      cute::copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      cute::copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B with A in registers (the probabilities) and B in shared memory.
template <class Acc, class RA, class RB, class SB, class Mma, class CopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, RA const& rA, RB& rB, SB const& sB,
                                        Mma const& mma, CopyB const& copy_b) {
  Tensor rB_view = retiled(copy_b, rB);
  cute::copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) cute::copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Sum / max over the 4 lanes of a quad (they hold the same rows of an m16n8 accumulator).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

// dst = src rounded to dst's 16-bit type, register for register.
template <class Src, class Dst>
__device__ __forceinline__ void round_to(Src const& src, Dst& dst) {
  using Element = typename Dst::value_type;
  CUTE_UNROLL
  for (int i = 0; i < size(src); ++i) dst(i) = static_cast<Element>(src(i));
}

// 2^x (ex2.approx; 2^-inf = 0): the softmax's exponential, scores pre-scaled by log2 e.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The (row, col) coordinates of each accumulator register of a tile, as a (rows, cols) view.
template <class ThrMma, class TileShape>
__device__ __forceinline__ auto rowcol_coords(ThrMma const& thr_mma, TileShape const& shape) {
  Tensor c = thr_mma.partition_C(make_identity_tensor(shape));
  return make_tensor(c.data(), acc_to_rowcol(c.layout()));
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) forward_kernel(const AttnParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kD = Traits::kHeadDim;
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x;
  // The heaviest causal tiles (the last query rows) start first.
  const int64_t m_block = gridDim.x - 1 - blockIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z, kvh = h / (p.hq / p.hkv);
  const int64_t M = p.mem_hidden, R = p.gate_hidden;
  const int64_t rows_left = p.nq - m_block * kBlockM;
  const KeyBlockRange range = key_block_range(m_block, kBlockM, kBlockN, p.nq, p.nk, p.causal);

  // Global tensors (int64 offsets and strides).
  const auto tile_q = Shape<Int<kBlockM>, Int<kD>>{};
  const auto tile_kv = Shape<Int<kBlockN>, Int<kD>>{};
  Tensor gQ = local_tile(
      make_tensor(make_gmem_ptr(static_cast<const Element*>(p.q) + b * p.q_stride.batch +
                                h * p.q_stride.head),
                  make_shape(p.nq, Int<kD>{}), make_stride(p.q_stride.row, _1{})),
      tile_q, make_coord(m_block, 0));
  Tensor gK = local_tile(
      make_tensor(make_gmem_ptr(static_cast<const Element*>(p.k) + b * p.k_stride.batch +
                                kvh * p.k_stride.head),
                  make_shape(p.nk, Int<kD>{}), make_stride(p.k_stride.row, _1{})),
      tile_kv, make_coord(_, 0));  // (kBlockN, kD, n_block)
  Tensor gV = local_tile(
      make_tensor(make_gmem_ptr(static_cast<const Element*>(p.v) + b * p.v_stride.batch +
                                kvh * p.v_stride.head),
                  make_shape(p.nk, Int<kD>{}), make_stride(p.v_stride.row, _1{})),
      tile_kv, make_coord(_, 0));
  // The weights' tensor-core copies (cext.py): W1^T and W2 as [M][D] rows, G1^T [16][D].
  Tensor gW1 = local_tile(
      make_tensor(make_gmem_ptr(static_cast<const Element*>(p.w1t_mma) + h * M * kD),
                  make_shape(M, Int<kD>{}), make_stride(Int<kD>{}, _1{})),
      tile_kv, make_coord(_, 0));
  Tensor gW2 = local_tile(
      make_tensor(make_gmem_ptr(static_cast<const Element*>(p.w2_mma) + h * M * kD),
                  make_shape(M, Int<kD>{}), make_stride(Int<kD>{}, _1{})),
      tile_kv, make_coord(_, 0));
  Tensor gG = make_tensor(
      make_gmem_ptr(static_cast<const Element*>(p.g1t_mma) + h * Traits::kGateCols * kD),
      Shape<Int<Traits::kGateCols>, Int<kD>>{}, Stride<Int<kD>, _1>{});

  // Shared memory.
  auto smem_at = [&](int offset) { return make_smem_ptr(reinterpret_cast<Element*>(smem + offset)); };
  Tensor sQraw = make_tensor(smem_at(Traits::kQRaw), typename Traits::SmemLayoutQ{});
  Tensor sQ = make_tensor(smem_at(p.cos ? Traits::kQ : Traits::kQRaw), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(smem_at(Traits::kK), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(smem_at(Traits::kV), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(smem_at(Traits::kV), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(smem_at(Traits::kV), typename Traits::SmemLayoutVtNoSwizzle{});
  Tensor sG = make_tensor(smem_at(Traits::kG), typename Traits::SmemLayoutG{});

  // Global -> shared copies, with the row coordinates of the ragged-edge predicates.
  typename Traits::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr.partition_S(gQ);
  Tensor tQsQ = gmem_thr.partition_D(sQraw);
  Tensor tKgK = gmem_thr.partition_S(gK);  // (CPY, CPY_N, CPY_K, n_block)
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tWgW1 = gmem_thr.partition_S(gW1);
  Tensor tWgW2 = gmem_thr.partition_S(gW2);
  Tensor tGgG = gmem_thr.partition_S(gG);
  Tensor tGsG = gmem_thr.partition_D(sG);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(tile_q));
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(tile_kv));
  auto load_k = [&](int64_t n) { copy_rows(gmem_copy, tKgK(_, _, _, n), tKsK, tKVcKV, p.nk - n * kBlockN); };
  auto load_v = [&](int64_t n) { copy_rows(gmem_copy, tVgV(_, _, _, n), tVsV, tKVcKV, p.nk - n * kBlockN); };
  // Hidden chunks of the memory MLP are always whole (M % kBlockN == 0, launch.cu checks).
  auto load_w1 = [&](int64_t c) { cute::copy(gmem_copy, tWgW1(_, _, _, c), tKsK); };
  auto load_w2 = [&](int64_t c) { cute::copy(gmem_copy, tWgW2(_, _, _, c), tVsV); };

  // Shared -> registers (ldmatrix) and the MMA partitions.
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);             // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);             // (MMA, MMA_N, MMA_K)
  Tensor tGrG = thr_mma.partition_fragment_B(sG);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);  // (MMA, MMA_K, MMA_N)
  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  Tensor tSsQ = copy_a.get_thread_slice(tid).partition_S(sQ);
  Tensor tSsQraw = copy_a.get_thread_slice(tid).partition_S(sQraw);
  Tensor tSsK = copy_b.get_thread_slice(tid).partition_S(sK);
  Tensor tGsGr = copy_b.get_thread_slice(tid).partition_S(sG);
  Tensor tOsVt = copy_bt.get_thread_slice(tid).partition_S(sVt);

  // Accumulators, and the (row, col) of each of their registers in the tile.
  Tensor acc_o = partition_fragment_C(tiled_mma, tile_q);                        // attention
  Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor cS = rowcol_coords(thr_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor cO = rowcol_coords(thr_mma, tile_q);
  Tensor s = make_tensor(acc_s.data(), acc_to_rowcol(acc_s.layout()));  // (rows, cols) view
  // The probabilities in 16 bits, read as P V's A operand: the score accumulator's
  // registers in the same order (acc_to_a_operand; tests/cute_host proves the identity).
  Tensor rP = make_tensor_like<Element>(acc_s);
  Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));
  Tensor o = make_tensor(acc_o.data(), acc_to_rowcol(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(s))::value;  // 2: rows lane / 4 and lane / 4 + 8

  // ---- prologue: query tile and G1^T, then the first K-slot load ----
  copy_rows(gmem_copy, tQgQ, tQsQ, tQcQ, rows_left);
  cute::copy(gmem_copy, tGgG, tGsG);
  cute::cp_async_fence();
  if (range.end > 0) load_k(range.end - 1);
  else load_w1(0);
  cute::cp_async_fence();
  cute::cp_async_wait<1>();
  __syncthreads();

  // The gate: logit = silu(q G1 + c1) . g2 per row (padded columns j >= R contribute 0).
  float gate[kRows];
  {
    Tensor acc_g = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<Traits::kGateCols>>{});
    clear(acc_g);
    gemm_ss(acc_g, tSrQ, tGrG, tSsQraw, tGsGr, tiled_mma, copy_a, copy_b);
    Tensor g = make_tensor(acc_g.data(), acc_to_rowcol(acc_g.layout()));
    Tensor cG = rowcol_coords(thr_mma, Shape<Int<kBlockM>, Int<Traits::kGateCols>>{});
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float logit = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(g); ++c) {
        const int j = get<1>(cG(r, c));
        if (j < R)
          logit += silu(g(r, c) + (p.c1 ? p.c1[h * R + j] : 0.f)) * p.g2[h * R + j];
      }
      gate[r] = gate_from_logit(quad_sum(logit), p.gate_scale, p.gate_shift);
    }
  }

  // q-RoPE (HF rotate_half) from the unrotated tile into sQ, pairs (c, c + D/2) per thread.
  if (p.cos) {
    for (int idx = tid; idx < kBlockM * kD / 2; idx += Traits::kNThreads) {
      const int r = idx / (kD / 2), c = idx % (kD / 2);
      const int64_t row = m_block * kBlockM + r;
      float y1 = 0.f, y2 = 0.f;
      if (row < p.nq) {
        const int64_t off = b * p.rope_batch_stride + row * p.rope_row_stride;
        const float x1 = static_cast<float>(sQraw(r, c)), x2 = static_cast<float>(sQraw(r, c + kD / 2));
        y1 = x1 * p.cos[off + c] - x2 * p.sin[off + c];
        y2 = x2 * p.cos[off + c + kD / 2] + x1 * p.sin[off + c + kD / 2];
      }
      sQ(r, c) = static_cast<Element>(y1);
      sQ(r, c + kD / 2) = static_cast<Element>(y2);
    }
  }

  // ---- attention: online softmax over key blocks end-1 .. 0 ----
  clear(acc_o);
  float row_max[kRows], row_sum[kRows];  // row_max in base-2 units (scores * scale * log2 e)
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;
  for (int64_t n = range.end - 1; n >= 0; --n) {
    clear(acc_s);
    cute::cp_async_wait<0>();
    __syncthreads();  // K[n] (and sQ) ready; every warp is done with V[n + 1]
    load_v(n);
    cute::cp_async_fence();
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, copy_a, copy_b);
    cute::cp_async_wait<0>();
    __syncthreads();  // V[n] ready; every warp is done with K[n]
    if (n > 0) load_k(n - 1);
    else load_w1(0);  // the memory MLP's first chunk
    cute::cp_async_fence();

    const bool masked = n >= range.full;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = m_block * kBlockM + get<0>(cS(r, 0));
      float mx = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        float x = s(r, c) * scale_log2;
        if (masked) {
          const int64_t j = n * kBlockN + get<1>(cS(r, c));
          if (j >= p.nk || (p.causal && !causal_visible(row, j, p.nq, p.nk))) x = -INFINITY;
        }
        s(r, c) = x;
        mx = fmaxf(mx, x);
      }
      mx = quad_max(mx);
      // softmax_rescale / softmax_safe_max of gated_attention.h, in base 2
      const float alpha = row_max[r] == -INFINITY ? 0.f : fast_exp2(row_max[r] - mx);
      const float safe = mx == -INFINITY ? 0.f : mx;
      row_max[r] = mx;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        s(r, c) = fast_exp2(s(r, c) - safe);
        sum += s(r, c);
      }
      row_sum[r] = row_sum[r] * alpha + sum;  // this lane's share; quad_sum at the end
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) o(r, c) *= alpha;
    }
    round_to(acc_s, rP);
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, copy_bt);
  }

  // Normalise; write lse and the gate (one lane per quad, its two rows).
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float l = quad_sum(row_sum[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o); ++c) o(r, c) *= inv;
    const int64_t row = m_block * kBlockM + get<0>(cO(r, 0));
    if (tid % 4 == 0 && row < p.nq) {
      p.gate[(b * p.nq + row) * p.hq + h] = gate[r];
      p.lse[(b * p.hq + h) * p.nq + row] = l > 0.f ? (row_max[r] + __log2f(l)) * kLn2 : -INFINITY;
    }
  }
  // attn, rounded to 16 bits (what the forward stores and the backward reads), parks in the
  // rotated query's buffer (no warp reads sQ after the loop's last barrier; unused without
  // RoPE): the MLP below then needs registers for its own accumulator only.
  Tensor sAttn = make_tensor(smem_at(Traits::kQ), typename Traits::SmemLayoutQ{});
  Tensor sOut = make_tensor(smem_at(Traits::kK), typename Traits::SmemLayoutQ{});
  auto copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto thr_o = copy_o.get_thread_slice(tid);
  {
    Tensor r_attn = make_tensor_like<Element>(acc_o);
    round_to(acc_o, r_attn);
    cute::copy(copy_o, thr_o.retile_S(r_attn), thr_o.partition_D(sAttn));
  }

  // ---- the memory MLP: mem = silu(q W1 + b1) W2, 64 hidden units per step ----
  Tensor acc_m = partition_fragment_C(tiled_mma, tile_q);
  clear(acc_m);
  const int64_t chunks = M / kBlockN;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    clear(acc_s);
    cute::cp_async_wait<0>();
    __syncthreads();  // W1^T chunk ready; every warp is done with the previous W2 / V
    load_w2(ch);
    cute::cp_async_fence();
    gemm_ss(acc_s, tSrQ, tSrK, tSsQraw, tSsK, tiled_mma, copy_a, copy_b);
    cute::cp_async_wait<0>();
    __syncthreads();  // W2 chunk ready; every warp is done with the W1^T chunk
    if (ch + 1 < chunks) load_w1(ch + 1);
    cute::cp_async_fence();
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r)
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        const int64_t j = ch * kBlockN + get<1>(cS(r, c));
        s(r, c) = silu(s(r, c) + (p.b1 ? p.b1[h * M + j] : 0.f));
      }
    round_to(acc_s, rP);
    gemm_rs(acc_m, tOrP, tOrVt, tOsVt, tiled_mma, copy_bt);
  }

  // ---- epilogue: out = attn + g (mem + b2 - attn); attn and out through shared memory ----
  Tensor r_attn = make_tensor_like<Element>(acc_m);
  cute::copy(copy_o, thr_o.partition_D(sAttn), thr_o.retile_S(r_attn));  // this lane's own
  Tensor a = make_tensor(r_attn.data(), acc_to_rowcol(r_attn.layout()));
  Tensor m = make_tensor(acc_m.data(), acc_to_rowcol(acc_m.layout()));
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r)
    CUTE_UNROLL
    for (int c = 0; c < size<1>(m); ++c) {
      const int d = get<1>(cO(r, c));
      m(r, c) = gated_mix(static_cast<float>(a(r, c)), m(r, c) + (p.b2 ? p.b2[h * kD + d] : 0.f),
                          gate[r]);
    }
  Tensor r_out = make_tensor_like<Element>(acc_m);
  round_to(acc_m, r_out);
  __syncthreads();  // every warp is done with the last W1^T chunk (sOut's buffer)
  cute::copy(copy_o, thr_o.retile_S(r_out), thr_o.partition_D(sOut));
  __syncthreads();
  const auto out_tensor = [&](void* base) {
    return local_tile(make_tensor(make_gmem_ptr(static_cast<Element*>(base) + (b * p.nq * p.hq + h) * kD),
                                  make_shape(p.nq, Int<kD>{}), make_stride(p.hq * kD, _1{})),
                      tile_q, make_coord(m_block, 0));
  };
  typename Traits::GmemTiledCopyO gmem_copy_o;
  auto gmem_thr_o = gmem_copy_o.get_thread_slice(tid);
  copy_rows(gmem_copy_o, gmem_thr_o.partition_S(sAttn), gmem_thr_o.partition_D(out_tensor(p.attn)),
            tQcQ, rows_left);
  copy_rows(gmem_copy_o, gmem_thr_o.partition_S(sOut), gmem_thr_o.partition_D(out_tensor(p.out)),
            tQcQ, rows_left);
}

}  // namespace cute_fwd

namespace cuda {

template <class T, int D>
int64_t forward_smem_bytes() {
  return cute_fwd::FwdTraits<D, typename cute_fwd::CuteElement<T>::type>::kSmemBytes;
}

template <class T, int D>
void launch_forward(const AttnParams& p) {
  using Traits = cute_fwd::FwdTraits<D, typename cute_fwd::CuteElement<T>::type>;
  static_assert(Traits::kGateCols == kGateCols, "launch.h and kernel_traits.h disagree");
  static_assert(Traits::kBlockN == kChunk, "the MLP's hidden chunk is the key block");
  static_assert(Traits::kBlockM == Traits::kBlockN, "the epilogue stages out in K's buffer");
  if (p.w1t_mma == nullptr || p.w2_mma == nullptr || p.g1t_mma == nullptr)
    throw std::invalid_argument("the CUDA forward needs the weights' tensor-core copies");
  const auto kernel = cute_fwd::forward_kernel<Traits>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), Traits::kSmemBytes);
  const dim3 grid(static_cast<unsigned>((p.nq + Traits::kBlockM - 1) / Traits::kBlockM),
                  static_cast<unsigned>(p.hq), static_cast<unsigned>(p.batch));
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, reinterpret_cast<cudaStream_t>(p.stream)>>>(p);
  LIFT_CUDA_CHECK_LAUNCH("forward_kernel");
}

// One translation unit per (T, D) instantiates this (fwd_<d>_<dtype>.cu), so ninja builds
// them in parallel.
#define LIFT_INSTANTIATE_CUTE_FORWARD(T, D)                      \
  template int64_t forward_smem_bytes<T, D>();                   \
  template void launch_forward<T, D>(const AttnParams&);

}  // namespace cuda
}  // namespace lift
