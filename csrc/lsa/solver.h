// The rectangular linear sum assignment solver, written once for every "team".
//
// Algorithm: the shortest augmenting path method of
//   D. F. Crouse, "On implementing 2D rectangular assignment algorithms",
//   IEEE Transactions on Aerospace and Electronic Systems 52(4), 2016, pp. 1679-1696,
// in the form scipy >= 1.9 uses (scipy/optimize/rectangular_lsap/rectangular_lsap.cpp),
// so that the matching is index-identical to scipy.optimize.linear_sum_assignment, ties
// included. Names are scipy's where scipy has one (snake_case: shortestPathCosts is
// shortest_path_costs, minVal min_val, curRow cur_row). The details that decide ties are
// kept exactly:
//   * reduced costs ((min_val + c[i][j]) - u[i]) - v[j], in float64, in that order;
//   * the scan list `remaining` starts reversed (remaining[it] = m-1-it) and a picked
//     column is swap-removed;
//   * among the columns at the minimum, the last unmatched one in scan order wins, else
//     the first one in scan order.
//
// A team is the group of lanes that solves one problem together: one thread on the CPU, a
// warp or a block on the GPU. The body below only uses
//   size, records_path, checks_in_relax, leader(), sync(), for_each(n, f),
//   any(rows, cols, pred), argmin(n, relax, values, ranks)
// where
//   * any(rows, cols, pred) calls pred(i, j) on every entry (no early exit, so pred may
//     stage the entry as it checks it) and tells whether one returned true;
//   * argmin(n, relax, values, ranks) calls relax(k) for every k, which updates values[k]
//     (NaN marks a k that is no candidate; calling it again for the same k changes
//     nothing, so a team may), then all-reduces the keys (values[k], ranks[k], k);
//   * a team whose records_path is false may leave out relax's path entries: the solver
//     finds them again (find_path);
//   * a team whose checks_in_relax is true relaxes through Relax itself, which then
//     checks a row's entries on the first step of its Dijkstra.
// The Key's tie rank is unique per column, so the keys are strictly totally ordered and
// every reduction order (a sequential scan, a warp butterfly, a block of warps) returns
// the same column. Every lane runs the scalar code redundantly; only the leader writes
// shared state, between syncs.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define LSA_HD __host__ __device__ __forceinline__
#else
#define LSA_HD inline
#endif

namespace lsa {

constexpr double kInf = __builtin_huge_val();
constexpr double kNaN = __builtin_nan("");

// kBadSizes: the item's sizes lie outside the padded problem (CUDA only: the CPU path
// checks sizes on the host and raises).
enum Status : int32_t { kOk = 0, kInfeasible = 1, kInvalid = 2, kBadSizes = 3 };

// One candidate column of a Dijkstra step. Smaller is better.
struct Key {
  double value;  // shortest path cost to the column
  int32_t tie;   // unique per column: unmatched columns first, latest scan position first;
                 // then matched columns, earliest scan position first
  int32_t col;

