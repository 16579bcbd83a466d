// Kernel traits of the CuTe backward's attention kernels (csrc/cuda/bwd_kernel.cuh): tiles,
// MMA, shared-memory layouts and copies in one place, on the forward's building blocks
// (kernel_traits.h: the same m16n8k16 MMA atom, 8 x 64 Swizzle<3,3,3> atoms, ldmatrix and
// 16-byte cp.async copies).  Two kernels, FlashAttention-2's structure without atomics:
//   dK/dV  one block per (64-key block, kv head, batch): 4 warps stacked along the keys
//          (each owns 16 keys and its rows of dK and dV in registers); it streams the
//          query tiles (kBlockM rows of the rotated query and dO, lse' and delta') of the
//          GQA group's query heads through a two-stage cp.async pipeline.  S^T = K Q^T and
//          dP^T = V dO^T are MMAs with K and V as A operands; P^T and dS^T stay in
//          registers and are reused as the A operands of dV += P^T dO and dK += dS^T Q
//          (acc_to_a_operand), whose B operands are dO^T and Q^T: ldmatrix.trans views of
//          the same swizzled tiles.
//   dQ     one block per (64-row query tile, query head, batch): 4 warps stacked along the
//          rows (each owns 16 rows of dQ in registers); K and V blocks through a two-stage
//          cp.async pipeline; dS stays in registers as the A operand of dQ += dS K, whose
//          B operand K^T is an ldmatrix.trans view of K's tile.
// Host code can include this header: tests/cute_host checks the layouts on the CPU.
#pragma once

#include "cuda/kernel_traits.h"

namespace lift {
namespace cute_fwd {

template <int kHeadDim_, class Element_>
struct BwdTraits {
  using Element = Element_;
  using Fwd = FwdTraits<kHeadDim_, Element_>;  // the shared atoms and layouts
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = kNWarps * 32;
  // dK/dV: keys per block (the MMA's M side) and query rows per streamed tile.  At D=128 the
  // two D-wide accumulators take 128 registers per thread, so the query tile is halved to
  // keep S^T, dP^T and their 16-bit copies within the 255-register budget.
  static constexpr int kBlockN = 64;
  static constexpr int kBlockMKV = kHeadDim <= 64 ? 64 : 32;
  // dQ: query rows per block (M side) and keys per streamed block.
  static constexpr int kBlockMQ = 64;
  static constexpr int kBlockNQ = 64;
  static_assert(kBlockN == 16 * kNWarps && kBlockMQ == 16 * kNWarps, "a warp owns 16 rows");

  using TiledMma = typename Fwd::TiledMma;
  using SmemLayoutAtom = typename Fwd::SmemLayoutAtom;
  template <int kRows>
  using SmemLayoutRows = decltype(tile_to_shape(SmemLayoutAtom{},
                                                Shape<Int<kRows>, Int<kHeadDim>>{}));
  // The same bytes read as the transpose [D][kRows]: the B operand when the tile's rows
  // are the MMA's K dimension (dO^T and Q^T in dK/dV, K^T in dQ).
  template <int kRows>
  using SmemLayoutRowsT = decltype(composition(
      SmemLayoutRows<kRows>{}, make_layout(Shape<Int<kHeadDim>, Int<kRows>>{}, GenRowMajor{})));
  template <int kRows>
  using SmemLayoutRowsTNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutRowsT<kRows>{}));

  using SmemLayoutKV = SmemLayoutRows<kBlockN>;      // K, V (dK/dV); dK, dV staging
  using SmemLayoutQKV = SmemLayoutRows<kBlockMKV>;   // a streamed Q / dO tile (dK/dV)
  using SmemLayoutQKVt = SmemLayoutRowsT<kBlockMKV>;
  using SmemLayoutQKVtNoSwizzle = SmemLayoutRowsTNoSwizzle<kBlockMKV>;
  using SmemLayoutQ = SmemLayoutRows<kBlockMQ>;      // Q, dO (dQ)
  using SmemLayoutKQ = SmemLayoutRows<kBlockNQ>;     // a streamed K / V block (dQ)
  using SmemLayoutKQt = SmemLayoutRowsT<kBlockNQ>;
  using SmemLayoutKQtNoSwizzle = SmemLayoutRowsTNoSwizzle<kBlockNQ>;

