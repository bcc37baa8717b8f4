// CPU teams for lsa::solve.
//
// SequentialTeam: one lane; the production CPU path.
// SimulatedTeam:  `lanes` emulated lanes, reduced in the order the CUDA teams use
//                 (a __shfl_xor_sync butterfly inside each warp of 32, then the warp
//                 results through shared scratch and a second butterfly). Used by the
//                 tests to show that the result does not depend on the team.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "solver.h"

// The sequential team's loops are the solver's hot loops: inline them (and the
// solver's lambdas) whatever the compiler's heuristics think of their size.
#define LSA_HOT inline __attribute__((always_inline))

namespace lsa {

class SequentialTeam {
 public:
  static constexpr int size = 1;
  bool leader() const { return true; }
  void sync() const {}

  template <class F>
  LSA_HOT void for_each(int32_t n, F&& f) const {
    for (int32_t k = 0; k < n; ++k) f(k);
  }

  template <class Pred>
  LSA_HOT bool any(int32_t rows, int32_t cols, Pred&& pred) const {
    for (int32_t i = 0; i < rows; ++i) {
      int32_t found = 0;  // a count, no early exit inside a row: the compiler vectorises it
      for (int32_t j = 0; j < cols; ++j) found += pred(i, j);
      if (found) return true;
    }
    return false;
  }

  template <class Relax>
  LSA_HOT Key argmin(int32_t n, const Relax& relax, const double* val, const int32_t* rank) const {
#if defined(__AVX__)
    if (n >= 8) return argmin_blocks(n, relax, val, rank);
#endif
    double lowest = kInf;
    for (int32_t k = 0; k < n; ++k) {
      relax(k);
      lowest = val[k] < lowest ? val[k] : lowest;
    }
    Key best = Key::none();
    if (lowest == kInf) return best;
    for (int32_t k = 0; k < n; ++k)
      if (val[k] == lowest) best = min_key(best, Key{val[k], rank[k], k});
    return best;
  }

#if defined(__AVX__)
 private:
  // Two passes over contiguous values, in blocks of eight columns: relax each block and
  // keep the lowest value of each of eight lanes, then find the least tie rank among
  // the columns at the lowest value (more than one is common: tight edges give exactly
  // equal path costs, and integer costs tie by the hundred). The last block is shifted
  // back to end at n, overlapping the one before: relaxing a column twice changes
  // nothing, and neither does meeting its key twice. A NaN value (a scanned column) is
  // skipped: minpd returns its second operand when the first is NaN. The sign of a
  // zero minimum depends on the order of the comparisons, which is why argmin returns
  // the winner's own value.
  template <class Relax>
  LSA_HOT Key argmin_blocks(int32_t n, const Relax& relax, const double* val,
                            const int32_t* rank) const {
    const double lowest = relax_blocks(n, relax, val);
    if (lowest == kInf) return Key::none();
#if defined(__AVX512F__)
    // Each column as a 64-bit key, rank above column: the least key is the winner. The
    // blocks go in groups of four: a group with no column at the lowest value costs
    // four compares, the others a masked minimum per block and no branch per column.
    using Keys = int64_t __attribute__((vector_size(64)));
    using Ranks = int32_t __attribute__((vector_size(32)));
    const __m512d target = _mm512_set1_pd(lowest);
    const auto equal = [&](int32_t b) {
      return _mm512_cmp_pd_mask(_mm512_loadu_pd(val + b), target, _CMP_EQ_OQ);
    };
    Keys least = Keys{} + INT64_MAX;
    const auto take = [&](int32_t b, __mmask8 mask) {
      Ranks r;
      std::memcpy(&r, rank + b, sizeof r);
      const Keys key = __builtin_convertvector(r, Keys) << 32 | (Keys{0, 1, 2, 3, 4, 5, 6, 7} + b);
      least = Keys(_mm512_mask_min_epi64(__m512i(least), mask, __m512i(least), __m512i(key)));
    };
    // (Up to 64 columns there is little to skip, and a mispredicted branch costs more.)
    int32_t b = 0;
    for (; n > 64 && b + 32 <= n; b += 32) {
      const __mmask8 m0 = equal(b), m1 = equal(b + 8), m2 = equal(b + 16), m3 = equal(b + 24);
      if ((m0 | m1 | m2 | m3) == 0) continue;
      take(b, m0), take(b + 8, m1), take(b + 16, m2), take(b + 24, m3);
    }
    for (; b + 8 <= n; b += 8) take(b, equal(b));
    if (b < n) take(n - 8, equal(n - 8));
    Keys t = __builtin_shufflevector(least, least, 4, 5, 6, 7, 0, 1, 2, 3);
    least = t < least ? t : least;
    t = __builtin_shufflevector(least, least, 2, 3, 0, 1, 6, 7, 4, 5);
    least = t < least ? t : least;
    t = __builtin_shufflevector(least, least, 1, 0, 3, 2, 5, 4, 7, 6);
    least = t < least ? t : least;
    const int32_t col = int32_t(least[0]);
    return Key{val[col], int32_t(least[0] >> 32), col};
#else
    Key best = Key::none();
    for (int32_t k = 0; k < n; k += 8) {
      const int32_t b = std::min(k, n - 8);
      const __m256d t = _mm256_set1_pd(lowest);
      const int lo = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(val + b), t, _CMP_EQ_OQ));
      const int hi = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(val + b + 4), t, _CMP_EQ_OQ));
      for (int mask = lo | hi << 4; mask != 0; mask &= mask - 1) {
        const int32_t q = b + __builtin_ctz(mask);
        best = min_key(best, Key{val[q], rank[q], q});
      }
    }
    return best;
