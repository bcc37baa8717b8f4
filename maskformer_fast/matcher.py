"""Hungarian matching of predicted masks to targets, for the whole batch at once.

A drop-in for the mask matchers of MaskFormer and Mask2Former (``matcher.py``) and, through
:class:`HFHungarianMatcher` and :class:`HFMaskFormerHungarianMatcher`, for Hugging Face
transformers' ``Mask2FormerHungarianMatcher`` and ``MaskFormerHungarianMatcher``: the same
arguments, the same cost formulas, the same indices, but one fused cost computation and one
batched assignment for the whole batch (and, if asked, for every decoder layer at once)
instead of a per-image loop that copies each cost matrix to the host and calls scipy. It
computes mask costs only: DETR's box costs (L1, GIoU) are not computed here; DETR-style code
keeps its own cost and replaces its scipy loop by ``batch_linear_sum_assignment``.

Cost of query q for target t (p = sigmoid(mask logit), y = target mask, P points or pixels):

    w_class * -softmax(class_logits)[q, label_t]
  + w_mask  * mask_cost(q, t)    sigmoid-BCE (Mask2Former) or focal (MaskFormer), / P
  + w_dice  * (1 - (2 p.y + 1) / (sum p + sum y + 1))
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from maskformer_fast.kernels import pairwise_mask_cost
from maskformer_fast.kernels.reference import has_cpu_kernel, pairwise_mask_cost_float64
from maskformer_fast.lsa import batch_linear_sum_assignment, index_pairs, to_device

NONFINITE_POLICIES = ("raise", "forbid", "clamp", "scipy")
# An image with a cost beyond this (or not finite) in float32 is costed again in float64:
# only logits far beyond a trained model's (|x| of ~1e5 and more) get there, where the fp32
# kernels' pixel sums overflow or lose the small terms.
RECOST_ABOVE = 1e6
HF_CLAMP = 1e10  # transformers' Mask2FormerHungarianMatcher clamps its cost to [-1e10, 1e10]


def point_sample(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``masks [B, N, H, W]`` at ``coords [B, P, 2]`` in [0, 1]^2 (x, y),
    as Mask2Former's ``point_sample``: ``grid_sample(masks, 2 * coords - 1)``. -> ``[B, N, P]``."""
    grid = (2.0 * coords - 1.0).to(masks.dtype)  # [B, P, 2]
    N = masks.shape[1]
    differentiable = torch.is_grad_enabled() and (masks.requires_grad or coords.requires_grad)
    if masks.device.type == "cpu" and masks.dtype == torch.float32 and not differentiable \
            and has_cpu_kernel("bilinear_sample"):
        # the compiled kernel (csrc/cost/bilinear_sample_cpu.cpp, no gradient): grid_sample's
        # values, bit for bit, each point's corners and weights computed once for all N planes
        return torch.ops.maskformer_fast.bilinear_sample(masks, grid)
    grid = grid.unsqueeze(1)  # [B, 1, P, 2]
    if N > 1 and masks.device.type == "cpu" and len(masks):
        # grid_sample interpolates point by point, all N planes of an image for each point: on
        # the CPU that walks N * H * W floats per point and misses the cache. One plane per
        # sample and the image's grid repeated (as Mask2Former calls it, with an expanded grid:
        # no copy) keeps one plane in cache at a time: same values, several times faster.
        out = [F.grid_sample(m[:, None], g.expand(N, -1, -1, -1), mode="bilinear", align_corners=False).flatten(1)
               for m, g in zip(masks, grid)]
        return out[0][None] if len(out) == 1 else torch.stack(out)
    return F.grid_sample(masks, grid, mode="bilinear", align_corners=False).squeeze(2)


