// CPU kernels of maskformer_fast::lsa and maskformer_fast::lsa_duals: batch items in
// parallel (at::parallel_for's threads take them a few at a time), one sequential team
// per item.
//
// An item is read in place when it can be: a float32 or float64 cost whose rows are
// contiguous, not transposed, not negated. Otherwise it is copied once into a per-thread
// buffer (oriented_copy.h): oriented so that rows <= cols (transposed when m < n, as scipy
// does), negated for maximisation, as float32 when every value of the input dtype is a
// float32, else as float64. The solver converts each entry to float64 as it reads it;
// both conversions are exact.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "certified.h"
#include "oriented_copy.h"
#include "pair_team.h"
#include "sequential_team.h"
#include "simulated_team.h"
#include "status.h"

namespace maskformer_fast {
namespace {

using at::Tensor;

struct Item {
  int64_t n, m;    // as given
  bool transpose;  // solve the m x n problem
  int64_t offset;  // of the item's first column (col_splits), else 0
  int32_t rows() const { return int32_t(transpose ? m : n); }
  int32_t cols() const { return int32_t(transpose ? n : m); }
};

// The oriented cost of one item: entry (i, j) is data[i * ld + j].
template <typename T>
struct DenseCost {
  const T* data;
  int64_t ld;
  double operator()(int32_t i, int32_t j) const { return double(data[i * ld + j]); }
  const T* row(int32_t i) const { return data + i * ld; }
};

// The entries as they would be stored, if that is how they are: read them in place.
template <typename T, typename S>
const T* as_stored(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return p;
  } else {
    return nullptr;
  }
}

// Per-thread scratch, grown to the largest item once. Every array starts on a 64-byte
// boundary, and so does every row of a copied item (its leading dimension rounded up to
// 16 floats or 8 doubles): the sequential team reads and writes them 64 bytes at a time,
// and a vector that straddles two cache lines costs two.
template <typename T>
struct Scratch {
  std::vector<char> cost, state;
  lsa::SequentialTeam team;
  lsa::Certifier certifier;

  static int64_t lines(int64_t bytes) { return (bytes + 63) / 64 * 64; }
  static char* aligned(std::vector<char>& buffer, int64_t bytes) {
    buffer.resize(bytes + 64);
    return buffer.data() + (-reinterpret_cast<uintptr_t>(buffer.data()) & 63);
  }
  // Room for an n x m item with leading dimension ld(m).
  static int64_t ld(int64_t m) { return lines(m * int64_t(sizeof(T))) / int64_t(sizeof(T)); }
  T* item(int64_t n, int64_t m) {
    return reinterpret_cast<T*>(aligned(cost, n * ld(m) * int64_t(sizeof(T))));
  }

  lsa::Workspace workspace(int64_t n, int64_t m) {
    char* p = aligned(state, lines(8 * n) + lines(4 * n) + 3 * lines(8 * m) + 5 * lines(4 * m));
    const auto take = [&p](int64_t bytes) {
      char* q = p;
      p += lines(bytes);
      return q;
    };
    lsa::Workspace w;
    w.u = reinterpret_cast<double*>(take(8 * n));
    w.col4row = reinterpret_cast<int32_t*>(take(4 * n));
    for (double** a : {&w.v, &w.shortest_path_costs, &w.scanned_costs})
      *a = reinterpret_cast<double*>(take(8 * m));
    for (int32_t** a : {&w.row4col, &w.path, &w.remaining, &w.vacated, &w.rank})
      *a = reinterpret_cast<int32_t*>(take(4 * m));
    return w;
  }
};

std::vector<Item> read_items(const Tensor& cost, const std::optional<Tensor>& sizes,
                             const std::optional<Tensor>& col_splits) {
  TORCH_CHECK_VALUE(cost.dim() == 3, "lsa: expected a [B, N, M] cost tensor, got ", cost.dim(),
                    " dimensions");
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  TORCH_CHECK_VALUE(N < std::numeric_limits<int32_t>::max() && M < std::numeric_limits<int32_t>::max(),
                    "lsa: each side of a problem must be below 2**31, got ", N, " x ", M);
  for (const auto* t : {&sizes, &col_splits}) {
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device() == cost.device(), "lsa: ",
                      t == &sizes ? "sizes" : "col_splits", " must be on the cost's device (",
                      cost.device(), "), got ", (**t).device());
  }
  std::vector<Item> items(B);
  if (col_splits.has_value()) {
    TORCH_CHECK_VALUE(!sizes.has_value(), "lsa: give sizes or col_splits, not both");
    const Tensor& s = *col_splits;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kLong, "lsa: col_splits must be int64, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == B, "col_splits must have one entry per batch item (",
                      B, "), got shape ", s.sizes());
    const auto acc = s.accessor<int64_t, 1>();
    int64_t offset = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t m = acc[b];
      TORCH_CHECK_VALUE(m >= 0, "col_splits[", b, "] = ", m, " is negative");
      TORCH_CHECK_VALUE(m <= M - offset, "col_splits sum to more than the cost's ", M,
                        " columns (from batch item ", b, ")");
      items[b] = Item{N, m, m < N, offset};
      offset += m;
    }
    TORCH_CHECK_VALUE(offset == M, "col_splits sum to ", offset, ", but the cost has ", M,
                      " columns");
    return items;
  }
  if (!sizes.has_value()) {
    for (auto& it : items) it = Item{N, M, M < N, 0};
    return items;
  }
  const Tensor& s = *sizes;
  TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == B && s.size(1) == 2,
                    "lsa: sizes must have shape [B, 2] = [", B, ", 2], got ", s.sizes());
  TORCH_CHECK_TYPE(s.scalar_type() == at::kLong, "lsa: sizes must be int64, got ", s.scalar_type());
  const auto acc = s.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = acc[b][0], m = acc[b][1];
    TORCH_CHECK_VALUE(0 <= n && n <= N && 0 <= m && m <= M, "sizes[", b, "] = (", n, ", ", m,
                      ") is outside the padded problem [", N, ", ", M, "] (batch item ", b, ")");
    items[b] = Item{n, m, m < n, 0};
  }
  return items;
}

