// CUDA kernels of maskformer_fast::lsa and maskformer_fast::lsa_duals: one warp or one
// block per batch item (lsa_cuda_kernels.cuh), results bit-identical to the CPU path.
// This file instantiates them behind the two entry points of lsa_cuda_launch.h; the torch
// binding is lsa_cuda_binding.cpp.
#include "lsa_cuda_kernels.cuh"

namespace lsa {
namespace cuda {

cudaError_t make_plan(const Batch& p, int device, int64_t lanes, Plan* plan) {
  int sms = 0, smem_optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) *plan = plan_for(p.B, p.N, p.M, sms, smem_optin, lanes);
  return err;
}

cudaError_t launch(const Batch& p, const Plan& plan, void* workspace, cudaStream_t stream) {
  return visit_dtype(p.dtype, [&](auto tag) {
    return launch_typed<decltype(tag)>(p, plan, static_cast<char*>(workspace), stream);
  });
}

}  // namespace cuda
}  // namespace lsa
