"""Tuning data for the fused matching cost on a GPU: pixels per step, warps per program and
programs per SM, timed (median, CUDA events) at B=8, Q=100, T=20, fp32 logits, BCE with the
class term, at 12,544 points and 256x256 pixels, each checked against the float64 formulas.

    python3 scripts/gpu_cost_sweep.py
"""

import itertools

import torch
import triton.testing

from maskformer_fast import kernels
from maskformer_fast.kernels import triton_cost as tc

g = torch.Generator(device="cuda").manual_seed(0)
B, Q, T, K1 = 8, 100, 20, 81
print("P | pixels/step | warps | programs/SM | ms | rel err vs float64", flush=True)
for P in (12544, 65536):
    x = torch.randn(B, Q, P, device="cuda", generator=g) * 3
    y = (torch.rand(B, T, P, device="cuda", generator=g) < 0.3).float()
    logits = torch.randn(B, Q, K1, device="cuda", generator=g)
    labels = torch.randint(0, K1 - 1, (B, T), device="cuda", generator=g)
    args = (x, y, None, logits, labels)
    ref = kernels.pairwise_mask_cost(*(a.double() if a is not None and a.is_floating_point() else a
                                       for a in args), backend="torch", w_class=2, w_mask=5, w_dice=5)
    for block_p, warps, per_sm in itertools.product((16, 32, 64), (4, 8), (2, 4, 8)):
        tc.BLOCK_P, tc.NUM_WARPS, tc.PROGRAMS_PER_SM = block_p, warps, per_sm
        f = lambda: kernels.pairwise_mask_cost(*args, backend="triton", w_class=2, w_mask=5, w_dice=5)  # noqa: E731
        try:
            err = ((f().double() - ref).abs().max() / ref.abs().max()).item()
            ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            print(f"{P} | {block_p} | {warps} | {per_sm} | {ms:.3f} | {err:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001 (a configuration that fails is data too)
            print(f"{P} | {block_p} | {warps} | {per_sm} | failed: {type(exc).__name__}: {exc}"[:300], flush=True)