  LSA_HD static Key none() { return Key{kInf, 0x7fffffff, -1}; }
  LSA_HD bool operator<(const Key& o) const {
    return value < o.value || (value == o.value && tie < o.tie);
  }
};

LSA_HD Key min_key(const Key& a, const Key& b) { return b < a ? b : a; }

// c ? a : b, computed with bit masks on the host: compilers turn a plain conditional in
// the relax loop ("store back what was loaded") into branches around masked stores,
// which mispredict.
template <class T>
LSA_HD T select(bool c, T a, T b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  Bits x, y;
  std::memcpy(&x, &a, sizeof(T));
  std::memcpy(&y, &b, sizeof(T));
  const Bits mask = Bits(0) - Bits(c);
  const Bits z = (x & mask) | (y & ~mask);
  T out;
  std::memcpy(&out, &z, sizeof(T));
  return out;
#endif
}

// The tie rank of the column at scan position `it` (scipy's loop index into `remaining`)
// of a problem with `m` columns, and back: the scan position that a tie rank stands for.
LSA_HD int32_t tie_rank(int32_t it, bool unmatched, int32_t m) {
  return unmatched ? m - 1 - it : m + it;
}
LSA_HD int32_t scan_position(int32_t rank, int32_t m) {
  return rank < m ? m - 1 - rank : rank - m;
}

// Per-problem state: u[n], col4row[n]; v[m], shortest_path_costs[m], scanned_costs[m],
// path[m], row4col[m], remaining[m], vacated[m], rank[m]. scipy's sets SC and SR are
// implicit: the scanned columns (SC) are the tail of `remaining`, the rows visited (SR)
// cur_row and those matched to the scanned columns. (The CPU's sequential team also
// needs room for m rounded up to 8 in v, shortest_path_costs and rank, which it reads and
// writes eight columns at a time, and v and shortest_path_costs on 32-byte boundaries.)
struct Workspace {
  double* u;
  double* v;
  double* shortest_path_costs;  // to each column in the current Dijkstra; NaN once scanned
  double* scanned_costs;  // [p], p in [num_remaining, m): the path cost of column
                          // remaining[p] when it was scanned
  int32_t* col4row;
  int32_t* row4col;
  int32_t* path;       // the row each column was reached from (scratch between Dijkstras)
  int32_t* remaining;  // [it], it < num_remaining: the column at scan position it;
                       // [num_remaining, m): the scanned columns, latest first
  int32_t* vacated;    // [p], p in [num_remaining, m): the scan position that column
                       // remaining[p] left
  int32_t* rank;  // the tie rank of each column not yet scanned (so also its position in
                  // `remaining`)
};

// The relaxation of one Dijkstra step: the edges of row i, on top of the path cost
// min_val to row i. relax(j) sets column j's path cost to the reduced cost
// ((min_val + c[i][j]) - u[i]) - v[j] where that is lower, and its path entry to i.
//   * A scanned column's cost is NaN: it compares false and stays. The column the step
//     before scanned turns NaN here, in the lane that relaxes it: a store between the
//     steps would hold up the next step's loads.
//   * The first step of a Dijkstra (min_val 0) sets every column outright: scipy's reset
//     to +inf, then a relaxation that wins wherever the edge is finite. (A column left at
//     +inf keeps a stale path entry, never read: it cannot be picked while feasible.)
//   * With `check` (first step, entries not yet checked), a NaN or -inf entry gives the
//     path cost -inf, which no valid entry gives (u[i] is 0 and v[j] <= 0 there): the
//     step's minimum tells that the row is invalid.
//   * relax(j) is load(j) then apply(j, edge): a lane of a GPU team issues the loads of
//     several of its columns before it waits for the first.
template <class Cost>
struct Relax {
  Cost cost;
  Workspace w;
  double min_val, ui;  // ui = u[i]
  int32_t i;
  int32_t scanned;  // the column the step before scanned, -1 for none: its path cost becomes NaN
  bool first, check;

  struct Edge {
    double c, v, s;  // c[i][j], v[j], the path cost before this step
  };
  LSA_HD Edge load(int32_t j) const { return {cost(i, j), w.v[j], w.shortest_path_costs[j]}; }

  // Returns column j's new path cost.
  LSA_HD double apply(int32_t j, const Edge& e) const {
    double r = ((min_val + e.c) - ui) - e.v;
    if (first) {
      if (check && !(e.c > -kInf)) r = -kInf;
      w.shortest_path_costs[j] = r;
      w.path[j] = i;
      return r;
    }
    const double s = j == scanned ? kNaN : e.s;
    const bool better = r < s;
    w.shortest_path_costs[j] = select(better, r, s);
#if defined(__CUDA_ARCH__)
    if (better) w.path[j] = i;  // a predicated store, no load
#else
    w.path[j] = select(better, i, w.path[j]);
#endif
    return better ? r : s;
  }

