"""Matching-cost and mask kernels.

- :func:`pairwise_mask_cost`: the matching cost of every query against every target of its
  image (class + sigmoid-BCE or focal + dice), for a whole padded batch at once.
- :func:`mask_cost_from_embeddings`: the same cost straight from mask embeddings and the
  pixel feature, without materialising the ``[B, Q, H, W]`` logits.
- :func:`mask_einsum`: ``"b t c, b c h w -> b t h w"``, differentiable.

``backend``: "auto" (the default) runs the Triton kernels (``triton_cost.py``,
``triton_einsum.py``) on CUDA tensors and the torch references
(:mod:`maskformer_fast.kernels.reference`) on CPU tensors; "triton" or "torch" force one.
"triton" on CPU tensors runs Triton's interpreter, and only when ``TRITON_INTERPRET=1`` was
set before the kernels were first used (slow: for tests).
"""

from __future__ import annotations

import importlib

import torch
from torch.nn.utils.rnn import pad_sequence

from maskformer_fast.kernels.reference import (
    mask_cost_from_embeddings_torch,
    mask_einsum_torch,
    pairwise_mask_cost_torch,
)

BACKENDS = ("auto", "triton", "torch")
MASK_COSTS = ("bce", "focal")


def _triton(name: str):
    """The Triton kernel module `name`, imported on first use (importing Triton is slow, and
    its ``@triton.jit`` reads ``TRITON_INTERPRET`` at that moment)."""
    try:
        return importlib.import_module(f"maskformer_fast.kernels.{name}")
    except ImportError as exc:
        raise RuntimeError(f"maskformer_fast.kernels: the Triton kernels need triton ({exc})") from exc


