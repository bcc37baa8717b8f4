// What the host side of the CUDA solver needs (lsa_cuda_binding.cpp, compiled by the C++
// compiler as the CPU sources are): the batch and plan structs and the two entry points
// defined in lsa_cuda.cu. No device code and no torch here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lsa {
namespace cuda {

constexpr int kWarpLanes = 32;
constexpr int kMaxBlockThreads = 512;

// The input dtypes, as the binding maps torch's.
enum class DType : int32_t {
  Bool, UInt8, Int8, Int16, Int32, Int64, Half, BFloat16, Float, Double
};

// One call's batch: cost [B, N, M] read through its strides, optional sizes [B, 2]
// int64 (device), outputs col4row [B, N] int64, status [B] int32, and, for lsa_duals,
// u [B, N] and v [B, M] float64 (all contiguous, written entirely by the kernel).
struct Batch {
  const void* cost;
  DType dtype;
  int64_t B, N, M;
  int64_t s0, s1, s2;
  const int64_t* sizes;  // nullptr: every item is N x M
  int64_t ss0, ss1;
  // DETR's layout instead of sizes: item b is N x col_splits[b], its columns ending at
  // col_ends[b] (the running sum). Both contiguous [B] (device), or nullptr.
  const int64_t* col_splits;
  const int64_t* col_ends;
  bool maximize;
  int64_t* col4row;
  int32_t* status;
  double* u;  // nullptr for lsa
  double* v;
};

struct Plan {
  int32_t lanes;          // threads per team: 32 (a warp) or a block of 64 to 1024
  int32_t teams;          // teams per block (warp teams only; else 1)
  bool state_shared;      // per-item state in shared memory, else in the global workspace
  bool stage_cost;        // oriented float64 cost block in shared memory
  int64_t R, C;           // padded oriented problem: R = min(N, M) rows, C = max(N, M) cols
  int64_t team_smem;      // shared bytes per team
  int64_t state_bytes;    // bytes of one item's state
  int64_t workspace_bytes;  // global workspace of the call (0 when the state is shared)
};

// The plan for the batch on `device` from cheap host queries (no synchronisation); `lanes`
// = 1 lets the shape choose the team width, 32 to kMaxBlockThreads forces it.
cudaError_t make_plan(const Batch& p, int device, int64_t lanes, Plan* plan);

// Launches the batch on `stream` (p.B > 0); `workspace` holds plan.workspace_bytes.
cudaError_t launch(const Batch& p, const Plan& plan, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace lsa
