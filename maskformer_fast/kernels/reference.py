"""Torch references of the matching-cost kernels: the CPU path, and what the Triton kernels
are tested against. Memory-frugal: the pixels are processed in chunks, so no ``[B, Q, P]``
intermediate of the whole mask is ever built.

With x a mask logit, p = sigmoid(x), y a target in [0, 1] and P pixels:

- BCE cost (Mask2Former): (BCE(x, 1) . y + BCE(x, 0) . (1 - y)) / P. Since
  BCE(x, 0) - BCE(x, 1) = x, this is (sum softplus(x) - x . y) / P: one product.
- focal cost (MaskFormer, alpha, gamma): (pos . y + neg . (1 - y)) / P with
  pos = alpha (1-p)^gamma BCE(x, 1), neg = (1-alpha) p^gamma BCE(x, 0), i.e.
  (sum neg - (neg - pos) . y) / P.
- dice cost: 1 - (2 p . y + 1) / (sum p + sum y + 1).

So an image's cost needs, per query and target, two dot products over the pixels (diff . y,
p . y) and, per query, two sums (sum neg, sum p). On CPU tensors the compiled kernel
``maskformer_fast::mask_cost_sums`` (csrc/cost/mask_cost_cpu.cpp) computes them: every
activation once per logit in one vectorised pass per chunk, then the chunk's dot products,
images in parallel. Without it (extension not built, or CUDA tensors) the torch ops below do
the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskformer_fast import _ops

CHUNK_ELEMENTS = 1 << 16  # logits per chunk: its handful of fp32 temporaries stay in L2


def has_cpu_kernel(op: str) -> bool:
    """Whether the built extension has the compiled CPU kernel ``op`` ("mask_cost_sums",
    "bilinear_sample"): False when it is not built, or built before the op."""
    return _ops.has_kernel("cpu", op)


def _use_cpu_kernel(x: torch.Tensor) -> bool:
    """Whether the logits ``x`` go through the compiled CPU kernel (mask_cost_sums) rather than
    the torch ops below."""
    return x.device.type == "cpu" and has_cpu_kernel("mask_cost_sums")


def _chunk_width(Q: int) -> int:
    """Pixels per chunk of an image with Q queries: whole vectors of 16 floats when it can."""
    width = max(1, CHUNK_ELEMENTS // max(Q, 1))
    return width - width % 16 if width >= 16 else width


def _mask_terms(x: torch.Tensor, mask_cost: str, alpha: float, gamma: float, buf: list):
    """Per-logit terms of a chunk of fp32 logits x ``[Q, c]``: ``(diff, neg, p)``, with neg and
    pos the terms of y = 0 and y = 1, diff = neg - pos (mask cost * P = sum neg - diff . y)
    and p = sigmoid(x) for the dice. ``buf``: five ``[Q, c]`` scratch tensors reused chunk
    after chunk (on the CPU, fresh temporaries would cost a trip to memory each), so the
    results are only valid until the next call."""
    p = torch.sigmoid(x, out=buf[0])
    q = torch.sub(1.0, p, out=buf[1])  # 1 - p = sigmoid(-x)
    # softplus(x) = max(x, 0) + log(1 + e^-|x|) and log(1 + e^-|x|) = -log sigmoid(|x|), where
    # sigmoid(|x|) = max(p, 1 - p) is in [0.5, 1]: one log instead of softplus's exp and log1p
    log_m = torch.maximum(p, q, out=buf[2]).log_()
    neg = torch.clamp_min(x, 0, out=buf[3]).sub_(log_m)  # BCE(x, 0) = softplus(x)
    if mask_cost == "bce":
        return x, neg, p  # BCE(x, 0) - BCE(x, 1) = x
    pos = torch.sub(neg, x, out=buf[2])  # BCE(x, 1) = softplus(-x)
    neg.mul_(torch.pow(p, gamma, out=buf[4])).mul_(1 - alpha)  # (1 - alpha) p^gamma BCE(x, 0)
    # diff = neg - alpha (1 - p)^gamma BCE(x, 1)
    return torch.addcmul(neg, q.pow_(gamma), pos, value=-alpha, out=buf[2]), neg, p


def _image_sums(logit_chunks, y, Q, mask_cost, alpha, gamma):
    """The pixel sums of one image's cost: ``dots [2, Q, n]`` = (diff . y, p . y) and
    ``sums [2, Q]`` = (sum neg, sum p). ``logit_chunks`` yields ``(start, x [Q, c])``, the
    logits of pixels ``start : start + c``; y ``[n, P]`` float32, its targets (no padding)."""
    dots, sums = y.new_zeros(2, Q, len(y)), y.new_zeros(2, Q)
    scratch = buf = None
    for start, x in logit_chunks:
        c = x.shape[-1]
        yc = y[:, start : start + c]
        if _use_cpu_kernel(x):
            d, s = torch.ops.maskformer_fast.mask_cost_sums(x[None], yc[None], None, mask_cost, alpha, gamma, c)
            dots += d[0]
            sums += s[0]
            continue
        if scratch is None:  # the first chunk is the longest
            buf = scratch = y.new_empty(5, Q, c).unbind(0)
        elif c != buf[0].shape[-1]:
            buf = [t[:, :c] for t in scratch]
        diff, neg, p = _mask_terms(x.float(), mask_cost, alpha, gamma, buf)
        dots[0].addmm_(diff, yc.T)  # two products: cheaper here than one of the two stacked
        dots[1].addmm_(p, yc.T)
        sums[0] += neg.sum(-1)
        sums[1] += p.sum(-1)
    return dots, sums


def _mask_dice(dots, sums, y_sum, P):
    """Mask and dice cost ``[..., Q, n]`` from an image's pixel sums (``_image_sums``) and its
    targets' sums ``y_sum [..., n]``."""
    mask = (sums[..., 0, :, None] - dots[..., 0, :, :]) / max(P, 1)
    dice = 1 - (2 * dots[..., 1, :, :] + 1) / (sums[..., 1, :, None] + y_sum[..., None, :] + 1)
    return mask, dice


