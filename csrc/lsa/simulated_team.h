// SimulatedTeam: `lanes` emulated lanes, reduced in the order the CUDA teams use (a
// __shfl_xor_sync butterfly inside each warp of 32, then the warp results through shared
// scratch and a second butterfly over as many lanes as there are warps). The tests run
// the solver with it to show that the result does not depend on the team, and run the
// CUDA kernels' per-item code on the host with it (tests/test_cuda.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "solver.h"

namespace lsa {

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
