"""One full matching step (every decoder layer) of a MaskFormer-family trainer: this
matcher (one fused cost computation and one batched assignment for all layers) against the
per-image reference (cost per image and layer, `.cpu()`, scipy), as the reference repos do.

B=8 images, Q=100 queries, T ragged up to 20 targets, 128x128 masks, 10 decoder outputs.
Both return the index pairs of every layer and image; they are timed interleaved.
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


@pytest.mark.parametrize("preset", list(PRESETS))
def test_matching_step(benchmark, table, interleaved, preset):
    kw = PRESETS[preset]
    layers, targets = make_step(torch.Generator().manual_seed(0))
    if benchmark.disabled:  # as a test: one layer, two images
        layers = [{k: v[:2] for k, v in layers[0].items()}]
        targets = targets[:2]
    matcher = HungarianMatcher(kw["w_class"], kw["w_mask"], kw["w_dice"], kw["num_points"], kw["mask_cost"])
    ours = lambda: matcher.match_layers(layers, targets, pairs=True)  # noqa: E731
    reference = lambda: [reference_matcher(layer, targets, **kw) for layer in layers]  # noqa: E731
    with torch.no_grad():
        torch.manual_seed(0)  # both draw their sampling points in the same order
        got = ours()
        torch.manual_seed(0)
        for layer_got, layer_want in zip(got, reference()):  # the same pairs, layer by layer
            for (r, c), (rr, cc) in zip(layer_got, layer_want):
                assert r.tolist() == rr.tolist() and c.tolist() == cc.tolist()
        if not benchmark.disabled:
            title = f"Matching step, B={B} Q={Q} T<={T_MAX} {SIZE}x{SIZE}, {LAYERS} layers (CPU)"
            medians = interleaved({"maskformer_fast": ours, "per-image reference": reference},
                                  seconds=0, min_rounds=5)
            for name, seconds in medians.items():
                table.add_value(title, preset, name, seconds, "ms")
            benchmark.group = f"matching step: {preset}"
        benchmark.pedantic(ours, rounds=1, iterations=1)
