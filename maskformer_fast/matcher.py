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

from maskformer_fast import _ops
from maskformer_fast.hungarian import batch_linear_sum_assignment
from maskformer_fast.kernels import pairwise_mask_cost

NONFINITE_POLICIES = ("raise", "forbid")


def point_sample(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``masks [B, N, H, W]`` at ``coords [B, P, 2]`` in [0, 1]^2 (x, y),
    as Mask2Former's ``point_sample``: ``grid_sample(masks, 2 * coords - 1)``. -> ``[B, N, P]``."""
    grid = (2.0 * coords - 1.0).to(masks.dtype)  # [B, P, 2]
    N = masks.shape[1]
    differentiable = torch.is_grad_enabled() and (masks.requires_grad or coords.requires_grad)
    if masks.device.type == "cpu" and masks.dtype == torch.float32 and not differentiable \
            and _ops.has_kernel("cpu", "bilinear_sample"):
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


def pad_targets(targets: Sequence[dict], device: torch.device) -> tuple:
    """Stacks ragged targets: masks ``[B, Tmax, H, W]`` (float, zero padding), labels
    ``[B, Tmax]`` (int64, zero padding) and counts ``[B]``."""
    counts = [int(t["labels"].shape[0]) for t in targets]
    for b, t in enumerate(targets):
        if t["masks"].shape[0] != counts[b]:
            raise ValueError(
                f"targets[{b}]: {t['masks'].shape[0]} masks but {counts[b]} labels"
            )
    shapes = {tuple(t["masks"].shape[-2:]) for t in targets if t["masks"].shape[0]}
    if len(shapes) > 1:
        raise ValueError(f"target masks must share one size across the batch, got {sorted(shapes)}")
    # an image without targets may hold masks of any size; an empty batch has none
    H, W = shapes.pop() if shapes else tuple(targets[0]["masks"].shape[-2:]) if targets else (0, 0)
    tmax = max(counts, default=0)
    masks = torch.zeros(len(targets), tmax, H, W, device=device)
    labels = torch.zeros(len(targets), tmax, dtype=torch.int64, device=device)
    for b, t in enumerate(targets):  # targets on the host: copied with no explicit sync
        if counts[b]:
            masks[b, : counts[b]] = t["masks"].to(device, non_blocking=True)
        labels[b, : counts[b]] = t["labels"].to(device, non_blocking=True)
    return masks, labels, torch.tensor(counts, dtype=torch.int64)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor goes to CUDA through pinned memory, so that the
    copy is asynchronous and the host never waits for the GPU."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class HungarianMatcher(nn.Module):
    """Matches predictions to targets, for a whole batch (and every decoder layer) at once.

    Args:
        cost_class, cost_mask, cost_dice: weights of the three cost terms.
        num_points: 0 to match on full masks (targets resized, nearest, to the prediction
            size, as MaskFormer does); otherwise the number of uniform points, shared by the
            predictions and the targets of an image, at which both are sampled bilinearly
            (Mask2Former: 12,544).
        mask_cost: "bce" (Mask2Former's sigmoid cross-entropy) or "focal" (MaskFormer's,
            alpha 0.25, gamma 2).
        nonfinite: what a NaN or infinite cost does. "raise" (default): a ValueError naming
            the first such image. "forbid": the pair cannot be matched; an image left with
            no complete matching raises, naming it.
        generator: the torch.Generator the sampling points are drawn from (default: torch's
            global generator, as Mask2Former).
        backend: the cost kernels' backend ("auto", "triton", "torch").

    Presets: :meth:`maskformer` (class 1, focal 20, dice 1, full masks) and
    :meth:`mask2former` (class 2, BCE 5, dice 5, 12,544 points).
    """

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
            targets: B dicts ``{"labels": [T] int64, "masks": [T, H, W]}`` (T may be 0).
            as_tensor: return ``col4row [B, Q]`` (int64 on the predictions' device, -1 for
                an unmatched query) instead of index pairs. With ``nonfinite="forbid"``, the
                CUDA kernels and targets on the GPU this needs no host synchronisation; an
                image left with no complete matching of finite cost then comes back
                unmatched (all -1) instead of raising. (``nonfinite="raise"`` syncs once to
                look for non-finite costs; the index pairs sync once to copy them.)

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors, ``pred_idx`` increasing,
            of length ``min(Q, T)``.
        """
        col4row = self.match_layers([outputs], targets, check=not as_tensor)[0]
        return col4row if as_tensor else _pairs(col4row)

    @torch.no_grad()
    def match_layers(self, layers: Sequence[dict], targets: Sequence[dict], *,
                     check: bool = True) -> list[torch.Tensor]:
        """Matches several sets of outputs (e.g. every decoder layer: the last layer and
        ``outputs["aux_outputs"]``) against the same targets: one cost kernel call per layer
        for the whole batch, one assignment call for all layers. Sampling points are drawn layer after layer, image after
        image, as the reference criteria draw them when they call their matcher once per
        layer in this order, so the indices are theirs. Returns one ``col4row [B, Q]`` per
        layer; ``check=False`` skips the (synchronising) check that every image got a
        complete matching."""
        L = len(layers)
        B, Q = layers[0]["pred_logits"].shape[:2]
        if len(targets) != B:
            raise ValueError(f"{len(targets)} targets for a batch of {B} predictions")
        device = layers[0]["pred_masks"].device
        tgt_masks, tgt_labels, counts = pad_targets(targets, device)
        counts = _to_device(counts, device)
        with torch.autocast(device.type, enabled=False):  # costs in fp32, as Mask2Former
            # one kernel call per layer (no copy of the layers' masks into one tensor), in
            # the order the reference draws its sampling points
            cost = torch.cat([self._cost(o["pred_masks"], o["pred_logits"], tgt_masks, tgt_labels, counts)
                              for o in layers])  # [L*B, Q, T], +inf beyond each image's targets
        sizes = torch.stack([torch.full_like(counts, Q), counts], 1).repeat(L, 1)
        self._check_finite(cost, counts.repeat(L), B)
        result = batch_linear_sum_assignment(cost, sizes, errors="status")
        bad = torch.nonzero(result.status).flatten() if check else []
        if len(bad):
            b = int(bad[0]) % B
            raise ValueError(
                f"matcher: image {b} has no complete matching of finite cost "
                f"({int(counts[b])} targets, too few queries with finite predictions)"
            )
        return list(result.col4row.view(L, B, Q).unbind(0))

    def _cost(self, masks, logits, tgt_masks, tgt_labels, counts):
        """The cost ``[B, Q, T]`` of one layer's predictions against the padded targets."""
        coords = self._points(masks) if self.num_points else None
        if coords is not None and masks.device.type == "cpu" and len(masks):
            # On the CPU, image by image: the points sampled from an image's predictions
            # ([Q, P], a few MB) are costed while still in cache, and no [B, Q, P] tensor
            # (fresh memory, page faults) is written and read back.
            T = tgt_masks.shape[1]
            cost = []
            for b, n in enumerate(counts.tolist()):  # only the image's own targets are sampled
                c = self._image_cost(masks[b : b + 1], logits[b : b + 1], tgt_masks[b : b + 1, :n],
                                     tgt_labels[b : b + 1, :n], counts[b : b + 1], coords[b : b + 1])
                cost.append(F.pad(c, (0, T - n), value=float("inf")))
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
        reference matchers draw them, shared by the predictions and the targets of that image."""
        device = self.generator.device if self.generator is not None else pred.device
        draws = [torch.rand(self.num_points, 2, generator=self.generator, device=device) for _ in range(pred.shape[0])]
        return _to_device(torch.stack(draws) if draws else torch.zeros(0, self.num_points, 2, device=device),
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

    def _check_finite(self, cost: torch.Tensor, counts: torch.Tensor, B: int) -> None:
        T = cost.shape[-1]
        valid = torch.arange(T, device=cost.device) < counts.to(cost.device)[:, None]  # [N, T]
        bad = ~torch.isfinite(cost) & valid[:, None, :]
        if self.nonfinite == "forbid":
            cost.masked_fill_(bad, float("inf"))
            return
        images = torch.nonzero(bad.flatten(1).any(1)).flatten()
        if len(images):
            b = int(images[0])
            raise ValueError(
                f"matcher: the matching cost of image {b % B} is not finite (NaN or inf in its "
                f"predictions{'' if b < B else f', decoder output {b // B}'}); "
                "pass nonfinite='forbid' to leave such pairs unmatched"
            )


def _pairs(col4row: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``col4row [B, Q]`` -> B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors."""
    host = col4row.cpu()
    out = []
    for row in host:
        pred = torch.nonzero(row >= 0).flatten()
        out.append((pred, row[pred]))
    return out


class HFHungarianMatcher(HungarianMatcher):
    """Hugging Face transformers' matcher signature: ``HFHungarianMatcher(cost_class, cost_mask,
    cost_dice, num_points)`` and ``forward(masks_queries_logits, class_queries_logits,
    mask_labels, class_labels)``, returning a list of B ``(pred_idx, tgt_idx)`` int64 tensors.
    The defaults are ``Mask2FormerHungarianMatcher``'s (sigmoid-BCE on 12,544 points);
    ``num_points=0, mask_cost="focal"`` is ``MaskFormerHungarianMatcher``
    (:class:`HFMaskFormerHungarianMatcher`)."""

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 12544, mask_cost: str = "bce", **kwargs):
        super().__init__(cost_class, cost_mask, cost_dice, num_points, mask_cost, **kwargs)

    @torch.no_grad()
    def forward(self, masks_queries_logits: torch.Tensor, class_queries_logits: torch.Tensor,
                mask_labels: Sequence[torch.Tensor], class_labels: Sequence[torch.Tensor]):
        outputs = {"pred_logits": class_queries_logits, "pred_masks": masks_queries_logits}
        targets = [{"labels": c, "masks": m} for c, m in zip(class_labels, mask_labels)]
        return super().forward(outputs, targets)


class HFMaskFormerHungarianMatcher(HFHungarianMatcher):
    """transformers' ``MaskFormerHungarianMatcher(cost_class, cost_mask, cost_dice)``: the focal
    mask cost on full masks, targets resized (nearest) to the prediction size."""

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0, **kwargs):
        super().__init__(cost_class, cost_mask, cost_dice, num_points=0, mask_cost="focal", **kwargs)
