"""Evaluation: COCO mask AP with pycocotools (COCOeval, iouType "segm") and panoptic
quality (PQ), on predictions post-processed as Mask2Former does."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def instances(logits: torch.Tensor, masks: torch.Tensor, topk: int = 100) -> list[dict]:
    """Mask2Former's instance inference for one image: the top-k (query, class) pairs over
    Q x K by class probability; binary mask where the mask logit > 0; score = class
    probability x mean mask probability inside the mask.

    Args: logits ``[Q, K+1]`` (last = no-object), masks ``[Q, H, W]`` logits.
    Returns: dicts with "label", "score", "mask" (bool ``[H, W]`` numpy).
    """
    probs = logits.float().softmax(-1)[:, :-1]  # [Q, K]
    Q, K = probs.shape
    scores, flat = probs.flatten().topk(min(topk, Q * K))
    queries, labels = flat // K, flat % K
    out = []
    for score, q, label in zip(scores.tolist(), queries.tolist(), labels.tolist()):
        m = masks[q].float()
        binary = m > 0
        area = int(binary.sum())
        mask_score = float(m.sigmoid()[binary].sum()) / area if area else 0.0
        out.append({"label": label, "score": score * mask_score, "mask": binary.cpu().numpy()})
    return out


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_metrics(ground_truth: list[dict], predictions: list[list[dict]], num_classes: int) -> dict:
    """COCO segm AP, AP50, AP75 and AR100 (fractions in [0, 1]).

    Args:
        ground_truth: per image ``{"labels": [T], "masks": [T, H, W]}`` (tensors).
        predictions: per image, the output of :func:`instances`.
    """
    images, annotations, results = [], [], []
    for image_id, (gt, preds) in enumerate(zip(ground_truth, predictions)):
        H, W = gt["masks"].shape[-2:]
        images.append({"id": image_id, "height": int(H), "width": int(W)})
        for label, mask in zip(gt["labels"].tolist(), gt["masks"].bool().numpy()):
            rle = _rle(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                "segmentation": rle, "area": float(mask.sum()), "iscrowd": 0,
                "bbox": list(mask_utils.toBbox(rle)),
            })  # fmt: skip
        for p in preds:
            results.append({"image_id": image_id, "category_id": p["label"] + 1,
                            "segmentation": _rle(p["mask"]), "score": p["score"]})
    gt_coco = COCO()
    gt_coco.dataset = {"images": images, "annotations": annotations,
                       "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco.createIndex()
        if not results or not annotations:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR100": 0.0}
        evaluator = COCOeval(gt_coco, gt_coco.loadRes(results), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    s = evaluator.stats
    return {"AP": float(s[0]), "AP50": float(s[1]), "AP75": float(s[2]), "AR100": float(s[8])}


def panoptic(logits: torch.Tensor, masks: torch.Tensor, object_threshold: float = 0.8,
             overlap_threshold: float = 0.8) -> list[dict]:
    """MaskFormer's panoptic inference for one image (things only): keep the queries whose
    best class is an object with probability > ``object_threshold``; each pixel goes to the
    kept query with the highest probability x mask probability; a query's segment is kept
    if it holds at least ``overlap_threshold`` of its own mask. Non-overlapping segments
    ``{"label", "mask"}``."""
    probs, labels = logits.float().softmax(-1).max(-1)
    keep = (labels < logits.shape[-1] - 1) & (probs > object_threshold)
    if not keep.any():
        return []
    mask_probs = masks[keep].float().sigmoid()
    owner = (probs[keep][:, None, None] * mask_probs).argmax(0)
    segments = []
    for k, label in enumerate(labels[keep].tolist()):
        own = mask_probs[k] >= 0.5
        segment = (owner == k) & own
        if segment.sum() > 0 and own.sum() > 0 and segment.sum() / own.sum() >= overlap_threshold:
            segments.append({"label": label, "mask": segment.cpu().numpy()})
    return segments


def panoptic_quality(ground_truth: list[dict], segments: list[list[dict]], num_classes: int) -> dict:
    """PQ, SQ, RQ averaged over classes (things only): a predicted segment matches a ground
    truth segment of its class at IoU > 0.5; PQ = sum IoU / (TP + FP / 2 + FN / 2)."""
    iou_sum, tp, fp, fn = (np.zeros(num_classes) for _ in range(4))
    for gt, preds in zip(ground_truth, segments):
        gt_masks = gt["masks"].bool().numpy()
        gt_labels = gt["labels"].tolist()
        matched_gt = set()
        for p in preds:
            best, best_iou = None, 0.5
            for t, (label, g) in enumerate(zip(gt_labels, gt_masks)):
                if label != p["label"] or t in matched_gt:
                    continue
                iou = (g & p["mask"]).sum() / max((g | p["mask"]).sum(), 1)
                if iou > best_iou:
                    best, best_iou = t, iou
            if best is None:
                fp[p["label"]] += 1
            else:
                matched_gt.add(best)
                tp[p["label"]] += 1
                iou_sum[p["label"]] += best_iou
        for t, label in enumerate(gt_labels):
            if t not in matched_gt:
                fn[label] += 1
    present = (tp + fp + fn) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        sq = np.where(tp > 0, iou_sum / np.maximum(tp, 1), 0.0)
        rq = np.where(present, tp / np.maximum(tp + fp / 2 + fn / 2, 1e-9), 0.0)
    if not present.any():
        return {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0}
    return {"PQ": float((sq * rq)[present].mean()), "SQ": float(sq[present].mean()),
            "RQ": float(rq[present].mean())}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int = 50, panoptic_metrics: bool = False) -> dict:
    """COCO mask AP (and PQ if asked) of ``model`` on every item of ``dataset``."""
    model.eval()
    device = next(model.parameters()).device
    ground_truth, predictions, segments = [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([image for image, _ in items]).to(device)
        out = model(images)
        for b, (_, target) in enumerate(items):
            ground_truth.append(target)
            predictions.append(instances(out["pred_logits"][b], out["pred_masks"][b]))
            if panoptic_metrics:
                segments.append(panoptic(out["pred_logits"][b], out["pred_masks"][b]))
    metrics = coco_metrics(ground_truth, predictions, dataset.num_classes)
    if panoptic_metrics:
        metrics.update(panoptic_quality(ground_truth, segments, dataset.num_classes))
    return metrics
