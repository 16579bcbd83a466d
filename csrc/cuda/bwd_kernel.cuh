// The CUDA backward of gated-memory attention: three kernels, FlashAttention-2's structure.
//   preprocess  bwd_preprocess.cuh: the memory and gate branches, lse' and delta' per row,
//               the rotated query (the gate folded into the probabilities, p' = (1 - g) p).
//   dkdv_kernel per 64-key block of a kv head, over its GQA group's query heads and the
//               query tiles that see it (query_block_range): S^T = K Q^T, P'^T = exp2(S^T
//               scale log2 e - lse') (masked only on tiles the causal diagonal cuts),
//               dV += P'^T dO, dP^T = V dO^T, dS^T = P'^T (dP^T - delta'), dK += dS^T Q; dK
//               and dV in registers for the whole loop, written once (dK times the scale).
//   dq_kernel   per 64-row query tile: over the visible key blocks (key_block_range, the
//               forward's full / masked split), S, P', dP = dO V^T, dS, dQ += dS K; then
//               dq = the branches' share + RoPE^T(scale dQ), the RoPE pairs (c, c + D/2)
//               being registers of the same thread.
// Both attention kernels are CuTe on the forward's building blocks (bwd_traits.h): mma.sync
// m16n8k16, ldmatrix (transposed for the operands read along their rows), swizzled shared
// memory, two-stage cp.async pipelines, the score accumulator reused as the next MMA's A
// operand.  GQA by index arithmetic.  No atomics (dQ has its own kernel that recomputes S
// and dP), so the backward is bit-reproducible whatever `deterministic` says.
// The same algorithm as csrc/cpu/bwd.cpp (the CPU twin: lse', delta', float P' for dS, P'
// and dS rounded to 16 bits only as MMA operands here).
#pragma once

#include "cuda/bwd_preprocess.cuh"
#include "cuda/bwd_traits.h"
#include "cuda/fwd_kernel.cuh"  // the CuTe building blocks: copy_rows, gemm_ss, gemm_rs, ...

namespace lift {
namespace cute_fwd {

// A 4-byte cp.async (lse' and delta' rows).
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem_src));
}

// The [Nq, D] rows of (b, h) that the attention kernels stream as the query: RoPE(q) from
// the workspace with RoPE, q itself without.
template <class Element, int kD, class T>
__device__ __forceinline__ auto query_rows(const AttnParams& p, const cuda::bwd::Workspace<T>& ws,
                                           int64_t b, int64_t h) {
  const Element* base = p.cos ? reinterpret_cast<const Element*>(ws.qrot) + (b * p.nq * p.hq + h) * kD
                              : static_cast<const Element*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
  const int64_t row_stride = p.cos ? p.hq * kD : p.q_stride.row;
  return make_tensor(make_gmem_ptr(base), make_shape(p.nq, Int<kD>{}), make_stride(row_stride, _1{}));
}

template <class Element, int kD>
__device__ __forceinline__ auto dout_rows(const AttnParams& p, int64_t b, int64_t h) {
  return make_tensor(make_gmem_ptr(static_cast<const Element*>(p.dout) + b * p.dout_stride.batch +
                                   h * p.dout_stride.head),
                     make_shape(p.nq, Int<kD>{}), make_stride(p.dout_stride.row, _1{}));
}

template <class Element, int kD>
__device__ __forceinline__ auto kv_rows(const void* ptr, const Strides& st, int64_t nk, int64_t b,
                                        int64_t kvh) {
  return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr) + b * st.batch + kvh * st.head),
                     make_shape(nk, Int<kD>{}), make_stride(st.row, _1{}));
}

