// Host-side proofs of the CUDA kernels' CuTe layouts (csrc/cuda/kernel_traits.h for the
// forward, csrc/cuda/bwd_traits.h for the backward), for the four compiled (head dim,
// dtype) configurations.  CuTe layouts are functions that evaluate
// on the CPU, so without a GPU this checks what the kernel relies on:
//   1. fragment coordinates: the m16n8 accumulator register (r, c) of lane l in warp w is at
//      row 16 w + l / 4 + 8 r, column 8 (c / 2) + 2 (l % 4) + c % 2, so the 4 lanes of a quad
//      share rows and the softmax's quad shuffles reduce whole rows;
//   2. the score accumulator read as P V's A operand (acc_to_a_operand) holds, register for
//      register, the coordinates the MMA expects: reusing it moves no data;
//   3. every warp-wide shared-memory access (ldmatrix phases, cp.async writes, the
//      epilogue's accumulator stores and 16-byte reads) touches distinct banks;
//   4. exact coverage: the copies and the accumulators tile every element once, and
//      key_block_range visits every visible key, masks every block that needs it.
// The backward (check_backward) adds: the same coordinate and register-reuse proofs for its
// (keys x query rows) and (query rows x keys) accumulators, every ldmatrix of the tiled
// copies the kernels use (plain and transposed, over the dO^T, Q^T and K^T views) reading
// one contiguous 16-byte row piece per lane on 8 distinct bank groups per phase and each
// element once per warp, the dQ epilogue's RoPE pairs lying in one thread's registers, and
// the dK/dV kernel's query-tile range and mask decision against brute force.
// Built and run by tests/test_cute_layouts.py (g++, the nvidia-cutlass headers).  Prints
// "ok <n checks>" and exits 0, or prints the first failure and exits 1.
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "cuda/bwd_traits.h"
#include "cuda/kernel_traits.h"

using namespace cute;
using lift::cute_fwd::FwdTraits;

static long checks = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    ++checks;                                              \
    if (!(cond)) {                                         \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);     \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
      std::exit(1);                                        \
    }                                                      \
  } while (0)

// Byte address of element (r, c) in a shared-memory layout of 2-byte elements.
template <class Layout>
int byte_of(Layout const& layout, int r, int c) {
  return int(layout(r, c)) * 2;
}

// 16-byte accesses go in phases of 8 lanes; each phase must hit 8 distinct 16-byte bank
// groups of a 128-byte line.
void check_16B_phase(std::vector<int> const& bytes, const char* what) {
  std::set<int> groups;
  for (int b : bytes) groups.insert((b / 16) % 8);
  CHECK(groups.size() == bytes.size(), "%s: a phase of %zu 16-byte accesses hits %zu bank groups",
        what, bytes.size(), groups.size());
}

