"""The CUDA solver (csrc/lsa/lsa_cuda.cu), trusted without a GPU as DESIGN.md asks:

1. it is built: with a CUDA build of torch, the extension must register CUDA kernels;
2. its logic runs on the CPU: the simulated team with the CUDA teams' widths and reduction
   order equals the sequential team bit for bit, and the kernels' per-item code
   (lsa::cuda::solve_item: sizes check, orientation, strided reads, staging, outputs) runs
   on the host through a small nvcc-built library and equals the CPU op bit for bit;
3. the GPU tests (marked cuda) and `python -m maskformer_fast.selfcheck` run where a GPU is.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskformer_fast import _ops
from maskformer_fast.selfcheck import COLUMNS, check_parity, corpus, format_table

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
]  # fmt: skip
WARP, BLOCK = 32, 256  # the CUDA teams' widths (lsa::kWarpSize, lsa::cuda::kBlockThreads)
STATUS_BAD_SIZES = 3

needs_ops = pytest.mark.skipif(_ops._LOAD_ERROR is not None, reason="maskformer_fast._C not built")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def duals(cost, sizes=None, maximize=False, lanes=1):
    return torch.ops.maskformer_fast.lsa_duals(cost, sizes, maximize, lanes)


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
@pytest.mark.parametrize("lanes", [WARP, BLOCK])
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
#include "lsa/teams_cpu.h"
using namespace lsa::cuda;

// Every item of the batch through solve_item with a simulated team of `lanes`, the cost
// staged (as the kernel does when it fits in shared memory) or read in place.
extern "C" void emulate(const void* cost, int dtype, int64_t B, int64_t N, int64_t M,
                        const int64_t* strides, const int64_t* sizes, const int64_t* size_strides,
                        bool maximize, int lanes, bool stage, int64_t* col4row, int32_t* status,
                        double* u, double* v) {
  const Batch p{cost, DType(dtype), B, N, M, strides[0], strides[1], strides[2], sizes,
                size_strides[0], size_strides[1], maximize, col4row, status, u, v};
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
  const int64_t fields[] = {q.block, q.state_shared, q.stage_cost, q.team_smem, q.workspace_bytes};
  for (int k = 0; k < 5; ++k) out[k] = fields[k];
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

    def solve(self, cost, sizes=None, maximize=False, lanes=WARP, stage=False):
        B, N, M = cost.shape
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
            ctypes.c_bool(maximize), lanes, ctypes.c_bool(stage),
            *(ctypes.c_void_p(t.data_ptr()) for t in out),
        )  # fmt: skip
        return out

    def plan(self, B, N, M, sms, smem_optin, lanes=1) -> dict:
        out = (ctypes.c_int64 * 5)()
        self.lib.plan(ctypes.c_int64(B), ctypes.c_int64(N), ctypes.c_int64(M), sms, smem_optin,
                      ctypes.c_int64(lanes), out)
        keys = ("block", "state_shared", "stage_cost", "team_smem", "workspace_bytes")
        return dict(zip(keys, out))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return Emulator(tmp_path_factory.mktemp("lsa_cuda_emulator"))


@needs_ops
@pytest.mark.parametrize("lanes", [WARP, BLOCK])
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
    assert status.tolist() == [0, STATUS_BAD_SIZES, STATUS_BAD_SIZES, STATUS_BAD_SIZES, 0]
    for b in (1, 2, 3):
        assert (col4row[b] == -1).all() and (u[b] == 0).all() and (v[b] == 0).all()
    good = torch.tensor([[6, 4], [6, 4], [6, 4], [6, 4], [2, 3]])
    want = duals(cost, good)
    for b in (0, 4):
        assert torch.equal(col4row[b], want[0][b]) and torch.equal(u[b], want[2][b])


@needs_ops
def test_plan(emulator):
    h100 = dict(sms=132, smem_optin=227 * 1024)
    # DETR-like batches: a warp per item, the solver state in shared memory.
    detr = emulator.plan(208, 300, 300, **h100)
    assert detr["block"] == 0 and detr["state_shared"] == 1 and detr["workspace_bytes"] == 0
    # Small ragged problems: the cost staged too.
    assert emulator.plan(32, 100, 20, **h100)["stage_cost"] == 1
    # Wider than a warp should scan, or few items: a block per item.
    assert emulator.plan(1000, 10, 1025, **h100)["block"] == 1
    assert emulator.plan(1000, 1024, 1024, **h100)["block"] == 0
    assert emulator.plan(1, 1000, 1000, **h100)["block"] == 1
    assert emulator.plan(1, 100, 200, **h100)["block"] == 0
    # Too big for shared memory: the state in the global workspace, one slice per item.
    assert emulator.plan(1, 2000, 2000, **h100)["state_shared"] == 1  # 104 KB
    big = emulator.plan(1, 3000, 5000, **h100)  # 236 KB
    assert big["state_shared"] == 0 and big["stage_cost"] == 0 and big["workspace_bytes"] > 0
    # lanes forces the team.
    assert emulator.plan(1, 1000, 1000, **h100, lanes=WARP)["block"] == 0
    assert emulator.plan(1000, 5, 5, **h100, lanes=BLOCK)["block"] == 1


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
@pytest.mark.parametrize("lanes", [1, WARP, BLOCK])
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
            strided = base.cuda().as_strided(view.shape, view.stride())
            assert_identical(duals(strided, None, maximize), got, "strided CUDA view")


@cuda
@pytest.mark.cuda
def test_cuda_warp_and_block_sides_of_the_threshold():
    g = torch.Generator().manual_seed(2)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [(2 * sms, 8, 1024), (2 * sms, 8, 1025), (1, 300, 300), (1, 100, 200)]
    for B, N, M in shapes:
        cost = torch.randint(0, 4, (B, N, M), generator=g).float()
        assert_identical(duals(cost.cuda()), duals(cost), f"{B}x{N}x{M}")


@cuda
@pytest.mark.cuda
def test_cuda_non_default_stream_and_graph_capture():
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(16, 30, 50, generator=g)
    cost[3, :, :] = float("nan")  # an invalid item: status, no raise, no sync
    want = torch.ops.maskformer_fast.lsa(cost, None, False)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu = cost.cuda()
        got = torch.ops.maskformer_fast.lsa(gpu, None, False)
    stream.synchronize()
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])

    static = cost.cuda()
    torch.ops.maskformer_fast.lsa(static, None, False)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.maskformer_fast.lsa(static, None, False)
    static.copy_(cost.flip(2))
    graph.replay()
    want = torch.ops.maskformer_fast.lsa(cost.flip(2), None, False)
    assert torch.equal(captured[0].cpu(), want[0]) and torch.equal(captured[1].cpu(), want[1])
    assert int(captured[1][3]) == _ops.STATUS_INVALID


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
    assert status.tolist() == [0, _ops.STATUS_INFEASIBLE, STATUS_BAD_SIZES, STATUS_BAD_SIZES]
    assert (col4row[1:] == -1).all()