// A single item with at least this many columns (after orientation) is solved by two
// threads together (lsa::PairTeam) when two are free. Each step then costs one exchange
// between the cores and saves the relaxation of half the columns; below a few hundred
// columns the exchange costs more than it saves.
constexpr int32_t kPairCols = 512;

// A batch with fewer entries (all items together) than this is solved by one thread.
constexpr int64_t kParallelEntries = 16 * 1024;

// maskformer_fast::lsa's `method`.
enum Method : int64_t { kAuto = 0, kCertified = 1, kOrdered = 2 };

// Under kAuto, a square item with at least this many rows tries the certified path.
constexpr int32_t kCertifiedRows = 48;

// Whether an item of `n` rows and `m` columns, as oriented, tries the certified path.
template <class Cost>
bool try_certified(int64_t method, const Cost& cost, int32_t n, int32_t m) {
  if (method == kOrdered || n != m || n < 2) return false;
  return method == kCertified || (n >= kCertifiedRows && !lsa::likely_ties(cost, n));
}

// Solves every item; fills col4row [B, N] (-1 where unmatched), status [B], and,
// when `u_out` is defined, the duals u [B, N] and v [B, M] in the caller's orientation.
void solve_batch(const Tensor& cost, const std::vector<Item>& items, bool maximize, int64_t lanes,
                 int64_t method, Tensor& col4row, Tensor& status, Tensor* u_out, Tensor* v_out) {
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  int64_t* c4r = col4row.data_ptr<int64_t>();
  int32_t* st = status.data_ptr<int32_t>();
  double* uo = u_out ? u_out->data_ptr<double>() : nullptr;
  double* vo = v_out ? v_out->data_ptr<double>() : nullptr;
  // Items are handed out `grain` at a time to whichever thread is free (not split into
  // equal ranges up front): items differ in work, and a core busy with something else
  // (a data loader) then costs its share only. About 4096 entries a grab: enough to pay
  // for the grab, few enough that a ragged batch's uneven end stays short.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, N * M));
  const int64_t grabs = (B + grain - 1) / grain;
  std::atomic<int64_t> next{0};
  // A small batch is solved by the calling thread alone: a second thread saves little
  // there, and when its core is busy (a data loader) the join waits for the scheduler to
  // run it.
  int64_t entries = 0;
  for (const Item& it : items) entries += it.n * it.m;
  const int64_t threads = entries < kParallelEntries ? 1 : std::min(grabs, int64_t(at::get_num_threads()));

  // Item b's results, from its workspace.
  const auto finish = [&](int64_t b, int32_t result, const lsa::Workspace& w) {
    const Item& it = items[b];
    st[b] = result;
    if (result != lsa::kOk) return;
    int64_t* out = c4r + b * N;
    if (!it.transpose) {
      for (int32_t i = 0; i < it.rows(); ++i) out[i] = w.col4row[i];
    } else {
      for (int32_t i = 0; i < it.rows(); ++i) out[w.col4row[i]] = i;
    }
    if (uo) {
      const double* ur = it.transpose ? w.v : w.u;
      const double* vc = it.transpose ? w.u : w.v;
      for (int64_t r = 0; r < it.n; ++r) uo[b * N + r] = ur[r];
      for (int64_t c = 0; c < it.m; ++c) vo[b * M + c] = vc[c];
    }
  };

  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, cost.scalar_type(), "lsa_cpu", [&] {
    using T = lsa::Stored<scalar_t>;
    const scalar_t* base = cost.const_data_ptr<scalar_t>();
    const int64_t s0 = cost.stride(0), s1 = cost.stride(1), s2 = cost.stride(2);
    // Item b as the solver reads it: in place, or copied (oriented, negated) into
    // `scratch`; sets `valid` and `checked` (a copy checks its entries as it goes).
    const auto view_of = [&](int64_t b, Scratch<T>& scratch, bool& valid, bool& checked) {
      const Item& it = items[b];
      const scalar_t* item = base + b * s0 + it.offset * s2;
      DenseCost<T> view{nullptr, s1};
      if (!it.transpose && !maximize && s2 == 1) view.data = as_stored<T>(item);
      valid = true, checked = false;
      if (view.data == nullptr) {
        T* copy = scratch.item(it.rows(), it.cols());
        valid = lsa::load_oriented(item, s1, s2, it.rows(), it.cols(), it.transpose, maximize,
                                   copy, scratch.ld(it.cols()));
        checked = true;
        view = {copy, scratch.ld(it.cols())};
      }
      return view;
    };

#if AT_PARALLEL_OPENMP  // (another backend may run both halves on one thread, one after the other)
    if (B == 1 && lanes <= 1 && items[0].cols() >= kPairCols && at::get_num_threads() >= 2 &&
        !at::in_parallel_region()) {
      const int32_t n = items[0].rows(), m = items[0].cols();
      Scratch<T> shared, own[2];
      bool valid, checked;
      const DenseCost<T> view = view_of(0, shared, valid, checked);
      if (!valid) {
        finish(0, lsa::kInvalid, lsa::Workspace{});
        return;
      }
      const lsa::Workspace ws[2] = {own[0].workspace(n, m), own[1].workspace(n, m)};
      // Both members solve, each on its own workspace, from ws's state when `warm`.
      const auto pair_solve = [&](bool warm) {
        // Everything allocated before the threads start: a member that threw would leave
        // the other waiting for its keys.
        lsa::PairTeam::Exchange exchange;
        lsa::PairTeam teams[2] = {{exchange, 0, m}, {exchange, 1, m}};
        int32_t result = lsa::kInvalid;
        at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
          if (end - begin == 2) {  // one thread after all: alone
            result = lsa::solve(own[0].team, view, n, m, ws[0], checked || warm, warm);
            return;
          }
          const int32_t mine = lsa::solve(teams[begin], view, n, m, ws[begin], checked || warm, warm);
          if (begin == 0) result = mine;
        });
        return result;
      };
      if (try_certified(method, view, n, m)) {
        const double cmax = lsa::jv_initialise(view, n, ws[0]);
        if (cmax < lsa::kInf) {
          std::copy_n(ws[0].u, n, ws[1].u), std::copy_n(ws[0].col4row, n, ws[1].col4row);
          std::copy_n(ws[0].v, m, ws[1].v), std::copy_n(ws[0].row4col, m, ws[1].row4col);
          if (pair_solve(true) == lsa::kOk && lsa::certify(view, n, ws[0], cmax, own[0].certifier)) {
            finish(0, lsa::kOk, ws[0]);
            return;
          }
        }
      }
      finish(0, pair_solve(false), ws[0]);
      return;
    }