template <int D, class Element>
void check_config(const char* name) {
  using Tr = FwdTraits<D, Element>;
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN;
  typename Tr::TiledMma mma;

  // 1. Accumulator coordinates of the score tile, and 2. the P-operand identity.
  for (int t = 0; t < Tr::kNThreads; ++t) {
    const int warp = t / 32, lane = t % 32;
    auto thr = mma.get_thread_slice(t);
    Tensor cS = thr.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
    Tensor rc = make_tensor(cS.data(), lift::cute_fwd::acc_to_rowcol(cS.layout()));
    CHECK(size<0>(rc) == 2 && size<1>(rc) == 2 * kN / 8, "%s: rowcol view shape", name);
    for (int r = 0; r < size<0>(rc); ++r)
      for (int c = 0; c < size<1>(rc); ++c) {
        const int row = get<0>(rc(r, c)), col = get<1>(rc(r, c));
        CHECK(row == 16 * warp + lane / 4 + 8 * r, "%s: thread %d reg (%d,%d) row %d", name, t, r, c, row);
        CHECK(col == 8 * (c / 2) + 2 * (lane % 4) + c % 2, "%s: thread %d reg (%d,%d) col %d", name, t, r, c, col);
      }
    Tensor asA = make_tensor(cS.data(), lift::cute_fwd::acc_to_a_operand(cS.layout()));
    Tensor cA = thr.partition_A(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));  // P [M][N=K]
    CHECK(size(asA) == size(cA), "%s: P operand size", name);
    CHECK(shape(asA) == shape(cA), "%s: P operand shape", name);
    for (int i = 0; i < size(cA); ++i)
      CHECK(asA(i) == cA(i), "%s: thread %d P register %d at (%d,%d), the MMA expects (%d,%d)", name, t,
            i, int(get<0>(asA(i))), int(get<1>(asA(i))), int(get<0>(cA(i))), int(get<1>(cA(i))));
  }

  // 3a. ldmatrix (plain and transposed) reads 8 rows x 16 bytes per phase, rows 8-aligned.
  auto check_ldmatrix = [&](auto layout, int rows, const char* what) {
    for (int r0 = 0; r0 < rows; r0 += 8)
      for (int c0 = 0; c0 < D; c0 += 8) {
        std::vector<int> bytes;
        for (int i = 0; i < 8; ++i) bytes.push_back(byte_of(layout, r0 + i, c0));
        check_16B_phase(bytes, what);
      }
  };
  check_ldmatrix(typename Tr::SmemLayoutQ{}, kM, "ldmatrix Q");
  check_ldmatrix(typename Tr::SmemLayoutKV{}, kN, "ldmatrix K/V");
  check_ldmatrix(typename Tr::SmemLayoutG{}, Tr::kGateCols, "ldmatrix G1^T");
  // The transposed view of V is the same bytes as V's rows.
  for (int d = 0; d < D; ++d)
    for (int n = 0; n < kN; ++n)
      CHECK(typename Tr::SmemLayoutVt{}(d, n) == typename Tr::SmemLayoutKV{}(n, d), "%s: Vt view", name);

  // 3b and 4. cp.async (and the epilogue's 16-byte reads, the same partition): every element of
  // a tile once, and each 8-lane phase on 8 distinct bank groups.
  auto check_gmem_copy = [&](auto layout, auto tile, const char* what) {
    typename Tr::GmemTiledCopy copy;
    std::vector<int> seen(size(tile), 0);
    constexpr int rows = decltype(size<0>(tile))::value;
    for (int t0 = 0; t0 < Tr::kNThreads; t0 += 8) {
      Tensor c0 = copy.get_thread_slice(t0).partition_S(make_identity_tensor(tile));
      for (int m = 0; m < size<1>(c0); ++m)
        for (int k = 0; k < size<2>(c0); ++k) {
          std::vector<int> bytes;
          for (int t = t0; t < t0 + 8; ++t) {
            Tensor c = copy.get_thread_slice(t).partition_S(make_identity_tensor(tile));
            const int row = get<0>(c(0, m, k)), col = get<1>(c(0, m, k));
            bytes.push_back(byte_of(layout, row, col));
            for (int v = 0; v < size<0>(c); ++v) {
              CHECK(get<0>(c(v, m, k)) == row && get<1>(c(v, m, k)) == col + v,
                    "%s: a thread's 16 bytes are not one contiguous row piece", what);
              ++seen[get<0>(c(v, m, k)) * D + get<1>(c(v, m, k))];
            }
          }
          check_16B_phase(bytes, what);
        }
    }
    for (int i = 0; i < rows * D; ++i) CHECK(seen[i] == 1, "%s: element %d copied %d times", what, i, seen[i]);
  };
  check_gmem_copy(typename Tr::SmemLayoutQ{}, Shape<Int<kM>, Int<D>>{}, "cp.async Q");
  check_gmem_copy(typename Tr::SmemLayoutKV{}, Shape<Int<kN>, Int<D>>{}, "cp.async K/V");
  check_gmem_copy(typename Tr::SmemLayoutG{}, Shape<Int<Tr::kGateCols>, Int<D>>{}, "cp.async G1^T");

  // 3c and 4. The epilogue's accumulator stores (4 bytes a lane): a warp's 32 lanes on 32
  // banks per store; the output accumulators cover the tile once.
  {
    auto copy_o = make_tiled_copy_C(typename Tr::SmemCopyAtomO{}, mma);
    typename Tr::SmemLayoutQ layout;
    std::vector<int> seen(kM * D, 0);
    auto coords = [&](int t) {
      return copy_o.get_thread_slice(t).partition_D(make_identity_tensor(Shape<Int<kM>, Int<D>>{}));
    };
    using Coords = decltype(coords(0));
    for (int w = 0; w < Tr::kNWarps; ++w)
      for (int m = 0; m < size<1>(Coords{}); ++m)
        for (int n = 0; n < size<2>(Coords{}); ++n) {
          std::set<int> banks;
          for (int lane = 0; lane < 32; ++lane) {
            Tensor c = coords(32 * w + lane);
            banks.insert((byte_of(layout, get<0>(c(0, m, n)), get<1>(c(0, m, n))) / 4) % 32);
            for (int v = 0; v < size<0>(c); ++v) ++seen[get<0>(c(v, m, n)) * D + get<1>(c(v, m, n))];
          }
          CHECK(banks.size() == 32, "%s: epilogue store (%d,%d) of warp %d hits %zu banks", name, m, n, w,
                banks.size());
        }
    for (int i = 0; i < kM * D; ++i) CHECK(seen[i] == 1, "%s: output element %d stored %d times", name, i, seen[i]);
  }

  // Shared memory per block within every target (sm_86/89: 99 KB opt-in).
  CHECK(Tr::kSmemBytes <= 99 * 1024, "%s: %d bytes of shared memory", name, Tr::kSmemBytes);
  std::printf("%s: smem %d bytes, %d threads\n", name, Tr::kSmemBytes, Tr::kNThreads);
}

