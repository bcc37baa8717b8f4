"""The Triton kernels compile for real GPUs, checked without one: every variant is compiled
ahead of time for sm_80 and sm_90 down to a cubin (maskformer_fast.kernels.compile_check), must
not spill registers, and must use tensor-core instructions for its dots. The interpreter
(tests/test_kernels_reference.py) runs the kernels' logic; this checks their code."""

import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def table():
    """compile_check's rows, each [kernel, variant, arch, registers, spill bytes, tensor-core
    ops, barriers around the atomic] (one run for the module: it compiles 72 kernels)."""
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "maskformer_fast.kernels.compile_check"], capture_output=True,
                         text=True, timeout=1200, env=env)
    print(out.stdout)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if re.match(r"\| (pairwise|einsum)", line)]
    assert rows, out.stdout + out.stderr
    return rows, out


def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_spills(table):
    rows, out = table
    kernels = {(r[0], r[1]) for r in rows}
    assert sum(k == "pairwise cost" for k, _ in kernels) == 20 and sum(k == "einsum bmm" for k, _ in kernels) == 16
    for kernel, variant, arch, regs, spill, tensor_ops, _ in rows:
        assert int(spill) == 0, f"{kernel} {variant} spills on {arch}"
        assert int(tensor_ops) > 0, f"{kernel} {variant}: no tensor-core instruction on {arch}"
    assert out.returncode == 0, out.stdout + out.stderr


def test_split_cost_kernel_fences_its_arrival_atomic(table):
    """The split-pixel cost kernel: a CTA barrier between every warp's partial-sum stores and
    the one-thread acq_rel atomic, and between the atomic and the loads of the other programs'
    partials, in the PTX (what runs) and in the TritonGPU IR (the kernel's own barriers: the
    PTX also holds one the compiler adds for its shared-memory scratch, which would hide the
    loss of ours)."""
    rows, _ = table
    split = [r for r in rows if r[0] == "pairwise cost" and r[1].endswith(", split")]
    assert len(split) == 24 and {r[2] for r in split} == {"sm_80", "sm_90"}
    for kernel, variant, arch, *_, barriers in split:
        assert barriers == "ptx Y/Y, ir Y/Y", f"{variant} on {arch}: {barriers}"
    assert all(r[6] == "-" for r in rows if r not in split)


def test_atomic_barrier_check_reads_ptx_order():
    """The PTX side of the check on hand-written instruction sequences: it must see a missing
    barrier (the compiled kernels always have one, so only this shows the check can fail)."""
    from maskformer_fast.kernels.compile_check import _atomic_barriers

    def ptx(before, after):
        return "\n".join(["@%p1 st.global.v4.b32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };", "// bar.sync 0;",
                          *before, "@%p2 atom.global.gpu.acq_rel.add.u32 %r5, [ %rd2 + 0 ], %r6;",
                          "@%p2 st.shared.b32 [ %r7 + 0 ], %r5;", *after, "ld.global.b32 %r8, [ %rd3 + 0 ];"])

    ir = "tt.store %a, %b\ngpu.barrier\n%c = tt.atomic_rmw add, acq_rel, gpu, %d\nttg.barrier all\n%e = tt.load %f"
    assert _atomic_barriers(ptx(["bar.sync \t0;"], ["barrier.sync.aligned 0;"]), ir) == "ptx Y/Y, ir Y/Y"
    assert _atomic_barriers(ptx([], ["bar.sync 0;"]), ir) == "ptx N/Y, ir Y/Y"
    assert _atomic_barriers(ptx(["bar.warp.sync -1;"], ["@%p3 bar.sync 0;"]), ir) == "ptx N/N, ir Y/Y"
    assert _atomic_barriers(ptx(["bar.sync 0;"], []), ir.replace("gpu.barrier\n", "")) == "ptx Y/N, ir N/Y"
    assert _atomic_barriers("st.global.b32 [ %rd1 ], %r1;", ir) == "-"
