"""Loads the compiled ops (maskformer_fast._C), registers their fake kernels, chooses a
backend and provides the scipy fallback used when the extension is not built.

Private: the solver's public face is :mod:`maskformer_fast.lsa` (re-exported by
:mod:`maskformer_fast.hungarian`), which alone imports this module's solver helpers."""

from __future__ import annotations

import enum
import functools
import warnings

import numpy as np
import scipy.optimize
import torch

try:
    from maskformer_fast import _C  # noqa: F401  (registers torch.ops.maskformer_fast.*)

    _LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built: the scipy fallback still works
    _LOAD_ERROR = exc


class Status(enum.IntEnum):
    """The per-item codes of ``BatchAssignment.status`` (the C++ solver's ``lsa::Status``)."""

    OK = 0  # solved
    INFEASIBLE = 1  # no complete assignment of finite cost
    INVALID = 2  # NaN or -inf entries (+inf under maximize)
    BAD_SIZES = 3  # sizes outside the padded problem (CUDA only: the CPU op raises instead)


STATUS_MESSAGES = {
    Status.INFEASIBLE: "cost matrix is infeasible",
    Status.INVALID: "matrix contains invalid numeric entries",
    # CUDA only: sizes are checked in the kernel (the CPU kernel raises before solving).
    Status.BAD_SIZES: "sizes lie outside the padded [N, M] problem",
}
BACKENDS = ("auto", "cpu", "cuda", "scipy")

if _LOAD_ERROR is None:

    def _one_device(op: str, *tensors) -> None:
        """The fake kernels run for meta (and fake) tensors. A real tensor on another device
        in the same call lands here too (meta outranks CPU in dispatch): refuse it, rather
        than return empty tensors where the real kernel's results were expected."""
        devices = {t.device for t in tensors if t is not None}
        if len(devices) > 1:
            names = ", ".join(sorted(map(str, devices)))
            raise ValueError(f"{op}: every tensor argument must be on one device, got {names}")

    @torch.library.register_fake("maskformer_fast::lsa")
    def _lsa_fake(cost, sizes, maximize, raise_errors=False, col_splits=None, method=0):
        _one_device("lsa", cost, sizes, col_splits)
        batch, rows = cost.shape[0], cost.shape[1]
        return cost.new_empty((batch, rows), dtype=torch.int64), cost.new_empty(
            (batch,), dtype=torch.int32
        )

    @torch.library.register_fake("maskformer_fast::lsa_duals")
    def _lsa_duals_fake(cost, sizes, maximize, lanes, col_splits=None, method=2):
        _one_device("lsa_duals", cost, sizes, col_splits)
        batch, rows, cols = cost.shape
        return (
            cost.new_empty((batch, rows), dtype=torch.int64),
            cost.new_empty((batch,), dtype=torch.int32),
            cost.new_empty((batch, rows), dtype=torch.float64),
            cost.new_empty((batch, cols), dtype=torch.float64),
        )

    # The CPU cost kernels (csrc/cost/); a build older than them has neither.
    if hasattr(torch.ops.maskformer_fast, "mask_cost_sums"):

        @torch.library.register_fake("maskformer_fast::mask_cost_sums")
        def _mask_cost_sums_fake(logits, targets, counts, mask_cost, alpha, gamma, chunk):
            _one_device("mask_cost_sums", logits, targets, counts)
            B, Q, T = logits.shape[0], logits.shape[1], targets.shape[1]
            return logits.new_empty((B, 2, Q, T), dtype=torch.float32), logits.new_empty(
                (B, 2, Q), dtype=torch.float32
            )

        @torch.library.register_fake("maskformer_fast::bilinear_sample")
        def _bilinear_sample_fake(planes, grid):
            _one_device("bilinear_sample", planes, grid)
            return planes.new_empty((planes.shape[0], planes.shape[1], grid.shape[1]))


@functools.cache
def has_kernel(device_type: str, op: str = "lsa") -> bool:
    """Whether the built extension has a kernel of op `op` (e.g. "lsa", "mask_cost_sums")
    for `device_type` ("cpu" or "cuda"); False for an op an older build lacks."""
    if _LOAD_ERROR is not None or not hasattr(torch.ops.maskformer_fast, op):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"maskformer_fast::{op}", key)


_warned_fallback = False