// The accumulator of a kM x kN tile: register (r, c) of thread t at row 16 w + l / 4 + 8 r,
// column 8 (c / 2) + 2 (l % 4) + c % 2; and, read as the A operand of the next MMA
// (acc_to_a_operand, K = kN), exactly the coordinates the MMA expects.
template <class Mma, int kM, int kN>
void check_accumulator(Mma const& mma, const char* name) {
  for (int t = 0; t < size(mma); ++t) {
    const int warp = t / 32, lane = t % 32;
    auto thr = mma.get_thread_slice(t);
    Tensor cS = thr.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
    Tensor rc = make_tensor(cS.data(), lift::cute_fwd::acc_to_rowcol(cS.layout()));
    CHECK(size<0>(rc) == 2 && size<1>(rc) == 2 * kN / 8, "%s: rowcol view shape", name);
    for (int r = 0; r < size<0>(rc); ++r)
      for (int c = 0; c < size<1>(rc); ++c) {
        CHECK(get<0>(rc(r, c)) == 16 * warp + lane / 4 + 8 * r, "%s: thread %d reg (%d,%d) row", name, t, r, c);
        CHECK(get<1>(rc(r, c)) == 8 * (c / 2) + 2 * (lane % 4) + c % 2, "%s: thread %d reg (%d,%d) col", name, t, r, c);
      }
    Tensor asA = make_tensor(cS.data(), lift::cute_fwd::acc_to_a_operand(cS.layout()));
    Tensor cA = thr.partition_A(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
    CHECK(shape(asA) == shape(cA), "%s: A operand shape", name);
    for (int i = 0; i < size(cA); ++i)
      CHECK(asA(i) == cA(i), "%s: thread %d register %d is not where the MMA expects it", name, t, i);
  }
}

// Every ldmatrix of a tiled copy over a (rows, cols) view of a shared-memory tile: each lane
// reads one contiguous, 16-byte-aligned piece of 8 elements; the 8 lanes of each phase hit
// 8 distinct bank groups; every element of the view is read `reads` times by the block (A
// operands: once, each warp its own rows; B operands: once per warp).
template <class TiledCopy, class ViewLayout, class Shape2>
void check_ldmatrix_copy(TiledCopy const& copy, ViewLayout const& view, Shape2 const& shape,
                         int n_threads, int reads, const char* what) {
  constexpr int rows = decltype(size<0>(Shape2{}))::value, cols = decltype(size<1>(Shape2{}))::value;
  std::vector<int> seen(rows * cols, 0);
  for (int w = 0; w < n_threads / 32; ++w) {
    using Part = decltype(copy.get_thread_slice(0).partition_S(make_identity_tensor(shape)));
    for (int i = 0; i < size<1>(Part{}); ++i)
      for (int j = 0; j < size<2>(Part{}); ++j)
        for (int phase = 0; phase < 4; ++phase) {
          std::vector<int> bytes;
          for (int lane = 8 * phase; lane < 8 * phase + 8; ++lane) {
            Tensor c = copy.get_thread_slice(32 * w + lane).partition_S(make_identity_tensor(shape));
            CHECK(size<0>(c) == 8, "%s: %d values per lane", what, int(size<0>(c)));
            const int first = int(view(get<0>(c(0, i, j)), get<1>(c(0, i, j))));
            CHECK(first % 8 == 0, "%s: a lane's piece is not 16-byte aligned", what);
            for (int v = 0; v < 8; ++v) {
              const int row = get<0>(c(v, i, j)), col = get<1>(c(v, i, j));
              CHECK(int(view(row, col)) == first + v, "%s: a lane's 16 bytes are not contiguous", what);
              ++seen[row * cols + col];
            }
            bytes.push_back(first * 2);
          }
          check_16B_phase(bytes, what);
        }
  }
  for (int e = 0; e < rows * cols; ++e)
    CHECK(seen[e] == reads, "%s: element %d read %d times, want %d", what, e, seen[e], reads);
}

// cp.async of a tile with the forward's gmem copy: each element once, each 8-lane phase on
// 8 distinct bank groups (the backward streams tiles of other heights).
template <class Tr, class Layout, int kRows>
void check_cp_async_rows(const char* what) {
  constexpr int D = Tr::kHeadDim;
  typename Tr::GmemTiledCopy copy;
  Layout layout;
  const auto tile = Shape<Int<kRows>, Int<D>>{};
  std::vector<int> seen(kRows * D, 0);
  for (int t0 = 0; t0 < Tr::kNThreads; t0 += 8) {
    using Part = decltype(copy.get_thread_slice(0).partition_S(make_identity_tensor(tile)));
    for (int m = 0; m < size<1>(Part{}); ++m)
      for (int k = 0; k < size<2>(Part{}); ++k) {
        std::vector<int> bytes;
        for (int t = t0; t < t0 + 8; ++t) {
          Tensor c = copy.get_thread_slice(t).partition_S(make_identity_tensor(tile));
          bytes.push_back(byte_of(layout, get<0>(c(0, m, k)), get<1>(c(0, m, k))));
          for (int v = 0; v < size<0>(c); ++v) ++seen[get<0>(c(v, m, k)) * D + get<1>(c(v, m, k))];
        }
        check_16B_phase(bytes, what);
      }
  }
  for (int i = 0; i < kRows * D; ++i) CHECK(seen[i] == 1, "%s: element %d copied %d times", what, i, seen[i]);
}

template <int D, class Element>
void check_backward(const char* name) {
  using Tr = lift::cute_fwd::BwdTraits<D, Element>;
  constexpr int kN = Tr::kBlockN, kMKV = Tr::kBlockMKV, kMQ = Tr::kBlockMQ, kNQ = Tr::kBlockNQ;
  typename Tr::TiledMma mma;
  // dK/dV: S^T, dP^T (keys x query rows) and P'^T, dS^T as the A operands of dV, dK.
  check_accumulator<decltype(mma), kN, kMKV>(mma, name);
  // dQ: S, dP (query rows x keys), dS as the A operand of dQ; the D-wide accumulators.
  check_accumulator<decltype(mma), kMQ, kNQ>(mma, name);
  check_accumulator<decltype(mma), kN, D>(mma, name);

  // The transposed views are the same bytes as the tiles.
  for (int d = 0; d < D; ++d) {
    for (int m = 0; m < kMKV; ++m)
      CHECK(typename Tr::SmemLayoutQKVt{}(d, m) == typename Tr::SmemLayoutQKV{}(m, d), "%s: Q^T view", name);
    for (int n = 0; n < kNQ; ++n)
      CHECK(typename Tr::SmemLayoutKQt{}(d, n) == typename Tr::SmemLayoutKQ{}(n, d), "%s: K^T view", name);
  }

  // Every ldmatrix the two kernels issue, on the tiled copies they build.
  auto copy_a = make_tiled_copy_A(typename Tr::SmemCopyAtom{}, mma);
  auto copy_b = make_tiled_copy_B(typename Tr::SmemCopyAtom{}, mma);
  auto copy_bt = make_tiled_copy_B(typename Tr::SmemCopyAtomTransposed{}, mma);
  const int nt = Tr::kNThreads;
  // dK/dV: K, V as A (keys x D); Q, dO as B (query rows x D); dO^T, Q^T as B (D x query rows).
  check_ldmatrix_copy(copy_a, typename Tr::SmemLayoutKV{}, Shape<Int<kN>, Int<D>>{}, nt, 1, "ldmatrix K/V (A, dK/dV)");
  check_ldmatrix_copy(copy_b, typename Tr::SmemLayoutQKV{}, Shape<Int<kMKV>, Int<D>>{}, nt, 4, "ldmatrix Q/dO (B, dK/dV)");
  check_ldmatrix_copy(copy_bt, typename Tr::SmemLayoutQKVt{}, Shape<Int<D>, Int<kMKV>>{}, nt, 4,
                      "ldmatrix.trans dO^T/Q^T (B, dK/dV)");
  // dQ: Q, dO as A; K, V as B; K^T as B.
  check_ldmatrix_copy(copy_a, typename Tr::SmemLayoutQ{}, Shape<Int<kMQ>, Int<D>>{}, nt, 1, "ldmatrix Q/dO (A, dQ)");
  check_ldmatrix_copy(copy_b, typename Tr::SmemLayoutKQ{}, Shape<Int<kNQ>, Int<D>>{}, nt, 4, "ldmatrix K/V (B, dQ)");
  check_ldmatrix_copy(copy_bt, typename Tr::SmemLayoutKQt{}, Shape<Int<D>, Int<kNQ>>{}, nt, 4, "ldmatrix.trans K^T (B, dQ)");

  // cp.async of every streamed tile.
  check_cp_async_rows<Tr, typename Tr::SmemLayoutQKV, kMKV>("cp.async Q/dO (dK/dV)");
  check_cp_async_rows<Tr, typename Tr::SmemLayoutKV, kN>("cp.async K/V (dK/dV)");
  check_cp_async_rows<Tr, typename Tr::SmemLayoutQ, kMQ>("cp.async Q/dO (dQ)");
  check_cp_async_rows<Tr, typename Tr::SmemLayoutKQ, kNQ>("cp.async K/V (dQ)");

  // The dQ epilogue's RoPE pairs: column c + D/8 of a thread's accumulator view is column
  // + D/2 of the same row.
  for (int t = 0; t < nt; ++t) {
    Tensor c = mma.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<kMQ>, Int<D>>{}));
    Tensor rc = make_tensor(c.data(), lift::cute_fwd::acc_to_rowcol(c.layout()));
    constexpr int half = decltype(size<1>(rc))::value / 2;
    CHECK(half == D / 8, "%s: D/8 columns per half", name);
    for (int r = 0; r < size<0>(rc); ++r)
      for (int k = 0; k < half; ++k) {
        CHECK(get<0>(rc(r, k + half)) == get<0>(rc(r, k)), "%s: RoPE pair rows", name);
        CHECK(get<1>(rc(r, k + half)) == get<1>(rc(r, k)) + D / 2, "%s: RoPE pair columns", name);
      }
  }

  // Shared memory: tiles start on whole swizzle atoms, the regions do not overlap, and the
  // attention kernels fit every sm_8x/sm_90 card (99 KB opt-in on sm_86/89).
  CHECK(Tr::kKVStage0 + 2 * Tr::kKVStage <= Tr::kKVRows && Tr::kKVRows % 128 == 0, "%s: dK/dV regions", name);
  CHECK(Tr::kKVSmemBytes <= 99 * 1024 && Tr::kQSmemBytes <= 99 * 1024, "%s: backward smem %d / %d bytes", name,
        Tr::kKVSmemBytes, Tr::kQSmemBytes);
  std::printf("%s backward: dK/dV smem %d bytes (query tile %d rows), dQ smem %d bytes\n", name,
              Tr::kKVSmemBytes, kMKV, Tr::kQSmemBytes);
}

