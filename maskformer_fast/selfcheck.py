"""GPU self-check of an installed build: ``python -m maskformer_fast.selfcheck``.

On a machine with a CUDA GPU it checks parity and reports measurements:

1. the assignment solver: parity (CUDA vs this library's CPU path vs scipy, index for index,
   and CUDA vs CPU dual for dual) on a corpus of hard cases, then a timing table: median
   milliseconds (CUDA events for the GPU paths, wall clock for the host ones, warm-up first)
   of the scipy loop (``.cpu()`` included), this library's CPU path (``.cpu()`` included),
   its CUDA path and, when installed, torch-linear-assignment, with the device name and the
   speed-up of the CUDA path over each;
2. the Triton kernels: the matching cost (from logits and from embeddings) and the mask
   einsum with its gradients against the CPU torch references, then a timing table of the
   matching cost (Triton vs the torch reference vs Mask2Former's per-image formulation, on
   the GPU) with the bytes-moved floor beside the Triton kernel and the torch reference
   (the floor's time at the device's peak bandwidth, and the GB/s each reaches).

The timings are reported, not judged. Exit status: 0 when both parity checks pass, 2 when
either fails (the differences are printed), 1 without a GPU or without the CUDA kernels
(nothing is checked).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.optimize
import torch

from maskformer_fast import _ops
from maskformer_fast.lsa import Status, compiled_backends


class Case(NamedTuple):
    """One batch of the parity corpus: cost [B, N, M] (CPU), sizes [B, 2] int64 or None."""

    name: str
    cost: torch.Tensor
    sizes: torch.Tensor | None
    maximize: bool


def corpus(seed: int = 0) -> list[Case]:
    """Random floats, heavy ties, constants, forbidden (+inf) edges, invalid entries, both
    orientations, ragged sizes and maximisation; widths for which the plan picks a warp, a
    block, or the global workspace."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for n, m in [(5, 9), (9, 5), (40, 40), (30, 70), (70, 30), (3, 1100), (1100, 3)]:
        batch = 4 if n * m < 10_000 else 2
        cases.append(Case(f"uniform {n}x{m}", torch.rand(batch, n, m, generator=g), None, False))
        ties = torch.randint(0, 4, (batch, n, m), generator=g).double()
        cases.append(Case(f"ties [0,4) {n}x{m}", ties, None, False))
        cases.append(Case(f"ties max {n}x{m}", ties, None, True))
    cases.append(Case("constant 16x16", torch.full((3, 16, 16), 2.5), None, False))
    cases.append(Case("constant 12x20", torch.full((3, 12, 20), -1.0), None, False))
    forbidden = torch.rand(8, 20, 30, generator=g, dtype=torch.float64)
    forbidden[torch.rand(forbidden.shape, generator=g) < 0.6] = float("inf")
    cases.append(Case("+inf edges 20x30 (some infeasible)", forbidden, None, False))
    cases.append(Case("+inf edges 30x20 (some infeasible)", forbidden.transpose(1, 2), None, False))
    cases.append(Case("+inf under maximize (invalid)", forbidden, None, True))
    bad = torch.rand(4, 6, 6, generator=g)
    bad[0, 2, 3], bad[1, 0, 0] = float("nan"), float("-inf")
    bad[3, 0, :], bad[3, 5, 1] = float("inf"), float("nan")  # invalid outranks infeasible
    cases.append(Case("NaN / -inf (invalid)", bad, None, False))
    cases.append(Case("NaN / -inf (invalid) transposed", bad.transpose(1, 2), None, False))
    ragged = torch.rand(16, 40, 25, generator=g) * 10
    sizes = torch.stack(
        [torch.randint(0, 41, (16,), generator=g), torch.randint(0, 26, (16,), generator=g)], 1
    )
    cases.append(Case("ragged 40x25", ragged.floor(), sizes, False))
    cases.append(Case("ragged 40x25 maximize", ragged, sizes, True))
    return cases