def _image_cost(logit_chunks, y, Q, P, mask_cost, alpha, gamma):
    """Mask and dice cost ``[Q, n]`` of one image: ``logit_chunks`` yields ``(start, x [Q, c])``,
    the logits of pixels ``start : start + c``; y ``[n, P]`` its targets (no padding)."""
    y = y.float()
    dots, sums = _image_sums(logit_chunks, y, Q, mask_cost, alpha, gamma)
    return _mask_dice(dots, sums, y.sum(-1), P)


def _chunks(x: torch.Tensor):
    """``(start, x[:, start : start + step])`` over the pixels of one image's logits ``[Q, P]``."""
    step = _chunk_width(x.shape[0])
    return ((start, x[:, start : start + step]) for start in range(0, x.shape[-1], step))


def _cost(image_cost, B, Q, T, P, device, class_logits, tgt_labels, tgt_counts, w_class, w_mask, w_dice):
    """The ``[B, Q, T]`` cost: image by image, each against its own targets only (padding
    targets are never read, so they may hold anything, even NaN), +inf in the padding."""
    counts = [T] * B if tgt_counts is None else [min(max(int(n), 0), T) for n in tgt_counts.tolist()]
    cost = torch.full((B, Q, T), float("inf"), device=device)
    for b, n in enumerate(counts):
        if n == 0 or Q == 0:
            continue
        mask, dice = image_cost(b, n)
        cost[b, :, :n] = w_mask * mask + w_dice * dice
    if class_logits is not None and w_class != 0 and T:
        prob = class_logits.float().softmax(-1)
        K1 = prob.shape[-1]
        labels = tgt_labels.to(device)
        picked = torch.gather(prob, 2, labels.clamp(0, K1 - 1)[:, None, :].expand(-1, Q, -1))
        # a label outside [0, K] of a valid target is NaN; the padding (any label, any class
        # score, even one whose softmax is NaN) stays +inf
        valid = (torch.arange(T, device=device) < torch.tensor(counts, device=device)[:, None])[:, None, :]
        cost -= w_class * picked.masked_fill(((labels < 0) | (labels >= K1))[:, None, :] & valid, float("nan"))
        cost.masked_fill_(~valid, float("inf"))
    return cost


def pairwise_mask_cost_torch(mask_logits, tgt_masks, tgt_counts=None, class_logits=None, tgt_labels=None, *,
                             w_class=1.0, w_mask=1.0, w_dice=1.0, mask_cost="bce", alpha=0.25, gamma=2.0):
    """``[B, Q, P]`` logits against ``[B, T, P]`` targets -> float32 ``[B, Q, T]``."""
    B, Q, P = mask_logits.shape
    T = tgt_masks.shape[1]
    if _use_cpu_kernel(mask_logits):  # the whole batch in one call, images in parallel
        counts = tgt_counts.cpu() if tgt_counts is not None else None
        dots, sums = torch.ops.maskformer_fast.mask_cost_sums(mask_logits, tgt_masks, counts, mask_cost, alpha,
                                                              gamma, _chunk_width(Q))

        def image_cost(b, n):
            y_sum = tgt_masks[b, :n].float().sum(-1)
            return _mask_dice(dots[b, :, :, :n], sums[b], y_sum, P)
    else:

        def image_cost(b, n):
            return _image_cost(_chunks(mask_logits[b]), tgt_masks[b, :n], Q, P, mask_cost, alpha, gamma)

    return _cost(image_cost, B, Q, T, P, mask_logits.device, class_logits, tgt_labels, tgt_counts,
                 w_class, w_mask, w_dice)


