// The torch binding of the CUDA kernels of maskformer_fast::lsa and lsa_duals
// (lsa_cuda.cu): argument checks, outputs, workspace, launch. Compiled by the C++
// compiler with the CPU sources, so that nvcc never parses torch's headers.
//
// Per call: one workspace allocation from the caching allocator (none when the solver
// state fits in shared memory), one kernel launch on the current stream, no host sync
// (unless raise_errors asks for the statuses on the host), no device assert. Failed items
// (invalid entries, infeasible, sizes out of range) are reported in `status`; only
// malformed arguments (shapes, dtypes, devices) raise, and raise_errors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "lsa_cuda_launch.h"
#include "status.h"

namespace maskformer_fast {
namespace {

using at::Tensor;
using lsa::cuda::DType;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBool: return DType::Bool;
    case at::kByte: return DType::UInt8;
    case at::kChar: return DType::Int8;
    case at::kShort: return DType::Int16;
    case at::kInt: return DType::Int32;
    case at::kLong: return DType::Int64;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    default: TORCH_CHECK_TYPE(false, "lsa: unsupported cost dtype ", t);
  }
}

// Checks the arguments (metadata only: nothing is read from the device), allocates the
// outputs and the workspace, and launches. `u`, `v` are filled when defined.
void solve_batch_cuda(const Tensor& cost, const std::optional<Tensor>& sizes,
                      const std::optional<Tensor>& col_splits, bool maximize, int64_t lanes,
                      Tensor& col4row, Tensor& status, Tensor* u, Tensor* v) {
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  lsa::cuda::Batch p{};
  p.cost = cost.const_data_ptr();
  p.dtype = to_dtype(cost.scalar_type());
  p.B = B, p.N = N, p.M = M;
  p.s0 = cost.stride(0), p.s1 = cost.stride(1), p.s2 = cost.stride(2);
  if (sizes.has_value()) {
    const Tensor& s = *sizes;
    TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == B && s.size(1) == 2,
                      "lsa: sizes must have shape [B, 2] = [", B, ", 2], got ", s.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == at::kLong, "lsa: sizes must be int64, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.device() == cost.device(), "lsa: sizes must be on the cost's device (",
                      cost.device(), "), got ", s.device());
    p.sizes = s.const_data_ptr<int64_t>();
    p.ss0 = s.stride(0), p.ss1 = s.stride(1);
  }
  Tensor splits, ends;  // (kept alive until the kernel is queued)
  if (col_splits.has_value()) {
    TORCH_CHECK_VALUE(!sizes.has_value(), "lsa: give sizes or col_splits, not both");
    TORCH_CHECK_TYPE(col_splits->scalar_type() == at::kLong, "lsa: col_splits must be int64, got ",
                     col_splits->scalar_type());
    TORCH_CHECK_VALUE(col_splits->dim() == 1 && col_splits->size(0) == B,
                      "col_splits must have one entry per batch item (", B, "), got shape ",
                      col_splits->sizes());
    TORCH_CHECK_VALUE(col_splits->device() == cost.device(),
                      "lsa: col_splits must be on the cost's device (", cost.device(), "), got ",
                      col_splits->device());
    // Checked by the kernel (status 3), not here: that would read them on the host.
    splits = col_splits->contiguous();
    ends = at::cumsum(splits, 0);
    p.col_splits = splits.const_data_ptr<int64_t>();
    p.col_ends = ends.const_data_ptr<int64_t>();
  }
  p.maximize = maximize;
  p.col4row = col4row.mutable_data_ptr<int64_t>();
  p.status = status.mutable_data_ptr<int32_t>();
  p.u = u ? u->mutable_data_ptr<double>() : nullptr;
  p.v = v ? v->mutable_data_ptr<double>() : nullptr;
  if (B == 0) return;

  lsa::cuda::Plan plan;
  C10_CUDA_CHECK(lsa::cuda::make_plan(p, cost.device().index(), lanes, &plan));
  Tensor workspace;
  if (plan.workspace_bytes > 0)
    workspace = at::empty({plan.workspace_bytes}, cost.options().dtype(at::kByte));
  void* ws = workspace.defined() ? workspace.mutable_data_ptr() : nullptr;
  C10_CUDA_CHECK(lsa::cuda::launch(p, plan, ws, c10::cuda::getCurrentCUDAStream()));
}

