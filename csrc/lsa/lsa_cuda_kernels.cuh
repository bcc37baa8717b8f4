// CUDA kernels of maskformer_fast::lsa / lsa_duals: one team per batch item, running
// lsa::solve (solver.h) with a WarpTeam or a BlockTeam (teams_cuda.cuh).
//
// Torch-free, so that nvcc's device passes never parse torch headers: lsa_cuda.cu
// compiles it, and the torch binding (lsa_cuda_binding.cpp) sees lsa_cuda_launch.h only.
//
// The plan (chosen on the host per call from the padded shape, never per item, so no
// shape ever compiles anything):
//   * team: a warp, or a block of 64 to 512 threads, per item. Each Dijkstra step
//     relaxes the columns and then reduces: a wider team pays fewer loads per lane but
//     a longer reduction (a second butterfly and a barrier past a warp). The width is
//     the widest that keeps kColsPerLane columns per lane and at most kLanesPerSM lanes
//     per multiprocessor over the batch: a large batch fills the GPU with warps, a small
//     one with wide teams. Warp teams go one per block (spread over every SM) unless the
//     batch would exceed the resident blocks, then kMaxWarpsPerBlock per block.
//   * shared memory: the per-item state (duals, path costs, scan list: 12 bytes per
//     row, 44 per column) and, when it also fits, the oriented cost block as float64
//     (read on every Dijkstra step, and the only way a transposed item is read with
//     unit stride) go into dynamic shared memory if all the block's teams fit in the
//     device's opt-in limit; otherwise the state lives in one global workspace
//     (a slice per item) and the cost is read in place through its strides.
// Nothing here synchronises with the host: every per-item failure goes to `status`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lsa_cuda_launch.h"
#include "solver.h"
#include "teams_cuda.cuh"