  using SmemCopyAtom = typename Fwd::SmemCopyAtom;
  using SmemCopyAtomTransposed = typename Fwd::SmemCopyAtomTransposed;
  using SmemCopyAtomO = typename Fwd::SmemCopyAtomO;
  using GmemTiledCopy = typename Fwd::GmemTiledCopy;
  using GmemTiledCopyO = typename Fwd::GmemTiledCopyO;

  static constexpr int kElem = int(sizeof(Element));
  // dK/dV shared memory (bytes): K, V, two stages of (Q, dO), then the two stages' lse' and
  // delta' rows (float32; after the tiles so that every tile starts on a 1 KB swizzle atom).
  // The epilogue stages dK and dV through K's and V's buffers.
  static constexpr int kKVTile = kBlockN * kHeadDim * kElem;
  static constexpr int kQKVTile = kBlockMKV * kHeadDim * kElem;
  static constexpr int kKVK = 0;
  static constexpr int kKVV = kKVTile;
  static constexpr int kKVStage0 = 2 * kKVTile;  // stage s: Q at + s * kKVStage, dO after it
  static constexpr int kKVStage = 2 * kQKVTile;
  static constexpr int kKVRows = kKVStage0 + 2 * kKVStage;  // stage s: lse' at + s * kKVRowStage
  static constexpr int kKVRowStage = 2 * kBlockMKV * 4;      // lse' then delta'
  static constexpr int kKVSmemBytes = kKVRows + 2 * kKVRowStage;
  // dQ shared memory: Q, dO, then two stages of (K, V).
  static constexpr int kQTile = kBlockMQ * kHeadDim * kElem;
  static constexpr int kKQTile = kBlockNQ * kHeadDim * kElem;
  static constexpr int kQQ = 0;
  static constexpr int kQdO = kQTile;
  static constexpr int kQStage0 = 2 * kQTile;  // stage s: K at + s * kQStage, V after it
  static constexpr int kQStage = 2 * kKQTile;
  static constexpr int kQSmemBytes = kQStage0 + 2 * kQStage;
  static_assert(kKVTile % 1024 == 0 && kQKVTile % 1024 == 0 && kKQTile % 1024 == 0,
                "tiles start on whole swizzle atoms");
};

// Which query tiles a key block meets in the dK/dV kernel: tiles [begin, end) hold every
// query row that sees some key of the block (bottom-right causal: row i sees key j iff
// j <= i + nk - nq); without causal, all of them.
struct QueryBlockRange {
  int64_t begin = 0, end = 0;
};

CUTE_HOST_DEVICE QueryBlockRange query_block_range(int64_t n_block, int block_m, int block_n,
                                                   int64_t nq, int64_t nk, bool causal) {
  const int64_t end = (nq + block_m - 1) / block_m;
  if (!causal) return {0, end};
  // The first row that sees the block's first key j0: i >= j0 - (nk - nq).
  const int64_t first_row = n_block * block_n - (nk - nq);
  const int64_t begin = first_row <= 0 ? 0 : first_row / block_m;
  return {begin < end ? begin : end, end};
}

// Whether every (row, key) of query tile m_block x key block n_block is visible and inside
// the sequences: then the tile needs no mask.
CUTE_HOST_DEVICE bool tile_fully_visible(int64_t m_block, int64_t n_block, int block_m,
                                         int block_n, int64_t nq, int64_t nk, bool causal) {
  const int64_t last_key = n_block * block_n + block_n - 1;
  const int64_t last_row = m_block * block_m + block_m - 1;
  if (last_key >= nk || last_row >= nq) return false;
  // the tile's first row sees its last key
  return !causal || last_key <= m_block * block_m + nk - nq;
}

}  // namespace cute_fwd
}  // namespace lift