  LSA_HD void operator()(int32_t j) const { apply(j, load(j)); }
};

// The path entries of the columns on the augmenting path that ends at `sink`, found
// after the Dijkstra from cur_row (for a team whose relaxation does not record them):
// column j's entry is the first row, in the order the Dijkstra visited rows, whose
// relaxation reached j's path cost at the time j was scanned. A relaxation lowers a path
// cost only where it is strictly lower, so the first row to reach the final value is the
// one that set it; the reduced cost is computed as Relax computes it, so the values
// compare exactly. Row k of the Dijkstra (k >= 1) is the row matched to the column
// scanned at step k - 1, remaining[m - k], reached at path cost scanned_costs[m - k];
// row 0 is cur_row, at 0. The walk goes back from the sink through the rows' matched
// columns, which were scanned ever earlier: one pass over the scanned columns finds
// each one's position.
template <class Cost>
LSA_HD void find_path(const Cost& cost, int32_t m, Workspace w, int32_t cur_row, int32_t sink,
                      int32_t num_remaining) {
  int32_t j = sink, p = num_remaining;
  while (true) {
    while (w.remaining[p] != j) ++p;
    const int32_t steps = m - 1 - p;  // j was scanned at this step
    int32_t i = cur_row;
    for (int32_t k = 0; k < steps; ++k) {
      const double min_val = k == 0 ? 0.0 : w.scanned_costs[m - k];
      if (((min_val + cost(i, j)) - w.u[i]) - w.v[j] == w.scanned_costs[p]) break;
      i = w.row4col[w.remaining[m - 1 - k]];
    }
    w.path[j] = i;
    if (i == cur_row) return;
    j = w.col4row[i];
  }
}

// Solves min sum c(i, col4row[i]) for an n x m problem with n <= m, `cost(i, j)` returning
// the entry as a double (already negated for maximisation). Returns kOk with w.col4row,
// w.u, w.v filled; kInvalid if an entry is NaN or -inf; kInfeasible if no matching of
// finite cost exists. `entries_checked`: the caller has already made sure that no entry
// is NaN or -inf (the CPU kernel does as it copies an item), so the solver skips its own
// pass over them. `warm`: w already holds a partial matching with feasible duals (u, v,
// col4row, row4col; certified.h), and only its free rows are augmented.
//
// Outline, as in scipy (steps 2 to 8 for each row cur_row in turn):
//   1. u = v = 0, every row and column free, the scan list in its starting order.
//   2. The row's entries checked for NaN and -inf (kInvalid).
//   3. Dijkstra from cur_row over the columns (scipy's augmenting_path): each step
//      relaxes the row reached last and removes the column of least path cost from the
//      scan list; a free column is the sink, a matched one leads on to its row.
//   4. A Dijkstra of one step, to a free column: match it, and on to the next row.
//   5. The path entries found again, for a team that does not record them.
//   6. The duals of the rows and columns the Dijkstra visited updated.
//   7. The matching augmented along the path back from the sink.
//   8. The scan list restored to its starting order.
template <class Team, class Cost>
LSA_HD int32_t solve(Team& team, const Cost& cost, int32_t n, int32_t m, Workspace w,
                     bool entries_checked = false, bool warm = false) {
  // Whether rows [from, to) hold an invalid entry: NaN and -inf are exactly the entries
  // that are not above -inf.
  const auto invalid = [&](int32_t from, int32_t to) {
    return !entries_checked && team.any(to - from, m, [&](int32_t i, int32_t j) {
      return !(cost(from + i, j) > -kInf);
    });
  };
  const bool check_in_relax = Team::checks_in_relax && !entries_checked;
  // Scan position `it` as the starting order has it: column m-1-it (reversed, so that a
  // constant matrix gives the identity), with its tie rank.
  const auto restore = [w, m](int32_t it) {
    const int32_t j = m - 1 - it;
    w.remaining[it] = j;
    w.rank[j] = tie_rank(it, w.row4col[j] < 0, m);
  };

  // 1. (With every column free, the starting order gives column j the tie rank j.)
  if (warm) {
    team.for_each(m, restore);
  } else {
    team.for_each(n, [&](int32_t i) { w.u[i] = 0.0; w.col4row[i] = -1; });
    team.for_each(m, [&](int32_t j) {
      w.v[j] = 0.0, w.row4col[j] = -1;
      w.remaining[j] = m - 1 - j, w.rank[j] = j;
    });
  }
  team.sync();

  for (int32_t cur_row = 0; cur_row < n; ++cur_row) {
    if (warm && w.col4row[cur_row] >= 0) continue;
    // 2. Row cur_row only, as its Dijkstra begins (in the first relaxation where the team
    // relaxes through Relax): no earlier step reads it, the rows visited so far being
    // matched ones. The later rows are checked only if the problem turns out infeasible,
    // since an invalid entry outranks infeasibility (scipy checks the whole matrix first).
    if (!Team::checks_in_relax && invalid(cur_row, cur_row + 1)) return kInvalid;

    // 3. Each step relaxes every column in storage order, not the scan list in scan
    // order: contiguous, so a team of lanes reads coalesced and one CPU thread
    // vectorises. The scan order survives where it matters, in the tie rank.
    double min_val = 0.0;
    int32_t i = cur_row, num_remaining = m, sink = -1, scanned = -1;
    for (bool first = true; sink < 0; first = false) {
      const Relax<Cost> relax{cost, w, min_val, w.u[i], i, scanned, first, first && check_in_relax};
      const Key best = team.argmin(m, relax, w.shortest_path_costs, w.rank);
      min_val = best.value;
      if (min_val == -kInf) return kInvalid;  // (only a check in the relaxation gives -inf)
      if (min_val == kInf) return invalid(cur_row + 1, n) ? kInvalid : kInfeasible;
      const int32_t j = best.col;
      if (first && w.row4col[j] < 0) {  // step 4
        sink = j;
        break;
      }
      if (w.row4col[j] < 0) {
        sink = j;
      } else {
        i = w.row4col[j];
      }
      // Swap-remove j from the scan list, keeping it at the tail with its path cost and
      // the position it left.
      if (team.leader()) {
        const int32_t it = scan_position(w.rank[j], m), last = w.remaining[num_remaining - 1];
        w.remaining[it] = last;
        w.rank[last] = tie_rank(it, w.row4col[last] < 0, m);
        w.remaining[num_remaining - 1] = j;
        w.scanned_costs[num_remaining - 1] = min_val;
        w.vacated[num_remaining - 1] = it;
      }
      scanned = j;
      --num_remaining;
      team.sync();
    }

    // 4. The common case while many columns are free. Steps 5 to 8 reduce to a few
    // stores: the sink's path cost is min_val, so its dual does not change, and the scan
    // list was not touched; the sink, now matched, takes the tie rank of a matched column
    // at its position.
    if (num_remaining == m) {
      team.sync();  // (every lane has read row4col[sink] before the leader writes it)
      if (team.leader()) {
        w.u[cur_row] += min_val;
        w.row4col[sink] = cur_row;
        w.col4row[cur_row] = sink;
        w.rank[sink] = tie_rank(m - 1 - sink, false, m);
      }
      team.sync();
      continue;
    }

    // 5.
    if constexpr (!Team::records_path) {
      if (team.leader()) find_path(cost, m, w, cur_row, sink, num_remaining);
      team.sync();
    }

    // 6. The rows visited (SR) are cur_row and the rows matched to the scanned columns
    // (SC) other than the sink; each is reached through its matched column.
    if (team.leader()) w.u[cur_row] += min_val;
    team.for_each(m - num_remaining, [&](int32_t k) {
      const int32_t j = w.remaining[num_remaining + k];
      const double d = min_val - w.scanned_costs[num_remaining + k];
      if (j != sink) w.u[w.row4col[j]] += d;
      w.v[j] -= d;
    });
    team.sync();

    // 7.
    if (team.leader()) {
      int32_t j = sink;
      while (true) {
        const int32_t r = w.path[j];
        w.row4col[j] = r;
        const int32_t prev = w.col4row[r];
        w.col4row[r] = j;
        j = prev;
        if (r == cur_row) break;
      }
    }
    team.sync();

    // 8. Only the positions this Dijkstra touched differ from the starting order: the
    // tail [num_remaining, m) and the positions the scanned columns left. Their columns
    // get their tie ranks with this row's matching (the sink is now matched); no other
    // column's status changed.
    team.for_each(m - num_remaining, [&](int32_t k) {
      restore(num_remaining + k);
      restore(w.vacated[num_remaining + k]);
    });
    team.sync();
  }
  return kOk;
}

}  // namespace lsa
