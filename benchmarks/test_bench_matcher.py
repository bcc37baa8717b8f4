"""One full matching step (every decoder layer) of a MaskFormer-family trainer: this
matcher (one fused cost computation and one batched assignment for all layers) against the
per-image reference (cost per image and layer, `.cpu()`, scipy), as the reference repos do.

B=8 images, Q=100 queries, T ragged up to 20 targets, 128x128 masks, 10 decoder outputs.
"""

import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from maskformer_fast.matcher import HungarianMatcher

B, Q, K, T_MAX, SIZE, LAYERS = 8, 100, 80, 20, 128, 10


def reference_matcher(outputs, targets, w_class, w_mask, w_dice, mask_cost, num_points):
    """DETR / Mask2Former's matcher: a loop over images, [Q, P] intermediates, scipy."""
    indices = []
    for b, tgt in enumerate(targets):
        prob = outputs["pred_logits"][b].softmax(-1)
        out_mask = outputs["pred_masks"][b]
        tgt_mask = tgt["masks"].to(out_mask)
        cost_class = -prob[:, tgt["labels"]]
        if num_points:
            coords = torch.rand(1, num_points, 2)
            grid = (2 * coords - 1)[:, None]
            tgt_mask = F.grid_sample(tgt_mask[:, None], grid.expand(len(tgt_mask), -1, -1, -1),
                                     align_corners=False).flatten(1)
            out_mask = F.grid_sample(out_mask[:, None], grid.expand(len(out_mask), -1, -1, -1),
                                     align_corners=False).flatten(1)
        else:
            out_mask, tgt_mask = out_mask.flatten(1), tgt_mask.flatten(1)
        P = out_mask.shape[1]
        pos = F.binary_cross_entropy_with_logits(out_mask, torch.ones_like(out_mask), reduction="none")
        neg = F.binary_cross_entropy_with_logits(out_mask, torch.zeros_like(out_mask), reduction="none")
        p = out_mask.sigmoid()
        if mask_cost == "focal":
            pos, neg = 0.25 * (1 - p) ** 2 * pos, 0.75 * p**2 * neg
        cost_mask = (pos @ tgt_mask.T + neg @ (1 - tgt_mask).T) / P
        cost_dice = 1 - (2 * p @ tgt_mask.T + 1) / (p.sum(-1)[:, None] + tgt_mask.sum(-1)[None, :] + 1)
        C = (w_class * cost_class + w_mask * cost_mask + w_dice * cost_dice).cpu()
        indices.append(scipy.optimize.linear_sum_assignment(C))
    return indices


def make_step(g):
    layers = [
        {"pred_logits": torch.randn(B, Q, K + 1, generator=g), "pred_masks": torch.randn(B, Q, SIZE, SIZE, generator=g)}
        for _ in range(LAYERS)
    ]
    counts = torch.randint(1, T_MAX + 1, (B,), generator=g).tolist()
    targets = [
        {"labels": torch.randint(0, K, (t,), generator=g), "masks": (torch.rand(t, SIZE, SIZE, generator=g) < 0.2).float()}
        for t in counts
    ]
    return layers, targets


PRESETS = {
    "MaskFormer (focal, 128x128 pixels)": dict(w_class=1.0, w_mask=20.0, w_dice=1.0, mask_cost="focal", num_points=0),
    "Mask2Former (BCE, 12,544 points)": dict(w_class=2.0, w_mask=5.0, w_dice=5.0, mask_cost="bce", num_points=12544),
}


@pytest.mark.parametrize("impl", ["maskformer_fast", "per-image reference"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_matching_step(benchmark, table, preset, impl):
    kw = PRESETS[preset]
    layers, targets = make_step(torch.Generator().manual_seed(0))
    if benchmark.disabled:  # as a test: one layer, two images
        layers = [{k: v[:2] for k, v in layers[0].items()}]
        targets = targets[:2]
    matcher = HungarianMatcher(kw["w_class"], kw["w_mask"], kw["w_dice"], kw["num_points"], kw["mask_cost"])
    if impl == "maskformer_fast":  # same indices as the reference, layer by layer
        torch.manual_seed(0)  # both draw their sampling points in the same order
        got = matcher.match_layers(layers, targets)
        torch.manual_seed(0)
        for layer, col4row in zip(layers, got):
            want = reference_matcher(layer, targets, **kw)
            for b, (r, c) in enumerate(want):
                assert col4row[b][torch.as_tensor(r)].tolist() == c.tolist()
        fn = lambda: matcher.match_layers(layers, targets)  # noqa: E731
    else:
        fn = lambda: [reference_matcher(layer, targets, **kw) for layer in layers]  # noqa: E731
    benchmark.group = f"matching step: {preset}"
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    table.add(f"Matching step, B={B} Q={Q} T<={T_MAX} {SIZE}x{SIZE}, {LAYERS} layers (CPU)", preset,
              "maskformer_fast" if impl == "maskformer_fast" else "per-image reference", benchmark)
