// The CPU solver alone, one thread, no Python: for comparing two versions of csrc/lsa on
// identical problems (this machine's speed drifts too much for one run of each to tell).
//
//   g++ -O3 -march=native -fno-fast-math -ffp-contract=off -fno-trapping-math -std=c++20
//       -pthread -I csrc/lsa benchmarks/lsa_harness.cpp -o /tmp/lsa_new   (one line)
//   /tmp/lsa_new N M B REPS [INTEGERS [FILE]]
//
// solves B uniform float32 N x M problems (N <= M; integers in [0, 10) if INTEGERS is 1;
// read from FILE, B * N * M float32 in a row, if given as a sixth argument)
// REPS times and prints the best time, a hash of the assignments, the sum of the duals and
// a hash of their bits: two builds that agree on these found the same matchings with the
// same duals. Build the old version the same way from a checkout of it and run the two
// alternately.
// With LSA_PAIR=1 in the environment each item is solved by a lsa::PairTeam of two threads;
// with LSA_PAIR=K > 1, by two that part at step K. With LSA_CERTIFIED=1 a square item
// takes the certified path first (certified.h), scipy's order where its proof fails.
#include <bit>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include "certified.h"
#include "pair_team.h"
#include "sequential_team.h"

struct DenseCost {
  const float* data;
  int64_t ld;
  double operator()(int32_t i, int32_t j) const { return double(data[i * ld + j]); }
  const float* row(int32_t i) const { return data + i * ld; }
};

template <class T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <class U>
  Aligned(const Aligned<U>&) {}
  T* allocate(size_t k) { return static_cast<T*>(::operator new(k * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const Aligned&) const { return true; }
};

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s N M B REPS [INTEGERS]\n", argv[0]);
    return 2;
  }
  const int n = std::atoi(argv[1]), m = std::atoi(argv[2]), B = std::atoi(argv[3]);
  const int reps = std::atoi(argv[4]), integers = argc > 5 ? std::atoi(argv[5]) : 0;
  if (n < 1 || n > m || B < 1 || reps < 1) {
    std::fprintf(stderr, "need 1 <= N <= M, B >= 1, REPS >= 1\n");
    return 2;
  }
  const int64_t ld = (m + 15) / 16 * 16;  // rows on 64-byte boundaries, as the extension copies
  std::vector<float> data(size_t(B) * n * ld + 16);
  std::mt19937 gen(123);
  std::uniform_real_distribution<float> uniform(0, 1);
  for (auto& x : data) x = integers ? float(gen() % 10) : uniform(gen);
  if (argc > 6) {  // the problems from a file of B * N * M float32 (a tensor's .numpy().tofile())
    std::FILE* f = std::fopen(argv[6], "rb");
    for (int64_t r = 0; f && r < int64_t(B) * n; ++r)
      if (std::fread(data.data() + r * ld, sizeof(float), m, f) != size_t(m)) f = nullptr;
    if (!f) {
      std::fprintf(stderr, "cannot read %d x %d x %d float32 from %s\n", B, n, m, argv[6]);
      return 2;
    }
    std::fclose(f);
  }

  // Room for m rounded up to 8 in every column array, each on a 64-byte boundary
  // (lsa::Workspace), as the extension allocates them.
  struct State {
    std::vector<double, Aligned<double>> u, v, shortest_path_costs, scanned_costs;
    std::vector<int32_t, Aligned<int32_t>> col4row, row4col, path, remaining, vacated, rank;
    State(int n, int m)
        : u(n + 8), v(m + 8), shortest_path_costs(m + 8), scanned_costs(m + 8), col4row(n + 8),
          row4col(m + 8), path(m + 8), remaining(m + 8), vacated(m + 8), rank(m + 8) {}
    lsa::Workspace workspace() {
      return {.u = u.data(), .v = v.data(), .shortest_path_costs = shortest_path_costs.data(),
              .scanned_costs = scanned_costs.data(), .col4row = col4row.data(),
              .row4col = row4col.data(), .path = path.data(), .remaining = remaining.data(),
              .vacated = vacated.data(), .rank = rank.data()};
    }
  };
  State state(n, m), state1(n, m);  // state1: member 1's, in a pair team
  const lsa::Workspace w = state.workspace(), w1 = state1.workspace();
  lsa::SequentialTeam team;
  const char* pair = std::getenv("LSA_PAIR");
  const long pair_mode = pair ? std::atol(pair) : 0, part_at = pair_mode > 1 ? pair_mode : 0;
  const bool certified = std::getenv("LSA_CERTIFIED") && n == m && n >= 2;
  lsa::Certifier certifier;
  const auto solve = [&](const DenseCost& cost) -> int32_t {
    if (certified && lsa::solve_certified(team, cost, n, w, certifier) == lsa::kOk) return lsa::kOk;
    if (pair_mode < 1) return lsa::solve(team, cost, n, m, w);
    lsa::PairTeam::Exchange exchange;
    lsa::PairTeam first(exchange, 0, m, uint32_t(part_at)), second(exchange, 1, m, uint32_t(part_at));
    std::thread other([&] { lsa::solve(second, cost, n, m, w1); });
    const int32_t result = lsa::solve(first, cost, n, m, w);
    other.join();
    return result;
  };
  uint64_t hash = 0, dual_bits = 0;
  const auto mix = [&](double x) {
    uint64_t b;
    std::memcpy(&b, &x, sizeof b);
    dual_bits = std::rotl(dual_bits, 29) ^ b;  // a float's double has 29 low zero bits
  };
  double duals = 0, best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int b = 0; b < B; ++b) {
      if (solve(DenseCost{data.data() + size_t(b) * n * ld, ld}) != lsa::kOk) {
        std::fprintf(stderr, "item %d not solved\n", b);
        return 1;
      }
      if (r > 0) continue;
      for (int i = 0; i < n; ++i)
        hash = hash * 1000003 + uint64_t(w.col4row[i]), duals += w.u[i], mix(w.u[i]);
      for (int j = 0; j < m; ++j) duals += w.v[j], mix(w.v[j]);
    }
    const std::chrono::duration<double> t = std::chrono::steady_clock::now() - start;
    best = std::min(best, t.count());
  }
  std::printf("%dx%d B=%d best %.3f ms hash %016llx duals %.17g bits %016llx\n", n, m, B,
              best * 1e3, (unsigned long long)hash, duals, (unsigned long long)dual_bits);
}
