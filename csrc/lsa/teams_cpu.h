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

// The sequential team's loops are the solver's hot loops: inline them, and the lambdas
// inside them (LSA_HOT_LAMBDA), whatever the compiler's heuristics think of their size.
// In the extension, where the solver is instantiated for every dtype, GCC 12 stopped
// inlining the per-block lambda of argmin_rows and called it for every eight columns:
// a 2000 x 2000 problem took 1.6x as long as the same code in a small program
// (tests/test_build.py now checks the built module for such a call).
#define LSA_HOT inline __attribute__((always_inline))
#define LSA_HOT_LAMBDA __attribute__((always_inline))

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
#if defined(__AVX512F__)
    if constexpr (requires { relax.cost.row(relax.i); }) {
      // (A wide row's first step has code of its own, which sets every column outright;
      // with at most 64 columns the branch would cost more than the loads it saves.)
      return n > 64 && relax.first ? argmin_rows<true>(n, relax, val, rank)
                                   : argmin_rows<false>(n, relax, val, rank);
    }
#endif
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
  }

  // Pass 1: relaxes every column (the compiler vectorises relax over each block);
  // returns the lowest value.
  template <class Relax>
  LSA_HOT static double relax_blocks(int32_t n, const Relax& relax, const double* val) {
    __m256d lo0 = _mm256_set1_pd(kInf), lo1 = lo0;
    const auto relax_block = [&](int32_t b) LSA_HOT_LAMBDA {
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
  // AVX-512 and a cost with contiguous rows: the same two passes, eight columns as one
  // vector, with the operations of Relax::operator() (the same IEEE operations in the
  // same order, so the same bits) and one masked store of the path entries. Up to 64
  // columns, the scanned column's NaN is applied as its block is loaded, and the first
  // step of a Dijkstra relaxes against +inf (scipy's reset) in the same code as the
  // others (a code path of its own would cost a mispredicted branch in and out per
  // row, which at this size is most of a step). The last block is masked
  // instead of shifted (a load that straddles the block stored just before it waits
  // for that store to reach the cache): its lanes past n read no cost and v = -inf,
  // so their path cost is +inf and they never win. v, spc, path and rank need room
  // for n rounded up to 8 (Workspace). Pass 1 keeps the lowest values of each group of
  // 64 columns, so that pass 2 looks only at the groups that hold the lowest value.
  template <bool First, class Relax>
  LSA_HOT Key argmin_rows(int32_t n, const Relax& relax, const double* val,
                          const int32_t* rank) const {
    const auto* row = relax.cost.row(relax.i);
    const Workspace& w = relax.w;
    const __m256i i = _mm256_set1_epi32(relax.i);
    const __m512d inf = _mm512_set1_pd(kInf);
    // Up to 64 columns, a first step's columns start from +inf (`fresh`) and the scanned
    // column's is NaN (`gone`), as masks of each block; wider rows have neither here.
    const auto relax_block = [&](int32_t b, __mmask8 in, __mmask8 gone = 0,
                                 __mmask8 fresh = 0) LSA_HOT_LAMBDA {
      const __m512d v = _mm512_mask_loadu_pd(-inf, in, w.v + b);
      const __m512d r = ((relax.min_val + load8(row + b, in)) - relax.ui) - v;
      if constexpr (First) {  // every column set outright (scipy's reset to +inf, then r)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.path + b), i);
        _mm512_storeu_pd(w.spc + b, r);
        return r;
      }
      __m512d s = _mm512_mask_mov_pd(_mm512_loadu_pd(w.spc + b), fresh, inf);
      s = _mm512_mask_mov_pd(s, gone, _mm512_set1_pd(kNaN));
      _mm256_mask_storeu_epi32(w.path + b, _mm512_cmp_pd_mask(r, s, _CMP_LT_OQ), i);
      const __m512d x = r < s ? r : s;
      _mm512_storeu_pd(w.spc + b, x);
      return x;
    };
    // lower(x, lo): x where it is lower, else lo; a NaN x (a scanned column) never is.
    // Chains of these over blocks keep a NaN out of every running minimum.
    const auto lower = [](__m512d x, __m512d lo) LSA_HOT_LAMBDA { return x < lo ? x : lo; };
    const int32_t full = n & ~7;
    const __mmask8 tail = __mmask8((1u << (n & 7)) - 1);

    // Pass 1. A long row is rarely in the cache (the matching decides which row comes
    // next): ask for all of its lines at once, into L2, rather than wait for the hardware
    // prefetcher to find the stream (a third less time per step on random rows of a
    // 2000 x 2000 float32 problem, measured here).
    if (n > 256) {
      const uintptr_t end = reinterpret_cast<uintptr_t>(row + n);
      for (uintptr_t a = reinterpret_cast<uintptr_t>(row) & ~uintptr_t(63); a < end; a += 64)
        _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T1);
    }
    __m512d lo = inf;
    const int32_t groups = (n + 63) / 64;
    if (groups > 1) {
      // The scanned column's NaN as a plain store: among many blocks, the one that holds
      // it is rarely loaded soon enough to wait for the store.
      if (relax.scanned >= 0) w.spc[relax.scanned] = kNaN;
      if (int64_t(group_low_.size()) < 8 * groups) group_low_.resize(8 * groups);
      int32_t b = 0, g = 0;
      for (; b + 64 <= n; b += 64, ++g) {
        // Four running minima: consecutive blocks do not wait for each other.
        __m512d x0 = lower(relax_block(b, 0xff), inf), x1 = lower(relax_block(b + 8, 0xff), inf);
        __m512d x2 = lower(relax_block(b + 16, 0xff), inf);
        __m512d x3 = lower(relax_block(b + 24, 0xff), inf);
        x0 = lower(relax_block(b + 32, 0xff), x0), x1 = lower(relax_block(b + 40, 0xff), x1);
        x2 = lower(relax_block(b + 48, 0xff), x2), x3 = lower(relax_block(b + 56, 0xff), x3);
        const __m512d x = lower(lower(x0, x1), lower(x2, x3));
        _mm512_storeu_pd(group_low_.data() + 8 * g, x);
        lo = lower(x, lo);
      }
      if (b < n) {
        __m512d x = inf;
        for (; b < full; b += 8) x = lower(relax_block(b, 0xff), x);
        if (tail) x = lower(relax_block(full, tail), x);
        _mm512_storeu_pd(group_low_.data() + 8 * g, x);
        lo = lower(x, lo);
      }
    } else {
      // The scanned column's NaN as a mask of each block, applied as it is loaded.
      const uint64_t gone = relax.scanned >= 0 ? uint64_t(1) << relax.scanned : 0;
      const __mmask8 fresh = relax.first ? 0xff : 0;
      __m512d lo2 = inf;  // two running minima: consecutive blocks do not wait for each other
      int32_t b = 0;
      for (; b + 16 <= n; b += 16) {
        lo = lower(relax_block(b, 0xff, __mmask8(gone >> b), fresh), lo);
        lo2 = lower(relax_block(b + 8, 0xff, __mmask8(gone >> (b + 8)), fresh), lo2);
      }
      if (b < full) lo = lower(relax_block(b, 0xff, __mmask8(gone >> b), fresh), lo);
      if (tail) lo2 = lower(relax_block(full, tail, __mmask8(gone >> full), fresh), lo2);
      lo = lower(lo2, lo);
    }
    // The lanes hold no NaN: any order of minima gives the lowest value.
    __m512d t = __builtin_shufflevector(lo, lo, 4, 5, 6, 7, 0, 1, 2, 3);
    lo = lower(t, lo);
    t = __builtin_shufflevector(lo, lo, 2, 3, 0, 1, 6, 7, 4, 5);
    lo = lower(t, lo);
    t = __builtin_shufflevector(lo, lo, 1, 0, 3, 2, 5, 4, 7, 6);
    lo = lower(t, lo);
    if (lo[0] == kInf) return Key::none();

    // Pass 2. Each column as a 64-bit key, rank above column: the least key wins.
    const auto equal = [&](int32_t b) LSA_HOT_LAMBDA {
      return _mm512_cmp_pd_mask(_mm512_loadu_pd(val + b), lo, _CMP_EQ_OQ);
    };
    using Keys = int64_t __attribute__((vector_size(64)));
    using Ranks = int32_t __attribute__((vector_size(32)));
    Keys least = Keys{} + INT64_MAX;
    const auto take = [&](int32_t b, __mmask8 mask) LSA_HOT_LAMBDA {
      Ranks r;
      std::memcpy(&r, rank + b, sizeof r);
      const Keys key = __builtin_convertvector(r, Keys) << 32 | (Keys{0, 1, 2, 3, 4, 5, 6, 7} + b);
      least = Keys(_mm512_mask_min_epi64(__m512i(least), mask, __m512i(least), __m512i(key)));
    };
    // Group by group (one group up to 64 columns), the groups whose minima reached the
    // lowest value. A single column at the lowest value (the common case) wins without
    // looking at ranks; otherwise the least key among all of them does.
    const auto reached = [&](int32_t g) LSA_HOT_LAMBDA {
      if (groups == 1) return true;
      return _mm512_cmp_pd_mask(_mm512_loadu_pd(group_low_.data() + 8 * g), lo, _CMP_EQ_OQ) != 0;
    };
    const auto group_end = [n](int32_t g) LSA_HOT_LAMBDA { return std::min(64 * g + 64, n); };
    int32_t g = 0;
    while (!reached(g)) ++g;
    uint64_t bits = 0;  // the columns of group g at the lowest value
    for (int32_t b = 64 * g; b < group_end(g); b += 8) bits |= uint64_t(equal(b)) << (b - 64 * g);
    int32_t next = g + 1;
    while (next < groups && !reached(next)) ++next;
    if (next == groups && (bits & (bits - 1)) == 0) {
      const int32_t col = 64 * g + __builtin_ctzll(bits);
      return Key{val[col], rank[col], col};
    }
    for (int32_t b = 64 * g; b < group_end(g); b += 8) take(b, __mmask8(bits >> (b - 64 * g)));
    for (; next < groups; ++next) {
      if (!reached(next)) continue;
      for (int32_t b = 64 * next; b < group_end(next); b += 8) take(b, equal(b));
    }
    Keys k = __builtin_shufflevector(least, least, 4, 5, 6, 7, 0, 1, 2, 3);
    least = k < least ? k : least;
    k = __builtin_shufflevector(least, least, 2, 3, 0, 1, 6, 7, 4, 5);
    least = k < least ? k : least;
    k = __builtin_shufflevector(least, least, 1, 0, 3, 2, 5, 4, 7, 6);
    least = k < least ? k : least;
    const int32_t col = int32_t(least[0]);
    return Key{val[col], int32_t(least[0] >> 32), col};
  }

  // GCC 12's _mm512_cvtps_pd raises a false "maybe uninitialized" warning; the masked
  // form does not.
  LSA_HOT static __m512d load8(const double* p, __mmask8 in) {
    return _mm512_maskz_loadu_pd(in, p);
  }
  LSA_HOT static __m512d load8(const float* p, __mmask8 in) {
    return _mm512_maskz_cvtps_pd(0xff, _mm256_maskz_loadu_ps(in, p));
  }

  mutable std::vector<double> group_low_;  // pass 1's lowest value of each lane, per 64 columns
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