def pad_targets(targets: Sequence[dict], device: torch.device, *, sizes: str = "same") -> tuple:
    """Stacks ragged targets: masks ``[B, Tmax, H, W]`` (float, zero padding), labels
    ``[B, Tmax]`` (int64, zero padding) and counts ``[B]`` (int64, on the host). The masks of
    an image without targets may have any size: they are not read.

    ``sizes``: how target masks of different sizes across the batch are stacked. "same":
    they must share one size, else a ValueError. "pad": zero-padded (bottom, right) to the
    largest height and width among them, as MaskFormer's matcher and the criteria of
    MaskFormer and Mask2Former pad them. "list": one size stacks as with "same"; several
    come back as a list of B float tensors ``[T_b, H_b, W_b]`` on ``device``."""
    if sizes not in ("same", "pad", "list"):
        raise ValueError(f"sizes must be 'same', 'pad' or 'list', got {sizes!r}")
    counts = [int(t["labels"].shape[0]) for t in targets]
    for b, t in enumerate(targets):
        if t["masks"].shape[0] != counts[b]:
            raise ValueError(
                f"targets[{b}]: {t['masks'].shape[0]} masks but {counts[b]} labels"
            )
    tmax = max(counts, default=0)
    labels = torch.zeros(len(targets), tmax, dtype=torch.int64, device=device)
    for b, t in enumerate(targets):
        labels[b, : counts[b]] = t["labels"].to(device, non_blocking=True)
    host_counts = torch.tensor(counts, dtype=torch.int64)
    shapes = {tuple(t["masks"].shape[-2:]) for t in targets if t["masks"].shape[0]}
    if len(shapes) > 1 and sizes == "same":
        raise ValueError(f"target masks must share one size across the batch, got {sorted(shapes)}")
    if len(shapes) > 1 and sizes == "list":
        return [t["masks"].to(device, torch.float32, non_blocking=True) for t in targets], labels, host_counts
    if len(shapes) > 1:  # "pad"
        H, W = max(h for h, _ in shapes), max(w for _, w in shapes)
    else:  # an empty batch has no masks at all
        H, W = shapes.pop() if shapes else tuple(targets[0]["masks"].shape[-2:]) if targets else (0, 0)
    masks = torch.zeros(len(targets), tmax, H, W, device=device)
    for b, t in enumerate(targets):  # targets on the host: copied with no explicit sync
        if counts[b]:
            h, w = t["masks"].shape[-2:]
            masks[b, : counts[b], :h, :w] = t["masks"].to(device, non_blocking=True)
    return masks, labels, host_counts