template <class Traits, class T>
__global__ void __launch_bounds__(Traits::kNThreads)
    dkdv_kernel(const AttnParams p, const cuda::bwd::Workspace<T> ws) {
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockN, kBlockM = Traits::kBlockMKV, kD = Traits::kHeadDim;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x;
  const int64_t n_block = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int64_t group = p.hq / p.hkv, nq_pad = cuda::bwd::nq_pad(p);
  const QueryBlockRange range = query_block_range(n_block, kBlockM, kBlockN, p.nq, p.nk, p.causal);
  const int64_t m_count = range.end - range.begin;
  const int64_t steps = group * m_count;  // (query head of the group, query tile) pairs

  const auto tile_kv = Shape<Int<kBlockN>, Int<kD>>{};
  const auto tile_q = Shape<Int<kBlockM>, Int<kD>>{};
  Tensor gK = local_tile(kv_rows<Element, kD>(p.k, p.k_stride, p.nk, b, kvh), tile_kv, make_coord(n_block, 0));
  Tensor gV = local_tile(kv_rows<Element, kD>(p.v, p.v_stride, p.nk, b, kvh), tile_kv, make_coord(n_block, 0));

  auto smem_at = [&](int offset) { return make_smem_ptr(reinterpret_cast<Element*>(smem + offset)); };
  Tensor sK = make_tensor(smem_at(Traits::kKVK), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(smem_at(Traits::kKVV), typename Traits::SmemLayoutKV{});
  auto q_offset = [&](int s) { return Traits::kKVStage0 + s * Traits::kKVStage; };
  auto do_offset = [&](int s) { return q_offset(s) + Traits::kQKVTile; };
  auto lse_at = [&](int s) { return reinterpret_cast<float*>(smem + Traits::kKVRows + s * Traits::kKVRowStage); };
  auto delta_at = [&](int s) { return lse_at(s) + kBlockM; };
  auto rows_tile = [&](int offset) { return make_tensor(smem_at(offset), typename Traits::SmemLayoutQKV{}); };
  auto rows_tile_t = [&](int offset) { return make_tensor(smem_at(offset), typename Traits::SmemLayoutQKVt{}); };

  // Global -> shared.
  typename Traits::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(tile_kv));
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(tile_q));
  // Step t: query head kvh * group + t / m_count, query tile range.begin + t % m_count.
  auto load_step = [&](int64_t t, int s) {
    const int64_t h = kvh * group + t / m_count, m = range.begin + t % m_count;
    copy_rows(gmem_copy, gmem_thr.partition_S(local_tile(query_rows<Element, kD>(p, ws, b, h), tile_q, make_coord(m, 0))),
              gmem_thr.partition_D(rows_tile(q_offset(s))), tQcQ, p.nq - m * kBlockM);
    copy_rows(gmem_copy, gmem_thr.partition_S(local_tile(dout_rows<Element, kD>(p, b, h), tile_q, make_coord(m, 0))),
              gmem_thr.partition_D(rows_tile(do_offset(s))), tQcQ, p.nq - m * kBlockM);
    // lse' and delta' are padded to whole 64-row tiles (+inf and 0): no predicate.
    const int64_t row = (b * p.hq + h) * nq_pad + m * kBlockM;
    if (tid < kBlockM) cp_async_4(lse_at(s) + tid, ws.lse2 + row + tid);
    else if (tid < 2 * kBlockM) cp_async_4(delta_at(s) + tid - kBlockM, ws.delta2 + row + tid - kBlockM);
  };

  // Shared -> registers and the MMA partitions.  K and V are the A operands (keys are the
  // rows of every accumulator); Q and dO the B operands, read plain (K = D: S^T, dP^T) and
  // transposed (K = query rows: dV, dK).
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto thr_bt = copy_bt.get_thread_slice(tid);
  Tensor tSrK = thr_mma.partition_fragment_A(sK);  // (MMA, MMA_M, MMA_K)
  Tensor tSrV = thr_mma.partition_fragment_A(sV);
  Tensor tSsK = thr_a.partition_S(sK);
  Tensor tSsV = thr_a.partition_S(sV);
  Tensor tSrQ = thr_mma.partition_fragment_B(rows_tile(q_offset(0)));  // (MMA, MMA_N, MMA_K)
  Tensor tSrdO = thr_mma.partition_fragment_B(rows_tile(do_offset(0)));
  Tensor tBrT = thr_mma.partition_fragment_B(
      make_tensor(smem_at(0), typename Traits::SmemLayoutQKVtNoSwizzle{}));  // Q^T / dO^T

  Tensor acc_dk = partition_fragment_C(tiled_mma, tile_kv);
  Tensor acc_dv = partition_fragment_C(tiled_mma, tile_kv);
  Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});  // S^T, then P'^T
  Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});  // dP^T, then dS^T
  Tensor cS = rowcol_coords(thr_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});  // (key, query row)
  Tensor st = make_tensor(acc_s.data(), acc_to_rowcol(acc_s.layout()));
  Tensor dpt = make_tensor(acc_dp.data(), acc_to_rowcol(acc_dp.layout()));
  Tensor rP = make_tensor_like<Element>(acc_s);
  Tensor tPrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));
  Tensor rdS = make_tensor_like<Element>(acc_dp);
  Tensor tPrdS = make_tensor(rdS.data(), acc_to_a_operand(rdS.layout()));
  clear(acc_dk);
  clear(acc_dv);

  copy_rows(gmem_copy, gmem_thr.partition_S(gK), gmem_thr.partition_D(sK), tKVcKV, p.nk - n_block * kBlockN);
  copy_rows(gmem_copy, gmem_thr.partition_S(gV), gmem_thr.partition_D(sV), tKVcKV, p.nk - n_block * kBlockN);
  if (steps > 0) load_step(0, 0);
  cute::cp_async_fence();

  const float scale_log2 = p.scale * kLog2e;
  for (int64_t t = 0; t < steps; ++t) {
    const int s = static_cast<int>(t & 1);
    cute::cp_async_wait<0>();
    __syncthreads();  // step t's tiles (and K, V) landed; every warp is done with stage s ^ 1
    if (t + 1 < steps) load_step(t + 1, s ^ 1);
    cute::cp_async_fence();
    const int64_t m = range.begin + t % m_count;
    const float* lse = lse_at(s);
    const float* delta = delta_at(s);

    clear(acc_s);  // S^T = K Q^T
    gemm_ss(acc_s, tSrK, tSrQ, tSsK, thr_b.partition_S(rows_tile(q_offset(s))), tiled_mma, copy_a, copy_b);
    const bool masked = !tile_fully_visible(m, n_block, kBlockM, kBlockN, p.nq, p.nk, p.causal);
    CUTE_UNROLL
    for (int r = 0; r < size<0>(st); ++r)
      CUTE_UNROLL
      for (int c = 0; c < size<1>(st); ++c) {
        const int col = get<1>(cS(r, c));
        float x = st(r, c) * scale_log2 - lse[col];
        // The causal cut (rows past nq have lse' = +inf, keys past nk are never stored).
        if (masked && p.causal &&
            !causal_visible(m * kBlockM + col, n_block * kBlockN + get<0>(cS(r, c)), p.nq, p.nk))
          x = -INFINITY;
        st(r, c) = fast_exp2(x);  // P'^T
      }
    round_to(acc_s, rP);

    clear(acc_dp);  // dP^T = V dO^T
    gemm_ss(acc_dp, tSrV, tSrdO, tSsV, thr_b.partition_S(rows_tile(do_offset(s))), tiled_mma, copy_a, copy_b);
    // dV += P'^T dO
    gemm_rs(acc_dv, tPrP, tBrT, thr_bt.partition_S(rows_tile_t(do_offset(s))), tiled_mma, copy_bt);
    CUTE_UNROLL
    for (int r = 0; r < size<0>(dpt); ++r)
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dpt); ++c) dpt(r, c) = st(r, c) * (dpt(r, c) - delta[get<1>(cS(r, c))]);
    round_to(acc_dp, rdS);
    // dK += dS^T Q (the softmax scale at the end)
    gemm_rs(acc_dk, tPrdS, tBrT, thr_bt.partition_S(rows_tile_t(q_offset(s))), tiled_mma, copy_bt);
  }

  // Epilogue: dV and scale dK, rounded, staged through V's and K's buffers, 16-byte stores.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.scale;
  Tensor r_dk = make_tensor_like<Element>(acc_dk);
  Tensor r_dv = make_tensor_like<Element>(acc_dv);
  round_to(acc_dk, r_dk);
  round_to(acc_dv, r_dv);
  auto copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto thr_o = copy_o.get_thread_slice(tid);
  cute::cp_async_wait<0>();  // K and V have landed even when no query tile was visited
  __syncthreads();           // every warp is done reading K and V
  cute::copy(copy_o, thr_o.retile_S(r_dk), thr_o.partition_D(sK));
  cute::copy(copy_o, thr_o.retile_S(r_dv), thr_o.partition_D(sV));
  __syncthreads();
  auto grad_rows = [&](void* base) {  // dk, dv: contiguous [B, Nk, Hkv, D]
    return local_tile(make_tensor(make_gmem_ptr(static_cast<Element*>(base) + (b * p.nk * p.hkv + kvh) * kD),
                                  make_shape(p.nk, Int<kD>{}), make_stride(p.hkv * kD, _1{})),
                      tile_kv, make_coord(n_block, 0));
  };
  typename Traits::GmemTiledCopyO gmem_copy_o;
  auto gmem_thr_o = gmem_copy_o.get_thread_slice(tid);
  copy_rows(gmem_copy_o, gmem_thr_o.partition_S(sK), gmem_thr_o.partition_D(grad_rows(p.dk)), tKVcKV,
            p.nk - n_block * kBlockN);
  copy_rows(gmem_copy_o, gmem_thr_o.partition_S(sV), gmem_thr_o.partition_D(grad_rows(p.dv)), tKVcKV,
            p.nk - n_block * kBlockN);
}

