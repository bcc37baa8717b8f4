// Every op of maskformer_fast._C is declared here; kernels register themselves
// with TORCH_LIBRARY_IMPL beside their sources (csrc/lsa/lsa_cpu.cpp, lsa_cuda.cu,
// csrc/cost/*_cpu.cpp).
#include <Python.h>
#include <torch/library.h>

namespace maskformer_fast {
extern PyMethodDef lsa_pairs_method;  // csrc/lsa/pairs.cpp
}

extern "C" {
// Importing maskformer_fast._C loads the library and so runs the registrations below.
// The module itself holds one function, lsa_pairs (csrc/lsa/pairs.cpp).
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {maskformer_fast::lsa_pairs_method, {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(maskformer_fast, m) {
  // Batched rectangular linear sum assignment, index-identical to scipy per item.
  // cost [B, N, M] (any real dtype, any strides); sizes [B, 2] int64 or None: item b
  // is cost[b, :sizes[b, 0], :sizes[b, 1]]. Or col_splits [B] int64 (DETR's layout,
  // summing to M; sizes None): item b is cost[b, :, o_b : o_b + col_splits[b]] with o_b
  // the sum of the splits before it. Returns col4row [B, N] int64 (-1 where a row is
  // unmatched or padding; column indices within the item) and status [B] int32 (0 ok,
  // 1 infeasible, 2 invalid, 3 sizes or splits out of range: CUDA, which checks them on
  // the device). raise_errors: raise ValueError with scipy's message and the index of
  // the first item that failed instead (errors="raise"). method: 0 auto, 1 certified
  // (square items on the CPU: Jonker-Volgenant plus a proof that the matching is scipy's,
  // else scipy's order), 2 scipy's order only. The indices are the same for every method;
  // CUDA always solves in scipy's order.
  m.def(
      "lsa(Tensor cost, Tensor? sizes, bool maximize, bool raise_errors=False, "
      "Tensor? col_splits=None, int method=0) -> (Tensor col4row, Tensor status)");
  // The same, also returning the optimal duals u [B, N], v [B, M] (float64) of the
  // minimisation (of -cost when maximize) from the solver that produced the matching,
  // with `lanes` = 1 for the production team or a power of two up to 1024 for a team of
  // that width (a simulated one on the CPU, always in scipy's order). `method` as for lsa,
  // but scipy's order by default: its duals are the same for every team and device. For
  // tests, diagnostics and timings.
  m.def(
      "lsa_duals(Tensor cost, Tensor? sizes, bool maximize, int lanes, Tensor? col_splits=None, "
      "int method=2) -> (Tensor col4row, Tensor status, Tensor u, Tensor v)");
  // The certified path's proof (csrc/lsa/certified.h) alone, for tests: whether the
  // matching col4row [n] (a permutation) of the square float64 cost [n, n] is provably
  // the one scipy returns, given duals u [n], v [n] (float64).
  m.def("lsa_certificate(Tensor cost, Tensor col4row, Tensor u, Tensor v) -> bool");

  // The pixel sums of the matching cost (CPU; maskformer_fast/kernels/reference.py): logits
  // [B, Q, P] (float), targets [B, T, P] in [0, 1], counts [B] or None (targets beyond an
  // image's count are not read). mask_cost "bce" or "focal" (alpha, gamma). With neg and pos
  // the loss terms of targets 0 and 1 and p = sigmoid: dots [B, 2, Q, T] = ((neg - pos) . y,
  // p . y) and sums [B, 2, Q] = (sum neg, sum p), float32. `chunk`: pixels per cached chunk.
  m.def(
      "mask_cost_sums(Tensor logits, Tensor targets, Tensor? counts, str mask_cost, float alpha, "
      "float gamma, int chunk) -> (Tensor dots, Tensor sums)");
  // planes [B, N, H, W] sampled bilinearly at grid [B, P, 2] (x, y in [-1, 1]) -> [B, N, P]
  // (float32): F.grid_sample(align_corners=False, padding zeros), every plane of an image at
  // that image's points.
  m.def("bilinear_sample(Tensor planes, Tensor grid) -> Tensor");
}
