"""HungarianMatcher and SetCriterion against straightforward per-image references of the
published formulas (DETR / MaskFormer / Mask2Former), solved with scipy."""

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from maskformer_fast.hungarian import HungarianMatcher as PublicMatcher
from maskformer_fast.losses import SetCriterion, uncertain_points
from maskformer_fast.matcher import HFHungarianMatcher, HungarianMatcher, point_sample


def reference_costs(outputs, targets, w_class, w_mask, w_dice, mask_cost, num_points=0, generator=None):
    """Per image, in float64: the cost ``[Q, T]`` as the reference matchers build it."""
    out = []
    for b, tgt in enumerate(targets):
        logits = outputs["pred_logits"][b].double()
        masks = outputs["pred_masks"][b].double()
        labels, tmasks = tgt["labels"], tgt["masks"].double()
        # Mask2Former draws an image's points before it looks at its targets
        coords = torch.rand(num_points, 2, generator=generator) if num_points else None
        if len(labels) == 0:
            out.append(torch.zeros(len(logits), 0, dtype=torch.float64))
            continue
        cost_class = -logits.softmax(-1)[:, labels]
        if num_points:
            grid = (2 * coords - 1)[None, None].double()
            x = F.grid_sample(masks[:, None], grid.expand(len(masks), -1, -1, -1), align_corners=False).flatten(1)
            y = F.grid_sample(tmasks[:, None], grid.expand(len(tmasks), -1, -1, -1), align_corners=False).flatten(1)
        else:
            if tmasks.shape[-2:] != masks.shape[-2:]:
                tmasks = F.interpolate(tmasks[:, None], size=masks.shape[-2:], mode="nearest")[:, 0]
            x, y = masks.flatten(1), tmasks.flatten(1)
        P = x.shape[1]
        p = x.sigmoid()
        pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
        neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
        if mask_cost == "focal":
            pos = 0.25 * (1 - p) ** 2 * pos
            neg = 0.75 * p**2 * neg
        cost_mask = (pos @ y.T + neg @ (1 - y).T) / P
        cost_dice = 1 - (2 * p @ y.T + 1) / (p.sum(-1)[:, None] + y.sum(-1)[None, :] + 1)
        out.append(w_class * cost_class + w_mask * cost_mask + w_dice * cost_dice)
    return out


def reference_match(outputs, targets, w_class, w_mask, w_dice, mask_cost, num_points=0, generator=None):
    """Per image: the float64 reference cost, then scipy."""
    out = []
    for cost in reference_costs(outputs, targets, w_class, w_mask, w_dice, mask_cost, num_points, generator):
        r, c = scipy.optimize.linear_sum_assignment(cost.numpy())
        out.append((torch.as_tensor(r), torch.as_tensor(c)))
    return out


def make_batch(g, B=4, Q=12, K=5, h=16, w=16, H=16, W=16, counts=None, scale=3.0):
    counts = counts if counts is not None else torch.randint(0, 8, (B,), generator=g).tolist()
    outputs = {
        "pred_logits": torch.randn(B, Q, K + 1, generator=g) * scale,
        "pred_masks": torch.randn(B, Q, h, w, generator=g) * scale,
    }
    targets = [
        {"labels": torch.randint(0, K, (t,), generator=g), "masks": (torch.rand(t, H, W, generator=g) < 0.4).float()}
        for t in counts
    ]
    return outputs, targets


def assert_same(got, want):
    assert len(got) == len(want)
    for (r, c), (rr, cc) in zip(got, want):
        assert r.dtype == torch.int64 and c.dtype == torch.int64
        assert r.tolist() == rr.tolist() and c.tolist() == cc.tolist()


@pytest.mark.parametrize("mask_cost", ["bce", "focal"])
@pytest.mark.parametrize("counts", [[3, 0, 7, 12], [0, 0, 0, 0], [20, 1, 12, 15]])
def test_full_mask_matching_equals_reference(mask_cost, counts):
    g = torch.Generator().manual_seed(sum(counts) + len(mask_cost))
    outputs, targets = make_batch(g, counts=counts, H=32, W=32)  # targets downsampled to 16x16
    matcher = HungarianMatcher(2.0, 5.0, 3.0, num_points=0, mask_cost=mask_cost)
    got = matcher(outputs, targets)
    assert_same(got, reference_match(outputs, targets, 2.0, 5.0, 3.0, mask_cost))
    for (r, c), t in zip(got, targets):
        assert len(r) == min(12, len(t["labels"]))
        assert torch.all(r[1:] > r[:-1])


def test_point_sampled_matching_equals_reference():
    g = torch.Generator().manual_seed(0)
    outputs, targets = make_batch(g, counts=[4, 0, 9, 2])
    matcher = HungarianMatcher.mask2former(generator=torch.Generator().manual_seed(7))
    matcher.num_points = 500
    got = matcher(outputs, targets)
    want = reference_match(outputs, targets, 2.0, 5.0, 5.0, "bce", 500, torch.Generator().manual_seed(7))
    assert_same(got, want)