void check_cost(const Tensor& cost) {
  // (A CPU cost gets here when another argument is on a CUDA device.)
  TORCH_CHECK_VALUE(cost.is_cuda(), "lsa: the cost is on ", cost.device(),
                    " but another argument is on a CUDA device");
  TORCH_CHECK_VALUE(cost.dim() == 3, "lsa: expected a [B, N, M] cost tensor, got ", cost.dim(),
                    " dimensions");
  TORCH_CHECK_VALUE(cost.size(1) < std::numeric_limits<int32_t>::max() &&
                        cost.size(2) < std::numeric_limits<int32_t>::max(),
                    "lsa: each side of a problem must be below 2**31, got ", cost.size(1), " x ",
                    cost.size(2));
}

std::tuple<Tensor, Tensor> lsa_cuda(const Tensor& cost, const std::optional<Tensor>& sizes,
                                    bool maximize, bool raise_errors,
                                    const std::optional<Tensor>& col_splits, int64_t /*method*/) {
  check_cost(cost);
  const c10::cuda::CUDAGuard guard(cost.device());
  const auto opts = cost.options();
  Tensor col4row = at::empty({cost.size(0), cost.size(1)}, opts.dtype(at::kLong));
  Tensor status = at::empty({cost.size(0)}, opts.dtype(at::kInt));
  solve_batch_cuda(cost, sizes, col_splits, maximize, 1, col4row, status, nullptr, nullptr);
  if (raise_errors) {
    const Tensor host = status.cpu();  // (a sync)
    raise_for_status(host.const_data_ptr<int32_t>(), host.size(0));
  }
  return {col4row, status};
}

// On CUDA, `lanes` picks the team width: 1 as the shape decides (as lsa does), 32 a warp
// per item, 64 to 1024 (a power of two) a block per item; the tests compare each with the
// CPU's simulated team of the same width.
std::tuple<Tensor, Tensor, Tensor, Tensor> lsa_duals_cuda(const Tensor& cost,
                                                          const std::optional<Tensor>& sizes,
                                                          bool maximize, int64_t lanes,
                                                          const std::optional<Tensor>& col_splits,
                                                          int64_t /*method*/) {
  TORCH_CHECK_VALUE(lanes == 1 || (lanes >= lsa::cuda::kWarpLanes && lanes <= lsa::cuda::kMaxBlockThreads &&
                                   (lanes & (lanes - 1)) == 0),
                    "lsa_duals: on CUDA, lanes must be 1 (automatic), ", lsa::cuda::kWarpLanes,
                    " (a warp per item) or a power of two up to ", lsa::cuda::kMaxBlockThreads,
                    " (a block per item), got ", lanes);
  check_cost(cost);
  const c10::cuda::CUDAGuard guard(cost.device());
  const auto opts = cost.options();
  Tensor col4row = at::empty({cost.size(0), cost.size(1)}, opts.dtype(at::kLong));
  Tensor status = at::empty({cost.size(0)}, opts.dtype(at::kInt));
  Tensor u = at::empty({cost.size(0), cost.size(1)}, opts.dtype(at::kDouble));
  Tensor v = at::empty({cost.size(0), cost.size(2)}, opts.dtype(at::kDouble));
  solve_batch_cuda(cost, sizes, col_splits, maximize, lanes, col4row, status, &u, &v);
  return {col4row, status, u, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskformer_fast, CUDA, m) {
  m.impl("lsa", &lsa_cuda);
  m.impl("lsa_duals", &lsa_duals_cuda);
}

}  // namespace maskformer_fast