def scipy_item(cost: np.ndarray, maximize: bool) -> tuple[np.ndarray, int]:
    """col4row of one item as scipy solves it (-1 unmatched) and the status it implies."""
    col4row = np.full(cost.shape[0], -1, dtype=np.int64)
    try:
        rows, cols = scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
    except ValueError as exc:
        return col4row, Status.INFEASIBLE if "infeasible" in str(exc) else Status.INVALID
    col4row[rows] = cols
    return col4row, Status.OK


def check_parity(cases: list[Case], device: str) -> list[str]:
    """Differences between the `device` kernel, the CPU kernel (indices, status, duals
    bit for bit) and scipy (indices, status); an empty list when all agree."""
    op, duals = torch.ops.maskformer_fast.lsa, torch.ops.maskformer_fast.lsa_duals
    failures = []
    for case in cases:
        sizes_dev = case.sizes.to(device) if case.sizes is not None else None
        got = [t.cpu() for t in duals(case.cost.to(device), sizes_dev, case.maximize, 1)]
        want = duals(case.cost, case.sizes, case.maximize, 1)
        for name, a, b in zip(("col4row", "status", "u", "v"), got, want):
            if a.is_floating_point():  # bit for bit
                a, b = a.view(torch.int64), b.view(torch.int64)
            if not torch.equal(a, b):
                failures.append(f"{case.name}: {name} differs between {device} and cpu")
        col4row, status = (t.cpu() for t in op(case.cost.to(device), sizes_dev, case.maximize))
        if not (torch.equal(col4row, got[0]) and torch.equal(status, got[1])):
            failures.append(f"{case.name}: lsa and lsa_duals disagree on {device}")
        host = case.cost.double().numpy()
        for b in range(host.shape[0]):
            n, m = case.sizes[b].tolist() if case.sizes is not None else host.shape[1:]
            ref, ref_status = scipy_item(host[b, :n, :m], case.maximize)
            if int(status[b]) != ref_status or not np.array_equal(col4row[b, :n].numpy(), ref):
                failures.append(f"{case.name}: item {b} differs from scipy")
    return failures


def median_ms(
    fn: Callable[[], object], cuda: bool, budget_s: float = 2.0, max_reps: int = 20
) -> float:
    """Median time of fn() in ms after one warm-up call: CUDA events when `cuda`, else the
    wall clock; at least 3 repetitions, more while within `budget_s`."""
    fn()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start_all < budget_s):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


COLUMNS = ("scipy loop", "maskformer_fast cpu", "maskformer_fast cuda", "torch-linear-assignment")


