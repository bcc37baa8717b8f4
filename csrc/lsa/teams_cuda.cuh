// CUDA teams for lsa::solve (see solver.h for the team interface).
//
// WarpTeam:  the 32 lanes of one warp solve one problem; __syncwarp is the barrier.
// BlockTeam: the whole block (64 to 512 threads, a power of two) solves one problem;
//            __syncthreads is the barrier.
//
// Both reduce exactly as lsa::SimulatedTeam (simulated_team.h) emulates: each lane keeps
// the best key of its columns k = rank, rank + size, ...; a __shfl_xor_sync butterfly
// with offsets 16, 8, 4, 2, 1 combines a warp; in a block, lane 0 of warp w writes
// scratch[w], one barrier, lane l of every warp reads scratch[l % warps] and
// butterflies again over groups of `warps` lanes. The keys are strictly totally
// ordered, so the winner is the same column whatever the order; the emulation makes
// the CPU tests run the very reduction the GPU runs.
//
// Torch-free: this header is compiled once per architecture.
#pragma once

#include <cstdint>

#include "solver.h"

namespace lsa {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Every lane ends with the least key of its group of `width` lanes (a power of two).
__device__ __forceinline__ Key warp_min_key(Key best, int width = kWarpSize) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset >= 1; offset /= 2) {
    if (offset >= width) continue;
    const Key other{__shfl_xor_sync(kFullMask, best.value, offset),
                    __shfl_xor_sync(kFullMask, best.tie, offset),
                    __shfl_xor_sync(kFullMask, best.col, offset)};
    best = min_key(best, other);
  }
  return best;
}

// The lane's own best key over k = first, first + stride, ... < n, relaxing each k once
// (the lane owns column k for this step). The lane loads `Loads` of its columns before it
// relaxes the first of them: its memory requests are in flight together rather than one
// round trip per column.
template <int Loads, class Relax>
__device__ __forceinline__ Key lane_min_key(int32_t first, int32_t stride, int32_t n,
                                            const Relax& relax,
                                            const int32_t* __restrict__ rank) {
  Key best = Key::none();
#pragma unroll 1
  for (int32_t k = first; k < n; k += Loads * stride) {
    typename Relax::Edge edge[Loads];
    int32_t r[Loads];
#pragma unroll
    for (int u = 0; u < Loads; ++u) {  // no branch: a column past n reloads the lane's own k
      const int32_t j = k + u * stride < n ? k + u * stride : k;
      edge[u] = relax.load(j), r[u] = rank[j];
    }
#pragma unroll
    for (int u = 0; u < Loads; ++u) {
      const int32_t j = k + u * stride;
      if (j >= n) break;
      const double x = relax.apply(j, edge[u]);
      if (x <= best.value) best = min_key(best, Key{x, r[u], j});  // NaN: no candidate
    }
  }
  return best;
}

// Whether pred(i, j) holds anywhere in a rows x cols block (pred runs on every entry),
// this lane taking the flat indices rank, rank + stride, ... (as SimulatedTeam::any),
// walked without a division per entry.
template <class Pred>
__device__ __forceinline__ bool lane_any(int32_t rank, int32_t stride, int32_t rows, int32_t cols,
                                         Pred& pred) {
  if (rows == 0 || cols == 0) return false;
  bool found = false;
  int64_t i = rank / cols, j = rank % cols;
  while (i < rows) {
    found = pred(int32_t(i), int32_t(j)) || found;
    j += stride;
    while (j >= cols) {
      j -= cols;
      ++i;
    }
  }
  return found;
}

class WarpTeam {
 public:
  static constexpr int size = kWarpSize;
  static constexpr bool records_path = true;
  static constexpr bool checks_in_relax = true;
  static constexpr int kLoads = 8;  // columns in flight per lane (lane_min_key): a warp
                                    // lane owns ~10 of a 300-column item

  __device__ explicit WarpTeam(int lane) : lane_(lane) {}

  __device__ __forceinline__ bool leader() const { return lane_ == 0; }
  __device__ __forceinline__ void sync() const { __syncwarp(); }

  template <class F>
  __device__ __forceinline__ void for_each(int32_t n, F&& f) const {
#pragma unroll 1
    for (int32_t k = lane_; k < n; k += size) f(k);
  }

  template <class Pred>
  __device__ __forceinline__ bool any(int32_t rows, int32_t cols, Pred&& pred) const {
    return __any_sync(kFullMask, lane_any(lane_, size, rows, cols, pred));
  }

  template <class Relax>
  __device__ __forceinline__ Key argmin(int32_t n, Relax&& relax, const double* /*val*/,
                                        const int32_t* rank) const {
    const Key best = warp_min_key(lane_min_key<kLoads>(lane_, size, n, relax, rank));
    __syncwarp();  // (shuffles order no memory: every lane's reads before the leader's writes)
    return best;
  }

 private:
  int lane_;
};

// `scratch` is 2 x 32 keys of shared memory. Argmin alternates between its halves, so
// one barrier per argmin suffices: a warp can only write a half again after passing
// the next argmin's barrier, which every lane reaches after reading that half.
class BlockTeam {
 public:
  __device__ BlockTeam(Key* scratch)
      : size(int(blockDim.x)), rank_(int(threadIdx.x)), scratch_(scratch), half_(0) {}

  const int size;  // a power of two in [64, 512]
  static constexpr bool records_path = true;
  static constexpr bool checks_in_relax = true;
  static constexpr int kLoads = 4;  // the plan gives a block lane 2 to 4 columns

  __device__ __forceinline__ bool leader() const { return rank_ == 0; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }

  template <class F>
  __device__ __forceinline__ void for_each(int32_t n, F&& f) const {
#pragma unroll 1
    for (int32_t k = rank_; k < n; k += size) f(k);
  }

  template <class Pred>
  __device__ __forceinline__ bool any(int32_t rows, int32_t cols, Pred&& pred) const {
    return __syncthreads_or(lane_any(rank_, size, rows, cols, pred)) != 0;
  }

  template <class Relax>
  __device__ __forceinline__ Key argmin(int32_t n, Relax&& relax, const double* /*val*/,
                                        const int32_t* rank) {
    const Key best = warp_min_key(lane_min_key<kLoads>(rank_, size, n, relax, rank));
    Key* half = scratch_ + half_ * kWarpSize;
    half_ ^= 1;
    const int warps = size / kWarpSize;
    if (rank_ % kWarpSize == 0) half[rank_ / kWarpSize] = best;
    __syncthreads();
    return warp_min_key(half[rank_ % warps], warps);
  }

 private:
  int rank_;
  Key* scratch_;
  int half_;
};

}  // namespace lsa
