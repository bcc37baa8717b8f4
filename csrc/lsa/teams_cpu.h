// CPU teams for lsa::solve.
//
// SequentialTeam: one lane; the production CPU path.
// PairTeam:       two threads on one problem, each with a workspace of its own; the CPU
//                 path for a single wide problem when two threads are free.
// SimulatedTeam:  `lanes` emulated lanes, reduced in the order the CUDA teams use
//                 (a __shfl_xor_sync butterfly inside each warp of 32, then the warp
//                 results through shared scratch and a second butterfly over as many
//                 lanes as there are warps). Used by the
//                 tests to show that the result does not depend on the team.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
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

struct alignas(64) CacheLine {
  double x[8];
};

class SequentialTeam {
 public:
  static constexpr int size = 1;
  static constexpr bool records_path = false;  // the vector relaxations below leave it out
  static constexpr bool checks_in_relax = false;
#if defined(__AVX512F__)
  static constexpr int32_t kFirstMasked = 64;
#else
  static constexpr int32_t kFirstMasked = 0;
#endif
  bool leader() const { return true; }
  void sync() const {}

  template <class F>
  LSA_HOT void for_each(int32_t n, F&& f) const {
    for (int32_t k = 0; k < n; ++k) f(k);
  }

  template <class Pred>
  LSA_HOT bool any(int32_t rows, int32_t cols, Pred&& pred) const {
    int32_t found = 0;  // a count, no early exit: the compiler vectorises it
    for (int32_t i = 0; i < rows; ++i)
      for (int32_t j = 0; j < cols; ++j) found += pred(i, j);
    return found != 0;
  }

  template <class Relax>
  LSA_HOT Key argmin(int32_t n, const Relax& relax, const double* val, const int32_t* rank) const {
    return argmin_range(0, n, relax, val, rank);
  }

 protected:
  // argmin over the columns [from, to) only (from a multiple of 8).
  template <class Relax>
  LSA_HOT Key argmin_range(int32_t from, int32_t to, const Relax& relax, const double* val,
                           const int32_t* rank) const {
#if defined(__AVX2__)
    if constexpr (requires { relax.cost.row(relax.i); }) {
      // The first step of a Dijkstra has code of its own (it sets every column
      // outright), except with AVX-512 up to 64 columns, where a mask does it for less
      // than the branch costs.
      // The vector code sees columns [0, n): every pointer shifted by `from`, and the
      // column found shifted back.
      const int32_t n = to - from, scanned = relax.scanned - from;
      const auto* row = relax.cost.row(relax.i) + from;
      Workspace w = relax.w;
      w.v += from, w.spc += from, val += from, rank += from;
      Key best = relax.first && n > kFirstMasked
                     ? argmin_rows<true>(n, row, w, val, rank, scanned, relax)
                     : argmin_rows<false>(n, row, w, val, rank, scanned, relax);
      if (best.col >= 0) best.col += from;
      return best;
    }
#endif
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

 private:
#if defined(__AVX2__)
  // A long row is rarely in the cache (the matching decides which row comes next): ask
  // for all of its lines at once, into L2, rather than wait for the hardware prefetcher
  // to find the stream (a third less time per step on random rows of a 2000 x 2000
  // float32 problem, measured here).
  template <class T>
  LSA_HOT static void prefetch_row(const T* row, int32_t n) {
    const uintptr_t end = reinterpret_cast<uintptr_t>(row + n);
    for (uintptr_t a = reinterpret_cast<uintptr_t>(row) & ~uintptr_t(63); a < end; a += 64)
      _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T1);
  }