// The dK/dV kernel's query tiles against brute force: [begin, end) holds every row that sees
// a key of the block and no tile before begin does; tile_fully_visible is exact.
void check_query_blocks() {
  for (int bm : {32, 64})
    for (int nq : {1, 5, 63, 64, 65, 130, 200})
      for (int nk : {1, 7, 64, 70, 129, 200, 300})
        for (int causal = 0; causal < 2; ++causal)
          for (int nb = 0; nb * 64 < nk; ++nb) {
            const int bn = 64;
            const auto range = lift::cute_fwd::query_block_range(nb, bm, bn, nq, nk, causal);
            auto visible = [&](int i, int j) { return i < nq && j < nk && (!causal || j <= i + nk - nq); };
            const int tiles = (nq + bm - 1) / bm;
            CHECK(range.end == tiles && 0 <= range.begin && range.begin <= range.end, "query range bounds");
            for (int m = 0; m < tiles; ++m) {
              bool any = false, all = true;
              for (int i = m * bm; i < m * bm + bm; ++i)
                for (int j = nb * bn; j < nb * bn + bn; ++j) {
                  any = any || visible(i, j);
                  all = all && visible(i, j);
                }
              if (m < range.begin)
                CHECK(!any, "nq=%d nk=%d causal=%d bm=%d: tile %d before begin sees key block %d", nq, nk, causal, bm, m, nb);
              CHECK(lift::cute_fwd::tile_fully_visible(m, nb, bm, bn, nq, nk, causal) == all,
                    "nq=%d nk=%d causal=%d bm=%d: tile (%d, %d) mask decision", nq, nk, causal, bm, m, nb);
            }
            // begin is tight: its tile sees the block (when any tile does)
            if (range.begin < range.end && causal) {
              bool any = false;
              for (int i = int(range.begin) * bm; i < int(range.begin) * bm + bm; ++i)
                for (int j = nb * bn; j < nb * bn + bn; ++j) any = any || visible(i, j);
              const bool some_tile = nb * bn <= (nq - 1) + nk - nq;
              CHECK(any || !some_tile, "nq=%d nk=%d bm=%d: begin tile %ld sees nothing", nq, nk, bm, long(range.begin));
            }
          }
}

