"""Torch references of the matching-cost kernels: the CPU path, and what the Triton kernels
are tested against. Memory-frugal: the pixels are processed in chunks, so no ``[B, Q, P]``
intermediate of the whole mask is ever built.

With x a mask logit, p = sigmoid(x), y a target in [0, 1] and P pixels:

- BCE cost (Mask2Former): (BCE(x, 1) . y + BCE(x, 0) . (1 - y)) / P. Since
  BCE(x, 1) - BCE(x, 0) = -x, this is (-x . y + sum softplus(x)) / P: one product.
- focal cost (MaskFormer, alpha, gamma): (pos . y + neg . (1 - y)) / P with
  pos = alpha (1-p)^gamma BCE(x, 1), neg = (1-alpha) p^gamma BCE(x, 0), i.e.
  ((pos - neg) . y + sum neg) / P.
- dice cost: 1 - (2 p . y + 1) / (sum p + sum y + 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 20  # logits per chunk (4 MiB of fp32: cache-sized passes)


def _accumulate(x: torch.Tensor, y: torch.Tensor, mask_cost: str, alpha: float, gamma: float, acc: list):
    """Adds one chunk of pixels: x ``[B, Q, p]`` logits, y ``[B, T, p]`` targets, in fp32."""
    x = x.float()
    p = x.sigmoid()
    neg = F.softplus(x)  # BCE(x, 0); BCE(x, 1) = neg - x
    if mask_cost == "bce":
        weight, bias, sign = x, neg, -1.0  # (BCE(x, 1) - BCE(x, 0)) . y = -x . y
    else:  # in place: every pass over the chunk counts on the CPU
        pos = (neg - x).mul_((1 - p).pow_(gamma)).mul_(alpha)
        neg = neg.mul_(p.pow(gamma)).mul_(1 - alpha)
        weight, bias, sign = pos.sub_(neg), neg, 1.0
    yt = y.transpose(1, 2)
    acc[0] += sign * torch.bmm(weight, yt)  # [B, Q, T]
    acc[1] += bias.sum(-1)  # [B, Q]
    acc[2] += torch.bmm(p, yt)  # p . y
    acc[3] += p.sum(-1)  # sum p
    acc[4] += y.sum(-1)  # sum y  [B, T]


def _finish(acc, P, class_logits, tgt_labels, tgt_counts, w_class, w_mask, w_dice) -> torch.Tensor:
    mask = (acc[0] + acc[1][..., None]) / max(P, 1)
    dice = 1 - (2 * acc[2] + 1) / (acc[3][..., None] + acc[4][:, None, :] + 1)
    cost = w_mask * mask + w_dice * dice
    if class_logits is not None and w_class != 0 and cost.shape[-1]:
        prob = class_logits.float().softmax(-1)
        K1 = prob.shape[-1]
        labels = tgt_labels.to(cost.device)
        picked = torch.gather(prob, 2, labels.clamp(0, K1 - 1)[:, None, :].expand(-1, cost.shape[1], -1))
        # a label outside [0, K] is NaN (padding labels may be anything: +inf below)
        picked = picked.masked_fill(((labels < 0) | (labels >= K1))[:, None, :], float("nan"))
        cost = cost - w_class * picked
    if tgt_counts is not None:
        T = cost.shape[-1]
        padding = torch.arange(T, device=cost.device) >= tgt_counts.to(cost.device)[:, None]
        cost = cost.masked_fill(padding[:, None, :], float("inf"))
    return cost


def _zeros(B, Q, T, device):
    return [torch.zeros(B, Q, T, device=device), torch.zeros(B, Q, device=device),
            torch.zeros(B, Q, T, device=device), torch.zeros(B, Q, device=device),
            torch.zeros(B, T, device=device)]


def _valid_targets(tgt_masks: torch.Tensor, tgt_counts: torch.Tensor | None) -> torch.Tensor:
    """Targets in fp32 with padding rows zeroed (padding may hold anything, even NaN)."""
    y = tgt_masks.float()
    if tgt_counts is not None:
        T = y.shape[1]
        keep = torch.arange(T, device=y.device) < tgt_counts.to(y.device)[:, None]
        y = torch.where(keep.view(*keep.shape, *([1] * (y.dim() - 2))), y, torch.zeros((), device=y.device))
    return y


def pairwise_mask_cost_torch(mask_logits, tgt_masks, tgt_counts=None, class_logits=None, tgt_labels=None, *,
                             w_class=1.0, w_mask=1.0, w_dice=1.0, mask_cost="bce", alpha=0.25, gamma=2.0):
    """``[B, Q, P]`` logits against ``[B, T, P]`` targets -> float32 ``[B, Q, T]``."""
    B, Q, P = mask_logits.shape
    T = tgt_masks.shape[1]
    y = _valid_targets(tgt_masks, tgt_counts)
    acc = _zeros(B, Q, T, mask_logits.device)
    step = max(1, CHUNK_ELEMENTS // max(B * Q, 1))
    for start in range(0, P, step):
        _accumulate(mask_logits[..., start : start + step], y[..., start : start + step], mask_cost, alpha, gamma, acc)
    return _finish(acc, P, class_logits, tgt_labels, tgt_counts, w_class, w_mask, w_dice)


def mask_cost_from_embeddings_torch(mask_embed, pixel_feat, tgt_masks, tgt_counts=None, class_logits=None,
                                    tgt_labels=None, *, w_class=1.0, w_mask=1.0, w_dice=1.0, mask_cost="bce",
                                    alpha=0.25, gamma=2.0):
    """The same cost with logits = einsum("bqc,bchw->bqhw"), computed chunk by chunk of
    pixels and never stored whole: memory O(Q * T + Q * chunk), not O(Q * H * W)."""
    B, Q, _ = mask_embed.shape
    feat = pixel_feat.flatten(2)  # [B, C, P]
    P = feat.shape[-1]
    T = tgt_masks.shape[1]
    y = _valid_targets(tgt_masks, tgt_counts).flatten(2)
    acc = _zeros(B, Q, T, mask_embed.device)
    embed = mask_embed.float()
    step = max(1, CHUNK_ELEMENTS // max(B * Q, 1))
    for start in range(0, P, step):
        x = torch.bmm(embed, feat[..., start : start + step].float())
        _accumulate(x, y[..., start : start + step], mask_cost, alpha, gamma, acc)
    return _finish(acc, P, class_logits, tgt_labels, tgt_counts, w_class, w_mask, w_dice)


def mask_einsum_torch(mask_embed: torch.Tensor, pixel_feat: torch.Tensor) -> torch.Tensor:
    """``"b t c, b c h w -> b t h w"``."""
    B, C, H, W = pixel_feat.shape
    dtype = torch.promote_types(mask_embed.dtype, pixel_feat.dtype)  # mixed dtypes promoted, as documented
    out = torch.bmm(mask_embed.to(dtype), pixel_feat.reshape(B, C, H * W).to(dtype))
    # every size explicit: with B, H or W = 0, view(B, -1, H, W) is ambiguous and raises
    return out.view(B, mask_embed.shape[1], H, W)