#endif
  }

  // Pass 1: relaxes every column; returns the lowest value.
  template <class Relax>
  LSA_HOT static double relax_blocks(int32_t n, const Relax& relax, const double* val) {
#if defined(__AVX512F__)
    // A cost with contiguous rows: eight columns as one vector, the operations of
    // Relax::operator() (the same IEEE operations in the same order, so the same bits)
    // and one masked store of the path entries. Vector operators rather than intrinsics
    // where GCC 12's intrinsics raise false "maybe uninitialized" warnings.
    if constexpr (requires { relax.cost.row(relax.i); }) {
      const auto* row = relax.cost.row(relax.i);
      const __m256i i = _mm256_set1_epi32(relax.i);
      const auto relax_block = [&](int32_t b) {
        const __m512d v = _mm512_loadu_pd(relax.w.v + b);
        const __m512d r = ((relax.min_val + load8(row + b)) - relax.ui) - v;
        __m512d x = r;
        if (relax.first) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(relax.w.path + b), i);
        } else {
          const __m512d s = _mm512_loadu_pd(relax.w.spc + b);
          _mm256_mask_storeu_epi32(relax.w.path + b, _mm512_cmp_pd_mask(r, s, _CMP_LT_OQ), i);
          x = r < s ? r : s;
        }
        _mm512_storeu_pd(relax.w.spc + b, x);
        return x;
      };
      // Two running minima, so that consecutive blocks do not wait for each other.
      __m512d lo = _mm512_set1_pd(kInf), lo2 = lo;
      const auto keep = [](__m512d& lo, __m512d x) { lo = x < lo ? x : lo; };
      int32_t b = 0;
      for (; b + 16 <= n; b += 16) keep(lo, relax_block(b)), keep(lo2, relax_block(b + 8));
      if (b + 8 <= n) keep(lo, relax_block(b)), b += 8;
      if (b < n) keep(lo2, relax_block(n - 8));
      keep(lo, lo2);
      // The lanes hold no NaN: any order of minima gives the lowest value.
      __m512d t = __builtin_shufflevector(lo, lo, 4, 5, 6, 7, 0, 1, 2, 3);
      lo = t < lo ? t : lo;
      t = __builtin_shufflevector(lo, lo, 2, 3, 0, 1, 6, 7, 4, 5);
      lo = t < lo ? t : lo;
      t = __builtin_shufflevector(lo, lo, 1, 0, 3, 2, 5, 4, 7, 6);
      lo = t < lo ? t : lo;
      return lo[0];
    }