template <class Traits, class T>
__global__ void __launch_bounds__(Traits::kNThreads)
    dq_kernel(const AttnParams p, const cuda::bwd::Workspace<T> ws) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockMQ, kBlockN = Traits::kBlockNQ, kD = Traits::kHeadDim;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x;
  const int64_t m_block = gridDim.x - 1 - blockIdx.x;  // the heaviest causal tiles first
  const int64_t h = blockIdx.y, b = blockIdx.z, kvh = h / (p.hq / p.hkv);
  const int64_t rows_left = p.nq - m_block * kBlockM;
  const KeyBlockRange range = key_block_range(m_block, kBlockM, kBlockN, p.nq, p.nk, p.causal);

  const auto tile_q = Shape<Int<kBlockM>, Int<kD>>{};
  const auto tile_kv = Shape<Int<kBlockN>, Int<kD>>{};
  Tensor gQ = local_tile(query_rows<Element, kD>(p, ws, b, h), tile_q, make_coord(m_block, 0));
  Tensor gdO = local_tile(dout_rows<Element, kD>(p, b, h), tile_q, make_coord(m_block, 0));
  Tensor gK = local_tile(kv_rows<Element, kD>(p.k, p.k_stride, p.nk, b, kvh), tile_kv, make_coord(_, 0));
  Tensor gV = local_tile(kv_rows<Element, kD>(p.v, p.v_stride, p.nk, b, kvh), tile_kv, make_coord(_, 0));

  auto smem_at = [&](int offset) { return make_smem_ptr(reinterpret_cast<Element*>(smem + offset)); };
  Tensor sQ = make_tensor(smem_at(Traits::kQQ), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(smem_at(Traits::kQdO), typename Traits::SmemLayoutQ{});
  auto k_offset = [&](int s) { return Traits::kQStage0 + s * Traits::kQStage; };
  auto v_offset = [&](int s) { return k_offset(s) + Traits::kKQTile; };
  auto kv_tile = [&](int offset) { return make_tensor(smem_at(offset), typename Traits::SmemLayoutKQ{}); };
  auto kv_tile_t = [&](int offset) { return make_tensor(smem_at(offset), typename Traits::SmemLayoutKQt{}); };

  typename Traits::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(tile_q));
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(tile_kv));
  Tensor tKgK = gmem_thr.partition_S(gK);  // (CPY, CPY_N, CPY_K, n_block)
  Tensor tVgV = gmem_thr.partition_S(gV);
  auto load_kv = [&](int64_t n, int s) {
    copy_rows(gmem_copy, tKgK(_, _, _, n), gmem_thr.partition_D(kv_tile(k_offset(s))), tKVcKV, p.nk - n * kBlockN);
    copy_rows(gmem_copy, tVgV(_, _, _, n), gmem_thr.partition_D(kv_tile(v_offset(s))), tKVcKV, p.nk - n * kBlockN);
  };

  // Q and dO are the A operands (query rows are the accumulators' rows); K and V the B
  // operands, read plain (K = D: S, dP) and K transposed (K = keys: dQ).
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto thr_bt = copy_bt.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrdO = thr_mma.partition_fragment_A(sdO);
  Tensor tSsQ = copy_a.get_thread_slice(tid).partition_S(sQ);
  Tensor tSsdO = copy_a.get_thread_slice(tid).partition_S(sdO);
  Tensor tSrK = thr_mma.partition_fragment_B(kv_tile(k_offset(0)));  // K, then V
  Tensor tBrKt = thr_mma.partition_fragment_B(
      make_tensor(smem_at(0), typename Traits::SmemLayoutKQtNoSwizzle{}));

  Tensor acc_dq = partition_fragment_C(tiled_mma, tile_q);
  Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});   // S, then P'
  Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // dP, then dS
  Tensor cS = rowcol_coords(thr_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor sc = make_tensor(acc_s.data(), acc_to_rowcol(acc_s.layout()));
  Tensor dp = make_tensor(acc_dp.data(), acc_to_rowcol(acc_dp.layout()));
  Tensor rdS = make_tensor_like<Element>(acc_dp);
  Tensor tPrdS = make_tensor(rdS.data(), acc_to_a_operand(rdS.layout()));
  constexpr int kRows = decltype(size<0>(sc))::value;  // 2: rows lane / 4 and lane / 4 + 8

  copy_rows(gmem_copy, gmem_thr.partition_S(gQ), gmem_thr.partition_D(sQ), tQcQ, rows_left);
  copy_rows(gmem_copy, gmem_thr.partition_S(gdO), gmem_thr.partition_D(sdO), tQcQ, rows_left);
  if (range.end > 0) load_kv(range.end - 1, 0);
  cute::cp_async_fence();

  // lse' and delta' of this thread's two rows (padded to whole tiles: no predicate).
  float lse[kRows], delta[kRows];
  const int64_t row_base = (b * p.hq + h) * cuda::bwd::nq_pad(p) + m_block * kBlockM;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    lse[r] = ws.lse2[row_base + get<0>(cS(r, 0))];
    delta[r] = ws.delta2[row_base + get<0>(cS(r, 0))];
  }
  clear(acc_dq);

  const float scale_log2 = p.scale * kLog2e;
  for (int64_t n = range.end - 1, it = 0; n >= 0; --n, ++it) {
    const int s = static_cast<int>(it & 1);
    cute::cp_async_wait<0>();
    __syncthreads();  // block n (and Q, dO) landed; every warp is done with stage s ^ 1
    if (n > 0) load_kv(n - 1, s ^ 1);
    cute::cp_async_fence();

    clear(acc_s);  // S = Q K^T
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, thr_b.partition_S(kv_tile(k_offset(s))), tiled_mma, copy_a, copy_b);
    const bool masked = n >= range.full;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = m_block * kBlockM + get<0>(cS(r, 0));
      CUTE_UNROLL
      for (int c = 0; c < size<1>(sc); ++c) {
        float x = sc(r, c) * scale_log2 - lse[r];
        if (masked) {
          const int64_t j = n * kBlockN + get<1>(cS(r, c));
          if (j >= p.nk || (p.causal && !causal_visible(row, j, p.nq, p.nk))) x = -INFINITY;
        }
        sc(r, c) = fast_exp2(x);  // P'
      }
    }
    clear(acc_dp);  // dP = dO V^T
    gemm_ss(acc_dp, tSrdO, tSrK, tSsdO, thr_b.partition_S(kv_tile(v_offset(s))), tiled_mma, copy_a, copy_b);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r)
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dp); ++c) dp(r, c) = sc(r, c) * (dp(r, c) - delta[r]);
    round_to(acc_dp, rdS);
    // dQ += dS K (the softmax scale at the end)
    gemm_rs(acc_dq, tPrdS, tBrKt, thr_bt.partition_S(kv_tile_t(k_offset(s))), tiled_mma, copy_bt);
  }

  cute::cp_async_wait<0>();  // no copy outlives the block (Q and dO when no key block is visible)

  // Epilogue: dq = the branches' share + RoPE^T(scale dQ).  Column c + D/8 of a thread's
  // accumulator view is column + D/2 (tests/cute_host), so each RoPE pair is in registers.
  Tensor o = make_tensor(acc_dq.data(), acc_to_rowcol(acc_dq.layout()));
  Tensor cO = rowcol_coords(thr_mma, tile_q);
  constexpr int kHalf = decltype(size<1>(o))::value / 2;
  T* dq = static_cast<T*>(p.dq);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = m_block * kBlockM + get<0>(cO(r, 0));
    if (row >= p.nq) continue;
    const int64_t flat = ((b * p.nq + row) * p.hq + h) * kD;
    const int64_t rope = b * p.rope_batch_stride + row * p.rope_row_stride;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o); ++c) {
      const int col = get<1>(cO(r, c));
      float g = o(r, c) * p.scale;
      if (p.cos) {
        const float partner = o(r, c < kHalf ? c + kHalf : c - kHalf) * p.scale;
        g = g * p.cos[rope + col] + (c < kHalf ? partner * p.sin[rope + col + kD / 2]
                                               : -partner * p.sin[rope + col - kD / 2]);
      }
      dq[flat + col] = cuda::from_float<T>(ws.dq[flat + col] + g);
    }
  }
}

}  // namespace cute_fwd

