// The certified fast path for one square problem: Jonker and Volgenant's initialisation,
// shortest augmenting paths for the rows it leaves free, then a proof that the matching
// is the one scipy returns. docs/solver.md gives the argument and the bound.
//
//   R. Jonker, A. Volgenant, "A shortest augmenting path algorithm for dense and sparse
//   linear assignment problems", Computing 38, 1987, pp. 325-340.
//
// The matching differs from scipy's only where the optimum is not unique. certify()
// proves that it is unique by more than any rounding error of either solver: every
// alternating cycle (another assignment differs from this one by a union of them) must
// use an edge whose reduced cost exceeds tau. Where the proof fails the caller solves the
// problem again in scipy's order (solver.h), so the indices are scipy's either way.
//
// CPU only. The loops go through GCC's vector extensions, one register of doubles at a
// time (as wide as -march offers).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "solver.h"

namespace lsa {

namespace jv {

// One native vector of doubles: eight lanes with AVX-512, four with AVX, two otherwise.
// (Vectors wider than the registers lower to spills, several times slower.)
#if defined(__AVX512F__)
constexpr int kW = 8;
#elif defined(__AVX__)
constexpr int kW = 4;
#else
constexpr int kW = 2;
#endif
typedef double V __attribute__((vector_size(8 * kW)));
typedef int64_t M __attribute__((vector_size(8 * kW)));  // lane masks of a V comparison
typedef float F __attribute__((vector_size(4 * kW)));

template <class T>
inline V load(const T* p) {
  if constexpr (sizeof(T) == 4) {
    F f;
    std::memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, V);
  } else {
    V d;
    std::memcpy(&d, p, sizeof d);
    return d;
  }
}
inline void store(double* p, V x) { std::memcpy(p, &x, sizeof x); }
inline V splat(double x) { return V{} + x; }
inline V lanes() {
  V x;
  for (int l = 0; l < kW; ++l) x[l] = l;
  return x;
}

// Bit l set where lane l of a is at most lane l of b. (Straight from the compare: a mask
// vector stored and reloaded in halves would stall on store forwarding.)
inline uint32_t le_bits(V a, V b) {
#if defined(__AVX512F__)
  return _mm512_cmp_pd_mask(__m512d(a), __m512d(b), _CMP_LE_OQ);
#elif defined(__AVX__)
  return _mm256_movemask_pd(_mm256_cmp_pd(__m256d(a), __m256d(b), _CMP_LE_OQ));
#else
  uint32_t bits = 0;
  for (int l = 0; l < kW; ++l) bits |= uint32_t(a[l] <= b[l]) << l;
  return bits;
#endif
}

// Every lane of x set to the least of them.
template <int S, size_t... L>
inline V spread_min(V x, std::index_sequence<L...> lanes) {
  const V t = __builtin_shufflevector(x, x, int(L ^ S)...);
  x = t < x ? t : x;
  if constexpr (S > 1) {
    return spread_min<S / 2>(x, lanes);
  } else {
    return x;
  }
}
inline V spread_min(V x) { return spread_min<kW / 2>(x, std::make_index_sequence<kW>()); }

// The least lane of x, and the lowest column holding it among the lanes' columns j.
inline double least(V x, V j, int32_t& column) {
  const V m = spread_min(x);
  column = int32_t(spread_min(x == m ? j : splat(kInf))[0]);
  return m[0];
}

// The two least values of a row of reduced costs c[i][j] - v[j] and their columns, ties
// to the lower column (so that no result depends on the vector width).
struct Top2 {
  double m1 = kInf, m2 = kInf;
  int32_t j1 = -1, j2 = -1;
  void insert(double x, int32_t j) {  // j above every column seen so far
    if (x < m1) {
      m2 = m1, j2 = j1, m1 = x, j1 = j;
    } else if (x < m2) {
      m2 = x, j2 = j;
    }
  }
};

template <class T>
Top2 top2(const T* row, const double* v, int32_t m) {
  V m1 = splat(kInf), m2 = m1, j1 = splat(-1), j2 = j1, jv = lanes();
  int32_t j = 0;
  for (; j + kW <= m; j += kW, jv += kW) {
    const V x = load(row + j) - load(v + j);
    const M lt1 = x < m1, lt2 = x < m2;
    m2 = lt1 ? m1 : (lt2 ? x : m2);
    j2 = lt1 ? j1 : (lt2 ? jv : j2);
    m1 = lt1 ? x : m1;
    j1 = lt1 ? jv : j1;
  }
  // Each lane holds the two least of its columns (column % kW == lane), ties to the
  // earlier: the least of all, then the least once its lane gives up its first.
  Top2 t;
  t.m1 = least(m1, j1, t.j1);
  const M first = j1 == splat(t.j1);
  t.m2 = least(first ? m2 : m1, first ? j2 : j1, t.j2);
  for (; j < m; ++j) t.insert(double(row[j]) - v[j], j);
  return t;
}

}  // namespace jv

