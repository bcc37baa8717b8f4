// SequentialTeam: one lane solves one problem; the production CPU path (see solver.h for
// the team interface).
//
// Its argmin is the solver's hot loop, written once per instruction set; this class
// declares the kernels and the headers included at the bottom define them:
//   argmin_generic.h  the scalar argmin (any build; costs without contiguous rows), and
//                     the parts both vector kernels share;
//   argmin_avx512.h   AVX-512: eight columns as one vector;
//   argmin_avx2.h     AVX2 without AVX-512: eight columns as two vectors of four.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "solver.h"

// The team's loops, and the lambdas inside them (LSA_HOT_LAMBDA), are always inlined: the
// compiler's size heuristics may otherwise call a lambda once per block of eight columns,
// which costs more than the block (tests/test_build.py checks the built module for such
// a call).
#define LSA_HOT inline __attribute__((always_inline))
#define LSA_HOT_LAMBDA __attribute__((always_inline))

namespace lsa {

struct alignas(64) CacheLine {
  double x[8];
};

class SequentialTeam {
 public:
  static constexpr int size = 1;
  static constexpr bool records_path = false;  // the vector kernels leave path entries out
  static constexpr bool checks_in_relax = false;
#if defined(__AVX512F__)
  static constexpr int32_t kFirstMasked = 64;  // argmin_avx512.h
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
      // outright), except with AVX-512 up to kFirstMasked columns, where a mask does it
      // for less than the branch costs. The vector code sees columns [0, n): every
      // pointer shifted by `from`, and the column found shifted back.
      const int32_t n = to - from, scanned = relax.scanned - from;
      const auto* row = relax.cost.row(relax.i) + from;
      Workspace w = relax.w;
      w.v += from, w.shortest_path_costs += from, val += from, rank += from;
      Key best = relax.first && n > kFirstMasked
                     ? argmin_rows<true>(n, row, w, val, rank, scanned, relax)
                     : argmin_rows<false>(n, row, w, val, rank, scanned, relax);
      if (best.col >= 0) best.col += from;
      return best;
    }
#endif
    return argmin_generic(from, to, relax, val, rank);
  }

  // Room for m columns, so that argmin allocates nothing.
  void reserve(int32_t m) {
#if defined(__AVX2__)
    group_lows(8 * ((m + 63) / 64 + 1));
#endif
    (void)m;
  }

 private:
  // argmin_generic.h
  template <class Relax>
  LSA_HOT static Key argmin_generic(int32_t from, int32_t to, const Relax& relax,
                                    const double* val, const int32_t* rank);
#if defined(__AVX2__)
  template <class T>
  LSA_HOT static void prefetch_row(const T* row, int32_t n);
  template <class Equal, class Reached, class Take>
  LSA_HOT static int32_t walk_groups(int32_t n, int32_t groups, const Equal& equal,
                                     const Reached& reached, const Take& take);

  // argmin_avx512.h or argmin_avx2.h: the argmin of columns [0, n) of a cost with
  // contiguous rows, `row` being row relax.i; row, w, val, rank and scanned as
  // argmin_range shifted them, relax for the rest.
  template <bool First, class T, class Relax>
  LSA_HOT Key argmin_rows(int32_t n, const T* row, const Workspace& w, const double* val,
                          const int32_t* rank, int32_t scanned, const Relax& relax) const;
#if defined(__AVX512F__)
  LSA_HOT static __m512d load8(const double* p, __mmask8 in);
  LSA_HOT static __m512d load8(const float* p, __mmask8 in);
#else
  LSA_HOT static __m256d load4(const double* p, bool tail, __m256i in);
  LSA_HOT static __m256d load4(const float* p, bool tail, __m256i in);
#endif

  // Pass 1's lowest value of each lane, per group of 64 columns, in whole cache lines of
  // their own (the two threads of a PairTeam write theirs every step).
  mutable std::vector<CacheLine> group_low_;
  LSA_HOT double* group_lows(int32_t size) const {
    if (int64_t(group_low_.size()) * 8 < size) group_low_.resize((size + 7) / 8);
    return group_low_.data()->x;
  }
#endif
};

}  // namespace lsa

#include "argmin_generic.h"
#if defined(__AVX512F__)
#include "argmin_avx512.h"
#elif defined(__AVX2__)
#include "argmin_avx2.h"
#endif