def pairwise_mask_cost_float64(mask_logits, tgt_masks, class_logits=None, tgt_labels=None, *, w_class=1.0,
                               w_mask=1.0, w_dice=1.0, mask_cost="bce", alpha=0.25, gamma=2.0):
    """One image's cost ``[Q, T]`` in float64, term by term as the reference matchers write it:
    ``(pos . y + neg . (1 - y)) / P`` with ``pos = BCE(x, 1)``, ``neg = BCE(x, 0)`` (focal:
    times ``alpha (1 - p)^gamma`` and ``(1 - alpha) p^gamma``), plus dice and class terms.

    ``mask_logits [Q, P]``, ``tgt_masks [T, P]``, ``class_logits [Q, K+1]``, ``tgt_labels [T]``.
    The fp32 kernels above sum ``neg`` over the pixels and subtract ``(neg - pos) . y``: for
    logits beyond ~1e37 in magnitude those sums overflow, and for huge ones their rounding
    drowns the small terms. Here no product of a pixel's term with a target that does not
    select it is ever formed, and float64 holds any sum of float32 terms, so every finite
    logit gets its exact cost; NaN or inf logits give the NaN / inf pattern of the
    references (``F.binary_cross_entropy_with_logits`` at +-inf is NaN). Slow: the matcher
    calls it only for images whose fp32 cost is not finite or huge."""
    x, y = mask_logits.double(), tgt_masks.double()
    P = x.shape[-1]
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    p = torch.sigmoid(x)
    if mask_cost == "focal":
        pos = alpha * (1 - p) ** gamma * pos
        neg = (1 - alpha) * p**gamma * neg
    mask = (pos @ y.T + neg @ (1 - y).T) / max(P, 1)
    dice = 1 - (2 * p @ y.T + 1) / (p.sum(-1)[:, None] + y.sum(-1)[None, :] + 1)
    cost = w_mask * mask + w_dice * dice
    if class_logits is not None and w_class != 0 and len(y):
        prob = class_logits.double().softmax(-1)
        K1 = prob.shape[-1]
        labels = tgt_labels.to(prob.device)
        picked = prob[:, labels.clamp(0, K1 - 1)]  # a label outside [0, K] gives NaN, as the kernels
        cost = cost - w_class * picked.masked_fill(((labels < 0) | (labels >= K1))[None, :], float("nan"))
    return cost


def mask_cost_from_embeddings_torch(mask_embed, pixel_feat, tgt_masks, tgt_counts=None, class_logits=None,
                                    tgt_labels=None, *, w_class=1.0, w_mask=1.0, w_dice=1.0, mask_cost="bce",
                                    alpha=0.25, gamma=2.0):
    """The same cost with logits = einsum("bqc,bchw->bqhw"), computed chunk by chunk of
    pixels and never stored whole: memory O(Q * T + Q * chunk), not O(Q * H * W)."""
    B, Q, _ = mask_embed.shape
    feat = pixel_feat.flatten(2)  # [B, C, P]
    P = feat.shape[-1]
    T = tgt_masks.shape[1]
    y = tgt_masks.flatten(2)
    embed = mask_embed.float()

    def image_cost(b, n):
        step = _chunk_width(Q)
        chunks = ((s, embed[b] @ feat[b, :, s : s + step].float()) for s in range(0, P, step))
        return _image_cost(chunks, y[b, :n], Q, P, mask_cost, alpha, gamma)

    return _cost(image_cost, B, Q, T, P, mask_embed.device, class_logits, tgt_labels, tgt_counts,
                 w_class, w_mask, w_dice)


def mask_einsum_torch(mask_embed: torch.Tensor, pixel_feat: torch.Tensor) -> torch.Tensor:
    """``"b t c, b c h w -> b t h w"``."""
    B, C, H, W = pixel_feat.shape
    dtype = torch.promote_types(mask_embed.dtype, pixel_feat.dtype)  # mixed dtypes promoted, as documented
    out = torch.bmm(mask_embed.to(dtype), pixel_feat.reshape(B, C, H * W).to(dtype))
    # every size explicit: with B, H or W = 0, view(B, -1, H, W) is ambiguous and raises
    return out.view(B, mask_embed.shape[1], H, W)
