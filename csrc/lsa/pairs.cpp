// maskformer_fast._C.lsa_pairs(col4row): scipy's (row_ind, col_ind) for every item of an
// lsa result, as a list of B tuples of int64 tensors. Every index lands in one buffer
// (rows, then columns) and each result is a view of it.
//
// A Python function rather than an op: the dispatcher's boxing and narrow() would cost
// more than the rest for B small items, and an output whose sizes depend on the data
// has nothing for torch.compile to trace. On CUDA: col4row is copied to the host once
// (the only sync), the buffer built there and copied back in one transfer.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

namespace maskformer_fast {
namespace {

using at::Tensor;

// A 1-D view of the contiguous `buffer`: `length` entries from `offset`, sharing its
// version counter as torch's own views do.
Tensor slice_of(const Tensor& buffer, int64_t offset, int64_t length) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(
      c10::TensorImpl::VIEW, c10::Storage(buffer.storage()), buffer.key_set(), buffer.dtype());
  const int64_t one = 1;
  impl->set_sizes_and_strides(c10::IntArrayRef(&length, 1), c10::IntArrayRef(&one, 1),
                              buffer.storage_offset() + offset);
  impl->set_version_counter(buffer.unsafeGetTensorImpl()->version_counter());
  return Tensor(std::move(impl));
}

PyObject* lsa_pairs(PyObject* /*module*/, PyObject* arg) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(THPVariable_Check(arg), "lsa_pairs: expected a tensor, got ",
                   Py_TYPE(arg)->tp_name);
  const Tensor& col4row = THPVariable_Unpack(arg);
  TORCH_CHECK_VALUE(col4row.dim() == 2, "lsa_pairs: expected col4row [B, N], got ",
                    col4row.dim(), " dimensions");
  TORCH_CHECK_TYPE(col4row.scalar_type() == at::kLong, "lsa_pairs: col4row must be int64, got ",
                   col4row.scalar_type());
  const auto device = col4row.device();
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(),
                    "lsa_pairs: col4row must be on the CPU or a CUDA device, got ", device);
  const Tensor host = (device.is_cpu() ? col4row : col4row.to(at::kCPU)).contiguous();
  const int64_t B = host.size(0), N = host.size(1);
  const int64_t* c4r = host.const_data_ptr<int64_t>();

  std::vector<int64_t> counts(B);
  int64_t K = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t k = 0;
    for (int64_t i = 0; i < N; ++i) k += c4r[b * N + i] >= 0;
    counts[b] = k, K += k;
  }
  Tensor buffer = at::empty({2 * K}, host.options());
  int64_t* rows = buffer.mutable_data_ptr<int64_t>();
  int64_t* cols = rows + K;
  for (int64_t b = 0, k = 0; b < B; ++b) {
    for (int64_t i = 0; i < N; ++i) {
      const int64_t j = c4r[b * N + i];
      if (j >= 0) rows[k] = i, cols[k++] = j;
    }
  }
  // (From pageable memory: the copy is staged before it returns, and needs no stream sync.)
  if (!device.is_cpu()) buffer = buffer.to(device, /*non_blocking=*/true);

  PyObject* out = PyList_New(B);
  if (out == nullptr) return nullptr;
  for (int64_t b = 0, offset = 0; b < B; offset += counts[b++]) {
    PyObject* row_ind = THPVariable_Wrap(slice_of(buffer, offset, counts[b]));
    PyObject* col_ind = THPVariable_Wrap(slice_of(buffer, K + offset, counts[b]));
    PyObject* pair = row_ind && col_ind ? PyTuple_Pack(2, row_ind, col_ind) : nullptr;
    Py_XDECREF(row_ind);
    Py_XDECREF(col_ind);
    if (pair == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, b, pair);
  }
  return out;
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef lsa_pairs_method = {"lsa_pairs", lsa_pairs, METH_O,
                                "lsa_pairs(col4row) -> [(row_ind, col_ind)] per item"};

}  // namespace maskformer_fast