#endif

    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      // Kept by each thread between calls (no allocation, no zeroing per call), unless large.
      thread_local Scratch<T> scratch;
      for (int64_t begin; (begin = next.fetch_add(grain, std::memory_order_relaxed)) < B;) {
        for (int64_t b = begin; b < std::min(B, begin + grain); ++b) {
          bool valid, checked;
          const DenseCost<T> view = view_of(b, scratch, valid, checked);
          const int32_t n = items[b].rows(), m = items[b].cols();
          const lsa::Workspace w = scratch.workspace(n, m);
          int32_t result = lsa::kInvalid;
          if (valid && lanes <= 1) {
            result = -1;
            if (try_certified(method, view, n, m))
              result = lsa::solve_certified(scratch.team, view, n, w, scratch.certifier);
            if (result < 0) result = lsa::solve(scratch.team, view, n, m, w, checked);
          } else if (valid) {
            lsa::SimulatedTeam team{int(lanes)};
            result = lsa::solve(team, view, n, m, w, checked);
          }
          finish(b, result, w);
        }
      }
      if (scratch.cost.size() + scratch.state.size() > (size_t(4) << 20)) scratch = Scratch<T>();
    });
  });
}

std::tuple<Tensor, Tensor> lsa_cpu(const Tensor& cost, const std::optional<Tensor>& sizes,
                                   bool maximize, bool raise_errors,
                                   const std::optional<Tensor>& col_splits, int64_t method) {
  TORCH_CHECK_VALUE(method >= kAuto && method <= kOrdered,
                    "lsa: method must be 0 (auto), 1 (certified) or 2 (scipy's order), got ", method);
  const auto items = read_items(cost, sizes, col_splits);
  auto col4row = at::full({cost.size(0), cost.size(1)}, -1, cost.options().dtype(at::kLong));
  auto status = at::empty({cost.size(0)}, cost.options().dtype(at::kInt));
  solve_batch(cost, items, maximize, 1, method, col4row, status, nullptr, nullptr);
  if (raise_errors) raise_for_status(status.const_data_ptr<int32_t>(), status.size(0));
  return {col4row, status};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lsa_duals_cpu(const Tensor& cost,
                                                         const std::optional<Tensor>& sizes,
                                                         bool maximize, int64_t lanes,
                                                         const std::optional<Tensor>& col_splits,
                                                         int64_t method) {
  TORCH_CHECK_VALUE(lanes == 1 || (lanes >= 2 && lanes <= 1024 && (lanes & (lanes - 1)) == 0),
                    "lsa_duals: lanes must be 1 (sequential) or a power of two up to 1024, got ",
                    lanes);
  TORCH_CHECK_VALUE(method >= kAuto && method <= kOrdered,
                    "lsa_duals: method must be 0 (auto), 1 (certified) or 2 (scipy's order), got ", method);
  const auto items = read_items(cost, sizes, col_splits);
  auto opts = cost.options();
  auto col4row = at::full({cost.size(0), cost.size(1)}, -1, opts.dtype(at::kLong));
  auto status = at::empty({cost.size(0)}, opts.dtype(at::kInt));
  auto u = at::full({cost.size(0), cost.size(1)}, 0.0, opts.dtype(at::kDouble));
  auto v = at::full({cost.size(0), cost.size(2)}, 0.0, opts.dtype(at::kDouble));
  solve_batch(cost, items, maximize, lanes, method, col4row, status, &u, &v);
  return {col4row, status, u, v};
}

bool lsa_certificate_cpu(const Tensor& cost, const Tensor& col4row, const Tensor& u, const Tensor& v) {
  const int64_t n = cost.size(0);
  TORCH_CHECK_VALUE(cost.dim() == 2 && cost.size(1) == n && cost.scalar_type() == at::kDouble,
                    "lsa_certificate: expected a square float64 cost, got ", cost.sizes(), " ",
                    cost.scalar_type());
  TORCH_CHECK_VALUE(col4row.sizes() == at::IntArrayRef{n} && col4row.scalar_type() == at::kLong,
                    "lsa_certificate: col4row must be int64 [", n, "]");
  for (const Tensor* t : {&u, &v})
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef{n} && t->scalar_type() == at::kDouble,
                      "lsa_certificate: u and v must be float64 [", n, "]");
  const Tensor c = cost.contiguous(), uu = u.contiguous(), vv = v.contiguous();
  std::vector<int32_t> col(n), row(n, -1);
  const auto acc = col4row.accessor<int64_t, 1>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = acc[i];
    TORCH_CHECK_VALUE(0 <= j && j < n && row[j] < 0, "lsa_certificate: col4row is not a permutation");
    col[i] = int32_t(j), row[j] = int32_t(i);
  }
  lsa::Workspace w{};
  w.u = const_cast<double*>(uu.const_data_ptr<double>());
  w.v = const_cast<double*>(vv.const_data_ptr<double>());
  w.col4row = col.data(), w.row4col = row.data();
  const DenseCost<double> view{c.const_data_ptr<double>(), n};
  double cmax = 0;
  for (int64_t k = 0; k < n * n; ++k) {
    TORCH_CHECK_VALUE(std::isfinite(view.data[k]), "lsa_certificate: the cost must be finite");
    cmax = std::max(cmax, std::fabs(view.data[k]));
  }
  lsa::Certifier certifier;
  return lsa::certify(view, int32_t(n), w, cmax, certifier);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskformer_fast, CPU, m) {
  m.impl("lsa", &lsa_cpu);
  m.impl("lsa_duals", &lsa_duals_cpu);
  m.impl("lsa_certificate", &lsa_certificate_cpu);
}

}  // namespace maskformer_fast