class HungarianMatcher(nn.Module):
    """Matches predictions to targets, for a whole batch (and every decoder layer) at once.

    Args:
        cost_class, cost_mask, cost_dice: weights of the three cost terms.
        num_points: 0 to match on full masks (targets resized, nearest, to the prediction
            size, as MaskFormer does; targets of different sizes are first zero-padded to the
            largest, as MaskFormer pads them); otherwise the number of uniform points,
            shared by the predictions and the targets of an image, at which both are sampled
            bilinearly (Mask2Former: 12,544), each image's targets at their own size.
        mask_cost: "bce" (Mask2Former's sigmoid cross-entropy) or "focal" (MaskFormer's,
            alpha 0.25, gamma 2).
        nonfinite: what a NaN or infinite cost does.

            - "raise" (default): a ValueError naming the first such image.
            - "forbid": the pair cannot be matched; an image left with no complete
              matching raises, naming it.
            - "clamp": as transformers' ``Mask2FormerHungarianMatcher``: every cost is
              clamped to [-1e10, 1e10] and NaN becomes 0 (its ``torch.minimum``,
              ``torch.maximum``, ``torch.nan_to_num(cost, 0)``), so such pairs stay
              matchable.
            - "scipy": as transformers' ``MaskFormerHungarianMatcher``, which hands the
              cost to scipy as it is: NaN or -inf raises a ValueError, +inf forbids the
              pair (an image left with no complete matching raises).

            Non-finite costs come from NaN or inf predictions only: an image whose fp32
            cost is not finite or beyond ``RECOST_ABOVE`` (1e6) in magnitude is costed
            again in float64, term by term, so finite logits of any size (up to float32's
            largest) get their exact cost (the cost matrix is then float64 if a cost does
            not fit in float32). Not on the path without host synchronisation (CUDA,
            "forbid", ``as_tensor=True`` or ``check=False``): there a non-finite fp32 cost
            is forbidden and a huge finite one kept as computed.
        generator: the torch.Generator the sampling points are drawn from (default: torch's
            global generator of the predictions' device, as Mask2Former).
        backend: the cost kernels' backend ("auto", "triton", "torch").

    Presets: :meth:`maskformer` (class 1, focal 20, dice 1, full masks) and
    :meth:`mask2former` (class 2, BCE 5, dice 5, 12,544 points).
    """

    #: num_points=0, targets of several sizes: zero-padded to the batch's largest, then
    #: resized (MaskFormer); False: each image's resized on its own (transformers)
    pad_mixed_targets = True

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 0,
        mask_cost: str = "bce",
        *,
        nonfinite: str = "raise",
        generator: torch.Generator | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all costs can't be 0")
        if mask_cost not in ("bce", "focal"):
            raise ValueError(f"mask_cost must be 'bce' or 'focal', got {mask_cost!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if num_points < 0:
            raise ValueError(f"num_points must be >= 0, got {num_points}")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points, self.mask_cost = num_points, mask_cost
        self.nonfinite, self.generator, self.backend = nonfinite, generator, backend

    @classmethod
    def maskformer(cls, **kwargs) -> "HungarianMatcher":
        """MaskFormer's matcher: class 1, focal 20, dice 1, on full masks."""
        return cls(cost_class=1.0, cost_mask=20.0, cost_dice=1.0, num_points=0, mask_cost="focal", **kwargs)

    @classmethod
    def mask2former(cls, **kwargs) -> "HungarianMatcher":
        """Mask2Former's (COCO) matcher: class 2, BCE 5, dice 5, on 12,544 sampled points."""
        return cls(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=12544, mask_cost="bce", **kwargs)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict], *, as_tensor: bool = False):
        """DETR / MaskFormer / Mask2Former convention.

        Args:
            outputs: ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w]}``; the
                no-object class is the last logit.
            targets: B dicts ``{"labels": [T] int64, "masks": [T, H, W]}`` (T may be 0; H, W
                may differ from image to image).
            as_tensor: return ``col4row [B, Q]`` (int64 on the predictions' device, -1 for
                an unmatched query) instead of index pairs. With ``nonfinite="forbid"``, the
                CUDA kernels and targets on the GPU this needs no host synchronisation; an
                image left with no complete matching of finite cost then comes back
                unmatched (all -1) instead of raising. (The other ``nonfinite`` policies
                sync once to look for non-finite costs; the index pairs sync once to copy
                them.)

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors, ``pred_idx`` increasing,
            of length ``min(Q, T)`` (no pairs for Q = 0; an empty list for B = 0).
        """
        if as_tensor:
            return self.match_layers([outputs], targets, check=False)[0]
        return self.match_layers([outputs], targets, pairs=True)[0]

    @torch.no_grad()
    def match_layers(self, layers: Sequence[dict], targets: Sequence[dict], *,
                     check: bool = True, pairs: bool = False) -> list:
        """Matches several sets of outputs (e.g. every decoder layer: the last layer and
        ``outputs["aux_outputs"]``) against the same targets: one cost kernel call per layer
        for the whole batch, one assignment call for all layers. Sampling points are drawn
        layer after layer, image after image, as the reference criteria draw them when they
        call their matcher once per layer in this order. Returns one ``col4row [B, Q]`` per
        layer, or with ``pairs=True`` the B index pairs of each layer as :meth:`forward`
        gives them (one copy to the host for all layers); ``check=False`` skips the
        (synchronising) check that every image got a complete matching."""
        L = len(layers)
        B, Q = layers[0]["pred_logits"].shape[:2]
        if len(targets) != B:
            raise ValueError(f"{len(targets)} targets for a batch of {B} predictions")
        device = layers[0]["pred_masks"].device
        pad = "pad" if self.num_points == 0 and self.pad_mixed_targets else "list"
        tgt_masks, tgt_labels, host_counts = pad_targets(targets, device, sizes=pad)
        counts = to_device(host_counts, device)
        with torch.autocast(device.type, enabled=False):  # costs in fp32, as Mask2Former
            # the points of every layer, in the order the reference draws them
            coords = [self._points(o["pred_masks"]) if self.num_points else None for o in layers]
            # one kernel call per layer (no copy of the layers' masks into one tensor)
            cost = torch.cat([self._cost(o["pred_masks"], o["pred_logits"], tgt_masks, tgt_labels, counts,
                                         host_counts, c)
                              for o, c in zip(layers, coords)])  # [L*B, Q, T], +inf beyond each image's targets
            valid = (torch.arange(cost.shape[-1], device=device) < counts[:, None]).repeat(L, 1)  # [L*B, T]
            if not (self.nonfinite == "forbid" and not check and device.type == "cuda"):
                cost = self._recost(cost, valid, layers, coords, tgt_masks, tgt_labels, host_counts)
        sizes = torch.stack([torch.full_like(counts, Q), counts], 1).repeat(L, 1)
        cost = self._apply_nonfinite(cost, valid, B)
        result = batch_linear_sum_assignment(cost, sizes, errors="status")
        bad = torch.nonzero(result.status).flatten() if check else []
        if len(bad):
            b = int(bad[0]) % B
            raise ValueError(
                f"matcher: image {b} has no complete matching of finite cost "
                f"({int(counts[b])} targets, too few queries with finite predictions)"
            )
        if pairs:
            every = index_pairs(result.col4row.cpu())
            return [every[layer * B : (layer + 1) * B] for layer in range(L)]
        return list(result.col4row.view(L, B, Q).unbind(0))

    def _cost(self, masks, logits, tgt_masks, tgt_labels, counts, host_counts, coords):
        """The cost ``[B, Q, T]`` of one layer's predictions against the padded targets (or
        the list of each image's targets, of several sizes)."""
        per_image = isinstance(tgt_masks, list)
        if per_image or (coords is not None and masks.device.type == "cpu" and len(masks)):
            # On the CPU, image by image: the points sampled from an image's predictions
            # ([Q, P], a few MB) are costed while still in cache, and no [B, Q, P] tensor
            # (fresh memory, page faults) is written and read back. Targets of several
            # sizes: image by image on any device, each at its own size.
            T = tgt_labels.shape[1]
            cost = []
            for b, n in enumerate(host_counts.tolist()):  # only the image's own targets are sampled
                if n == 0:
                    cost.append(torch.full((1, masks.shape[1], T), float("inf"), device=masks.device))
                    continue
                c = self._image_cost(masks[b : b + 1], logits[b : b + 1], _image_targets(tgt_masks, b, n),
                                     tgt_labels[b : b + 1, :n], counts[b : b + 1],
                                     None if coords is None else coords[b : b + 1])
                cost.append(F.pad(c, (0, T - n), value=float("inf")))
            if not cost:
                return torch.zeros(0, masks.shape[1], T, device=masks.device)
            return torch.cat(cost)
        return self._image_cost(masks, logits, tgt_masks, tgt_labels, counts, coords)

    def _image_cost(self, masks, logits, tgt_masks, tgt_labels, counts, coords):
        """The cost of a batch of images (or of one) at its sampling points (None: all pixels)."""
        pred, tgt = self._sample(masks, tgt_masks, coords)
        return pairwise_mask_cost(
            pred,
            tgt,
            counts.to(masks.device),
            logits.float(),
            tgt_labels,
            w_class=self.cost_class,
            w_mask=self.cost_mask,
            w_dice=self.cost_dice,
            mask_cost=self.mask_cost,
            backend=self.backend,
        )

    def _points(self, pred: torch.Tensor) -> torch.Tensor:
        """``[B, P, 2]`` uniform points: one set per image, drawn image after image as the
        reference matchers draw them (``torch.rand`` of P x 2 values on the predictions'
        device, or the generator's), shared by the predictions and the targets of that image."""
        device = self.generator.device if self.generator is not None else pred.device
        draws = [torch.rand(self.num_points, 2, generator=self.generator, device=device) for _ in range(pred.shape[0])]
        return to_device(torch.stack(draws) if draws else torch.zeros(0, self.num_points, 2, device=device),
                          pred.device)

    def _sample(self, pred: torch.Tensor, tgt: torch.Tensor, coords: torch.Tensor | None):
        """Predictions ``[B, Q, h, w]`` and targets ``[B, T, H, W]`` as ``[B, Q, P]`` and
        ``[B, T, P]`` at the same pixels (coords None) or points ``coords [B, P, 2]``."""
        B, _, h, w = pred.shape
        T = tgt.shape[1]
        if coords is None:
            if tgt.shape[-2:] != (h, w):
                tgt = F.interpolate(tgt, size=(h, w), mode="nearest") if T else tgt.new_zeros(B, 0, h, w)
            return pred.flatten(2).float(), tgt.flatten(2)
        tgt_points = point_sample(tgt, coords) if T else tgt.new_zeros(B, 0, coords.shape[1])
        return point_sample(pred.float(), coords), tgt_points

    def _recost(self, cost, valid, layers, coords, tgt_masks, tgt_labels, host_counts):
        """``cost`` with every image whose valid fp32 cost is not finite or beyond
        RECOST_ABOVE in magnitude costed again in float64, term by term
        (:func:`pairwise_mask_cost_float64`): the fp32 kernels sum the terms of every pixel
        before subtracting, which overflows (or drowns the small terms) for huge logits. The
        result is float64 if a new cost does not fit in float32. Syncs once."""
        suspect = ~(cost.abs() <= RECOST_ABOVE) & valid[:, None, :]  # NaN compares False
        images = torch.nonzero(suspect.flatten(1).any(1)).flatten().tolist()
        if not images:
            return cost
        B = len(host_counts)
        new = {}
        for i in images:
            layer, b = divmod(i, B)
            n = int(host_counts[b])
            o = layers[layer]
            pred, tgt = self._sample(o["pred_masks"][b : b + 1], _image_targets(tgt_masks, b, n),
                                     None if coords[layer] is None else coords[layer][b : b + 1])
            new[i] = pairwise_mask_cost_float64(pred[0], tgt[0], o["pred_logits"][b], tgt_labels[b, :n],
                                                w_class=self.cost_class, w_mask=self.cost_mask,
                                                w_dice=self.cost_dice, mask_cost=self.mask_cost)
        fp32_max = torch.finfo(torch.float32).max
        if any(bool((c.abs() > fp32_max).logical_and_(c.isfinite()).any()) for c in new.values()):
            cost = cost.double()
        for i, c in new.items():
            cost[i, :, : c.shape[1]] = c.to(cost.dtype)
        return cost

    def _apply_nonfinite(self, cost: torch.Tensor, valid: torch.Tensor, B: int) -> torch.Tensor:
        """The ``nonfinite`` policy on the valid entries of ``cost [L*B, Q, T]`` (the padding,
        +inf, is left alone)."""
        valid = valid[:, None, :]
        if self.nonfinite == "clamp":  # transformers' Mask2FormerHungarianMatcher
            clamped = cost.clamp(-HF_CLAMP, HF_CLAMP).nan_to_num_(0.0)
            return torch.where(valid, clamped, cost)
        bad = ~torch.isfinite(cost) & valid
        if self.nonfinite == "forbid":
            return cost.masked_fill_(bad, float("inf"))
        if self.nonfinite == "scipy":  # +inf forbids the pair, NaN and -inf are refused
            bad &= cost != float("inf")
        images = torch.nonzero(bad.flatten(1).any(1)).flatten()
        if len(images):
            b = int(images[0])
            layer = "" if b < B else f", decoder output {b // B}"
            if self.nonfinite == "scipy":
                raise ValueError(
                    f"matcher: the matching cost of image {b % B} holds NaN or -inf (NaN or inf in its "
                    f"predictions{layer}), which scipy refuses (\"matrix contains invalid numeric "
                    "entries\") in transformers' MaskFormerHungarianMatcher"
                )
            raise ValueError(
                f"matcher: the matching cost of image {b % B} is not finite (NaN or inf in its "
                f"predictions{layer}); pass nonfinite='forbid' to leave such pairs unmatched"
            )
        return cost


