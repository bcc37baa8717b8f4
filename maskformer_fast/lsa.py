"""Exact, batched linear sum assignment: a drop-in for scipy.optimize.linear_sum_assignment.

The returned indices are those scipy returns, ties included. Every problem is solved
with scipy's own algorithm (Crouse's shortest augmenting path, float64 arithmetic in the
same order), or, for a larger square problem on the CPU, by a faster exact method whose
result is then proven to be scipy's (unique by more than any rounding error), else
solved again in scipy's order. One call solves a whole batch, in C++ on the CPU (batch
items in parallel) or in CUDA on the GPU.

The solver's public face: users import it through :mod:`maskformer_fast.hungarian`, which
re-exports everything here beside the matchers.

    >>> from maskformer_fast.hungarian import linear_sum_assignment
    >>> row_ind, col_ind = linear_sum_assignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    >>> row_ind.tolist(), col_ind.tolist()
    ([0, 1, 2], [1, 0, 2])
"""

from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np
import torch

from maskformer_fast import _ops
from maskformer_fast._ops import Status

ArrayLike = Union[torch.Tensor, np.ndarray, list]

_TORCH_DTYPES = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
}  # fmt: skip


class BatchAssignment(NamedTuple):
    """Result of :func:`batch_linear_sum_assignment`.

    col4row: int64 ``[B, N]``, the column matched to each row, -1 for unmatched rows,
        padding rows and items that failed.
    status: int32 ``[B]``, a :class:`Status` per item: 0 solved, 1 infeasible, 2 invalid
        entries (NaN, -inf, or +inf under ``maximize``), 3 sizes outside the padded problem
        (CUDA; the CPU raises).
    Both are torch tensors on the cost's device, or numpy arrays for a numpy cost.
    """

    col4row: torch.Tensor | np.ndarray
    status: torch.Tensor | np.ndarray

    def pairs(self) -> list[tuple]:
        """Per item, ``(row_ind, col_ind)`` exactly as scipy returns them for that item: int64
        tensors on the cost's device (numpy arrays for a numpy cost), empty for an item that
        failed. One compiled pass; on CUDA one copy to the host and one back."""
        return index_pairs(self.col4row)


def index_pairs(col4row: torch.Tensor | np.ndarray) -> list[tuple]:
    """scipy's ``(row_ind, col_ind)`` of each item of ``col4row`` (int64 ``[B, N]``, the column
    of each row, -1 for none), as :meth:`BatchAssignment.pairs` gives them: int64 tensors on
    its device, or numpy arrays for a numpy ``col4row``; ``row_ind`` increasing. For a
    col4row kept from an earlier call, or gathered from several (e.g. ``torch.cat``)."""
    if isinstance(col4row, torch.Tensor):
        return _ops.pairs(col4row)
    if isinstance(col4row, np.ndarray):
        return [(r.numpy(), c.numpy()) for r, c in _ops.pairs(torch.from_numpy(col4row))]
    raise TypeError(f"col4row must be a torch tensor or numpy array, got {type(col4row).__name__}")


METHODS = {"auto": 0, "certified": 1, "ordered": 2}


def _method(method: str) -> int:
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}") from None


def compiled_backends() -> tuple[str, ...]:
    """The devices ("cpu", "cuda") for which the built extension has the solver's kernel:
    ``backend="auto"`` uses them, and falls back to scipy (with a warning) for the others.
    Empty when the extension is not built. A "cuda" kernel says nothing of a GPU being
    present (``torch.cuda.is_available()``)."""
    return tuple(kind for kind in ("cpu", "cuda") if _ops.has_kernel(kind))


def _as_tensor(cost: ArrayLike, ndim: int, what: str) -> tuple[torch.Tensor, bool]:
    """The cost as a torch tensor (no copy where possible) and whether it came from numpy."""
    if type(cost) is torch.Tensor and cost.dtype in _TORCH_DTYPES and cost.dim() == ndim:
        return cost, False  # the common case first: the checks below cost microseconds
    if isinstance(cost, torch.Tensor):
        if cost.dim() != ndim:
            raise ValueError(f"expected {what}, got a {cost.dim()} array")
        if cost.dtype not in _TORCH_DTYPES:
            if cost.dtype.is_complex or not (cost.dtype.is_floating_point or cost.dtype in (
                torch.uint16, torch.uint32, torch.uint64
            )):
                raise TypeError(f"Cannot cast tensor of dtype {cost.dtype} to float64")
            cost = cost.double()
        return cost, False
    arr = np.asarray(cost)
    if not arr.dtype.isnative:  # byte-swapped ('>f8' here): torch takes native order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim != ndim:
        raise ValueError(f"expected {what}, got a {arr.ndim} array")
    if not np.can_cast(arr.dtype, np.float64, casting="safe"):
        raise TypeError(
            f"Cannot cast array data from {arr.dtype!r} to dtype('float64') "
            "according to the rule 'safe'"
        )
    if arr.dtype.kind == "u" and arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
    try:
        return torch.from_numpy(arr), True
    except ValueError:  # negative strides
        return torch.from_numpy(np.ascontiguousarray(arr)), True


