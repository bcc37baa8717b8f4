// SequentialTeam's argmin with AVX2 and no AVX-512 (included by sequential_team.h), for a
// cost with contiguous rows: the two passes of argmin_avx512.h, eight columns as two
// vectors of four, the last block's lanes past n reading no cost and v = -inf.
//   * The scanned column's NaN is a plain store and the first step of a Dijkstra has code
//     of its own (First) at every width: masks cost more than they save where a 256-bit
//     operation is two 128-bit ones.
//   * v and shortest_path_costs are read and written as aligned vectors: they start on a
//     32-byte boundary (Workspace).
#pragma once

#include "sequential_team.h"

#if defined(__AVX2__) && !defined(__AVX512F__)
namespace lsa {

// (the scanned column's NaN is stored through relax.w)
template <bool First, class T, class Relax>
LSA_HOT Key SequentialTeam::argmin_rows(int32_t n, const T* row, const Workspace& w,
                                        const double* val, const int32_t* rank,
                                        int32_t /*scanned*/, const Relax& relax) const {
  const __m256d inf = _mm256_set1_pd(kInf);
  const __m256d min_val = _mm256_set1_pd(relax.min_val), ui = _mm256_set1_pd(relax.ui);
  // Four columns from b; `in` (a lane mask) says which lie inside the row, when `tail`.
  const auto relax4 = [&](int32_t b, bool tail = false, __m256i in = __m256i{}) LSA_HOT_LAMBDA {
    __m256d v = _mm256_load_pd(w.v + b);
    if (tail) v = _mm256_blendv_pd(-inf, v, _mm256_castsi256_pd(in));
    const __m256d r = ((min_val + load4(row + b, tail, in)) - ui) - v;
    // every column set outright on the first step (scipy's reset to +inf, then r);
    // later, r where it is lower (minpd returns its second operand, a NaN included,
    // unless the first is lower)
    const __m256d x = First ? r : _mm256_min_pd(r, _mm256_load_pd(w.shortest_path_costs + b));
    _mm256_store_pd(w.shortest_path_costs + b, x);
    return x;
  };
  const auto lower = [](__m256d x, __m256d lo) LSA_HOT_LAMBDA { return x < lo ? x : lo; };
  const int32_t full = n & ~7, tail = n & 7, groups = (n + 63) / 64;
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i in_lo = _mm256_cmpgt_epi64(_mm256_set1_epi64x(tail), lane);
  const __m256i in_hi = _mm256_cmpgt_epi64(_mm256_set1_epi64x(tail - 4), lane);

  // Pass 1, group by group (64 columns), with four running minima.
  if (n > 256) prefetch_row(row, n);
  if (relax.scanned >= 0) relax.w.shortest_path_costs[relax.scanned] = kNaN;
  double* const group_low = groups > 1 ? group_lows(4 * groups) : nullptr;
  __m256d lo = inf;
  for (int32_t g = 0, b = 0; g < groups; ++g) {
    __m256d x0 = inf, x1 = inf, x2 = inf, x3 = inf;
    const int32_t end = std::min(b + 64, full);
    for (; b + 16 <= end; b += 16) {
      x0 = lower(relax4(b), x0), x1 = lower(relax4(b + 4), x1);
      x2 = lower(relax4(b + 8), x2), x3 = lower(relax4(b + 12), x3);
    }
    if (b < end) x0 = lower(relax4(b), x0), x1 = lower(relax4(b + 4), x1), b += 8;
    if (tail && g == groups - 1) {
      x2 = lower(relax4(full, true, in_lo), x2), x3 = lower(relax4(full + 4, true, in_hi), x3);
    }
    const __m256d x = lower(lower(x0, x1), lower(x2, x3));
    if (groups > 1) _mm256_storeu_pd(group_low + 4 * g, x);
    lo = lower(x, lo);
  }
  lo = lower(_mm256_permute2f128_pd(lo, lo, 1), lo);
  lo = lower(_mm256_permute_pd(lo, 5), lo);
  if (lo[0] == kInf) return Key::none();

  // Pass 2, as with AVX-512. Keys are compared as signed 64-bit integers (both halves are
  // non-negative), four at a time, without a branch per column: columns at the lowest
  // value are many when costs are few distinct integers, and a loop over them
  // mispredicts its every exit.
  const auto at_lowest = [&](int32_t b) LSA_HOT_LAMBDA {
    return _mm256_cmp_pd(_mm256_loadu_pd(val + b), lo, _CMP_EQ_OQ);
  };
  const auto equal = [&](int32_t b) LSA_HOT_LAMBDA {
    return uint32_t(_mm256_movemask_pd(at_lowest(b)) | _mm256_movemask_pd(at_lowest(b + 4)) << 4);
  };
  const auto min64 = [](__m256i a, __m256i b) LSA_HOT_LAMBDA {
    return _mm256_blendv_epi8(a, b, _mm256_cmpgt_epi64(a, b));
  };
  const __m256i none = _mm256_set1_epi64x(INT64_MAX);
  __m256i least = none;
  const auto take = [&](int32_t b) LSA_HOT_LAMBDA {
    for (int32_t q = b; q < b + 8; q += 4) {
      const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rank + q));
      const __m256i key = _mm256_or_si256(_mm256_slli_epi64(_mm256_cvtepu32_epi64(r), 32),
                                          _mm256_add_epi64(lane, _mm256_set1_epi64x(q)));
      least = min64(least, _mm256_blendv_epi8(none, key, _mm256_castpd_si256(at_lowest(q))));
    }
  };
  const auto reached = [&](int32_t g) LSA_HOT_LAMBDA {
    if (groups == 1) return true;
    const __m256d low = _mm256_loadu_pd(group_low + 4 * g);
    return _mm256_movemask_pd(_mm256_cmp_pd(low, lo, _CMP_EQ_OQ)) != 0;
  };
  if (const int32_t col = walk_groups(n, groups, equal, reached, take); col >= 0) {
    return Key{val[col], rank[col], col};
  }
  least = min64(least, _mm256_permute2x128_si256(least, least, 1));
  const int64_t key = std::min(_mm256_extract_epi64(least, 0), _mm256_extract_epi64(least, 1));
  const int32_t col = int32_t(key);
  return Key{val[col], int32_t(key >> 32), col};
}

LSA_HOT __m256d SequentialTeam::load4(const double* p, bool tail, __m256i in) {
  return tail ? _mm256_maskload_pd(p, in) : _mm256_loadu_pd(p);
}
LSA_HOT __m256d SequentialTeam::load4(const float* p, bool tail, __m256i in) {
  // the low half of each 64-bit lane of `in` as a 32-bit lane mask
  const __m256 in_ps = _mm256_castsi256_ps(in);
  const __m128i in32 = _mm_castps_si128(_mm_shuffle_ps(
      _mm256_castps256_ps128(in_ps), _mm256_extractf128_ps(in_ps, 1), 0x88));
  return _mm256_cvtps_pd(tail ? _mm_maskload_ps(p, in32) : _mm_loadu_ps(p));
}

}  // namespace lsa
#endif
