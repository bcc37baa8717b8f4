"""The CUDA solver (csrc/lsa/lsa_cuda.cu), trusted without a GPU as DESIGN.md asks:

1. it is built: with a CUDA build of torch, the extension must register CUDA kernels;
2. its logic runs on the CPU: the simulated team with the CUDA teams' widths and reduction
   order equals the sequential team bit for bit, and the kernels' per-item code
   (lsa::cuda::solve_item: sizes check, orientation, strided reads, staging, outputs) runs
   on the host through a small nvcc-built library and equals the CPU op bit for bit;
3. the GPU tests (marked cuda) and `python -m maskformer_fast.selfcheck` run where a GPU is;
4. the GPU tests include the public API (backend "auto", errors="status" without a sync
   and under graph capture, errors="raise" with one sync).

The nvcc resource report (no spills) is checked in tests/test_build.py.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import scipy.optimize
import torch

from maskformer_fast import _ops
from maskformer_fast.hungarian import Status, compiled_backends
from maskformer_fast.selfcheck import COLUMNS, check_parity, corpus, format_table, kernel_table

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
]  # fmt: skip
WARP, BLOCK = 32, 256  # a warp team, and a block team (the widths go up to MAX_LANES)
WIDTHS = [32, 64, 128, 256, 512]  # every team width the plan can pick (lsa::cuda::team_width)

needs_ops = pytest.mark.skipif("cpu" not in compiled_backends(),
                               reason="maskformer_fast._C not built")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def duals(cost, sizes=None, maximize=False, lanes=1):
    return torch.ops.maskformer_fast.lsa_duals(cost, sizes, maximize, lanes)


def state_bytes(R, C):
    """Bytes of one item's solver state (lsa::cuda::state_bytes)."""
    return 8 * (R + 3 * C) + (4 * (R + 5 * C) + 7) // 8 * 8


def workspace_cases(optin):
    """(name, (B, N, M), lanes) whose solver state does not fit in `optin` bytes of shared
    memory (40 bytes of state per column), for a block team and a warp team."""
    wide = optin // 40 + 64
    return [
        ("block, wide", (1, 300, wide), 1),
        ("block, tall transposed view", (2, wide, 200), 1),
        ("block, ties", (1, 150, wide), BLOCK),
        ("warp", (4, 100, wide), WARP),
    ]


def assert_identical(got, want, what=""):
    """col4row, status equal; duals equal bit for bit."""
    for name, a, b in zip(("col4row", "status", "u", "v"), got, want):
        a, b = a.cpu(), b.cpu()
        if a.is_floating_point():
            a, b = a.view(torch.int64), b.view(torch.int64)
        assert torch.equal(a, b), f"{what}: {name} differs"


# 1. Built.


@needs_ops
def test_cuda_kernels_registered():
    if torch.version.cuda is None:
        pytest.skip("CPU build of torch: the extension is built without CUDA")
    for op in ("maskformer_fast::lsa", "maskformer_fast::lsa_duals"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), (
            f"{op} has no CUDA kernel although torch {torch.__version__} has CUDA "
            f"{torch.version.cuda}: build with nvcc available (MASKFORMER_FAST_CUDA=1)"
        )


# 2. The logic on the CPU.


@needs_ops
@pytest.mark.parametrize("lanes", WIDTHS)
def test_simulated_cuda_team_equals_sequential(lanes):
    for case in corpus(seed=lanes):
        want = duals(case.cost, case.sizes, case.maximize, 1)
        got = duals(case.cost, case.sizes, case.maximize, lanes)
        assert_identical(got, want, f"{case.name}, {lanes} lanes")