def _as_sizes(sizes, batch: int, device: torch.device) -> torch.Tensor:
    """sizes as an int64 [B, 2] tensor on the cost's device. Only metadata is checked here
    (no host sync); the op checks each item's range (the CUDA kernel reports status 3)."""
    if (type(sizes) is torch.Tensor and sizes.dtype is torch.int64 and sizes.shape == (batch, 2)
            and sizes.device == device):
        return sizes  # the common case first, as in _as_tensor
    s = sizes if isinstance(sizes, torch.Tensor) else torch.as_tensor(np.asarray(sizes))
    if s.dtype.is_floating_point or s.dtype.is_complex or s.dtype == torch.bool:
        raise TypeError(f"sizes must hold integers, got dtype {s.dtype}")
    if s.dim() != 2 or s.shape[0] != batch or s.shape[1] != 2:
        raise ValueError(f"sizes must have shape [B, 2] = [{batch}, 2], got {list(s.shape)}")
    if s.dtype == torch.int64 and s.device == device:
        return s
    return to_device(s.long(), device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor goes to CUDA through pinned memory, so that the
    copy is asynchronous (from pageable memory it waits for the stream)."""
    if device.type == "cuda" and tensor.is_cpu:
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _as_splits(col_splits, batch: int, cols: int, device: torch.device) -> torch.Tensor:
    """col_splits as an int64 [B] tensor on the cost's device. Host values are checked here
    for a CUDA cost (the CPU op checks its own; device values are checked by the kernel)."""
    if isinstance(col_splits, torch.Tensor):
        if col_splits.dtype.is_floating_point or col_splits.dtype.is_complex or col_splits.dim() != 1:
            raise TypeError("col_splits must be a list or 1-D tensor of integers, got a "
                            f"{col_splits.dim()}-D {col_splits.dtype} tensor")
        s = col_splits
    else:
        s = torch.tensor(col_splits, dtype=torch.int64)
        if s.dim() != 1:
            raise TypeError(f"col_splits must be a list of integers, got {col_splits!r}")
    if s.is_cpu and device.type == "cpu":
        return s if s.dtype is torch.int64 else s.long()
    if s.is_cpu:
        _ops.check_col_splits(s.tolist(), batch, cols)
    elif s.shape[0] != batch:  # (values on a GPU are checked by the kernel)
        raise ValueError(f"col_splits must have one entry per batch item ({batch}), got shape "
                         f"[{s.shape[0]}]")
    return to_device(s.long(), device)


def batch_linear_sum_assignment(
    cost: ArrayLike,
    sizes: ArrayLike | None = None,
    *,
    col_splits: ArrayLike | None = None,
    maximize: bool = False,
    errors: str = "raise",
    backend: str = "auto",
    method: str = "auto",
) -> BatchAssignment:
    """Solves B assignment problems in one call, each exactly as scipy would.

    Args:
        cost: ``[B, N, M]`` torch tensor or numpy array; bool, integer or floating
            (float16, bfloat16, float32, float64); any strides (read in place).
        sizes: optional ``[B, 2]`` integers: item b is ``cost[b, :sizes[b, 0], :sizes[b, 1]]``;
            entries outside it are never read (NaN padding is fine).
        col_splits: instead of sizes, DETR's layout: ``cost`` is ``[B, N, sum(col_splits)]``
            and item b is ``cost[b, :, o_b : o_b + col_splits[b]]``, ``o_b`` the sum of the
            splits before it, read where it lies (a list or 1-D integer tensor). Column
            indices are within the item, as ``C.split(col_splits, -1)`` gives them.
        maximize: maximise the total instead (costs are negated, so +inf is invalid).
        errors: ``"raise"`` raises ValueError with scipy's message and the index of the
            first failing item; ``"status"`` never raises for the content of the costs
            and reports it in ``status``.
        backend: ``"auto"`` (the compiled kernel for the cost's device, else scipy with a
            warning), ``"cpu"``, ``"cuda"`` or ``"scipy"``. Results are identical.
        method: how the CPU kernel solves a square item; the indices are scipy's for
            every choice. ``"certified"``: Jonker-Volgenant's method, then a proof from
            its duals that the optimum is unique by more than any rounding error of
            either solver, so that scipy returns it too; an item whose proof fails is
            solved again in scipy's order. ``"ordered"``: scipy's order only.
            ``"auto"``: certified for square items of at least 48 rows whose first
            and last rows do not repeat their least entry (costs with few distinct
            values rarely have a unique optimum), else ordered. Rectangular items, CUDA
            and the scipy backend always use scipy's order.

    Returns:
        BatchAssignment(col4row ``[B, N]`` int64, status ``[B]`` int32); ``.pairs()`` gives
        scipy's ``(row_ind, col_ind)`` per item.
    """
    if errors not in ("raise", "status"):
        raise ValueError(f"errors must be 'raise' or 'status', got {errors!r}")
    # Python here runs with caches full of the solver's data (each step about twice its
    # cost in a loop of its own): the common case takes few steps, and none after the op
    # (it raises for errors="raise" itself). First a CPU tensor with int64 sizes or none,
    # whose sizes the op checks itself.
    if (type(cost) is torch.Tensor and cost.is_cpu and col_splits is None and backend == "auto"
            and method == "auto" and (sizes is None or (type(sizes) is torch.Tensor and sizes.dtype is torch.int64))
            and cost.dtype in _TORCH_DTYPES and cost.dim() == 3 and _ops.has_kernel("cpu")):
        return tuple.__new__(BatchAssignment, _ops.lsa_op(cost, sizes, bool(maximize), errors == "raise"))
    tensor, from_numpy = _as_tensor(cost, 3, "a batch of matrices (3-D array [B, N, M])")
    device = tensor.device
    if sizes is not None:
        if col_splits is not None:
            raise ValueError("give sizes or col_splits, not both")
        sizes = _as_sizes(sizes, tensor.shape[0], device)
    elif col_splits is not None:
        col_splits = _as_splits(col_splits, tensor.shape[0], tensor.shape[2], device)
    kind, how = device.type, _method(method)
    if backend == "auto" and kind == "cpu" and _ops.has_kernel(kind):  # the op itself
        col4row, status = _ops.lsa_op(tensor, sizes, bool(maximize), errors == "raise", col_splits,
                                      how)
    else:
        which = _ops.resolve_backend(backend, device)
        col4row, status = _ops.lsa(tensor, sizes, bool(maximize), which, errors == "raise",
                                   col_splits, how)
    if from_numpy:
        col4row, status = col4row.numpy(), status.numpy()
    return tuple.__new__(BatchAssignment, (col4row, status))  # without NamedTuple's __new__


def linear_sum_assignment(cost: ArrayLike, maximize: bool = False, *, backend: str = "auto",
                          method: str = "auto"):
    """Drop-in for ``scipy.optimize.linear_sum_assignment``: same signature, indices and errors.

    Args:
        cost: ``[N, M]`` matrix: numpy / array-like (numpy int64 results) or torch tensor
            (torch int64 results on its device); bool, integer or floating; any strides.
        maximize: maximise the total instead.
        backend, method: as for :func:`batch_linear_sum_assignment`.

    Returns:
        ``(row_ind, col_ind)``: ``row_ind`` increasing, ``cost[row_ind, col_ind]`` the optimal
        assignment, of length ``min(N, M)``.

    Raises:
        ValueError: "matrix contains invalid numeric entries" (NaN, -inf; +inf under
            maximize), "cost matrix is infeasible", or a cost that is not 2-D.
        TypeError: a dtype that cannot be cast safely to float64.
    """
    tensor, from_numpy = _as_tensor(cost, 2, "a matrix (2-D array)")
    which = _ops.resolve_backend(backend, tensor.device)
    col4row, status = _ops.lsa(tensor.unsqueeze(0), None, bool(maximize), which,
                               method=_method(method))
    _ops.raise_for_status(status, batched=False)
    if not col4row.is_cpu:
        return _ops.pairs(col4row)[0]
    row = col4row.numpy()[0]  # numpy: a few microseconds less than torch on small arrays
    rows = np.flatnonzero(row >= 0)
    if from_numpy:
        return rows, row[rows]
    return torch.from_numpy(rows), torch.from_numpy(row[rows])


__all__ = [
    "ArrayLike", "BatchAssignment", "METHODS", "Status", "batch_linear_sum_assignment", "compiled_backends",
    "index_pairs", "linear_sum_assignment",
]  # fmt: skip