#endif
    // Otherwise the compiler vectorises relax over each block.
    __m256d lo0 = _mm256_set1_pd(kInf), lo1 = lo0;
    const auto relax_block = [&](int32_t b) {
      // relax(j) touches the state of column j only: no dependence between iterations.
#pragma GCC unroll 1
#pragma GCC ivdep
      for (int32_t l = 0; l < 8; ++l) relax(b + l);
      lo0 = _mm256_min_pd(_mm256_loadu_pd(val + b), lo0);
      lo1 = _mm256_min_pd(_mm256_loadu_pd(val + b + 4), lo1);
    };
    for (int32_t b = 0; b + 8 <= n; b += 8) relax_block(b);
    if (n % 8 != 0) relax_block(n - 8);
    alignas(32) double lanes[8];
    _mm256_store_pd(lanes, lo0);
    _mm256_store_pd(lanes + 4, lo1);
    double lowest = kInf;
    for (double x : lanes) lowest = x < lowest ? x : lowest;
    return lowest;
  }

#if defined(__AVX512F__)
  LSA_HOT static __m512d load8(const double* p) { return _mm512_loadu_pd(p); }
  LSA_HOT static __m512d load8(const float* p) {
    return _mm512_maskz_cvtps_pd(0xff, _mm256_loadu_ps(p));  // _mm512_cvtps_pd: see above
  }
#endif
#endif
};

class SimulatedTeam {
 public:
  static constexpr int kWarp = 32;

  explicit SimulatedTeam(int lanes) : size(lanes), partial_(lanes), next_(lanes) {
    if (lanes < 2 || lanes > 1024 || (lanes & (lanes - 1)) != 0)
      throw std::invalid_argument("simulated team: lanes must be a power of two in [2, 1024]");
  }

  const int size;
  bool leader() const { return true; }  // lanes run one after another: lane 0's writes suffice
  void sync() const {}

  // Lane l takes k = l, l + size, ...
  template <class F>
  void for_each(int32_t n, F&& f) const {
    for (int lane = 0; lane < size; ++lane)
      for (int32_t k = lane; k < n; k += size) f(k);
  }

  // Lane l takes the flat indices l, l + size, ... of a rows x cols block.
  template <class Pred>
  bool any(int32_t rows, int32_t cols, Pred&& pred) const {
    if (rows == 0 || cols == 0) return false;
    bool found = false;
    for (int lane = 0; lane < size; ++lane) {
      int64_t i = lane / cols, j = lane % cols;
      while (i < rows) {
        found = found || pred(int32_t(i), int32_t(j));
        j += size;
        while (j >= cols) { j -= cols; ++i; }
      }
    }
    return found;
  }

  // Lane l keeps the best key of k = l, l + size, ... (as a CUDA lane does), then
  // the lanes combine. A NaN value compares false: no candidate.
  template <class Relax>
  Key argmin(int32_t n, Relax&& relax, const double* val, const int32_t* rank) {
    for (int lane = 0; lane < size; ++lane) {
      Key best = Key::none();
      for (int32_t k = lane; k < n; k += size) {
        relax(k);
        if (val[k] <= best.value) best = min_key(best, Key{val[k], rank[k], k});
      }
      partial_[lane] = best;
    }
    warp_butterfly();
    if (size > kWarp) {
      // Lane 0 of warp w writes scratch[w]; after the barrier lane l of every warp
      // reads scratch[l] (none past the last warp) and butterflies again.
      const int warps = size / kWarp;
      std::vector<Key> scratch(warps);
      for (int w = 0; w < warps; ++w) scratch[w] = partial_[w * kWarp];
      for (int lane = 0; lane < size; ++lane) {
        const int l = lane % kWarp;
        partial_[lane] = l < warps ? scratch[l] : Key::none();
      }
      warp_butterfly();
    }
    for (int lane = 1; lane < size; ++lane)
      if (partial_[lane] < partial_[0] || partial_[0] < partial_[lane])
        throw std::logic_error("simulated team: lanes disagree after the reduction");
    return partial_[0];
  }

 private:
  // Every lane ends with the minimum of its warp, combined as
  // x = min_key(x, shfl_xor(x, offset)) for offset = 16, 8, 4, 2, 1.
  void warp_butterfly() {
    const int width = std::min(size, kWarp);
    for (int offset = width / 2; offset >= 1; offset /= 2) {
      for (int lane = 0; lane < size; ++lane) {
        const int base = lane - lane % width;
        next_[lane] = min_key(partial_[lane], partial_[base + ((lane % width) ^ offset)]);
      }
      partial_.swap(next_);
    }
  }

  std::vector<Key> partial_, next_;
};

}  // namespace lsa