class Emulator:
    """The CUDA kernels' per-item code on the host (see the EMULATOR source below)."""

    SOURCE = r"""
#include <vector>
#include "lsa/lsa_cuda_kernels.cuh"
#include "lsa/simulated_team.h"
using namespace lsa::cuda;

// Every item of the batch through solve_item with a simulated team of `lanes`, the cost
// staged (as the kernel does when it fits in shared memory) or read in place.
extern "C" void emulate(const void* cost, int dtype, int64_t B, int64_t N, int64_t M,
                        const int64_t* strides, const int64_t* sizes, const int64_t* size_strides,
                        const int64_t* col_splits, const int64_t* col_ends, bool maximize,
                        int lanes, bool stage, int64_t* col4row, int32_t* status, double* u,
                        double* v) {
  const Batch p{cost, DType(dtype), B, N, M, strides[0], strides[1], strides[2], sizes,
                size_strides[0], size_strides[1], col_splits, col_ends, maximize, col4row,
                status, u, v};
  const Plan plan = plan_for(B, N, M, 1, stage ? 1 << 30 : 0, lanes);
  std::vector<double> staged(stage ? plan.R * plan.C : 0), state(plan.state_bytes / 8);
  visit_dtype(p.dtype, [&](auto tag) {
    for (int64_t b = 0; b < B; ++b) {
      lsa::SimulatedTeam team(lanes);
      solve_item<decltype(tag)>(team, p, plan, b, reinterpret_cast<char*>(state.data()),
                                stage ? staged.data() : nullptr);
    }
    return 0;
  });
}

extern "C" void plan(int64_t B, int64_t N, int64_t M, int sms, int smem_optin, int64_t lanes,
                     int64_t* out) {
  const Plan q = plan_for(B, N, M, sms, smem_optin, lanes);
  const int64_t fields[] = {q.lanes, q.teams, q.state_shared, q.stage_cost, q.team_smem,
                            q.workspace_bytes};
  for (int k = 0; k < 6; ++k) out[k] = fields[k];
}
"""
    DTYPE_CODES = {dt: k for k, dt in enumerate(DTYPES)}  # lsa::cuda::DType's order

    def __init__(self, directory: Path):
        nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
        nvcc = nvcc if os.path.exists(nvcc) else shutil.which("nvcc")
        if nvcc is None:
            pytest.skip("nvcc not found")
        src, lib = directory / "emulator.cu", directory / "emulator.so"
        src.write_text(self.SOURCE)
        subprocess.run(
            [nvcc, "-std=c++20", "-O2", "-shared", "-Xcompiler", "-fPIC", "-arch=sm_80",
             "--expt-relaxed-constexpr", "-diag-suppress", "20011,20014",
             f"-I{ROOT / 'csrc'}", "-o", str(lib), str(src)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.lib = ctypes.CDLL(str(lib))

    def solve(self, cost, sizes=None, maximize=False, lanes=WARP, stage=False, col_splits=None):
        B, N, M = cost.shape
        ends = col_splits.cumsum(0) if col_splits is not None else None
        out = (
            torch.empty(B, N, dtype=torch.int64), torch.empty(B, dtype=torch.int32),
            torch.empty(B, N, dtype=torch.float64), torch.empty(B, M, dtype=torch.float64),
        )  # fmt: skip
        i64 = ctypes.c_int64 * 3
        self.lib.emulate(
            ctypes.c_void_p(cost.data_ptr()), self.DTYPE_CODES[cost.dtype],
            ctypes.c_int64(B), ctypes.c_int64(N), ctypes.c_int64(M), i64(*cost.stride()),
            ctypes.c_void_p(sizes.data_ptr() if sizes is not None else 0),
            i64(*(sizes.stride() if sizes is not None else (0, 0)), 0),
            *(ctypes.c_void_p(t.data_ptr() if t is not None else 0) for t in (col_splits, ends)),
            ctypes.c_bool(maximize), lanes, ctypes.c_bool(stage),
            *(ctypes.c_void_p(t.data_ptr()) for t in out),
        )  # fmt: skip
        return out

    def plan(self, B, N, M, sms, smem_optin, lanes=1) -> dict:
        out = (ctypes.c_int64 * 6)()
        self.lib.plan(ctypes.c_int64(B), ctypes.c_int64(N), ctypes.c_int64(M), sms, smem_optin,
                      ctypes.c_int64(lanes), out)
        keys = ("lanes", "teams", "state_shared", "stage_cost", "team_smem", "workspace_bytes")
        return dict(zip(keys, out))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return Emulator(tmp_path_factory.mktemp("lsa_cuda_emulator"))


@needs_ops
@pytest.mark.parametrize("lanes", [WARP, 64, BLOCK])
@pytest.mark.parametrize("stage", [False, True], ids=["in-place", "staged"])
def test_kernel_item_code_equals_cpu(emulator, lanes, stage):
    for case in corpus(seed=3):
        got = emulator.solve(case.cost, case.sizes, case.maximize, lanes, stage)
        assert_identical(got, duals(case.cost, case.sizes, case.maximize), case.name)


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_item_code_dtypes_and_strides(emulator, dtype):
    g = torch.Generator().manual_seed(7)
    base = (torch.rand(3, 24, 34, generator=g) * 6 - 2).to(dtype)
    views = {
        "contiguous": base,
        "transposed": base.transpose(1, 2),
        "step slices": base[:, ::2, 1::3],
        "batch-strided transposed": base[::2].transpose(1, 2)[:, 3:, :],
    }
    for name, view in views.items():
        for maximize in (False, True):
            want = duals(view, None, maximize)
            for stage in (False, True):
                got = emulator.solve(view, None, maximize, WARP, stage)
                assert_identical(got, want, f"{dtype} {name} maximize={maximize} stage={stage}")


@needs_ops
def test_kernel_item_code_bad_sizes(emulator):
    """Sizes outside the padded problem: status 3, -1 and zero duals, nothing read (the
    cost here is a view of exactly [B, N, M]; an out-of-bounds read would be in freed or
    foreign memory, caught by the sanitizer build)."""
    cost = torch.rand(5, 6, 4, dtype=torch.float64)
    sizes = torch.tensor([[6, 4], [7, 4], [-1, 2], [3, 5], [2, 3]])
    col4row, status, u, v = emulator.solve(cost, sizes)
    assert status.tolist() == [0, Status.BAD_SIZES, Status.BAD_SIZES, Status.BAD_SIZES, 0]
    for b in (1, 2, 3):
        assert (col4row[b] == -1).all() and (u[b] == 0).all() and (v[b] == 0).all()
    good = torch.tensor([[6, 4], [6, 4], [6, 4], [6, 4], [2, 3]])
    want = duals(cost, good)
    for b in (0, 4):
        assert torch.equal(col4row[b], want[0][b]) and torch.equal(u[b], want[2][b])


@needs_ops
@pytest.mark.parametrize("stage", [False, True], ids=["in-place", "staged"])
def test_kernel_item_code_col_splits(emulator, stage):
    """DETR's layout: item b is cost[b, :, o_b : o_b + splits[b]], read in place (here a
    transposed, strided view), equal to the CPU op; splits that do not sum to M, or that
    run past it, give every item status 3 and nothing read."""
    g = torch.Generator().manual_seed(11)
    cost = torch.rand(4, 23, 9, generator=g).transpose(1, 2)[:, :, 1:]  # [4, 9, 22]
    cost[1, :, 3:5] = 0.5  # ties
    for splits in ([5, 0, 9, 8], [0, 0, 0, 22], [22, 0, 0, 0]):
        splits = torch.tensor(splits)
        for maximize in (False, True):
            got = emulator.solve(cost, None, maximize, WARP, stage, col_splits=splits)
            want = torch.ops.maskformer_fast.lsa_duals(cost, None, maximize, 1, col_splits=splits)
            assert_identical(got, want, f"{splits.tolist()} maximize={maximize}")
    for splits in ([5, 0, 9, 7], [5, 0, 9, 9], [30, -8, 0, 0]):
        col4row, status, u, v = emulator.solve(cost, None, False, WARP, stage,
                                               col_splits=torch.tensor(splits))
        want = [Status.BAD_SIZES] * 4 if sum(splits) != 22 else [Status.BAD_SIZES] * 2 + [0, 0]
        assert status.tolist() == want, splits


@needs_ops
def test_plan(emulator):
    h100 = dict(sms=132, smem_optin=227 * 1024)
    # The team width: the widest with two columns per lane and at most 512 lanes per SM.
    assert emulator.plan(208, 300, 300, **h100)["lanes"] == 128
    assert emulator.plan(208, 300, 100, **h100)["lanes"] == 128
    assert emulator.plan(208, 300, 600, **h100)["lanes"] == 256
    assert emulator.plan(32, 100, 20, **h100)["lanes"] == WARP
    assert emulator.plan(256, 50, 50, **h100)["lanes"] == WARP
    assert emulator.plan(1, 1000, 1000, **h100)["lanes"] == 256
    assert emulator.plan(1, 2000, 2000, **h100)["lanes"] == 512
    assert emulator.plan(4000, 300, 300, **h100)["lanes"] == 32
    # Warp teams one per block, four per block once the batch exceeds the resident blocks.
    assert emulator.plan(256, 50, 50, **h100)["teams"] == 1
    assert emulator.plan(132 * 32 + 1, 50, 50, **h100)["teams"] == 4
    # DETR-like batches: the solver state in shared memory; small problems staged too.
    detr = emulator.plan(208, 300, 300, **h100)
    assert detr["state_shared"] == 1 and detr["workspace_bytes"] == 0
    assert emulator.plan(32, 100, 20, **h100)["stage_cost"] == 1
    # Too big for shared memory: the state in the global workspace, one slice per item.
    assert emulator.plan(1, 2000, 2000, **h100)["state_shared"] == 1  # 104 KB
    big = emulator.plan(1, 3000, 5000, **h100)  # 236 KB
    assert big["state_shared"] == 0 and big["stage_cost"] == 0 and big["workspace_bytes"] > 0
    assert big["workspace_bytes"] == state_bytes(3000, 5000)
    # The GPU workspace test's cases use the workspace on any device.
    for optin in (99 * 1024, 227 * 1024):
        for name, (B, N, M), lanes in workspace_cases(optin):
            q = emulator.plan(B, N, M, sms=132, smem_optin=optin, lanes=lanes)
            assert (q["lanes"] == WARP) == (lanes == WARP) and q["state_shared"] == 0, (name, optin)
            assert q["workspace_bytes"] == B * state_bytes(min(N, M), max(N, M)), (name, optin)
    # lanes forces the team.
    assert emulator.plan(1, 1000, 1000, **h100, lanes=WARP)["lanes"] == WARP
    assert emulator.plan(1000, 5, 5, **h100, lanes=512)["lanes"] == 512


# 3. Ready for a GPU: the self-check and the GPU tests.


def test_selfcheck_without_gpu_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run `python -m maskformer_fast.selfcheck` itself")
    result = subprocess.run(
        [sys.executable, "-m", "maskformer_fast.selfcheck"], capture_output=True, text=True,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1
    assert "needs a CUDA GPU" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_selfcheck_table_format():
    times = {"scipy loop": 70.0, "maskformer_fast cpu": 7.0, "maskformer_fast cuda": 1.0,
             "torch-linear-assignment": None}
    table = format_table("Test GPU", [("B=208 300x100", times)])
    lines = table.splitlines()
    assert lines[0] == "Device: Test GPU (median ms)"
    assert all(column in lines[2] for column in COLUMNS)
    assert lines[-1] == "| B=208 300x100 | 70.000 | 7.000 | 1.000 | n/a | 70.0x | 7.0x | n/a |"


def test_selfcheck_kernel_table_format():
    rows = [("P=12,544 points", 2_000_000_000, [1.0, 4.0, 8.0])]
    lines = kernel_table(rows, peak=4e12).splitlines()
    assert "(4000 GB/s)" in lines[1]
    assert lines[-1] == "| P=12,544 points | 2000.0 | 0.500 | 1.000 | 2000 | 4.000 | 500 | 8.000 |"
    lines = kernel_table(rows, peak=None).splitlines()
    assert "(unknown)" in lines[1]
    assert lines[-1] == "| P=12,544 points | 2000.0 | n/a | 1.000 | 2000 | 4.000 | 500 | 8.000 |"


@needs_ops
def test_selfcheck_parity_code_on_cpu():
    # The self-check's comparison against the CPU kernel and scipy, run with the CPU as the
    # device under test.
    assert check_parity(corpus(), "cpu") == []


@cuda
@pytest.mark.cuda
def test_cuda_parity_with_cpu_and_scipy():
    assert check_parity(corpus(), "cuda") == []


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("lanes", [1, *WIDTHS])
def test_cuda_teams_equal_cpu(lanes):
    for case in corpus(seed=11):
        sizes = case.sizes.cuda() if case.sizes is not None else None
        got = duals(case.cost.cuda(), sizes, case.maximize, lanes)
        assert_identical(got, duals(case.cost, case.sizes, case.maximize), case.name)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dtypes_and_strides(dtype):
    g = torch.Generator().manual_seed(5)
    base = (torch.rand(4, 40, 60, generator=g) * 6 - 2).to(dtype)
    for view in (base, base.transpose(1, 2), base[:, ::2, 1::3], base[::2].transpose(1, 2)):
        for maximize in (False, True):
            got = duals(view.cuda(), None, maximize)
            assert_identical(got, duals(view, None, maximize), f"{dtype} {view.stride()}")
            # A strided view of a CUDA tensor is read in place, not copied.
            strided = base.cuda().as_strided(view.shape, view.stride(), view.storage_offset())
            assert_identical(duals(strided, None, maximize), got, "strided CUDA view")


@cuda
@pytest.mark.cuda
def test_cuda_every_planned_width_equals_cpu():
    """Shapes for which the plan picks each team width, with ties."""
    g = torch.Generator().manual_seed(2)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [(4 * sms, 8, 60), (sms, 20, 200), (sms, 20, 300), (2, 100, 600), (1, 300, 2100)]
    for B, N, M in shapes:
        cost = torch.randint(0, 4, (B, N, M), generator=g).float()
        assert_identical(duals(cost.cuda()), duals(cost), f"{B}x{N}x{M}")


@cuda
@pytest.mark.cuda
def test_cuda_global_workspace_equals_cpu():
    """Items whose solver state does not fit in shared memory: the state in the global
    workspace, the cost read in place (plan_for). The block team (one item over the opt-in
    limit; both orientations, the second a transposed view) and the warp team (four items
    per block over it)."""
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    g = torch.Generator().manual_seed(8)
    for name, (B, N, M), lanes in workspace_cases(optin):
        if "transposed" in name:
            cost = torch.rand(B, M, N, generator=g).transpose(1, 2)
        elif "ties" in name:
            cost = torch.randint(0, 5, (B, N, M), generator=g).double()
        else:
            cost = torch.rand(B, N, M, generator=g)
        assert_identical(duals(cost.cuda(), None, False, lanes), duals(cost), name)


@cuda
@pytest.mark.cuda
def test_cuda_ragged_sizes_on_the_block_team():
    """Ragged items (either orientation, empty ones) on the block team: padding is NaN, so
    any read of it would show as status 2."""
    g = torch.Generator().manual_seed(9)
    for (B, N, M), lanes in [((6, 200, 1500), 1), ((8, 60, 90), BLOCK)]:
        cost = torch.randint(0, 20, (B, N, M), generator=g).float()
        sizes = torch.stack([torch.randint(0, N + 1, (B,), generator=g),
                             torch.randint(0, M + 1, (B,), generator=g)], 1)
        sizes[:3] = torch.tensor([[N, M], [N, 5], [0, 7]])  # full, tall, empty
        for b, (n, m) in enumerate(sizes.tolist()):
            cost[b, n:], cost[b, :, m:] = float("nan"), float("nan")
        want = duals(cost, sizes)
        assert (want[1] == 0).all()
        got = duals(cost.cuda(), sizes.cuda(), False, lanes)
        assert_identical(got, want, f"ragged {B}x{N}x{M}, lanes={lanes}")


@cuda
@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    """The cost is written on a side stream after a long sleep there, and the op called on
    that stream with no sync in between: on any other stream it would solve the zeros."""
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(64, 50, 80, generator=g)
    src, gpu = cost.cuda(), torch.zeros(cost.shape, device="cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds on this stream only
        gpu.copy_(src)
        got = duals(gpu, None, False, 1)
        col4row, status = torch.ops.maskformer_fast.lsa(gpu, None, False)
    torch.cuda.synchronize()
    want = duals(cost)
    assert_identical(got, want, "side stream")
    assert torch.equal(col4row.cpu(), want[0]) and torch.equal(status.cpu(), want[1])


@cuda
@pytest.mark.cuda
def test_cuda_graph_capture():
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(16, 30, 50, generator=g)
    cost[3, :, :] = float("nan")  # an invalid item: status, no raise, no sync
    static = cost.cuda()
    torch.ops.maskformer_fast.lsa(static, None, False)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.maskformer_fast.lsa(static, None, False)
    static.copy_(cost.flip(2))
    graph.replay()
    want = torch.ops.maskformer_fast.lsa(cost.flip(2), None, False)
    assert torch.equal(captured[0].cpu(), want[0]) and torch.equal(captured[1].cpu(), want[1])
    assert int(captured[1][3]) == Status.INVALID


@cuda
@pytest.mark.cuda
def test_cuda_bad_sizes_and_infeasible_without_sync():
    cost = torch.rand(4, 5, 5).cuda()
    cost[1, 0, :] = float("inf")
    sizes = torch.tensor([[5, 5], [5, 5], [6, 5], [5, -1]]).cuda()
    # Any host synchronisation inside the op would raise under this mode.
    torch.cuda.set_sync_debug_mode("error")
    try:
        col4row, status = torch.ops.maskformer_fast.lsa(cost, sizes, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert status.tolist() == [0, Status.INFEASIBLE, Status.BAD_SIZES, Status.BAD_SIZES]
    assert (col4row[1:] == -1).all()


# 4. Through the public API.


def cpu_reference(cost, sizes):
    from maskformer_fast.hungarian import batch_linear_sum_assignment

    return batch_linear_sum_assignment(cost, sizes, errors="status", backend="cpu")


def assert_same_assignment(got, want, what):
    assert got.col4row.is_cuda and got.status.is_cuda, what
    assert torch.equal(got.col4row.cpu(), want.col4row), what
    assert torch.equal(got.status.cpu(), want.status), what


@cuda
@pytest.mark.cuda
def test_public_api_auto_picks_cuda(monkeypatch):
    from maskformer_fast.hungarian import batch_linear_sum_assignment, linear_sum_assignment

    def no_scipy(*args):
        raise AssertionError("backend='auto' fell back to scipy for CUDA tensors")

    monkeypatch.setattr(_ops, "_lsa_scipy", no_scipy)
    assert "cuda" in compiled_backends()
    g = torch.Generator().manual_seed(12)
    cost = torch.rand(8, 30, 45, generator=g)
    sizes = torch.stack([torch.randint(0, 31, (8,), generator=g),
                         torch.randint(0, 46, (8,), generator=g)], 1)
    want = cpu_reference(cost, sizes)
    # sizes as a CUDA tensor, or host-side (copied to the device first)
    for s in (sizes.cuda(), sizes.tolist(), sizes.numpy()):
        got = batch_linear_sum_assignment(cost.cuda(), s)
        assert_same_assignment(got, want, f"sizes as {type(s).__name__}")
    rows, cols = linear_sum_assignment(cost[0].cuda())
    ref_rows, ref_cols = scipy.optimize.linear_sum_assignment(cost[0].double().numpy())
    assert rows.is_cuda and cols.is_cuda
    assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()


@cuda
@pytest.mark.cuda
def test_public_api_errors_status_no_sync_and_graph_capture():
    """errors="status" with sizes as a CUDA int64 tensor: no host sync (any would raise under
    sync debug mode "error"), and capturable in a CUDA graph."""
    from maskformer_fast.hungarian import batch_linear_sum_assignment

    g = torch.Generator().manual_seed(13)
    cost = torch.rand(4, 20, 30, generator=g)
    cost[2, 0, 0] = float("nan")
    sizes = torch.tensor([[20, 30], [5, 30], [20, 30], [20, 4]])
    gpu, gpu_sizes = cost.cuda(), sizes.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = batch_linear_sum_assignment(gpu, gpu_sizes, errors="status")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same_assignment(got, cpu_reference(cost, sizes), "no sync")
    assert int(got.status[2]) == Status.INVALID

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = batch_linear_sum_assignment(gpu, gpu_sizes, errors="status")
    new_cost = torch.rand(4, 20, 30, generator=g)
    new_sizes = torch.tensor([[3, 30], [20, 30], [20, 1], [0, 0]])
    gpu.copy_(new_cost)
    gpu_sizes.copy_(new_sizes)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_assignment(captured, cpu_reference(new_cost, new_sizes), "graph replay")


@cuda
@pytest.mark.cuda
def test_public_api_errors_raise_syncs_once(capfd):
    """errors="raise" reads `status` on the host: exactly one synchronising call, whether
    every item is solved or one fails. (Sync debug mode "warn" reports each sync as a Python
    warning or, in some torch versions, on stderr: both are counted.)"""
    from maskformer_fast.hungarian import batch_linear_sum_assignment

    g = torch.Generator().manual_seed(14)
    good = torch.rand(4, 20, 30, generator=g).cuda()
    bad = good.clone()
    bad[1, 3, 4] = float("nan")
    sizes = torch.tensor([[20, 30], [20, 30], [7, 9], [20, 2]]).cuda()
    torch.cuda.synchronize()
    for cost, fails in ((good, False), (bad, True)):
        capfd.readouterr()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    batch_linear_sum_assignment(cost, sizes)
                    raised = False
                except ValueError as exc:
                    assert "invalid numeric entries (batch item 1)" in str(exc)
                    raised = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
        message = "synchronizing CUDA operation"
        syncs = sum(message in str(w.message) for w in caught) + capfd.readouterr().err.count(message)
        assert raised == fails and syncs == 1, (fails, syncs, [str(w.message) for w in caught])


@cuda
@pytest.mark.cuda
def test_op_errors_raise_and_do_not_crash():
    """The CUDA op's own errors (raise_errors=True on a failed item, a malformed argument)
    must be Python exceptions. On an H200 with torch 2.11 the first killed the process
    (SIGSEGV), which the public API avoids by reading the statuses in Python; run in a
    subprocess so that a crash fails this test only."""
    code = (
        "import torch, maskformer_fast\n"
        "c = torch.rand(4, 20, 30, device='cuda'); c[1, 3, 4] = float('nan')\n"
        "for args in ((c, None, False, True), (c[0], None, False, False)):\n"
        "    try:\n"
        "        torch.ops.maskformer_fast.lsa(*args)\n"
        "    except (ValueError, RuntimeError) as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ValueError matrix contains invalid numeric entries (batch item 1)")
    assert lines[1].startswith("ValueError lsa: expected a [B, N, M] cost tensor")
