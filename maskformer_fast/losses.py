"""Set criterion of the MaskFormer family: classification with a no-object class plus mask
losses on the matched pairs, for the final and every auxiliary decoder output.

Mask losses on matched pairs (x mask logit, p = sigmoid(x), y target in [0, 1]; each mean
over the pixels or points of a mask, summed over masks and divided by ``num_masks``, the
number of target masks in the batch averaged over distributed ranks):

- ``"bce"``:   binary cross-entropy with logits;
- ``"brier"``: Brier score (p - y)^2;
- ``"focal"``: sigmoid focal loss, alpha 0.25, gamma 2 (MaskFormer);
- ``"dice"``:  1 - (2 sum p y + 1) / (sum p + sum y + 1) (a per-mask quantity, not a mean).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from maskformer_fast.matcher import HungarianMatcher, pad_targets, point_sample


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """``[M, P]`` logits and targets -> scalar."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def brier_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    return (logits.sigmoid() - targets).pow(2).mean(1).sum() / num_masks


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    p = logits.sigmoid()
    numerator = 2 * (p * targets).sum(1)
    denominator = p.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


MASK_LOSSES: dict[str, Callable] = {
    "bce": bce_loss, "brier": brier_loss, "focal": focal_loss, "dice": dice_loss,
}  # fmt: skip


