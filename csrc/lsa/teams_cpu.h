// CPU teams for lsa::solve.
//
// SequentialTeam: one lane; the production CPU path.
// SimulatedTeam:  `lanes` emulated lanes, reduced in the order the CUDA teams use
//                 (a __shfl_xor_sync butterfly inside each warp of 32, then the warp
//                 results through shared scratch and a second butterfly). Used by the
//                 tests to show that the result does not depend on the team.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "solver.h"

namespace lsa {

struct SequentialTeam {
  static constexpr int size = 1;
  bool leader() const { return true; }
  void sync() const {}

  template <class F>
  void for_each(int32_t n, F&& f) const {
    for (int32_t k = 0; k < n; ++k) f(k);
  }

  template <class Pred>
  bool any(int32_t rows, int32_t cols, Pred&& pred) const {
    for (int32_t i = 0; i < rows; ++i)
      for (int32_t j = 0; j < cols; ++j)
        if (pred(i, j)) return true;
    return false;
  }

  template <class F>
  Key argmin(int32_t n, F&& key_of) const {
    Key best = Key::none();
    for (int32_t it = 0; it < n; ++it) best = min_key(best, key_of(it));
    return best;
  }
};

class SimulatedTeam {
 public:
  static constexpr int kWarp = 32;

  explicit SimulatedTeam(int lanes) : size(lanes), partial_(lanes), next_(lanes) {
    if (lanes < 2 || lanes > 1024 || (lanes & (lanes - 1)) != 0)
      throw std::invalid_argument("simulated team: lanes must be a power of two in [2, 1024]");
  }

  const int size;
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
        found = found || pred(int32_t(i), int32_t(j));
        j += size;
        while (j >= cols) { j -= cols; ++i; }
      }
    }
    return found;
  }

  template <class F>
  Key argmin(int32_t n, F&& key_of) {
    for (int lane = 0; lane < size; ++lane) {
      Key best = Key::none();
      for (int32_t it = lane; it < n; it += size) best = min_key(best, key_of(it));
      partial_[lane] = best;
    }
    warp_butterfly();
    if (size > kWarp) {
      // Lane 0 of warp w writes scratch[w]; after the barrier lane l of every warp
      // reads scratch[l] (none past the last warp) and butterflies again.
      const int warps = size / kWarp;
      std::vector<Key> scratch(warps);
      for (int w = 0; w < warps; ++w) scratch[w] = partial_[w * kWarp];
      for (int lane = 0; lane < size; ++lane) {
        const int l = lane % kWarp;
        partial_[lane] = l < warps ? scratch[l] : Key::none();
      }
      warp_butterfly();
    }
    for (int lane = 1; lane < size; ++lane)
      if (partial_[lane] < partial_[0] || partial_[0] < partial_[lane])
        throw std::logic_error("simulated team: lanes disagree after the reduction");
    return partial_[0];
  }

 private:
  // Every lane ends with the minimum of its warp, combined as
  // x = min_key(x, shfl_xor(x, offset)) for offset = 16, 8, 4, 2, 1.
  void warp_butterfly() {
    const int width = std::min(size, kWarp);
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