// Scratch of the certificate, kept by each thread between items.
struct Certifier {
  struct Edge {
    int32_t from, to;  // a candidate tight edge, as rows of the row graph
    double slack;      // its reduced cost
  };
  std::vector<Edge> edges;
  std::vector<int32_t> head, next, indegree, queue;
};

// Jonker-Volgenant's initialisation of an n x n problem (n >= 2): column reduction,
// reduction transfer, then two passes of augmenting row reduction. Leaves in w a partial
// matching with duals such that every matched row's column is a least entry of its
// reduced costs c[i][j] - v[j], and u[i] = c[i][col4row[i]] - v[col4row[i]] (0 for free
// rows): a warm start for solve(). Returns max |c|, or +inf if an entry is not finite (the
// caller then takes scipy's order, which reports it).
template <class Cost>
double jv_initialise(const Cost& cost, int32_t n, Workspace w) {
  using jv::V;
  using jv::M;
  double* v = w.v;
  double* arg = w.scanned_costs;  // per column: the row of its least entry (as a double)
  int32_t* matches = w.rank;      // per row: the columns whose least entry it holds
  int32_t* free_rows = w.remaining;
  for (int32_t j = 0; j < n; ++j) v[j] = kInf, arg[j] = -1;
  for (int32_t i = 0; i < n; ++i) w.col4row[i] = -1, matches[i] = 0, w.u[i] = 0;

  // Column reduction, row by row (the matrix is stored by rows); checks every entry.
  V amax = jv::splat(0);
  M bad = M{};
  double amax_tail = 0;
  bool bad_tail = false;
  for (int32_t i = 0; i < n; ++i) {
    const auto* row = cost.row(i);
    const V iv = jv::splat(i);
    int32_t j = 0;
    for (; j + jv::kW <= n; j += jv::kW) {
      const V x = jv::load(row + j), vj = jv::load(v + j);
      const M lt = x < vj;
      jv::store(v + j, lt ? x : vj);
      jv::store(arg + j, lt ? iv : jv::load(arg + j));
      const V ax = x < 0 ? -x : x;
      amax = ax > amax ? ax : amax;
      bad |= x != x;
    }
    for (; j < n; ++j) {
      const double x = double(row[j]);
      if (x < v[j]) v[j] = x, arg[j] = i;
      amax_tail = std::max(amax_tail, std::fabs(x));
      bad_tail |= x != x;
    }
  }
  double cmax = amax_tail;
  for (int l = 0; l < jv::kW; ++l) cmax = std::max(cmax, amax[l]), bad_tail |= bad[l] != 0;
  if (bad_tail || !(cmax < kInf)) return kInf;

  // Each column to the row of its least entry, last columns first, unless that row is
  // already taken.
  for (int32_t j = n - 1; j >= 0; --j) {
    const int32_t i = int32_t(arg[j]);
    w.row4col[j] = -1;
    if (matches[i]++ == 0) w.row4col[j] = i, w.col4row[i] = j;
  }

  // Reduction transfer: a row that took one column makes it dearer for the others, by
  // as much as the row's next best column costs it.
  int32_t num_free = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (matches[i] == 0) {
      free_rows[num_free++] = i;
    } else if (matches[i] == 1) {
      const int32_t j1 = w.col4row[i];
      const jv::Top2 t = jv::top2(cost.row(i), v, n);
      v[j1] -= t.j1 == j1 ? t.m2 : t.m1;
    }
  }

  // Augmenting row reduction: each free row takes its best column, lowering that
  // column's dual until the row's second best ties it; a row it displaces is free again,
  // taken next if the dual dropped, else in the next pass. Ties make this an auction
  // that can bid in ever smaller steps, so it stops after n bids: the rows still free
  // are left to the shortest augmenting paths.
  int64_t bids = 0;
  for (int pass = 0; pass < 2 && bids < int64_t(n); ++pass) {
    const int32_t listed = num_free;
    int32_t k = 0;
    num_free = 0;
    while (k < listed && bids++ < int64_t(n)) {
      const int32_t i = free_rows[k++];
      const jv::Top2 t = jv::top2(cost.row(i), v, n);
      int32_t j = t.j1, i0 = w.row4col[j];
      if (t.m1 < t.m2) {
        v[j] -= t.m2 - t.m1;
      } else if (i0 >= 0) {
        j = t.j2, i0 = w.row4col[j];
      }
      w.row4col[j] = i, w.col4row[i] = j;
      if (i0 >= 0) {
        w.col4row[i0] = -1;
        if (t.m1 < t.m2) {
          free_rows[--k] = i0;
        } else {
          free_rows[num_free++] = i0;
        }
      }
    }
  }
  for (int32_t i = 0; i < n; ++i) {
    const int32_t j = w.col4row[i];
    if (j >= 0) w.u[i] = double(cost.row(i)[j]) - v[j];
  }
  return cmax;
}