def _triton_impl(backend: str, name: str, module: str, *tensors: torch.Tensor | None):
    """The Triton module that runs `name` on `tensors` (which must share a device), or None
    for the torch reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: tensors on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return None
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{name}: backend='triton' needs CUDA tensors, got {device.type} tensors")
    impl = _triton(module)
    if device.type == "cpu" and not impl.INTERPRETED:
        raise RuntimeError(
            f"{name}: backend='triton' needs CUDA tensors; on CPU tensors Triton runs only through "
            "its interpreter, which TRITON_INTERPRET=1 turns on when set before the kernels are "
            "first used (slow; for tests). Use backend='auto' or 'torch' on the CPU."
        )
    return impl


def _pad_ragged(name: str, tgt_masks, tgt_counts, tgt_labels, B: int, spatial: tuple):
    """Targets given as lists (B tensors ``[T_b, *spatial]``, labels ``[T_b]``) -> the padded
    ``[B, Tmax, *spatial]`` tensor (zero padding), counts and labels ``[B, Tmax]``."""
    if not isinstance(tgt_masks, (list, tuple)):
        if isinstance(tgt_labels, (list, tuple)):
            raise ValueError(f"{name}: tgt_labels is a list but tgt_masks is not")
        return tgt_masks, tgt_counts, tgt_labels
    if tgt_counts is not None:
        raise ValueError(f"{name}: tgt_counts comes from the list of targets; pass None")
    if len(tgt_masks) != B or any(tuple(m.shape[1:]) != spatial for m in tgt_masks):
        raise ValueError(f"{name}: expected {B} target tensors [T_b, {', '.join(map(str, spatial))}], got "
                         f"{[list(m.shape) for m in tgt_masks]}")
    counts = torch.tensor([len(m) for m in tgt_masks], dtype=torch.int64)
    if tgt_labels is not None:
        if not isinstance(tgt_labels, (list, tuple)) or [len(t) for t in tgt_labels] != counts.tolist():
            raise ValueError(f"{name}: with a list of targets, tgt_labels is a list of as many labels")
        tgt_labels = pad_sequence(list(tgt_labels), batch_first=True) if B else torch.zeros(0, 0, dtype=torch.int64)
    masks = pad_sequence(list(tgt_masks), batch_first=True) if B else torch.zeros(0, 0, *spatial)
    return masks, counts.to(masks.device), tgt_labels


def _check_cost_args(name, B, Q, T, tgt_counts, class_logits, tgt_labels, mask_cost):
    if mask_cost not in MASK_COSTS:
        raise ValueError(f"mask_cost must be one of {MASK_COSTS}, got {mask_cost!r}")
    if tgt_counts is not None and tuple(tgt_counts.shape) != (B,):
        raise ValueError(f"{name}: tgt_counts must have shape [B] = [{B}], got {list(tgt_counts.shape)}")
    if (class_logits is None) != (tgt_labels is None):
        raise ValueError(f"{name}: class_logits and tgt_labels go together")
    if class_logits is not None:
        if class_logits.dim() != 3 or class_logits.shape[:2] != (B, Q):
            raise ValueError(f"{name}: class_logits must be [B, Q, K+1] = [{B}, {Q}, K+1], got "
                             f"{list(class_logits.shape)}")
        if tuple(tgt_labels.shape) != (B, T):
            raise ValueError(f"{name}: tgt_labels must be [B, T] = [{B}, {T}], got {list(tgt_labels.shape)}")


def pairwise_mask_cost(mask_logits: torch.Tensor, tgt_masks: torch.Tensor, tgt_counts: torch.Tensor | None = None,
                       class_logits: torch.Tensor | None = None, tgt_labels: torch.Tensor | None = None, *,
                       w_class: float = 1.0, w_mask: float = 1.0, w_dice: float = 1.0, mask_cost: str = "bce",
                       backend: str = "auto") -> torch.Tensor:
    """Matching cost ``[B, Q, T]`` (float32; +inf in the padding columns t >= count).

    Args:
        mask_logits: ``[B, Q, P]`` (fp32 / fp16 / bf16).
        tgt_masks: ``[B, T, P]`` in [0, 1] (any float, bool or uint8 dtype), or a list of B
            tensors ``[T_b, P]`` (then tgt_counts is None and tgt_labels a list of ``[T_b]``).
        tgt_counts: ``[B]``: targets beyond an image's count are padding; None: all valid.
        class_logits: ``[B, Q, K+1]`` and tgt_labels ``[B, T]`` int64, for the class term
            ``-softmax(class_logits)[q, label_t]``; omit both for no class term.
        w_class, w_mask, w_dice: weights; mask_cost: "bce" or "focal" (alpha 0.25, gamma 2).
    """
    if mask_logits.dim() == 3:
        tgt_masks, tgt_counts, tgt_labels = _pad_ragged("pairwise_mask_cost", tgt_masks, tgt_counts, tgt_labels,
                                                        mask_logits.shape[0], tuple(mask_logits.shape[2:]))
    if mask_logits.dim() != 3 or tgt_masks.dim() != 3 or tgt_masks.shape[0] != mask_logits.shape[0] \
            or tgt_masks.shape[2] != mask_logits.shape[2]:
        raise ValueError(f"pairwise_mask_cost: mask_logits [B, Q, P] and tgt_masks [B, T, P] must agree, got "
                         f"{list(mask_logits.shape)} and {list(tgt_masks.shape)}")
    B, Q, _ = mask_logits.shape
    _check_cost_args("pairwise_mask_cost", B, Q, tgt_masks.shape[1], tgt_counts, class_logits, tgt_labels,
                     mask_cost)
    triton = _triton_impl(backend, "pairwise_mask_cost", "triton_cost", mask_logits, tgt_masks, tgt_counts,
                          class_logits, tgt_labels)
    impl = triton.pairwise_mask_cost_triton if triton else pairwise_mask_cost_torch
    return impl(mask_logits, tgt_masks, tgt_counts, class_logits, tgt_labels,
                w_class=w_class, w_mask=w_mask, w_dice=w_dice, mask_cost=mask_cost)


def mask_cost_from_embeddings(mask_embed: torch.Tensor, pixel_feat: torch.Tensor, tgt_masks: torch.Tensor,
                              tgt_counts: torch.Tensor | None = None, class_logits: torch.Tensor | None = None,
                              tgt_labels: torch.Tensor | None = None, *, w_class: float = 1.0,
                              w_mask: float = 1.0, w_dice: float = 1.0, mask_cost: str = "bce",
                              backend: str = "auto") -> torch.Tensor:
    """:func:`pairwise_mask_cost` of the logits ``einsum("bqc,bchw->bqhw", mask_embed,
    pixel_feat)`` against ``tgt_masks [B, T, H, W]`` (or a list of B ``[T_b, H, W]``), never
    materialising the logits."""
    if pixel_feat.dim() == 4:
        tgt_masks, tgt_counts, tgt_labels = _pad_ragged("mask_cost_from_embeddings", tgt_masks, tgt_counts,
                                                        tgt_labels, pixel_feat.shape[0], tuple(pixel_feat.shape[2:]))
    if mask_embed.dim() != 3 or pixel_feat.dim() != 4 or tgt_masks.dim() != 4:
        raise ValueError("mask_cost_from_embeddings: expected mask_embed [B, Q, C], pixel_feat [B, C, H, W], "
                         f"tgt_masks [B, T, H, W]; got {list(mask_embed.shape)}, {list(pixel_feat.shape)}, "
                         f"{list(tgt_masks.shape)}")
    B, Q, C = mask_embed.shape
    if pixel_feat.shape[:2] != (B, C) or tgt_masks.shape[0] != B or tgt_masks.shape[2:] != pixel_feat.shape[2:]:
        raise ValueError(f"mask_cost_from_embeddings: shapes disagree: {list(mask_embed.shape)}, "
                         f"{list(pixel_feat.shape)}, {list(tgt_masks.shape)}")
    _check_cost_args("mask_cost_from_embeddings", B, Q, tgt_masks.shape[1], tgt_counts, class_logits, tgt_labels,
                     mask_cost)
    triton = _triton_impl(backend, "mask_cost_from_embeddings", "triton_cost", mask_embed, pixel_feat, tgt_masks,
                          tgt_counts, class_logits, tgt_labels)
    impl = triton.mask_cost_from_embeddings_triton if triton else mask_cost_from_embeddings_torch
    return impl(mask_embed, pixel_feat, tgt_masks, tgt_counts, class_logits, tgt_labels,
                w_class=w_class, w_mask=w_mask, w_dice=w_dice, mask_cost=mask_cost)


def mask_einsum(mask_embed: torch.Tensor, pixel_feat: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``einsum("b t c, b c h w -> b t h w")``: ``[B, T, C]`` x ``[B, C, H, W]`` -> ``[B, T, H, W]``,
    differentiable. Mixed dtypes are promoted; under CUDA autocast both inputs take the
    autocast dtype, as a matmul would."""
    if mask_embed.dim() != 3 or pixel_feat.dim() != 4 or mask_embed.shape[0] != pixel_feat.shape[0] \
            or mask_embed.shape[2] != pixel_feat.shape[1]:
        raise ValueError(f"mask_einsum: expected [B, T, C] and [B, C, H, W], got {list(mask_embed.shape)} and "
                         f"{list(pixel_feat.shape)}")
    triton = _triton_impl(backend, "mask_einsum", "triton_einsum", mask_embed, pixel_feat)
    if triton is None:
        return mask_einsum_torch(mask_embed, pixel_feat)
    if mask_embed.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    else:
        dtype = torch.promote_types(mask_embed.dtype, pixel_feat.dtype)
    if dtype not in triton.DTYPES:
        raise TypeError(f"mask_einsum: the Triton kernel takes {triton.DTYPES} inputs, got {dtype}")
    return triton.mask_einsum_triton(mask_embed.to(dtype), pixel_feat.to(dtype))


__all__ = ["mask_cost_from_embeddings", "mask_einsum", "pairwise_mask_cost"]