namespace cuda {

template <class T, int D>
using BwdTraitsFor = cute_fwd::BwdTraits<D, typename cute_fwd::CuteElement<T>::type>;

template <class T, int D>
int64_t backward_smem_bytes() {
  using Tr = BwdTraitsFor<T, D>;
  return std::max<int64_t>({bwd::PreSmem<T, D>::bytes, Tr::kKVSmemBytes, Tr::kQSmemBytes});
}

template <class T, int D>
void launch_backward(const AttnParams& p) {
  using Tr = BwdTraitsFor<T, D>;
  if (p.workspace == nullptr) throw std::invalid_argument("the CUDA backward needs a workspace");
  const bwd::Workspace<T> ws(p, p.workspace);
  const auto stream = reinterpret_cast<cudaStream_t>(p.stream);

  const dim3 pre_grid(static_cast<unsigned>((p.nq + kTile - 1) / kTile), static_cast<unsigned>(p.hq),
                      static_cast<unsigned>(p.batch));
  const auto pre = bwd::preprocess_kernel<T, D>;
  set_smem_limit(reinterpret_cast<const void*>(pre), bwd::PreSmem<T, D>::bytes);
  pre<<<pre_grid, kThreads, bwd::PreSmem<T, D>::bytes, stream>>>(p, ws);
  LIFT_CUDA_CHECK_LAUNCH("preprocess_kernel");

  const dim3 kv_grid(static_cast<unsigned>((p.nk + Tr::kBlockN - 1) / Tr::kBlockN),
                     static_cast<unsigned>(p.hkv), static_cast<unsigned>(p.batch));
  const auto dkdv = cute_fwd::dkdv_kernel<Tr, T>;
  set_smem_limit(reinterpret_cast<const void*>(dkdv), Tr::kKVSmemBytes);
  dkdv<<<kv_grid, Tr::kNThreads, Tr::kKVSmemBytes, stream>>>(p, ws);
  LIFT_CUDA_CHECK_LAUNCH("dkdv_kernel");

  const dim3 q_grid(static_cast<unsigned>((p.nq + Tr::kBlockMQ - 1) / Tr::kBlockMQ),
                    static_cast<unsigned>(p.hq), static_cast<unsigned>(p.batch));
  const auto dq = cute_fwd::dq_kernel<Tr, T>;
  set_smem_limit(reinterpret_cast<const void*>(dq), Tr::kQSmemBytes);
  dq<<<q_grid, Tr::kNThreads, Tr::kQSmemBytes, stream>>>(p, ws);
  LIFT_CUDA_CHECK_LAUNCH("dq_kernel");
}

// One translation unit per (T, D) instantiates this (bwd_<d>_<dtype>.cu).
#define LIFT_INSTANTIATE_CUTE_BACKWARD(T, D)                     \
  template int64_t backward_smem_bytes<T, D>();                  \
  template void launch_backward<T, D>(const AttnParams&);

}  // namespace cuda
}  // namespace lift