def format_table(device: str, rows: list[tuple[str, dict[str, float | None]]]) -> str:
    """A markdown table of median ms per case and solver (None: not run), with the speed-up
    of the CUDA path over each other solver."""
    others = [c for c in COLUMNS if c != "maskformer_fast cuda"]
    head = ["case", *COLUMNS, *(f"{c} / cuda" for c in others)]
    lines = [f"Device: {device} (median ms)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for case, times in rows:
        cuda = times.get("maskformer_fast cuda")
        cells = [case] + [f"{times[c]:.3f}" if times.get(c) is not None else "n/a" for c in COLUMNS]
        for c in others:
            ok = cuda and times.get(c) is not None
            cells.append(f"{times[c] / cuda:.1f}x" if ok else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_cases(g: torch.Generator) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """The benchmark shapes (float32 uniform): DETR-like batches, a ragged batch, and
    single large problems."""
    ragged_m = torch.randint(1, 21, (32,), generator=g)
    return [
        ("B=208 300x100", torch.rand(208, 300, 100, generator=g), None),
        ("B=208 300x300", torch.rand(208, 300, 300, generator=g), None),
        ("B=208 300x600", torch.rand(208, 300, 600, generator=g), None),
        ("B=32 100x[1,20] ragged", torch.rand(32, 100, 20, generator=g),
         torch.stack([torch.full((32,), 100), ragged_m], 1)),
        ("1000x1000", torch.rand(1, 1000, 1000, generator=g), None),
        ("2000x2000", torch.rand(1, 2000, 2000, generator=g), None),
    ]


def time_all(device: str) -> list[tuple[str, dict[str, float | None]]]:
    try:
        from torch_linear_assignment import batch_linear_assignment
    except ImportError:
        batch_linear_assignment = None
    op = torch.ops.maskformer_fast.lsa
    rows = []
    for name, cost, sizes in timing_cases(torch.Generator().manual_seed(1)):
        gpu, gpu_sizes = cost.to(device), sizes.to(device) if sizes is not None else None
        shape = sizes.tolist() if sizes is not None else [cost.shape[1:]] * cost.shape[0]

        def scipy_loop():
            host = gpu.cpu().numpy()
            for b, (n, m) in enumerate(shape):
                scipy.optimize.linear_sum_assignment(host[b, :n, :m])

        times = {
            "scipy loop": median_ms(scipy_loop, cuda=False),
            "maskformer_fast cpu": median_ms(lambda: op(gpu.cpu(), sizes, False), cuda=False),
            "maskformer_fast cuda": median_ms(lambda: op(gpu, gpu_sizes, False), cuda=True),
            "torch-linear-assignment": None,
        }
        if batch_linear_assignment is not None and sizes is None:
            tla = median_ms(lambda: batch_linear_assignment(gpu), cuda=True)
            times["torch-linear-assignment"] = tla
        rows.append((name, times))
        print(f"  timed {name}", flush=True)
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("maskformer_fast.selfcheck needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Nothing was checked.")
        return 1
    if "cuda" not in compiled_backends():
        why = _ops._LOAD_ERROR or "built without nvcc"
        print(f"maskformer_fast.selfcheck: the built extension has no CUDA kernel ({why}); "
              "rebuild it with `pip install -e . --no-build-isolation` where nvcc is found.")
        return 1
    device = "cuda"
    name = torch.cuda.get_device_name()
    print(f"maskformer_fast self-check on {name}, torch {torch.__version__}")
    cases = corpus()
    failures = check_parity(cases, device)
    if failures:
        print("PARITY FAILED:\n  " + "\n  ".join(failures))
        return 2
    print(f"parity: CUDA == CPU (indices, status, duals bit for bit) == scipy, {len(cases)} cases")
    rows = time_all(device)
    print(format_table(name, rows))
    failures = check_kernels(device)
    if failures:
        print("KERNEL CHECK FAILED:\n  " + "\n  ".join(failures))
        return 2
    print("kernels: Triton (CUDA) == torch references (CPU) within fp32 / TF32 tolerances")
    print(time_kernels(device))
    return 0


KERNEL_SHAPES = [(3, 100, 20, 12544, 64), (2, 7, 45, 1000, 20), (4, 130, 0, 77, 8)]  # B, Q, T, P, C


def check_kernels(device: str, shapes=KERNEL_SHAPES) -> list[str]:
    """The Triton kernels on `device` against the torch references on the CPU."""
    from maskformer_fast import kernels

    g = torch.Generator().manual_seed(2)
    failures = []
    for B, Q, T, P, C in shapes:
        x, y = torch.randn(B, Q, P, generator=g) * 3, (torch.rand(B, T, P, generator=g) < 0.3).float()
        counts = torch.randint(0, T + 1, (B,), generator=g)
        logits, labels = torch.randn(B, Q, 81, generator=g), torch.randint(0, 80, (B, T), generator=g)
        embed, feat = torch.randn(B, Q, C, generator=g) / C**0.5, torch.randn(B, C, 1, P, generator=g)
        for mask_cost in ("bce", "focal"):
            args = (x, y, counts, logits, labels)
            got = kernels.pairwise_mask_cost(*(t.to(device) for t in args), mask_cost=mask_cost, backend="triton")
            want = kernels.pairwise_mask_cost(*args, mask_cost=mask_cost, backend="torch")
            if not torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-4, equal_nan=True):
                failures.append(f"pairwise_mask_cost {mask_cost} B={B} Q={Q} T={T} P={P}")
            args = (embed, feat, y.view(B, T, 1, P), counts, logits, labels)
            got = kernels.mask_cost_from_embeddings(*(t.to(device) for t in args), mask_cost=mask_cost,
                                                    backend="triton")
            want = kernels.mask_cost_from_embeddings(*args, mask_cost=mask_cost, backend="torch")
            if not torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-4, equal_nan=True):
                failures.append(f"mask_cost_from_embeddings {mask_cost} B={B} Q={Q} T={T} P={P} C={C}")
        leaves = [embed.to(device).requires_grad_(), feat.to(device).requires_grad_()]
        out = kernels.mask_einsum(*leaves, backend="triton")
        got = [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]
        ref_leaves = [embed.double().requires_grad_(), feat.double().requires_grad_()]
        ref = torch.einsum("btc,bchw->bthw", *ref_leaves)
        want = [ref, *torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))]
        for what, a, b in zip(("einsum", "d embed", "d feat"), got, want):
            scale = b.abs().max().item() + 1
            if not torch.allclose(a.cpu().double(), b, rtol=2e-2, atol=2e-2 * scale):  # TF32
                failures.append(f"mask_einsum {what} B={B} Q={Q} C={C} P={P}")
    return failures