def resolve_backend(backend: str, device: torch.device) -> str:
    """Maps `backend` to "cpu", "cuda" or "scipy" for a cost on `device`."""
    global _warned_fallback
    kind = device.type  # (a property that costs a third of a microsecond: read once)
    if backend == "auto" and kind in ("cpu", "cuda") and has_kernel(kind):
        return kind
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "scipy":
        return backend
    if backend in ("cpu", "cuda"):
        if kind != backend:
            raise ValueError(
                f"backend={backend!r} needs a cost tensor on {backend}, got one on {device}"
            )
        if not has_kernel(backend):
            why = f" ({_LOAD_ERROR})" if _LOAD_ERROR is not None else ""
            raise RuntimeError(
                f"backend={backend!r}: maskformer_fast._C has no {backend} kernel{why}; "
                "build it with `pip install -e . --no-build-isolation`"
            )
        return backend
    if not _warned_fallback:
        _warned_fallback = True
        why = f": {_LOAD_ERROR}" if _LOAD_ERROR is not None else ""
        warnings.warn(
            f"maskformer_fast: no compiled kernel for {kind} tensors{why}; "
            "falling back to scipy (slow, one problem at a time)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "scipy"


# The op's overload, for callers that have chosen the compiled backend already (the packet,
# torch.ops.maskformer_fast.lsa, is a Python frame more).
lsa_op = torch.ops.maskformer_fast.lsa.default if _LOAD_ERROR is None else None


def lsa(cost: torch.Tensor, sizes: torch.Tensor | None, maximize: bool, backend: str,
        raise_errors=False, col_splits: torch.Tensor | None = None, method: int = 0):
    """Runs the batched op on the chosen backend: (col4row [B, N] int64, status [B] int32).
    raise_errors: raise ValueError for the first failed item instead (raise_for_status).
    method: the op's (0 auto, 1 certified, 2 scipy's order; CPU only)."""
    if backend == "cpu":
        # (the op's own check: no Python after the solve, where each step costs most)
        return torch.ops.maskformer_fast.lsa(cost, sizes, maximize, raise_errors, col_splits, method)
    if backend == "cuda":
        # The statuses are read here, not by the op: an error raised from the CUDA op crashed
        # the process on an H200 with torch 2.11 (the op reads them the same way: one sync).
        col4row, status = torch.ops.maskformer_fast.lsa(cost, sizes, maximize, False, col_splits)
    else:
        col4row, status = _lsa_scipy(cost, sizes, maximize, col_splits)
    if raise_errors:
        raise_for_status(status, batched=True)
    return col4row, status


def pairs(col4row: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """scipy's (row_ind, col_ind) of every item of col4row [B, N], in one pass."""
    if _LOAD_ERROR is None:
        return _C.lsa_pairs(col4row)
    out = []
    for row in col4row:  # the fallback's pace
        rows = torch.nonzero(row >= 0).flatten()
        out.append((rows, row[rows]))
    return out


def check_col_splits(splits: list[int], batch: int, cols: int) -> None:
    """DETR's column splits checked on the host, worded as the CPU op words it."""
    if len(splits) != batch:
        raise ValueError(
            f"col_splits must have one entry per batch item ({batch}), got shape [{len(splits)}]"
        )
    offset = 0
    for b, m in enumerate(splits):
        if m < 0:
            raise ValueError(f"col_splits[{b}] = {m} is negative")
        if m > cols - offset:
            raise ValueError(
                f"col_splits sum to more than the cost's {cols} columns (from batch item {b})"
            )
        offset += m
    if offset != cols:
        raise ValueError(f"col_splits sum to {offset}, but the cost has {cols} columns")


def raise_for_status(status: torch.Tensor, batched: bool) -> None:
    """One host sync: raises ValueError with scipy's message for the first failed item
    (the op's raise_errors does the same in C++, csrc/lsa/status.h)."""
    if status.shape[0] <= 256:  # a list: microseconds less than .numpy() on a new tensor
        codes = status.tolist()
        if not any(codes):  # the common case
            return
    else:
        codes = (status if status.is_cpu else status.cpu()).numpy()
        if not np.count_nonzero(codes):
            return
    b = int(np.flatnonzero(codes)[0])
    message = STATUS_MESSAGES[int(codes[b])]
    raise ValueError(f"{message} (batch item {b})" if batched else message)


def _lsa_scipy(cost: torch.Tensor, sizes: torch.Tensor | None, maximize: bool,
               col_splits: torch.Tensor | None = None):
    """The fallback: scipy per item, the arguments checked as the compiled ops check them."""
    batch, rows, cols = cost.shape
    items = [(rows, cols, 0)] * batch  # (n, m, first column)
    if col_splits is not None:
        splits = col_splits.tolist()
        check_col_splits(splits, batch, cols)
        ends = np.cumsum(splits, dtype=np.int64)
        items = [(rows, m, int(e) - m) for m, e in zip(splits, ends)]
    elif sizes is not None:
        for b, (n, m) in enumerate(sizes.tolist()):
            if not (0 <= n <= rows and 0 <= m <= cols):
                raise ValueError(f"sizes[{b}] = ({n}, {m}) is outside the padded problem "
                                 f"[{rows}, {cols}] (batch item {b})")
            items[b] = (n, m, 0)
    col4row = np.full((batch, rows), -1, dtype=np.int64)
    status = np.zeros(batch, dtype=np.int32)
    host = cost.detach().cpu()
    if host.dtype in (torch.float16, torch.bfloat16):
        host = host.double()
    host = host.numpy()
    for b, (n, m, first) in enumerate(items):
        try:
            r, c = scipy.optimize.linear_sum_assignment(host[b, :n, first:first + m],
                                                        maximize=maximize)
        except ValueError as exc:
            status[b] = Status.INFEASIBLE if "infeasible" in str(exc) else Status.INVALID
            continue
        col4row[b, r] = c
    return (
        torch.from_numpy(col4row).to(cost.device),
        torch.from_numpy(status).to(cost.device),
    )
