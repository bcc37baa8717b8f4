"""Compiles every variant of the Triton kernels for NVIDIA GPUs without a GPU, and reports what
the compiler made of them: registers, spill stack, shared memory, tensor-core instructions.

    python -m maskformer_fast.kernels.compile_check       # sm_80 and sm_90, a table

Triton compiles ahead of time for a named target (``triton.compile`` with a ``GPUTarget``),
down to a cubin, with its bundled ptxas; no driver is needed. This is how the kernels are
trusted to build on a GPU-less machine: the interpreter runs their logic, this compiles their
code. Arguments are specialised as the JIT specialises them for contiguous tensors (unit
strides are constants). Must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from maskformer_fast.kernels import triton_cost, triton_einsum

ARCHS = (80, 90)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass
class Report:
    kernel: str
    variant: str
    arch: int
    registers: int
    spill_bytes: int  # the stack: registers spilled to local memory
    tensor_core_ops: int  # mma.sync + wgmma instructions in the PTX

    def row(self) -> str:
        return (f"| {self.kernel} | {self.variant} | sm_{self.arch} | {self.registers} | {self.spill_bytes} | "
                f"{self.tensor_core_ops} |")


def _compile(fn, types: dict, constants: dict, arch: int, num_warps: int):
    signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def _resources(kernel) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return int(regs), int(stack)


def _report(name, variant, fn, types, constants, arch, num_warps) -> Report:
    kernel = _compile(fn, types, constants, arch, num_warps)
    ptx = kernel.asm["ptx"]
    return Report(name, variant, arch, *_resources(kernel), ptx.count("mma.sync") + ptx.count("wgmma.mma_async"))


def cost_variants():
    """The matching-cost kernel: every combination of its switches, fp32 / fp16 / bf16 logits,
    float and uint8 (bool) targets, at its largest target tile."""
    f = triton_cost
    floats = {"n_pix", "w_class", "w_mask", "w_dice", "alpha"}
    unit = ("sxk", "syp", "sot", "sck", "slt", "sfp")
    for embed, focal, has_class, split in itertools.product((False, True), repeat=4):
        for logits, targets in (("fp32", "fp32"), ("fp16", "u8"), ("bf16", "fp32")):
            if (logits, targets) != ("fp32", "fp32") and (focal, has_class, split) != (True, True, True):
                continue  # dtypes change the loads only: once per input path is enough
            types = {n: "fp32" if n in floats else "i32" for n in f._cost_kernel.arg_names}
            types.update(x_ptr=f"*{logits}", f_ptr=f"*{logits}", y_ptr=f"*{targets}", count_ptr="*i64",
                         cl_ptr="*fp32", lab_ptr="*i64", out_ptr="*fp32", ws_ptr="*fp32", arrived_ptr="*i32")
            constants = dict(EMBED=embed, FOCAL=focal, HAS_CLASS=has_class, SPLIT=split, PRECISION="tf32x3",
                             BLOCK_Q=f.BLOCK_Q, BLOCK_T=f.MAX_BLOCK_T, BLOCK_P=f.BLOCK_P, BLOCK_C=f.BLOCK_C,
                             BLOCK_K=f.BLOCK_K, **{n: 1 for n in unit})
            variant = (f"{'embed' if embed else 'logits'} {logits}, targets {targets}, "
                       f"{'focal' if focal else 'bce'}{', class' if has_class else ''}{', split' if split else ''}")
            yield "pairwise cost", variant, f._cost_kernel, types, constants, f.NUM_WARPS


def bmm_variants():
    """The einsum's batched matmul: the forward pass (unit stride on N) and the gradients'
    transposed operands (unit stride on M of the first operand), in each dtype and precision."""
    f = triton_einsum
    for dtype, precision in (("fp32", "tf32"), ("fp32", "tf32x3"), ("fp16", "ieee"), ("bf16", "ieee")):
        for layout, unit in (("forward", ("sak", "scn", "son")), ("transposed a", ("sam", "scn", "son"))):
            types = {n: "i32" for n in f._bmm_kernel.arg_names}
            types.update(a_ptr=f"*{dtype}", c_ptr=f"*{dtype}", o_ptr=f"*{dtype}")
            constants = dict(PRECISION=precision, BLOCK_M=f.BLOCK_M, BLOCK_N=f.BLOCK_N, BLOCK_K=f.BLOCK_K,
                             **{n: 1 for n in unit})
            yield "einsum bmm", f"{dtype} {precision}, {layout}", f._bmm_kernel, types, constants, f.NUM_WARPS


def reports(archs=ARCHS):
    if triton_cost.INTERPRETED or triton_einsum.INTERPRETED:
        raise RuntimeError("compile_check: unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    for arch in archs:
        for variant in itertools.chain(cost_variants(), bmm_variants()):
            yield _report(*variant[:2], *variant[2:5], arch, variant[5])


def main() -> int:
    print(f"Triton {triton.__version__}: kernels compiled for sm_{' and sm_'.join(map(str, ARCHS))}\n")
    print("| kernel | variant | arch | registers | spill bytes | tensor-core ops |")
    print("|---|---|---|---|---|---|")
    spills = 0
    for r in reports():
        print(r.row(), flush=True)
        spills += r.spill_bytes > 0
    print(f"\n{spills} variant(s) spill registers")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