namespace lsa {
namespace cuda {

constexpr int kMaxWarpsPerBlock = 4;
constexpr int kColsPerLane = 2;
constexpr int kLanesPerSM = 512;
constexpr int kBlocksPerSM = 32;  // resident blocks per multiprocessor (sm_80 to sm_90)


// Bytes of one item's solver state for R rows and C columns, a multiple of 8.
__host__ __device__ inline int64_t state_bytes(int64_t R, int64_t C) {
  const int64_t doubles = R + 3 * C;  // u; v, shortest_path_costs, scanned_costs
  const int64_t ints = R + 5 * C;     // col4row; row4col, path, remaining, rank, vacated
  return 8 * doubles + (4 * ints + 7) / 8 * 8;
}

// Carves the state of an R x C problem out of `p` (8-byte aligned).
LSA_HD Workspace carve(char* p, int64_t R, int64_t C) {
  double* d = reinterpret_cast<double*>(p);
  int32_t* i = reinterpret_cast<int32_t*>(d + R + 3 * C);
  return Workspace{.u = d, .v = d + R, .shortest_path_costs = d + R + C,
                   .scanned_costs = d + R + 2 * C, .col4row = i, .row4col = i + R,
                   .path = i + R + C, .remaining = i + R + 2 * C, .vacated = i + R + 4 * C,
                   .rank = i + R + 3 * C};
}

// The entry as a double, exactly as the CPU path converts it.
LSA_HD double to_double(bool x) { return x ? 1.0 : 0.0; }
LSA_HD double to_double(__half x) { return double(__half2float(x)); }
LSA_HD double to_double(__nv_bfloat16 x) { return double(__bfloat162float(x)); }
template <class T>
LSA_HD double to_double(T x) {
  return double(x);
}

// The oriented cost of one item read in place: entry (i, j) is at base[i * sr + j * sc]
// (the caller's strides, swapped for a transposed item), times sign = -1 for
// maximisation. The product is exact, as the CPU's multiplication by -1.0 is, and no
// branch comes between a lane's loads.
template <class T>
struct StridedCost {
  const T* base;
  int64_t sr, sc;
  double sign;
  LSA_HD double operator()(int32_t i, int32_t j) const {
    return to_double(base[int64_t(i) * sr + int64_t(j) * sc]) * sign;
  }
};

// The oriented cost of one item staged in shared memory, row-major.
struct StagedCost {
  const double* data;
  int32_t ld;
  LSA_HD double operator()(int32_t i, int32_t j) const { return data[i * ld + j]; }
};

// Solves batch item b with `team`; `state` holds its solver state, `staged` room for its
// oriented cost (nullptr: read the cost in place). Host-callable too: the tests run it
// with lsa::SimulatedTeam (tests/test_cuda.py).
#pragma nv_exec_check_disable
template <class T, class Team>
LSA_HD void solve_item(Team& team, const Batch& p, const Plan& plan, int64_t b, char* state,
                           double* staged) {
  // The item's size. sizes come from the caller's device memory and are only trusted
  // once checked: an item outside the padded [N, M] gets kBadSizes and reads nothing.
  int64_t given_n = p.N, given_m = p.M, offset = 0;
  if (p.sizes != nullptr) {
    given_n = p.sizes[b * p.ss0];
    given_m = p.sizes[b * p.ss0 + p.ss1];
  }
  bool in_range = 0 <= given_n && given_n <= p.N && 0 <= given_m && given_m <= p.M;
  if (p.col_splits != nullptr) {  // the splits must also sum to M
    given_m = p.col_splits[b], offset = p.col_ends[b] - given_m;
    in_range = 0 <= given_m && 0 <= offset && p.col_ends[b] <= p.M && p.col_ends[p.B - 1] == p.M;
  }
  const int32_t n = in_range ? int32_t(given_n) : 0, m = in_range ? int32_t(given_m) : 0;
  // Orient so that rows <= cols (as scipy and the CPU path): a transposed item solves
  // cost[b].T, reading the caller's strides swapped.
  const bool transpose = m < n;
  const int32_t rows = transpose ? m : n, cols = transpose ? n : m;
  const Workspace w = carve(state, plan.R, plan.C);
  int32_t status = kBadSizes;
  if (in_range) {
    const T* item = static_cast<const T*>(p.cost) + b * p.s0 + offset * p.s2;
    if (staged != nullptr) {
      // Read in the caller's order (coalesced for a contiguous cost), stored oriented,
      // every entry checked on the way (NaN and -inf are the entries not above -inf).
      const bool bad = team.any(n, m, [&](int32_t r, int32_t c) {
        const double x = to_double(item[r * p.s1 + c * p.s2]);
        const double y = p.maximize ? -x : x;
        staged[transpose ? c * cols + r : r * cols + c] = y;
        return !(y > -kInf);
      });
      team.sync();
      status = bad ? kInvalid : solve(team, StagedCost{staged, cols}, rows, cols, w, true);
    } else {
      const StridedCost<T> view{item, transpose ? p.s2 : p.s1, transpose ? p.s1 : p.s2,
                                p.maximize ? -1.0 : 1.0};
      status = solve(team, view, rows, cols, w);
    }
  }

  // Results in the caller's orientation; -1 and zero duals wherever nothing was solved.
  // A transposed item's row r is oriented column r, matched to row4col[r].
  const bool ok = status == kOk;
  int64_t* out = p.col4row + b * p.N;
  team.for_each(int32_t(p.N), [&](int32_t r) {
    out[r] = ok && r < n ? (transpose ? w.row4col[r] : w.col4row[r]) : -1;
  });
  if (p.u != nullptr) {
    const double* ur = transpose ? w.v : w.u;
    const double* vc = transpose ? w.u : w.v;
    team.for_each(int32_t(p.N), [&](int32_t r) { p.u[b * p.N + r] = ok && r < n ? ur[r] : 0.0; });
    team.for_each(int32_t(p.M), [&](int32_t c) { p.v[b * p.M + c] = ok && c < m ? vc[c] : 0.0; });
  }
  if (team.leader()) p.status[b] = status;
}

// Where team `t` of this block keeps item b's state and staged cost.
__device__ inline void team_memory(const Plan& plan, int t, int64_t b, char* workspace,
                                   char** state, double** staged) {
  extern __shared__ double smem[];
  char* mine = reinterpret_cast<char*>(smem) + t * plan.team_smem;
  *staged = plan.stage_cost ? reinterpret_cast<double*>(mine) : nullptr;
  if (plan.stage_cost) mine += 8 * plan.R * plan.C;
  *state = plan.state_shared ? mine : workspace + b * plan.state_bytes;
}

// A warp per item, plan.teams independent warps per block (no block barrier).
template <class T>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * kWarpSize, 1)
    lsa_warp_kernel(Batch p, Plan plan, char* workspace) {
  const int t = int(threadIdx.x) / kWarpSize;
  const int64_t b = int64_t(blockIdx.x) * plan.teams + t;
  if (b >= p.B) return;  // the whole warp leaves
  WarpTeam team(int(threadIdx.x) % kWarpSize);
  char* state;
  double* staged;
  team_memory(plan, t, b, workspace, &state, &staged);
  solve_item<T>(team, p, plan, b, state, staged);
}

// A block per item.
template <class T>
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    lsa_block_kernel(Batch p, Plan plan, char* workspace) {
  __shared__ Key scratch[2 * kWarpSize];
  const int64_t b = blockIdx.x;
  BlockTeam team(scratch);
  char* state;
  double* staged;
  team_memory(plan, 0, b, workspace, &state, &staged);
  solve_item<T>(team, p, plan, b, state, staged);
}

// The team width for B items of C oriented columns on `sms` multiprocessors (see the top).
inline int32_t team_width(int64_t B, int64_t C, int sms) {
  int32_t lanes = kWarpSize;
  while (lanes < kMaxBlockThreads && 2 * lanes * kColsPerLane <= C &&
         B * 2 * lanes <= int64_t(sms) * kLanesPerSM)
    lanes *= 2;
  return lanes;
}

// The plan for B items of N x M on a device with `sms` multiprocessors and `smem_optin`
// bytes of shared memory per block (see the top). `lanes` = 32 to kMaxBlockThreads (a
// power of two) forces a team width (lsa_duals' tests and timings); 1 lets the shape
// choose.
inline Plan plan_for(int64_t B, int64_t N, int64_t M, int sms, int smem_optin, int64_t lanes) {
  Plan q;
  q.R = std::min(N, M);
  q.C = std::max(N, M);
  q.lanes = lanes == 1 ? team_width(B, q.C, sms) : int32_t(lanes);
  const bool block = q.lanes > kWarpSize;
  q.teams = block || B <= int64_t(sms) * kBlocksPerSM ? 1 : kMaxWarpsPerBlock;
  const int64_t budget = smem_optin - (block ? int64_t(sizeof(Key)) * 2 * kWarpSize : 0);
  q.state_bytes = state_bytes(q.R, q.C);
  const double cost_bytes = 8.0 * double(q.R) * double(q.C);  // no int64 overflow
  q.stage_cost = q.teams * (cost_bytes + double(q.state_bytes)) <= double(budget);
  q.state_shared = q.teams * q.state_bytes <= budget;
  q.team_smem = (q.stage_cost ? int64_t(cost_bytes) : 0) + (q.state_shared ? q.state_bytes : 0);
  q.workspace_bytes = q.state_shared ? 0 : B * q.state_bytes;
  return q;
}

template <class T>
cudaError_t launch_typed(const Batch& p, const Plan& plan, char* workspace, cudaStream_t stream) {
  const bool block = plan.lanes > kWarpSize;
  const size_t smem = size_t(plan.teams * plan.team_smem);
  const auto kernel = block ? lsa_block_kernel<T> : lsa_warp_kernel<T>;
  if (smem > 48 * 1024) {  // beyond the default limit, up to the device's opt-in limit
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const unsigned grid = unsigned(block ? p.B : (p.B + plan.teams - 1) / plan.teams);
  const unsigned threads = unsigned(block ? plan.lanes : plan.teams * kWarpSize);
  kernel<<<grid, threads, smem, stream>>>(p, plan, workspace);
  return cudaGetLastError();
}

// Calls f(T{}) with T the C++ type of `dtype` (torch's Half and BFloat16 have the
// layout of CUDA's __half and __nv_bfloat16).
template <class F>
auto visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Bool: return f(bool{});
    case DType::UInt8: return f(uint8_t{});
    case DType::Int8: return f(int8_t{});
    case DType::Int16: return f(int16_t{});
    case DType::Int32: return f(int32_t{});
    case DType::Int64: return f(int64_t{});
    case DType::Half: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float: return f(float{});
    case DType::Double: break;
  }
  return f(double{});
}

}  // namespace cuda
}  // namespace lsa
