// SequentialTeam's argmin with AVX-512 (included by sequential_team.h), for a cost with
// contiguous rows: two passes, eight columns as one vector, with the path-cost
// operations of Relax::operator() (the same IEEE operations in the same order, so the
// same bits); no path entries (records_path is false).
//   * Up to 64 columns, the scanned column's NaN is applied as its block is loaded, and
//     the first step of a Dijkstra relaxes against +inf (scipy's reset) in the same code
//     as the others: at this size a branch in and out per row costs more than the masks.
//   * The last block is masked, not shifted back: a load that straddles the block stored
//     just before it waits for that store. Its lanes past n read no cost and v = -inf, so
//     their path cost is +inf and they never win. v, shortest_path_costs and rank need room for n
//     rounded up to 8 (Workspace).
//   * Pass 1 keeps the lowest values of each group of 64 columns, so that pass 2 looks
//     only at the groups that hold the lowest value.
#pragma once

#include <cstring>

#include "sequential_team.h"

#if defined(__AVX512F__)
namespace lsa {

template <bool First, class T, class Relax>
LSA_HOT Key SequentialTeam::argmin_rows(int32_t n, const T* row, const Workspace& w,
                                        const double* val, const int32_t* rank, int32_t scanned,
                                        const Relax& relax) const {
  const __m512d inf = _mm512_set1_pd(kInf);
  // Up to 64 columns, a first step's columns start from +inf (`fresh`) and the scanned
  // column's is NaN (`gone`), as masks of each block; wider rows have neither here.
  const auto relax_block = [&](int32_t b, __mmask8 in, __mmask8 gone = 0,
                               __mmask8 fresh = 0) LSA_HOT_LAMBDA {
    const __m512d v = _mm512_mask_loadu_pd(-inf, in, w.v + b);
    const __m512d r = ((relax.min_val + load8(row + b, in)) - relax.ui) - v;
    if constexpr (First) {  // every column set outright (scipy's reset to +inf, then r)
      _mm512_storeu_pd(w.shortest_path_costs + b, r);
      return r;
    }
    __m512d s = _mm512_mask_mov_pd(_mm512_loadu_pd(w.shortest_path_costs + b), fresh, inf);
    s = _mm512_mask_mov_pd(s, gone, _mm512_set1_pd(kNaN));
    const __m512d x = r < s ? r : s;
    _mm512_storeu_pd(w.shortest_path_costs + b, x);
    return x;
  };
  // lower(x, lo): x where it is lower, else lo; a NaN x (a scanned column) never is.
  // Chains of these over blocks keep a NaN out of every running minimum.
  const auto lower = [](__m512d x, __m512d lo) LSA_HOT_LAMBDA { return x < lo ? x : lo; };
  const int32_t full = n & ~7;
  const __mmask8 tail = __mmask8((1u << (n & 7)) - 1);

  // Pass 1.
  if (n > 256) prefetch_row(row, n);
  __m512d lo = inf;
  const int32_t groups = (n + 63) / 64;
  double* const group_low = groups > 1 ? group_lows(8 * groups) : nullptr;
  if (groups > 1) {
    // The scanned column's NaN as a plain store: among many blocks, the one that holds
    // it is rarely loaded soon enough to wait for the store.
    if (relax.scanned >= 0) relax.w.shortest_path_costs[relax.scanned] = kNaN;
    int32_t b = 0, g = 0;
    for (; b + 64 <= n; b += 64, ++g) {
      // Four running minima: consecutive blocks do not wait for each other.
      __m512d x0 = lower(relax_block(b, 0xff), inf), x1 = lower(relax_block(b + 8, 0xff), inf);
      __m512d x2 = lower(relax_block(b + 16, 0xff), inf);
      __m512d x3 = lower(relax_block(b + 24, 0xff), inf);
      x0 = lower(relax_block(b + 32, 0xff), x0), x1 = lower(relax_block(b + 40, 0xff), x1);
      x2 = lower(relax_block(b + 48, 0xff), x2), x3 = lower(relax_block(b + 56, 0xff), x3);
      const __m512d x = lower(lower(x0, x1), lower(x2, x3));
      _mm512_storeu_pd(group_low + 8 * g, x);
      lo = lower(x, lo);
    }
    if (b < n) {
      __m512d x = inf;
      for (; b < full; b += 8) x = lower(relax_block(b, 0xff), x);
      if (tail) x = lower(relax_block(full, tail), x);
      _mm512_storeu_pd(group_low + 8 * g, x);
      lo = lower(x, lo);
    }
  } else {
    // The scanned column's NaN as a mask of each block, applied as it is loaded.
    const uint64_t gone = scanned >= 0 && scanned < n ? uint64_t(1) << scanned : 0;
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
  const auto take = [&](int32_t b) LSA_HOT_LAMBDA {
    const __mmask8 mask = equal(b);
    Ranks r;
    std::memcpy(&r, rank + b, sizeof r);
    const Keys key = __builtin_convertvector(r, Keys) << 32 | (Keys{0, 1, 2, 3, 4, 5, 6, 7} + b);
    least = Keys(_mm512_mask_min_epi64(__m512i(least), mask, __m512i(least), __m512i(key)));
  };
  // A single column at the lowest value wins without looking at ranks; otherwise the
  // least key among all of them does (walk_groups).
  const auto reached = [&](int32_t g) LSA_HOT_LAMBDA {
    if (groups == 1) return true;
    return _mm512_cmp_pd_mask(_mm512_loadu_pd(group_low + 8 * g), lo, _CMP_EQ_OQ) != 0;
  };
  if (const int32_t col = walk_groups(n, groups, equal, reached, take); col >= 0) {
    return Key{val[col], rank[col], col};
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

LSA_HOT __m512d SequentialTeam::load8(const double* p, __mmask8 in) {
  return _mm512_maskz_loadu_pd(in, p);
}
// The masked conversion: GCC warns (falsely) that the unmasked one's result may be used
// uninitialised.
LSA_HOT __m512d SequentialTeam::load8(const float* p, __mmask8 in) {
  return _mm512_maskz_cvtps_pd(0xff, _mm256_maskz_loadu_ps(in, p));
}

}  // namespace lsa
#endif
