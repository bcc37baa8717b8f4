"""Compiles every variant of the Triton kernels for NVIDIA GPUs without a GPU, and reports what
the compiler made of them: registers, spill stack, tensor-core instructions, and for the cost
kernel's split-pixel variants the barriers around the arrival atomic.

    python -m maskformer_fast.kernels.compile_check       # sm_80 and sm_90, a table

Triton compiles ahead of time for a named target (``triton.compile`` with a ``GPUTarget``),
down to a cubin, with its bundled ptxas; no driver is needed. This is how the kernels are
trusted to build on a GPU-less machine: the interpreter runs their logic, this compiles their
code. Arguments are specialised as the JIT specialises them for contiguous tensors (unit
strides are constants). Must run without ``TRITON_INTERPRET=1``.

The split-pixel cost kernel hands its partial sums to the last program of a tile through an
atomic run by one thread: every warp's stores must be ordered before it by a CTA barrier, and
its acquire before every warp's loads after it. ``_atomic_barriers`` reads that off the PTX
(a ``bar.sync`` between the last ``st.global`` and the ``atom``, and between the ``atom`` and
the next ``ld.global``) and off the TritonGPU IR, where only the kernel's own barriers appear
(the PTX may hold one that the compiler added for its shared-memory scratch alone).
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
    # around the split kernel's arrival atomic: barrier before / after in the PTX and in the
    # TritonGPU IR, e.g. "ptx Y/Y, ir Y/Y"; "-" for a kernel without an atomic
    atomic_barriers: str = "-"

    def row(self) -> str:
        return (f"| {self.kernel} | {self.variant} | sm_{self.arch} | {self.registers} | {self.spill_bytes} | "
                f"{self.tensor_core_ops} | {self.atomic_barriers} |")


PTX_BARRIER = re.compile(r"^(bar|barrier)(\.cta)?\.sync\b")  # unpredicated, CTA-wide (not bar.warp.sync)
IR_BARRIER = re.compile(r"\b(gpu|ttg)\.barrier\b")


def _barriers_around(lines: list[str], atomic: str, store: str, load: str, barrier: re.Pattern) -> str:
    """"Y/N": whether a barrier lies between the last `store` line before the first `atomic`
    line and it, and between it and the next `load` line; "-" without an atomic."""
    atoms = [i for i, line in enumerate(lines) if re.search(atomic, line)]
    if not atoms:
        return "-"
    i = atoms[0]
    stores = [j for j in range(i) if re.search(store, lines[j])]
    loads = [j for j in range(i + 1, len(lines)) if re.search(load, lines[j])]
    before = bool(stores) and any(barrier.search(line) for line in lines[stores[-1] + 1 : i])
    after = bool(loads) and any(barrier.search(line) for line in lines[i + 1 : loads[0]])
    return f"{'Y' if before else 'N'}/{'Y' if after else 'N'}"


def _atomic_barriers(ptx: str, ttgir: str) -> str:
    """The barriers around a kernel's first atomic, in its PTX and its TritonGPU IR."""
    ptx_lines = [line.split("//")[0].strip() for line in ptx.splitlines()]
    ptx_side = _barriers_around(ptx_lines, r"\batom\.", r"\bst\.global\b", r"\bld\.global\b", PTX_BARRIER)
    if ptx_side == "-":
        return "-"
    ir_lines = [line.strip() for line in ttgir.splitlines()]
    ir_side = _barriers_around(ir_lines, r"\btt\.atomic_rmw\b", r"\btt\.store\b", r"\btt\.load\b", IR_BARRIER)
    return f"ptx {ptx_side}, ir {ir_side}"


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
    return Report(name, variant, arch, *_resources(kernel), ptx.count("mma.sync") + ptx.count("wgmma.mma_async"),
                  _atomic_barriers(ptx, kernel.asm["ttgir"]))


def cost_variants(arch: int):
    """The matching-cost kernel: every combination of its switches, fp32 / fp16 / bf16 logits,
    float and uint8 (bool) targets, at its largest target tile and the pixel step it takes on
    `arch`."""
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
            block_p = f.BLOCK_P_SM90 if arch >= 90 else f.BLOCK_P  # as f._block_p
            constants = dict(EMBED=embed, FOCAL=focal, HAS_CLASS=has_class, SPLIT=split, PRECISION="tf32x3",
                             BLOCK_Q=f.BLOCK_Q, BLOCK_T=f.MAX_BLOCK_T, BLOCK_P=block_p, BLOCK_C=f.BLOCK_C,
                             BLOCK_K=f.BLOCK_K, **{n: 1 for n in unit})
            variant = (f"{'embed' if embed else 'logits'} {logits}, targets {targets}, "
                       f"{'focal' if focal else 'bce'}{', class' if has_class else ''}{', split' if split else ''}")
            yield "pairwise cost", variant, f._cost_kernel, types, constants, f.NUM_WARPS


def bmm_variants():
    """The einsum's batched matmul: the forward pass (unit stride on N), the feature's gradient
    (transposed first operand: unit stride on M) and the embedding's gradient (unit stride on
    K in both operands; K split or not), in each dtype and precision."""
    f = triton_einsum
    layouts = (("forward", ("sak", "scn", "son"), False, f.BLOCK_K),
               ("transposed a", ("sam", "scn", "son"), False, f.BLOCK_K),
               ("grad embed", ("sak", "sck", "son"), False, f.BLOCK_K_GRAD_EMBED),
               ("grad embed, split K", ("sak", "sck", "son"), True, f.BLOCK_K_GRAD_EMBED))
    for dtype, precision in (("fp32", "tf32"), ("fp32", "tf32x3"), ("fp16", "ieee"), ("bf16", "ieee")):
        for layout, unit, split, block_k in layouts:
            types = {n: "i32" for n in f._bmm_kernel.arg_names}
            types.update(a_ptr=f"*{dtype}", c_ptr=f"*{dtype}", o_ptr="*fp32" if split else f"*{dtype}")
            constants = dict(SPLIT=split, PRECISION=precision, BLOCK_M=f.BLOCK_M, BLOCK_N=f.BLOCK_N,
                             BLOCK_K=block_k, **{n: 1 for n in unit})
            yield "einsum bmm", f"{dtype} {precision}, {layout}", f._bmm_kernel, types, constants, f.NUM_WARPS


def reports(archs=ARCHS):
    if triton_cost.INTERPRETED or triton_einsum.INTERPRETED:
        raise RuntimeError("compile_check: unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    for arch in archs:
        for variant in itertools.chain(cost_variants(arch), bmm_variants()):
            yield _report(*variant[:2], *variant[2:5], arch, variant[5])


def main() -> int:
    print(f"Triton {triton.__version__}: kernels compiled for sm_{' and sm_'.join(map(str, ARCHS))}\n")
    print("| kernel | variant | arch | registers | spill bytes | tensor-core ops | barriers around the atomic |")
    print("|---|---|---|---|---|---|---|")
    spills = unfenced = 0
    for r in reports():
        print(r.row(), flush=True)
        spills += r.spill_bytes > 0
        unfenced += r.atomic_barriers not in ("-", "ptx Y/Y, ir Y/Y")
    print(f"\n{spills} variant(s) spill registers; {unfenced} variant(s) lack a barrier around the atomic")
    return 1 if spills or unfenced else 0


if __name__ == "__main__":
    sys.exit(main())