def test_presets_and_public_import():
    assert PublicMatcher is HungarianMatcher
    mf = HungarianMatcher.maskformer()
    assert (mf.cost_class, mf.cost_mask, mf.cost_dice, mf.num_points, mf.mask_cost) == (1, 20, 1, 0, "focal")
    m2f = HungarianMatcher.mask2former()
    assert (m2f.cost_class, m2f.cost_mask, m2f.cost_dice, m2f.num_points, m2f.mask_cost) == (2, 5, 5, 12544, "bce")


def test_all_layers_in_one_call_equal_one_call_per_layer():
    g = torch.Generator().manual_seed(3)
    layers = [make_batch(g, counts=[5, 2, 0, 9])[0] for _ in range(4)]
    _, targets = make_batch(torch.Generator().manual_seed(3), counts=[5, 2, 0, 9])
    matcher = HungarianMatcher(1.0, 20.0, 1.0, num_points=64, mask_cost="focal",
                               generator=torch.Generator().manual_seed(11))
    together = matcher.match_layers(layers, targets)
    matcher.generator.manual_seed(11)
    for layer, col4row in zip(layers, together):
        one = matcher(layer, targets, as_tensor=True)
        assert torch.equal(one, col4row)


def test_hugging_face_signature():
    g = torch.Generator().manual_seed(4)
    outputs, targets = make_batch(g, counts=[3, 6, 1, 0])
    hf = HFHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=300,
                            generator=torch.Generator().manual_seed(2))
    got = hf(outputs["pred_masks"], outputs["pred_logits"], [t["masks"] for t in targets],
             [t["labels"] for t in targets])
    want = reference_match(outputs, targets, 2.0, 5.0, 5.0, "bce", 300, torch.Generator().manual_seed(2))
    assert_same(got, want)


def test_half_precision_under_autocast():
    g = torch.Generator().manual_seed(5)
    outputs, targets = make_batch(g, counts=[4, 7, 2, 5])
    matcher = HungarianMatcher(1.0, 5.0, 5.0)
    half = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher(half, targets)
    rounded = {k: v.float() for k, v in half.items()}
    assert_same(got, reference_match(rounded, targets, 1.0, 5.0, 5.0, "bce"))


def test_nonfinite_policies():
    g = torch.Generator().manual_seed(6)
    outputs, targets = make_batch(g, counts=[3, 4, 2, 5])
    outputs["pred_masks"][2, 5] = float("nan")
    with pytest.raises(ValueError, match="image 2"):
        HungarianMatcher()(outputs, targets)
    got = HungarianMatcher(nonfinite="forbid")(outputs, targets)
    assert 5 not in got[2][0].tolist() and len(got[2][0]) == 2
    clean = {k: v.clone() for k, v in outputs.items()}
    clean["pred_masks"][2, 5] = 0
    want = reference_match(clean, targets, 1.0, 1.0, 1.0, "bce")
    assert_same(got[:2] + got[3:], want[:2] + want[3:])
    outputs["pred_logits"][1] = float("nan")  # every query of image 1
    with pytest.raises(ValueError, match="image 1 has no complete matching"):
        HungarianMatcher(nonfinite="forbid")(outputs, targets)


def test_matcher_input_errors():
    g = torch.Generator().manual_seed(8)
    outputs, targets = make_batch(g, counts=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="3 targets for a batch of 4"):
        HungarianMatcher()(outputs, targets[:3])
    targets[1]["masks"] = targets[1]["masks"][:1]
    with pytest.raises(ValueError, match=r"targets\[1\]: 1 masks but 2 labels"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(ValueError, match="mask_cost"):
        HungarianMatcher(mask_cost="l1")
    with pytest.raises(ValueError, match="can't be 0"):
        HungarianMatcher(0, 0, 0)


# ---------------------------------------------------------------- the criterion


def direct_losses(logits, masks, targets, matches, num_classes, eos_coef):
    """The loss formulas evaluated directly, in float64, pair by pair."""
    ce_num = ce_den = 0.0
    per_mask = {"bce": [], "brier": [], "focal": [], "dice": []}
    for b, (pred_idx, tgt_idx) in enumerate(matches):
        target = torch.full((logits.shape[1],), num_classes)
        target[pred_idx] = targets[b]["labels"][tgt_idx]
        logp = logits[b].double().log_softmax(-1)
        for q in range(logits.shape[1]):
            w = eos_coef if target[q] == num_classes else 1.0
            ce_num += -w * logp[q, target[q]]
            ce_den += w
        for q, t in zip(pred_idx.tolist(), tgt_idx.tolist()):
            x = masks[b, q].double().flatten()
            y = targets[b]["masks"][t].double().flatten()
            p = 1 / (1 + torch.exp(-x))
            bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
            p_t = p * y + (1 - p) * (1 - y)
            a_t = 0.25 * y + 0.75 * (1 - y)
            per_mask["bce"].append(bce.mean())
            per_mask["brier"].append(((p - y) ** 2).mean())
            per_mask["focal"].append((a_t * (1 - p_t) ** 2 * bce).mean())
            per_mask["dice"].append(1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1))
    num_masks = max(sum(len(t["labels"]) for t in targets), 1)
    out = {"loss_ce": ce_num / ce_den}
    for k, v in per_mask.items():
        out[f"loss_{k}"] = sum(v) / num_masks if v else torch.tensor(0.0)
    return out


