// SequentialTeam's argmin where no instruction set decides (included by
// sequential_team.h): the scalar argmin, and the parts that the AVX-512 and AVX2 kernels
// share.
#pragma once

#include "sequential_team.h"

namespace lsa {

// Two passes: relax every column and keep the lowest path cost, then the least key
// among the columns at it (a scanned column's NaN is never lower, nor equal).
template <class Relax>
LSA_HOT Key SequentialTeam::argmin_generic(int32_t from, int32_t to, const Relax& relax,
                                           const double* val, const int32_t* rank) {
  double lowest = kInf;
  for (int32_t k = from; k < to; ++k) {
    relax(k);
    lowest = val[k] < lowest ? val[k] : lowest;
  }
  Key best = Key::none();
  if (lowest == kInf) return best;
  for (int32_t k = from; k < to; ++k)
    if (val[k] == lowest) best = min_key(best, Key{val[k], rank[k], k});
  return best;
}

#if defined(__AVX2__)
// A long row is rarely in the cache (the matching decides which row comes next): ask for
// all of its lines at once, into L2, rather than wait for the hardware prefetcher to
// find the stream.
template <class T>
LSA_HOT void SequentialTeam::prefetch_row(const T* row, int32_t n) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(row + n);
  for (uintptr_t a = reinterpret_cast<uintptr_t>(row) & ~uintptr_t(63); a < end; a += 64)
    _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T1);
}

// Pass 2's walk, for both vector widths: group by group (one group up to 64 columns),
// the groups whose minima reached the lowest value. equal(b) is the 8-bit mask of the
// columns of block b at the lowest value, reached(g) whether group g's minima reached
// it, take(b) adds those columns' keys. Returns the column when a single one is at the
// lowest value (the common case: no ranks read), else -1 after taking every column
// that is.
template <class Equal, class Reached, class Take>
LSA_HOT int32_t SequentialTeam::walk_groups(int32_t n, int32_t groups, const Equal& equal,
                                            const Reached& reached, const Take& take) {
  const auto group_end = [n](int32_t g) LSA_HOT_LAMBDA { return std::min(64 * g + 64, n); };
  int32_t g = 0;
  while (!reached(g)) ++g;
  uint64_t bits = 0;  // the columns of group g at the lowest value
  for (int32_t b = 64 * g; b < group_end(g); b += 8) bits |= uint64_t(equal(b)) << (b - 64 * g);
  int32_t next = g + 1;
  while (next < groups && !reached(next)) ++next;
  if (next == groups && (bits & (bits - 1)) == 0) return 64 * g + __builtin_ctzll(bits);
  for (int32_t b = 64 * g; b < group_end(g); b += 8) take(b);
  for (; next < groups; ++next) {
    if (!reached(next)) continue;
    for (int32_t b = 64 * next; b < group_end(next); b += 8) take(b);
  }
  return -1;
}
#endif

}  // namespace lsa