  // Pass 2's walk, for both vector widths: group by group (one group up to 64 columns),
  // the groups whose minima reached the lowest value. equal(b) is the 8-bit mask of the
  // columns of block b at the lowest value, reached(g) whether group g's minima reached
  // it, take(b) adds those columns' keys. Returns the column when a single one is
  // at the lowest value (the common case: no ranks read), else -1 after taking every
  // column that is.
  template <class Equal, class Reached, class Take>
  LSA_HOT static int32_t walk_groups(int32_t n, int32_t groups, const Equal& equal,
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

#if defined(__AVX512F__)
  // AVX-512 and a cost with contiguous rows: two passes, eight columns as one vector,
  // with the path-cost operations of Relax::operator() (the same IEEE operations in the
  // same order, so the same bits); no path entries (records_path is false). Up to 64
  // columns, the scanned column's NaN is applied as its block is loaded, and the first
  // step of a Dijkstra relaxes against +inf (scipy's reset) in the same code as the
  // others (a code path of its own would cost a mispredicted branch in and out per
  // row, which at this size is most of a step). The last block is masked
  // instead of shifted (a load that straddles the block stored just before it waits
  // for that store to reach the cache): its lanes past n read no cost and v = -inf,
  // so their path cost is +inf and they never win. v, spc and rank need room for n
  // rounded up to 8 (Workspace). Pass 1 keeps the lowest values of each group of 64
  // columns, so that pass 2 looks only at the groups that hold the lowest value.
  // (row, w, val, rank and scanned as argmin_range shifted them; relax for the rest)
  template <bool First, class T, class Relax>
  LSA_HOT Key argmin_rows(int32_t n, const T* row, const Workspace& w, const double* val,
                          const int32_t* rank, int32_t scanned, const Relax& relax) const {
    const __m512d inf = _mm512_set1_pd(kInf);
    // Up to 64 columns, a first step's columns start from +inf (`fresh`) and the scanned
    // column's is NaN (`gone`), as masks of each block; wider rows have neither here.
    const auto relax_block = [&](int32_t b, __mmask8 in, __mmask8 gone = 0,
                                 __mmask8 fresh = 0) LSA_HOT_LAMBDA {
      const __m512d v = _mm512_mask_loadu_pd(-inf, in, w.v + b);
      const __m512d r = ((relax.min_val + load8(row + b, in)) - relax.ui) - v;
      if constexpr (First) {  // every column set outright (scipy's reset to +inf, then r)
        _mm512_storeu_pd(w.spc + b, r);
        return r;
      }
      __m512d s = _mm512_mask_mov_pd(_mm512_loadu_pd(w.spc + b), fresh, inf);
      s = _mm512_mask_mov_pd(s, gone, _mm512_set1_pd(kNaN));
      const __m512d x = r < s ? r : s;
      _mm512_storeu_pd(w.spc + b, x);
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
      if (relax.scanned >= 0) relax.w.spc[relax.scanned] = kNaN;
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

  // GCC 12's _mm512_cvtps_pd raises a false "maybe uninitialized" warning; the masked
  // form does not.
  LSA_HOT static __m512d load8(const double* p, __mmask8 in) {
    return _mm512_maskz_loadu_pd(in, p);
  }
  LSA_HOT static __m512d load8(const float* p, __mmask8 in) {
    return _mm512_maskz_cvtps_pd(0xff, _mm256_maskz_loadu_ps(in, p));
  }

#elif defined(__AVX2__)
  // AVX2 without AVX-512: the same two passes, eight columns as two vectors of four.
  // The last block's lanes past n read no cost and v = -inf, as above. The scanned
  // column's NaN is a plain store and the first step of a Dijkstra has code of its own
  // (First) at every width: masks cost more than they save here (measured on a Zen 1,
  // where a 256-bit operation is two). v and spc are read and written as aligned
  // vectors: they start on a 32-byte boundary (Workspace).
  // (row, w, val and rank as argmin_range shifted them; relax for the rest; the scanned
  // column's NaN is stored through relax.w)
  template <bool First, class T, class Relax>
  LSA_HOT Key argmin_rows(int32_t n, const T* row, const Workspace& w, const double* val,
                          const int32_t* rank, int32_t /*scanned*/, const Relax& relax) const {
    const __m256d inf = _mm256_set1_pd(kInf);
    const __m256d min_val = _mm256_set1_pd(relax.min_val), ui = _mm256_set1_pd(relax.ui);
    // Four columns from b; `in` (a lane mask) says which lie inside the row, when `tail`.
    const auto relax4 = [&](int32_t b, bool tail = false,
                            __m256i in = __m256i{}) LSA_HOT_LAMBDA {
      __m256d v = _mm256_load_pd(w.v + b);
      if (tail) v = _mm256_blendv_pd(-inf, v, _mm256_castsi256_pd(in));
      const __m256d r = ((min_val + load4(row + b, tail, in)) - ui) - v;
      // every column set outright on the first step (scipy's reset to +inf, then r);
      // later, r where it is lower (minpd returns its second operand, a NaN included,
      // unless the first is lower)
      const __m256d x = First ? r : _mm256_min_pd(r, _mm256_load_pd(w.spc + b));
      _mm256_store_pd(w.spc + b, x);
      return x;
    };
    const auto lower = [](__m256d x, __m256d lo) LSA_HOT_LAMBDA { return x < lo ? x : lo; };
    const int32_t full = n & ~7, tail = n & 7, groups = (n + 63) / 64;
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i in_lo = _mm256_cmpgt_epi64(_mm256_set1_epi64x(tail), lane);
    const __m256i in_hi = _mm256_cmpgt_epi64(_mm256_set1_epi64x(tail - 4), lane);

    // Pass 1, group by group (64 columns), with four running minima.
    if (n > 256) prefetch_row(row, n);
    if (relax.scanned >= 0) relax.w.spc[relax.scanned] = kNaN;
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

    // Pass 2, as above. Keys are compared as signed 64-bit integers (both halves are
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

  LSA_HOT static __m256d load4(const double* p, bool tail, __m256i in) {
    return tail ? _mm256_maskload_pd(p, in) : _mm256_loadu_pd(p);
  }
  LSA_HOT static __m256d load4(const float* p, bool tail, __m256i in) {
    // the low half of each 64-bit lane of `in` as a 32-bit lane mask
    const __m128i in32 = _mm_castps_si128(_mm_shuffle_ps(
        _mm256_castps256_ps128(_mm256_castsi256_ps(in)), _mm256_extractf128_ps(_mm256_castsi256_ps(in), 1), 0x88));
    return _mm256_cvtps_pd(tail ? _mm_maskload_ps(p, in32) : _mm_loadu_ps(p));
  }
#endif
#if defined(__AVX2__)
  // Pass 1's lowest value of each lane, per group of 64 columns, in whole cache lines of
  // their own (the two threads of a PairTeam write theirs every step).
  mutable std::vector<CacheLine> group_low_;
  LSA_HOT double* group_lows(int32_t size) const {
    if (int64_t(group_low_.size()) * 8 < size) group_low_.resize((size + 7) / 8);
    return group_low_.data()->x;
  }
#endif

 protected:
  // Room for m columns, so that argmin allocates nothing.
  void reserve(int32_t m) {
#if defined(__AVX2__)
    group_lows(8 * ((m + 63) / 64 + 1));
#endif
    (void)m;
  }
};

// One of two threads that solve one problem together. Each runs the whole solver on a
// workspace of its own; only argmin (and the check of the entries) is shared: member 0
// relaxes the columns [0, split), member 1 [split, m), and the two swap their best
// keys, so that both pick the same column (the keys are totally ordered) and go on
// identically. The scalar work between relaxations (the scan list, the duals, the
// augmentation) is done twice, which costs less than handing its results over would.
//
// One swap a step: a key written to a cache line of one's own, the other's read once
// it carries this step's number. Each member writes two such lines, by step parity, so
// that a key is never overwritten before the other has read it (a member cannot be two
// steps ahead). Both threads must run at once (the caller's OpenMP team does that); a
// member waits for the other spinning a while, then asleep on the step number.
//
// Two threads only pay when both cores are free: a member that waits for the other
// longer than it works (the other core busy with a data loader, or a virtual machine's
// second core shared with another) votes to part, with its key. From the next Dijkstra
// on (only then is a member's workspace complete) member 0 goes on alone over every
// column, and member 1 stops (its argmin finds nothing: its solve ends as infeasible,
// a result nobody reads).
class alignas(64) PairTeam : public SequentialTeam {  // (its counts change every step:
                                                      // a cache line of its own)
 public:
  struct Exchange {
    struct alignas(64) Slot {
      std::atomic<uint32_t> step{0};
      Key key;
      bool part;  // this member's vote to part
    };
    Slot slot[2][2];  // [member][step parity]
  };

  // For a problem of m columns; part_at: for tests, a step at which this member votes to
  // part whatever the times.
  PairTeam(Exchange& exchange, int member, int32_t m, uint32_t part_at = 0)
      : exchange_(exchange), member_(member), split_((m / 2 + 63) / 64 * 64), part_at_(part_at) {
    reserve(m);
  }

  template <class Relax>
  Key argmin(int32_t n, const Relax& relax, const double* val, const int32_t* rank) {
    if (relax.first && parting_) alone_ = true;
    if (alone_) return member_ == 0 ? argmin_range(0, n, relax, val, rank) : Key::none();
    const int32_t split = std::min(split_, n);
    const Key mine = member_ == 0 ? argmin_range(0, split, relax, val, rank)
                                  : argmin_range(split, n, relax, val, rank);
    return min_key(mine, swap(mine));
  }

  // Each member looks at its own columns (the solver asks before a Dijkstra: parting
  // starts there too).
  template <class Pred>
  bool any(int32_t rows, int32_t cols, Pred&& pred) {
    if (parting_) alone_ = true;
    if (alone_) return member_ == 0 && SequentialTeam::any(rows, cols, pred);
    const int32_t split = std::min(split_, cols), from = member_ == 0 ? 0 : split;
    const bool found = SequentialTeam::any(rows, member_ == 0 ? split : cols - split,
                                           [&](int32_t i, int32_t j) { return pred(i, from + j); });
    return swap(Key{double(found), 0, 0}).value != 0 || found;
  }

 private:
  // Hands this member's key to the other and returns the other's.
  const Key& swap(const Key& mine) {
    const int64_t arrived = ticks();
    work_ += arrived - left_;
    ++step_;
    auto& out = exchange_.slot[member_][step_ & 1];
    out.key = mine;
    out.part = (part_at_ != 0 && step_ == part_at_) || ((step_ & 255) == 0 && wait_ > work_);
    if ((step_ & 255) == 0) work_ = wait_ = 0;  // (votes over the last 256 steps)
    out.step.store(step_, std::memory_order_release);
    out.step.notify_one();
    const auto& in = exchange_.slot[1 - member_][step_ & 1];
    for (int spins = 0;;) {
      const uint32_t seen = in.step.load(std::memory_order_acquire);
      if (seen == step_) break;
      if (spins < 4096) {
        ++spins;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        in.step.wait(seen, std::memory_order_acquire);
      }
    }
    parting_ = parting_ || out.part || in.part;
    left_ = ticks();
    wait_ += left_ - arrived;
    return in.key;
  }

  static int64_t ticks() {
#if defined(__x86_64__) || defined(__i386__)
    return int64_t(__builtin_ia32_rdtsc());
#else
    return std::chrono::steady_clock::now().time_since_epoch().count();
#endif
  }

  Exchange& exchange_;
  const int member_;
  const int32_t split_;  // on a group of 64 columns
  const uint32_t part_at_;
  uint32_t step_ = 0;
  int64_t left_ = ticks(), work_ = 0, wait_ = 0;  // when the last swap ended; since the last vote
  bool parting_ = false, alone_ = false;
};

class SimulatedTeam {
 public:
  static constexpr int kWarp = 32;

  explicit SimulatedTeam(int lanes) : size(lanes), partial_(lanes), next_(lanes) {
    if (lanes < 2 || lanes > 1024 || (lanes & (lanes - 1)) != 0)
      throw std::invalid_argument("simulated team: lanes must be a power of two in [2, 1024]");
  }

  const int size;
  static constexpr bool records_path = true;
  static constexpr bool checks_in_relax = true;
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
        found = pred(int32_t(i), int32_t(j)) || found;
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
    warp_butterfly(std::min(size, kWarp));
    if (size > kWarp) {
      // Lane 0 of warp w writes scratch[w]; after the barrier lane l of every warp reads
      // scratch[l % warps] and butterflies again over groups of `warps` lanes.
      const int warps = size / kWarp;
      std::vector<Key> scratch(warps);
      for (int w = 0; w < warps; ++w) scratch[w] = partial_[w * kWarp];
      for (int lane = 0; lane < size; ++lane) partial_[lane] = scratch[lane % warps];
      warp_butterfly(warps);
    }
    for (int lane = 1; lane < size; ++lane)
      if (partial_[lane] < partial_[0] || partial_[0] < partial_[lane])
        throw std::logic_error("simulated team: lanes disagree after the reduction");
    return partial_[0];
  }

 private:
  // Every lane ends with the minimum of its group of `width` lanes, combined as
  // x = min_key(x, shfl_xor(x, offset)) for offset = width / 2, ..., 2, 1.
  void warp_butterfly(int width) {
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