def _image_targets(tgt_masks, b: int, n: int) -> torch.Tensor:
    """Image b's n targets ``[1, n, H, W]``, from the padded targets or the list of them."""
    return tgt_masks[b][None, :n] if isinstance(tgt_masks, list) else tgt_masks[b : b + 1, :n]


class HFHungarianMatcher(HungarianMatcher):
    """Hugging Face transformers' matcher signature: ``HFHungarianMatcher(cost_class, cost_mask,
    cost_dice, num_points)`` and ``forward(masks_queries_logits, class_queries_logits,
    mask_labels, class_labels)``, returning a list of B ``(pred_idx, tgt_idx)`` int64 tensors.
    The defaults are ``Mask2FormerHungarianMatcher``'s: sigmoid-BCE on 12,544 points, and
    ``nonfinite="clamp"``, its handling of non-finite costs (NaN or inf predictions): the cost
    clamped to [-1e10, 1e10], NaN set to 0, so such pairs still match as they do there.
    ``num_points=0, mask_cost="focal", nonfinite="scipy"`` is ``MaskFormerHungarianMatcher``
    (:class:`HFMaskFormerHungarianMatcher`). Each image's targets are sampled (or resized) at
    their own size, as transformers does."""

    pad_mixed_targets = False

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 12544, mask_cost: str = "bce", *, nonfinite: str = "clamp", **kwargs):
        super().__init__(cost_class, cost_mask, cost_dice, num_points, mask_cost, nonfinite=nonfinite, **kwargs)

    @torch.no_grad()
    def forward(self, masks_queries_logits: torch.Tensor, class_queries_logits: torch.Tensor,
                mask_labels: Sequence[torch.Tensor], class_labels: Sequence[torch.Tensor]):
        outputs = {"pred_logits": class_queries_logits, "pred_masks": masks_queries_logits}
        targets = [{"labels": c, "masks": m} for c, m in zip(class_labels, mask_labels)]
        return super().forward(outputs, targets)


class HFMaskFormerHungarianMatcher(HFHungarianMatcher):
    """transformers' ``MaskFormerHungarianMatcher(cost_class, cost_mask, cost_dice)``: the focal
    mask cost on full masks, each image's targets resized (nearest) to the prediction size, and
    ``nonfinite="scipy"``: as there, where the cost goes to scipy unclamped, a NaN cost (NaN or
    inf predictions) raises a ValueError and a +inf one forbids the pair."""

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0, *,
                 nonfinite: str = "scipy", **kwargs):
        super().__init__(cost_class, cost_mask, cost_dice, num_points=0, mask_cost="focal", nonfinite=nonfinite,
                         **kwargs)