def peak_bandwidth(device: str) -> float | None:
    """The device's peak memory bandwidth in bytes/s (2 x memory clock x bus width, as
    CUDA's deviceQuery computes it), or None when the driver does not report them."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def kernel_table(case_rows: list[tuple[str, int, list[float]]], peak: float | None) -> str:
    """Rows (case, bytes-moved floor, [Triton ms, torch reference ms, Mask2Former ms]) as a
    markdown table, each kernel's GB/s (the floor / its time) beside it."""
    at_peak = f"{peak / 1e9:.0f} GB/s" if peak else "unknown"
    lines = ["Matching cost, B=8 Q=100 T=20 (median ms; GB/s = the least bytes any implementation must "
             "move / time)", f"floor ms = the floor at the device's peak bandwidth ({at_peak})", "",
             "| case | floor MB | floor ms | Triton ms | Triton GB/s | torch reference ms | torch reference GB/s "
             "| Mask2Former per image ms |", "|---|---|---|---|---|---|---|---|"]
    for case, floor, (triton, torch_ref, per_image) in case_rows:
        floor_ms = f"{floor / peak * 1e3:.3f}" if peak else "n/a"
        lines.append(f"| {case} | {floor / 1e6:.1f} | {floor_ms} | {triton:.3f} | {floor / triton / 1e6:.0f} | "
                     f"{torch_ref:.3f} | {floor / torch_ref / 1e6:.0f} | {per_image:.3f} |")
    return "\n".join(lines)


def time_kernels(device: str) -> str:
    """Median ms of the matching cost of B=8 images x 100 queries x 20 targets."""
    from maskformer_fast import kernels

    g = torch.Generator().manual_seed(3)
    rows = []
    for case, P in (("P=12,544 points", 12544), ("128x128", 128 * 128), ("256x256", 256 * 256)):
        x = (torch.randn(8, 100, P, generator=g) * 3).to(device)
        y = (torch.rand(8, 20, P, generator=g) < 0.3).float().to(device)
        logits, labels = torch.randn(8, 100, 81, generator=g).to(device), torch.randint(0, 80, (8, 20)).to(device)

        def per_image():
            for b in range(8):
                pos = torch.nn.functional.softplus(-x[b])
                neg = torch.nn.functional.softplus(x[b])
                p = x[b].sigmoid()
                cost = (pos @ y[b].T + neg @ (1 - y[b]).T) / P - logits[b].softmax(-1)[:, labels[b]]
                cost = cost + 1 - (2 * p @ y[b].T + 1) / (p.sum(-1)[:, None] + y[b].sum(-1)[None, :] + 1)

        times = [median_ms(lambda: kernels.pairwise_mask_cost(x, y, None, logits, labels, backend=b), cuda=True)
                 for b in ("triton", "torch")] + [median_ms(per_image, cuda=True)]
        # read the logits, targets, class logits and labels once, write the [B, Q, T] cost
        floor = sum(t.numel() * t.element_size() for t in (x, y, logits, labels)) + 8 * 100 * 20 * 4
        rows.append((case, floor, times))
    return kernel_table(rows, peak_bandwidth(device))


if __name__ == "__main__":
    sys.exit(main())