// Whether the matching w.col4row of an n x n problem with duals w.u, w.v is provably the
// one scipy returns (docs/solver.md): no alternating cycle of edges whose reduced cost is
// at most tau. `cmax` = max |c|.
template <class Cost>
bool certify(const Cost& cost, int32_t n, const Workspace& w, double cmax, Certifier& c) {
  constexpr double unit = 0x1p-53;
  double umax = 0, vmax = 0;
  for (int32_t i = 0; i < n; ++i) umax = std::max(umax, std::fabs(w.u[i]));
  for (int32_t j = 0; j < n; ++j) vmax = std::max(vmax, std::fabs(w.v[j]));
  if (!(umax < kInf && vmax < kInf)) return false;
  const double dn = n;
  const double delta = 3 * unit * (cmax + umax + vmax);  // error of one computed reduced cost
  const double scipy_gap = 64 * dn * (dn + 2) * unit * cmax;
  // Our own duals' violations (negative reduced costs, matched edges off zero) may add up
  // to `own` before the proof gives up; a first pass collects every edge that could be
  // tight for any violations up to that.
  const double own = 8 * dn * unit * (cmax + umax + vmax);
  const double tau_max = scipy_gap + delta + dn * (2 * own + 2 * delta);
  const size_t cap = 8 * size_t(n) + 64;  // more candidates: the proof fails fast

  if (c.edges.size() < cap + jv::kW) c.edges.resize(cap + jv::kW);  // room to pass cap once
  size_t edges = 0;
  jv::V rmin = jv::splat(kInf);
  double rmin_tail = kInf, off_zero = 0;
  const jv::V hi = jv::splat(tau_max);
  for (int32_t i = 0; i < n; ++i) {
    const auto* row = cost.row(i);
    const double ui = w.u[i];
    const int32_t mine = w.col4row[i];
    const auto reduced = [&](int32_t j) { return (double(row[j]) - ui) - w.v[j]; };
    const auto candidate = [&](int32_t j) {
      if (j != mine) c.edges[edges++] = {i, w.row4col[j], reduced(j)};
    };
    int32_t j = 0;
    for (; j + jv::kW <= n; j += jv::kW) {
      const jv::V r = (jv::load(row + j) - ui) - jv::load(w.v + j);
      rmin = r < rmin ? r : rmin;
      if (uint32_t tight = jv::le_bits(r, hi)) {
        for (; tight; tight &= tight - 1) candidate(j + __builtin_ctz(tight));
        if (edges > cap) return false;
      }
    }
    for (; j < n; ++j) {
      const double r = reduced(j);
      rmin_tail = std::min(rmin_tail, r);
      if (r <= tau_max) candidate(j);
    }
    if (edges > cap) return false;
    off_zero = std::max(off_zero, std::fabs(reduced(mine)));
  }
  for (int l = 0; l < jv::kW; ++l) rmin_tail = std::min(rmin_tail, rmin[l]);
  const double below = std::max(0.0, -rmin_tail);
  if (below > own || off_zero > own) return false;
  const double tau = scipy_gap + delta + dn * (below + off_zero + 2 * delta);

  // The tight edges as a graph on rows: i -> the row matched to column j. An alternating
  // cycle is a directed cycle; Kahn's algorithm removes every row iff there is none.
  c.head.assign(n, -1), c.next.assign(edges, -1), c.indegree.assign(n, 0);
  for (size_t e = 0; e < edges; ++e) {
    if (c.edges[e].slack > tau) continue;
    c.next[e] = c.head[c.edges[e].from], c.head[c.edges[e].from] = int32_t(e);
    ++c.indegree[c.edges[e].to];
  }
  c.queue.clear();
  for (int32_t i = 0; i < n; ++i)
    if (c.indegree[i] == 0) c.queue.push_back(i);
  for (size_t q = 0; q < c.queue.size(); ++q)
    for (int32_t e = c.head[c.queue[q]]; e >= 0; e = c.next[e])
      if (--c.indegree[c.edges[e].to] == 0) c.queue.push_back(c.edges[e].to);
  return c.queue.size() == size_t(n);
}

// Whether the first and last rows each hold their least entry more than once: costs
// with few distinct values (integers, quantised scores), whose optimum is rarely unique,
// so that the proof would fail after the fast path's work. A few microseconds.
template <class Cost>
bool likely_ties(const Cost& cost, int32_t n) {
  const auto repeated_min = [&](int32_t i) {
    const auto* row = cost.row(i);
    double least = kInf;
    int32_t count = 0;
    for (int32_t j = 0; j < n; ++j) {
      const double x = double(row[j]);
      count = x < least ? 1 : count + (x == least);
      least = std::min(least, x);
    }
    return count > 1;
  };
  return repeated_min(0) && repeated_min(n - 1);
}

// Solves an n x n problem (n >= 2) on the fast path: returns kOk with scipy's matching
// and this solver's duals in w when the result is certified, else -1.
template <class Team, class Cost>
int32_t solve_certified(Team& team, const Cost& cost, int32_t n, Workspace w, Certifier& c) {
  const double cmax = jv_initialise(cost, n, w);
  if (!(cmax < kInf)) return -1;
  if (solve(team, cost, n, n, w, true, true) != kOk) return -1;
  return certify(cost, n, w, cmax, c) ? kOk : -1;
}

}  // namespace lsa