def uncertain_points(logits: torch.Tensor, num_points: int, oversample_ratio: float,
                     importance_sample_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask2Former's importance sampling of ``num_points`` points per mask of ``logits
    [M, H, W]``: draw ``oversample_ratio * num_points`` uniform points, keep the
    ``importance_sample_ratio`` share where the prediction is least certain (smallest
    |logit|), fill up with uniform points. Returns coordinates ``[M, num_points, 2]`` in
    [0, 1]^2."""
    M = logits.shape[0]
    device = generator.device if generator is not None else logits.device
    candidates = torch.rand(M, int(num_points * oversample_ratio), 2, generator=generator,
                            device=device).to(logits.device)
    uncertainty = -point_sample(logits[:, None], candidates)[:, 0].abs()  # [M, S]
    n_uncertain = int(importance_sample_ratio * num_points)
    keep = uncertainty.topk(n_uncertain, dim=1).indices
    coords = torch.gather(candidates, 1, keep[..., None].expand(-1, -1, 2))
    n_random = num_points - n_uncertain
    if n_random > 0:
        extra = torch.rand(M, n_random, 2, generator=generator, device=device).to(logits.device)
        coords = torch.cat([coords, extra], 1)
    return coords


class SetCriterion(nn.Module):
    """Matches every decoder output (in one call) and computes the losses.

    Args:
        num_classes: K, the number of object classes; logits have K + 1 entries, the last
            one being no-object.
        matcher: a :class:`HungarianMatcher`.
        weight_dict: weight of each loss by name (``"loss_ce"``, ``"loss_bce"``,
            ``"loss_dice"``, ...); auxiliary losses ``"loss_dice_0"``, ... use the weight of
            their base name.
        eos_coef: weight of the no-object class in the cross-entropy (0.1).
        mask_losses: names from :data:`MASK_LOSSES`.
        num_points: 0 for losses on full masks (predictions upsampled bilinearly to the
            target size, as MaskFormer; targets of several sizes zero-padded to the largest,
            as MaskFormer and Mask2Former pad them); else Mask2Former's importance-sampled points
            (``oversample_ratio``, ``importance_sample_ratio``).
        generator: the torch.Generator that sampling points are drawn from.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        mask_losses: Sequence[str] = ("bce", "dice"),
        num_points: int = 0,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        unknown = set(mask_losses) - set(MASK_LOSSES)
        if unknown:
            raise ValueError(f"unknown mask losses {sorted(unknown)}; choose from {sorted(MASK_LOSSES)}")
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, dict(weight_dict)
        self.mask_losses = tuple(mask_losses)
        self.num_points, self.generator = num_points, generator
        self.oversample_ratio, self.importance_sample_ratio = oversample_ratio, importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        """``outputs``: ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w],
        "aux_outputs": [{...}, ...]}`` (aux optional); ``targets``: B dicts ``{"labels": [T],
        "masks": [T, H, W]}``. Returns the unweighted losses; :meth:`total` weighs them.

        An empty batch (B = 0) gives every loss as 0, still tied to the outputs (``sum * 0``
        of them), so that backward runs and reaches every parameter (as DDP needs). Outputs
        with no queries (Q = 0) raise a ValueError: there is no loss to average."""
        layers = [outputs] + list(outputs.get("aux_outputs", []))
        for i, layer in enumerate(layers):
            if layer["pred_logits"].dim() == 3 and layer["pred_logits"].shape[1] == 0:
                where = "outputs" if i == 0 else f"outputs['aux_outputs'][{i - 1}]"
                raise ValueError(
                    f"SetCriterion: {where} has no queries (pred_logits of shape "
                    f"{list(layer['pred_logits'].shape)}, expected [B, Q, K+1] with Q >= 1): "
                    "the classification loss is a mean over the queries"
                )
        matches = self.matcher.match_layers(layers, targets)
        device = outputs["pred_logits"].device
        # targets of several sizes zero-padded to the largest, as MaskFormer's and
        # Mask2Former's criteria pad them (nested_tensor_from_tensor_list)
        tgt_masks, tgt_labels, counts = pad_targets(targets, device, sizes="pad")
        num_masks = self._num_masks(counts, device)
        losses = {}
        for i, (layer, col4row) in enumerate(zip(layers, matches)):
            suffix = "" if i == 0 else f"_{i - 1}"
            col4row = col4row.to(device)
            losses["loss_ce" + suffix] = self._class_loss(layer["pred_logits"], col4row, tgt_labels)
            for name, value in self._mask_losses(layer["pred_masks"], col4row, tgt_masks, num_masks).items():
                losses[name + suffix] = value
        return losses

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of ``losses``; a loss without a weight counts 0."""
        def base(name: str) -> str:
            head, _, tail = name.rpartition("_")
            return head if tail.isdigit() else name

        return sum(self.weight_dict.get(base(k), 0.0) * v for k, v in losses.items())

    @staticmethod
    def _num_masks(counts: torch.Tensor, device: torch.device) -> float:
        n = counts.sum().to(device=device, dtype=torch.float)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return max(float(n), 1.0)

    def _class_loss(self, logits: torch.Tensor, col4row: torch.Tensor, tgt_labels: torch.Tensor):
        if logits.shape[0] == 0:  # an empty batch: cross_entropy's mean over nothing is NaN
            return logits.float().sum() * 0
        matched = col4row >= 0
        if tgt_labels.shape[1]:
            labels = torch.gather(tgt_labels, 1, col4row.clamp(min=0))
        else:
            labels = torch.zeros_like(col4row)
        target = torch.where(matched, labels, torch.full_like(labels, self.num_classes))
        return F.cross_entropy(logits.transpose(1, 2).float(), target, self.empty_weight)

    def _mask_losses(self, pred_masks: torch.Tensor, col4row: torch.Tensor, tgt_masks: torch.Tensor,
                     num_masks: float) -> dict[str, torch.Tensor]:
        b, q = torch.nonzero(col4row >= 0, as_tuple=True)
        src = pred_masks[b, q].float()  # [M, h, w]
        if len(src) == 0:  # no matched pair (an empty batch, no targets): 0, tied to the outputs
            return {f"loss_{name}": src.sum() * 0 for name in self.mask_losses}
        tgt = tgt_masks[b, col4row[b, q]]  # [M, H, W]
        if self.num_points == 0:
            if src.shape[-2:] != tgt.shape[-2:]:
                src = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
            logits, labels = src.flatten(1), tgt.flatten(1)
        else:
            with torch.no_grad():
                coords = uncertain_points(src.detach(), self.num_points, self.oversample_ratio,
                                          self.importance_sample_ratio, self.generator)
                labels = point_sample(tgt[:, None], coords)[:, 0]
            logits = point_sample(src[:, None], coords)[:, 0]
        return {f"loss_{name}": MASK_LOSSES[name](logits, labels, num_masks) for name in self.mask_losses}
