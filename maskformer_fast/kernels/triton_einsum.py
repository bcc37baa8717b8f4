"""The per-pixel mask einsum ``"b t c, b c h w -> b t h w"`` as a Triton batched matmul,
differentiable.

One kernel, a batched ``out[b] = a[b] @ c[b]`` over arbitrary strides, serves the forward
pass and both gradients (``grad_embed = grad @ feat^T``, ``grad_feat = embed^T @ grad``) by
being handed transposed views: nothing is copied to make an operand contiguous.

``grad_embed`` reduces over the long H*W axis into a small ``[B, T, C]``: about 64 programs
for B = 8, most of a GPU idle. When the grid is small against the SM count, K is split:
each split writes its fp32 partial product to a workspace ``[split, B, M, N]``, summed in a
fixed order afterwards (deterministic, unlike atomics).

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
# grad_embed's second operand (feat^T) is contiguous along K: 32-deep steps spill on sm_80 (tf32x3)
BLOCK_K_GRAD_EMBED = 16
NUM_WARPS = 4
MIN_SPLIT_K_BLOCKS = 8  # K blocks per split at least
INTERPRETER_SPLIT_K = 2  # the interpreter splits K in two when it can, so that tests run both paths


@triton.jit
def _bmm_kernel(
    a_ptr, sab, sam, sak,  # [B, M, K]
    c_ptr, scb, sck, scn,  # [B, K, N]
    o_ptr, sos, sob, som, son,  # [B, M, N], or split > 1: fp32 partials [split, B, M, N]
    M, N, K, split, k_chunk,  # SPLIT: K is cut into `split` ranges of `k_chunk`
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # N (pixels, in the forward pass) is the long axis: it takes the unbounded grid axis.
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = ms < M, ns < N
    if SPLIT:
        b = (tl.program_id(2) // split).to(tl.int64)
        part = tl.program_id(2) % split
        k_end = tl.minimum(part * k_chunk + k_chunk, K)
    else:
        b = tl.program_id(2).to(tl.int64)
        part = 0
        k_end = K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(part * k_chunk, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        a = tl.load(a_ptr + b * sab + ms[:, None] * sam + ks[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        c = tl.load(c_ptr + b * scb + ks[:, None] * sck + ns[None, :] * scn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc += tl.dot(a, c, input_precision=PRECISION)
    tl.store(o_ptr + part * sos + b * sob + ms[:, None] * som + ns[None, :] * son, acc.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 when it was defined).
INTERPRETED = isinstance(_bmm_kernel, InterpretedFunction)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _split_k(programs: int, K: int, device: torch.device, block_k: int) -> tuple[int, int]:
    """(split, k_chunk): K shared by `split` programs, `k_chunk` each (a multiple of block_k).
    On a GPU, split only when `programs` would not fill every SM twice, as long as each split
    keeps MIN_SPLIT_K_BLOCKS blocks of K."""
    blocks = triton.cdiv(K, block_k)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split = min(triton.cdiv(2 * sms, programs), blocks // MIN_SPLIT_K_BLOCKS) if programs < 2 * sms else 1
    else:
        split = INTERPRETER_SPLIT_K
    split = max(1, min(split, blocks))
    k_chunk = triton.cdiv(blocks, split) * block_k
    return triton.cdiv(K, k_chunk), k_chunk


def bmm(a: torch.Tensor, c: torch.Tensor, block_k: int = BLOCK_K) -> torch.Tensor:
    """``a [B, M, K] @ c [B, K, N]`` -> ``[B, M, N]``, any strides, one dtype."""
    B, M, K = a.shape
    N = c.shape[2]
    if B * M * N == 0 or K == 0:
        return torch.zeros(B, M, N, device=a.device, dtype=a.dtype)
    if a.dtype == torch.float32 and a.device.type != "cpu":
        precision = "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        precision = "ieee"  # fp16 / bf16 dots are exact products anyway; the interpreter is exact
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M), B)
    split, k_chunk = _split_k(grid[0] * grid[1] * B, K, a.device, block_k)
    if split == 1:
        out = torch.empty(B, M, N, device=a.device, dtype=a.dtype)
    else:
        out = torch.empty(split, B, M, N, device=a.device, dtype=torch.float32)  # fp32 partials
    with torch.cuda.device_of(a):  # Triton launches on the current device (a no-op on the CPU)
        _bmm_kernel[grid[:2] + (B * split,)](
            a, *a.stride(), c, *c.stride(), out, out.stride(0) if split > 1 else 0, *out.stride()[-3:],
            M, N, K, split, k_chunk, SPLIT=split > 1,
            PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=NUM_WARPS)
    return out if split == 1 else out.sum(0).to(a.dtype)  # the splits in a fixed order


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
        d_embed = bmm(grad, feat.transpose(1, 2), BLOCK_K_GRAD_EMBED) if ctx.needs_input_grad[0] else None
        d_feat = bmm(embed.transpose(1, 2), grad).view(B, C, H, W) if ctx.needs_input_grad[1] else None
        return d_embed, d_feat


def mask_einsum_triton(mask_embed: torch.Tensor, pixel_feat: torch.Tensor) -> torch.Tensor:
    """``"b t c, b c h w -> b t h w"``, differentiable; both inputs of one dtype."""
    return MaskEinsum.apply(mask_embed, pixel_feat)
