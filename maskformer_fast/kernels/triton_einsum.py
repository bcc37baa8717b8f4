"""The per-pixel mask einsum ``"b t c, b c h w -> b t h w"`` as a Triton batched matmul,
differentiable.

One kernel, a batched ``out[b] = a[b] @ c[b]`` over arbitrary strides, serves the forward
pass and both gradients (``grad_embed = grad @ feat^T``, ``grad_feat = embed^T @ grad``) by
being handed transposed views: nothing is copied to make an operand contiguous.

Inputs of one floating dtype (fp32, fp16, bf16); fp32 accumulation; output in the inputs'
dtype. fp32 dots follow ``torch.get_float32_matmul_precision()``: "highest" (torch's default)
gives tf32x3 (three TF32 products: about fp32 accuracy on tensor cores), otherwise TF32, as
torch's own matmul does when TF32 is allowed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
NUM_WARPS = 4


@triton.jit
def _bmm_kernel(
    a_ptr, sab, sam, sak,  # [B, M, K]
    c_ptr, scb, sck, scn,  # [B, K, N]
    o_ptr, sob, som, son,  # [B, M, N]
    M, N, K,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # N (pixels, in the forward pass) is the long axis: it takes the unbounded grid axis.
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(2).to(tl.int64)
    m_ok, n_ok = ms < M, ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + b * sab + ms[:, None] * sam + ks[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        c = tl.load(c_ptr + b * scb + ks[:, None] * sck + ns[None, :] * scn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc += tl.dot(a, c, input_precision=PRECISION)
    tl.store(o_ptr + b * sob + ms[:, None] * som + ns[None, :] * son, acc.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 when it was defined).
INTERPRETED = isinstance(_bmm_kernel, InterpretedFunction)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

def bmm(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a [B, M, K] @ c [B, K, N]`` -> ``[B, M, N]``, any strides, one dtype."""
    B, M, K = a.shape
    N = c.shape[2]
    out = torch.empty(B, M, N, device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    if a.dtype == torch.float32 and a.device.type != "cpu":
        precision = "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        precision = "ieee"  # fp16 / bf16 dots are exact products anyway; the interpreter is exact
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M), B)
    _bmm_kernel[grid](a, *a.stride(), c, *c.stride(), out, *out.stride(), M, N, K,
                      PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return out


class MaskEinsum(torch.autograd.Function):
    """``out[b, t, h, w] = sum_c embed[b, t, c] * feat[b, c, h, w]``."""

    @staticmethod
    def forward(ctx, embed: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(embed, feat)
        B, C, H, W = feat.shape
        # every size explicit: with B, H or W = 0, a -1 in view / reshape is ambiguous and raises
        return bmm(embed, feat.reshape(B, C, H * W)).view(B, embed.shape[1], H, W)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        embed, feat = ctx.saved_tensors
        B, C, H, W = feat.shape
        grad = grad.reshape(B, embed.shape[1], H * W)
        feat = feat.reshape(B, C, H * W)
        d_embed = bmm(grad, feat.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        d_feat = bmm(embed.transpose(1, 2), grad).view(B, C, H, W) if ctx.needs_input_grad[1] else None
        return d_embed, d_feat


def mask_einsum_triton(mask_embed: torch.Tensor, pixel_feat: torch.Tensor) -> torch.Tensor:
    """``"b t c, b c h w -> b t h w"``, differentiable; both inputs of one dtype."""
    return MaskEinsum.apply(mask_embed, pixel_feat)