// 4. key_block_range against brute force, ragged and bottom-right causal.
void check_key_blocks() {
  const int bm = 64, bn = 64;
  for (int nq : {1, 5, 63, 64, 65, 130, 200})
    for (int nk : {1, 7, 64, 70, 129, 200, 300})
      for (int causal = 0; causal < 2; ++causal)
        for (int mb = 0; mb * bm < nq; ++mb) {
          const auto range = lift::cute_fwd::key_block_range(mb, bm, bn, nq, nk, causal);
          auto visible = [&](int i, int j) { return j < nk && (!causal || j <= i + nk - nq); };
          int last_block = -1;
          for (int i = mb * bm; i < std::min(nq, mb * bm + bm); ++i)
            for (int j = 0; j < nk; ++j)
              if (visible(i, j)) last_block = std::max(last_block, j / bn);
          CHECK(range.end == last_block + 1, "nq=%d nk=%d causal=%d m_block=%d: end %ld, want %d", nq, nk,
                causal, mb, long(range.end), last_block + 1);
          CHECK(0 <= range.full && range.full <= range.end, "full out of range");
          // Unmasked blocks: every (row of the tile, key of the block) is visible.
          for (int n = 0; n < range.full; ++n)
            for (int i = mb * bm; i < std::min(nq, mb * bm + bm); ++i)
              for (int j = n * bn; j < n * bn + bn; ++j)
                CHECK(visible(i, j), "nq=%d nk=%d causal=%d m_block=%d: block %d unmasked but (%d,%d) is hidden",
                      nq, nk, causal, mb, n, i, j);
          // Masked blocks need it: some key of the block is hidden from some row.
          for (int n = int(range.full); n < range.end; ++n) {
            bool hidden = false;
            for (int i = mb * bm; i < std::min(nq, mb * bm + bm) && !hidden; ++i)
              for (int j = n * bn; j < n * bn + bn && !hidden; ++j) hidden = !visible(i, j);
            CHECK(hidden, "nq=%d nk=%d causal=%d m_block=%d: block %d masked needlessly", nq, nk, causal, mb, n);
          }
        }
}

int main() {
  check_config<64, cute::half_t>("D=64 fp16");
  check_config<128, cute::half_t>("D=128 fp16");
  check_config<64, cute::bfloat16_t>("D=64 bf16");
  check_config<128, cute::bfloat16_t>("D=128 bf16");
  check_key_blocks();
  check_backward<64, cute::half_t>("D=64 fp16");
  check_backward<128, cute::half_t>("D=128 fp16");
  check_backward<64, cute::bfloat16_t>("D=64 bf16");
  check_backward<128, cute::bfloat16_t>("D=128 bf16");
  check_query_blocks();
  std::printf("ok %ld checks\n", checks);
  return 0;
}