def test_criterion_losses_equal_direct_evaluation():
    g = torch.Generator().manual_seed(9)
    outputs, targets = make_batch(g, counts=[3, 0, 5, 2], scale=1.0)
    matcher = HungarianMatcher(1.0, 5.0, 5.0)
    criterion = SetCriterion(5, matcher, {"loss_ce": 2.0, "loss_bce": 5.0, "loss_dice": 5.0}, eos_coef=0.1,
                             mask_losses=("bce", "brier", "focal", "dice"))
    losses = criterion(outputs, targets)
    want = direct_losses(outputs["pred_logits"], outputs["pred_masks"], targets,
                         matcher(outputs, targets), 5, 0.1)
    for k, v in want.items():
        assert torch.allclose(losses[k].double(), torch.as_tensor(v).double(), rtol=1e-5, atol=1e-6), k
    total = criterion.total(losses)
    assert torch.allclose(total, 2 * losses["loss_ce"] + 5 * losses["loss_bce"] + 5 * losses["loss_dice"])


def test_criterion_aux_losses_and_gradients():
    g = torch.Generator().manual_seed(10)
    mask_embed = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    pixel = torch.randn(2, 8, 16, 16, generator=g, requires_grad=True)
    class_logits = torch.randn(2, 6, 4, generator=g, requires_grad=True)

    def layer(scale):
        return {"pred_logits": class_logits * scale,
                "pred_masks": torch.einsum("bqc,bchw->bqhw", mask_embed * scale, pixel)}

    outputs = dict(layer(1.0), aux_outputs=[layer(0.5), layer(0.25)])
    _, targets = make_batch(g, B=2, K=3, counts=[2, 3], H=32, W=32)
    criterion = SetCriterion(3, HungarianMatcher(1.0, 20.0, 1.0, mask_cost="focal"),
                             {"loss_ce": 1.0, "loss_focal": 20.0, "loss_dice": 1.0}, mask_losses=("focal", "dice"))
    losses = criterion(outputs, targets)
    assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "focal", "dice") for s in ("", "_0", "_1")}
    criterion.total(losses).backward()
    for t in (mask_embed, pixel, class_logits):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_point_sampled_losses():
    g = torch.Generator().manual_seed(12)
    outputs, targets = make_batch(g, counts=[3, 4, 0, 1], scale=1.0)
    outputs["pred_masks"].requires_grad_(True)
    criterion = SetCriterion(5, HungarianMatcher.mask2former(), {"loss_ce": 2, "loss_bce": 5, "loss_dice": 5},
                             num_points=200, generator=torch.Generator().manual_seed(1))
    criterion.matcher.num_points = 300
    losses = criterion(outputs, targets)
    criterion.total(losses).backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0
    assert 0 < losses["loss_bce"].item() < 10 and 0 < losses["loss_dice"].item() <= 1


def test_uncertain_points_prefer_uncertain_pixels():
    logits = torch.full((1, 32, 32), 10.0)
    logits[0, :, :4] = 0.0  # the uncertain strip: x in [0, 1/8)
    coords = uncertain_points(logits, 64, 3.0, 0.75, torch.Generator().manual_seed(0))
    assert coords.shape == (1, 64, 2)
    # topk sorts by uncertainty: the first points are the candidates inside the strip
    assert (coords[0, :16, 0] < 0.15).all()
    assert (coords[0, 48:, 0] < 0.15).float().mean() < 0.5  # the last quarter is uniform
    assert point_sample(logits[:, None], coords).shape == (1, 1, 64)


@pytest.mark.parametrize("num_points", [0, 50])
def test_empty_batch_and_empty_images_of_another_size(num_points):
    """Regression: an empty batch raised IndexError (RuntimeError with point sampling), and an
    image without targets whose mask tensor has another size raised RuntimeError."""
    empty = {"pred_logits": torch.randn(0, 6, 4), "pred_masks": torch.randn(0, 6, 16, 16)}
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=num_points, generator=torch.Generator().manual_seed(0))
    assert matcher(empty, []) == []
    assert matcher(empty, [], as_tensor=True).shape == (0, 6)
    assert [c.shape for c in matcher.match_layers([empty, empty], [])] == [(0, 6), (0, 6)]
    g = torch.Generator().manual_seed(13)
    outputs, targets = make_batch(g, B=3, Q=6, counts=[2, 0, 3])
    targets[1]["masks"] = torch.zeros(0, 7, 3)  # no targets: the size of its (empty) masks is free
    matcher.generator.manual_seed(1)
    want = reference_match(outputs, targets, 2.0, 5.0, 5.0, "bce", num_points, torch.Generator().manual_seed(1))
    assert_same(matcher(outputs, targets), want)
