// Kernel traits of the CuTe forward (csrc/cuda/fwd_kernel.cuh): the tiles, the tensor-core
// MMA, the shared-memory layouts and the copies, in one place.  FlashAttention-2's design on
// sm80 building blocks (they run unchanged on sm_90a):
//   - mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate) through a CuTe MMA atom, 4 warps
//     stacked along the query rows (each warp owns 16 rows of the 64-row tile);
//   - shared memory in 8 x 64-element atoms with Swizzle<3,3,3>: the 16-byte chunk c of row r
//     lands at chunk c ^ (r % 8), so ldmatrix (8 rows x 16 bytes per phase), cp.async
//     (8 threads x 16 bytes of one row) and the accumulator stores touch 32 distinct banks;
//   - global -> shared by cp.async (16 bytes per thread), shared -> registers by ldmatrix
//     (transposed for V, which is the B operand of P V).
// Host code can include this header (no CUDA headers needed): tests/cute_host checks the
// layouts on the CPU.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>

namespace lift {
namespace cute_fwd {

using namespace cute;

template <class Element>
struct MmaOpFor;
template <>
struct MmaOpFor<cute::half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct MmaOpFor<cute::bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
};

template <int kHeadDim_, class Element_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;   // query rows per block
  static constexpr int kBlockN = 64;   // keys (and memory-MLP hidden units) per step
  static constexpr int kGateCols = 16;  // the gate's hidden layer, zero-padded to one MMA tile
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0, "the swizzled atoms are 64 elements wide");
  static_assert(kBlockM == 16 * kNWarps, "each warp owns 16 query rows");

  using TiledMma = TiledMMA<MMA_Atom<typename MmaOpFor<Element>::type>,
                            Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  using SmemLayoutAtom = decltype(composition(
      Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{},
                                              Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutG = decltype(tile_to_shape(SmemLayoutAtom{},
                                             Shape<Int<kGateCols>, Int<kHeadDim>>{}));
  // V (and the memory MLP's W2 chunk) read as its transpose [D][kBlockN]: the B operand of
  // P V.  The same bytes as SmemLayoutKV.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = Copy_Atom<UniversalCopy<uint32_t>, Element>;

  // Global <-> shared: 8 threads per 64-element row, 16 bytes (8 elements) each.
  static constexpr int kGmemElems = 16 / sizeof(Element);
  static constexpr int kGmemThreadsPerRow = 64 / kGmemElems;
  using GmemLayoutAtom = Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
                                Stride<Int<kGmemThreadsPerRow>, _1>>;
  using GmemTiledCopy = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemLayoutAtom{},
      Layout<Shape<_1, Int<kGmemElems>>>{}));
  using GmemTiledCopyO = decltype(make_tiled_copy(
      Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{}, GmemLayoutAtom{},
      Layout<Shape<_1, Int<kGmemElems>>>{}));

  // Shared memory (bytes): the unrotated query tile (the memory MLP and the gate read it),
  // the rotated one (Q K^T; the same buffer without RoPE), one K and one V buffer (the
  // cp.async pipeline overlaps V's load with Q K^T and the next K's with the softmax and
  // P V; the memory MLP streams W1^T and W2 chunks through them), and G1^T.  The epilogue
  // stages attn and out through the two query buffers.
  static constexpr int kTileBytes = kBlockM * kHeadDim * int(sizeof(Element));
  static constexpr int kQRaw = 0;
  static constexpr int kQ = kQRaw + kTileBytes;
  static constexpr int kK = kQ + kTileBytes;
  static constexpr int kV = kK + kBlockN * kHeadDim * int(sizeof(Element));
  static constexpr int kG = kV + kBlockN * kHeadDim * int(sizeof(Element));
  static constexpr int kSmemBytes = kG + kGateCols * kHeadDim * int(sizeof(Element));
};

// Which key blocks a query block visits, and which of them need the mask: blocks [0, end)
// hold every key some row of the block sees; blocks [0, full) are visible to every row of
// the block (no mask: no causal cut and no ragged key edge), [full, end) are masked.
// Bottom-right causal: row i sees key j iff j <= i + nk - nq.
struct KeyBlockRange {
  int64_t end = 0, full = 0;
};

CUTE_HOST_DEVICE KeyBlockRange key_block_range(int64_t m_block, int block_m, int block_n,
                                               int64_t nq, int64_t nk, bool causal) {
  const int64_t n_blocks = (nk + block_n - 1) / block_n;
  int64_t end = n_blocks, full = nk / block_n;
  if (causal) {
    // the last key the block's last row (< nq) sees, and the last key its first row sees
    const int64_t last_row =
        (m_block * block_m + block_m < nq ? m_block * block_m + block_m : nq) - 1;
    const int64_t hi = last_row + nk - nq;
    const int64_t lo = m_block * block_m + nk - nq;
    end = hi < 0 ? 0 : (hi / block_n + 1 < n_blocks ? hi / block_n + 1 : n_blocks);
    const int64_t full_causal = lo + 1 < 0 ? 0 : (lo + 1) / block_n;
    full = full < full_causal ? full : full_causal;
  }
  if (full > end) full = end;
  return {end, full};
}

// The accumulator of an m16n8 MMA, ((2, 2), MMA_M, MMA_N) -> (rows, cols) =
// ((2, MMA_M), (2, MMA_N)): value v of an atom is at row v / 2 (times 8), column v % 2.
template <class Layout>
CUTE_HOST_DEVICE auto acc_to_rowcol(Layout const& acc) {
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(rank(get<0>(acc)))::value == 2);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<2>(acc)));
}

// The accumulator of S = Q K^T (m16n8 tiles) read as the A operand of P V (m16n8k16):
// ((2, 2), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, MMA_N / 2).  Two adjacent n8 accumulator
// tiles are one k16 A tile, value for value: no data moves (tests/cute_host proves it).
template <class Layout>
CUTE_HOST_DEVICE auto acc_to_a_operand(Layout const& acc) {
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

}  // namespace cute_fwd
}  // namespace lift
