"""HungarianMatcher and SetCriterion against straightforward per-image references of the
published formulas (DETR / MaskFormer / Mask2Former), solved with scipy."""

import os

import pytest
import scipy.optimize
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from maskformer_fast import losses as losses_module
from maskformer_fast.hungarian import HungarianMatcher as PublicMatcher
from maskformer_fast.hungarian import batch_linear_sum_assignment
from maskformer_fast.losses import SetCriterion, uncertain_points
from maskformer_fast.matcher import (HFHungarianMatcher, HFMaskFormerHungarianMatcher, HungarianMatcher,
                                     point_sample)


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


@pytest.mark.parametrize("convention", ["Mask2Former", "MaskFormer"])
def test_hugging_face_signature(convention):
    """transformers' Mask2FormerHungarianMatcher (BCE on points) and MaskFormerHungarianMatcher
    (focal on full masks, targets resized nearest), called as transformers calls them."""
    g = torch.Generator().manual_seed(4)
    outputs, targets = make_batch(g, counts=[3, 6, 1, 0, 9], B=5, H=32, W=32)
    if convention == "Mask2Former":
        hf = HFHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=300,
                                generator=torch.Generator().manual_seed(2))
        want = reference_match(outputs, targets, 2.0, 5.0, 5.0, "bce", 300, torch.Generator().manual_seed(2))
    else:
        hf = HFMaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
        want = reference_match(outputs, targets, 1.0, 20.0, 1.0, "focal")
        # the mask cost matters: BCE would give other indices on this batch
        bce = reference_match(outputs, targets, 1.0, 20.0, 1.0, "bce")
        assert any(c.tolist() != cc.tolist() for (_, c), (_, cc) in zip(want, bce))
    got = hf(outputs["pred_masks"], outputs["pred_logits"], [t["masks"] for t in targets],
             [t["labels"] for t in targets])
    assert_same(got, want)
    generic = HFHungarianMatcher(1.0, 20.0, 1.0, num_points=0, mask_cost="focal")
    assert (generic.num_points, generic.mask_cost) == (0, "focal")


@pytest.mark.parametrize("sizes", [[3, 0, 12, 10, 1], [0, 0]])
@pytest.mark.parametrize("integer", [False, True])
def test_detr_style_split_cost_in_one_batched_call(sizes, integer):
    """The README's recipe for DETR-style code: the cost C [B, Q, sum T] that DETR splits per
    image for scipy, solved in one batched call with the same indices (ties included)."""
    g = torch.Generator().manual_seed(14)
    bs, num_queries = len(sizes), 10
    C = torch.randint(0, 3, (bs * num_queries, sum(sizes)), generator=g).float() if integer \
        else torch.rand(bs * num_queries, sum(sizes), generator=g)
    C = C.view(bs, num_queries, -1)
    want = [scipy.optimize.linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]
    # the recipe
    blocks = pad_sequence([c[i].T for i, c in enumerate(C.split(sizes, -1))], batch_first=True).mT
    shape = torch.tensor([[num_queries, t] for t in sizes])
    got = batch_linear_sum_assignment(blocks, shape).pairs()
    assert_same(got, [(torch.as_tensor(i), torch.as_tensor(j)) for i, j in want])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_points", [0, 64])
def test_as_tensor_on_cuda_does_not_sync(num_points):
    """as_tensor=True with nonfinite="forbid" and targets on the GPU: no host synchronisation
    (torch raises on one in sync debug mode), for forward and match_layers."""
    g = torch.Generator().manual_seed(16)
    outputs, targets = make_batch(g, counts=[3, 0, 7, 12], H=32, W=32)
    cuda_outputs = {k: v.cuda() for k, v in outputs.items()}
    cuda_targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    matcher = HungarianMatcher(2.0, 5.0, 3.0, num_points=num_points, nonfinite="forbid",
                               generator=torch.Generator().manual_seed(0))  # points drawn on the host
    matcher(cuda_outputs, cuda_targets, as_tensor=True)  # warm-up: kernel compilation, pinned memory
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        col4row = matcher(cuda_outputs, cuda_targets, as_tensor=True)
        layers = matcher.match_layers([cuda_outputs, cuda_outputs], cuda_targets, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert col4row.device.type == "cuda" and col4row.shape == (4, 12)
    assert [c.shape for c in layers] == [(4, 12), (4, 12)]
    if num_points == 0:
        want = reference_match(outputs, targets, 2.0, 5.0, 3.0, "bce")
        got = [(torch.nonzero(row >= 0).flatten(), row[row >= 0]) for row in col4row.cpu()]
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


def direct_losses(logits, masks, targets, matches, num_classes, eos_coef, coords=None, num_masks=None):
    """The loss formulas evaluated directly, in float64, pair by pair: on full masks, or at the
    points ``coords [M, P, 2]`` (one set per matched pair, in the order of ``matches``)."""
    ce_num = ce_den = 0.0
    per_mask = {"bce": [], "brier": [], "focal": [], "dice": []}
    pair = 0
    for b, (pred_idx, tgt_idx) in enumerate(matches):
        target = torch.full((logits.shape[1],), num_classes)
        target[pred_idx] = targets[b]["labels"][tgt_idx]
        logp = logits[b].double().log_softmax(-1)
        for q in range(logits.shape[1]):
            w = eos_coef if target[q] == num_classes else 1.0
            ce_num += -w * logp[q, target[q]]
            ce_den += w
        for q, t in zip(pred_idx.tolist(), tgt_idx.tolist()):
            x = masks[b, q].double()
            y = targets[b]["masks"][t].double()
            if coords is None:
                x, y = x.flatten(), y.flatten()
            else:
                grid = (2 * coords[pair].double() - 1)[None, None]  # [1, 1, P, 2]
                x, y = (F.grid_sample(v[None, None], grid, align_corners=False).flatten() for v in (x, y))
                pair += 1
            p = 1 / (1 + torch.exp(-x))
            bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
            p_t = p * y + (1 - p) * (1 - y)
            a_t = 0.25 * y + 0.75 * (1 - y)
            per_mask["bce"].append(bce.mean())
            per_mask["brier"].append(((p - y) ** 2).mean())
            per_mask["focal"].append((a_t * (1 - p_t) ** 2 * bce).mean())
            per_mask["dice"].append(1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1))
    if num_masks is None:
        num_masks = max(sum(len(t["labels"]) for t in targets), 1)
    out = {"loss_ce": ce_num / ce_den}
    for k, v in per_mask.items():
        out[f"loss_{k}"] = sum(v) / num_masks if v else torch.tensor(0.0)
    return out


def assert_losses(got, want, suffix=""):
    for k, v in want.items():
        v = torch.as_tensor(v).double()
        assert torch.allclose(got[k + suffix].double(), v, rtol=1e-5, atol=1e-6), k + suffix


def test_criterion_losses_equal_direct_evaluation():
    """The final and every auxiliary output, each with its own matching."""
    g = torch.Generator().manual_seed(9)
    outputs, targets = make_batch(g, counts=[3, 0, 5, 2], scale=1.0)
    aux = [make_batch(g, counts=[3, 0, 5, 2], scale=1.0)[0] for _ in range(2)]
    matcher = HungarianMatcher(1.0, 5.0, 5.0)
    criterion = SetCriterion(5, matcher, {"loss_ce": 2.0, "loss_bce": 5.0, "loss_dice": 5.0}, eos_coef=0.1,
                             mask_losses=("bce", "brier", "focal", "dice"))
    losses = criterion(dict(outputs, aux_outputs=aux), targets)
    assert len(losses) == 3 * 5
    for suffix, layer in zip(["", "_0", "_1"], [outputs] + aux):
        want = direct_losses(layer["pred_logits"], layer["pred_masks"], targets, matcher(layer, targets), 5, 0.1)
        assert_losses(losses, want, suffix)
    total = criterion.total(losses)
    weighted = [2 * losses["loss_ce" + s] + 5 * losses["loss_bce" + s] + 5 * losses["loss_dice" + s]
                for s in ("", "_0", "_1")]
    assert torch.allclose(total, sum(weighted))


def test_point_sampled_losses_equal_direct_evaluation(monkeypatch):
    """Mask losses at the importance-sampled points: the points the criterion drew, recorded,
    then every loss evaluated directly at them (predictions and targets sampled alike)."""
    drawn = []

    def recorded(*args, **kwargs):
        drawn.append(uncertain_points(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(losses_module, "uncertain_points", recorded)
    g = torch.Generator().manual_seed(17)
    outputs, targets = make_batch(g, counts=[3, 4, 0, 1], scale=1.0)
    aux = [make_batch(g, counts=[3, 4, 0, 1], scale=1.0)[0]]
    outputs["pred_masks"].requires_grad_(True)
    matcher = HungarianMatcher(2.0, 5.0, 5.0)
    criterion = SetCriterion(5, matcher, {}, mask_losses=("bce", "brier", "focal", "dice"), num_points=200,
                             generator=torch.Generator().manual_seed(1))
    losses = criterion(dict(outputs, aux_outputs=aux), targets)
    assert len(drawn) == 2 and drawn[0].shape == (8, 200, 2)
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0
    for suffix, layer, coords in zip(["", "_0"], [outputs] + aux, drawn):
        want = direct_losses(layer["pred_logits"], layer["pred_masks"], targets, matcher(layer, targets), 5, 0.1,
                             coords=coords)
        assert_losses(losses, want, suffix)


def test_uncertain_points_equal_direct_importance_sampling():
    """3P uniform candidates, the 0.75P with the smallest |logit| kept, 0.25P uniform points
    added, drawn in that order from the generator."""
    logits = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(15)) * 3
    coords = uncertain_points(logits, 40, 3.0, 0.75, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    candidates, extra = torch.rand(3, 120, 2, generator=gen), torch.rand(3, 10, 2, generator=gen)
    for m in range(3):
        grid = (2 * candidates[m].double() - 1)[None, None]
        x = F.grid_sample(logits[m].double()[None, None], grid, align_corners=False).flatten()
        kept = candidates[m][x.abs().argsort()[:30]]
        assert sorted(map(tuple, kept.tolist())) == sorted(map(tuple, coords[m, :30].tolist()))
        assert torch.equal(coords[m, 30:], extra[m])


RANK_COUNTS = [[3, 0], [5, 4]]  # 12 masks over 2 ranks: num_masks = 6 on both


def rank_batch(rank):
    return make_batch(torch.Generator().manual_seed(20 + rank), B=2, counts=RANK_COUNTS[rank], scale=1.0)


def criterion_on_rank(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        outputs, targets = rank_batch(rank)
        criterion = SetCriterion(5, HungarianMatcher(1.0, 5.0, 5.0), {}, mask_losses=("bce", "dice"))
        torch.save(criterion(outputs, targets), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_num_masks_averaged_over_ranks(tmp_path):
    """Two gloo processes: each divides its mask losses by the mean number of masks per rank.
    Forked, not spawned: a spawned process spends seconds importing torch again."""
    torch.multiprocessing.start_processes(criterion_on_rank, args=(str(tmp_path / "init"), str(tmp_path)),
                                          nprocs=2, start_method="fork")
    for rank in range(2):
        outputs, targets = rank_batch(rank)
        want = direct_losses(outputs["pred_logits"], outputs["pred_masks"], targets,
                             HungarianMatcher(1.0, 5.0, 5.0)(outputs, targets), 5, 0.1, num_masks=6.0)
        got = torch.load(tmp_path / f"{rank}.pt")
        assert_losses(got, {k: want[k] for k in ("loss_ce", "loss_bce", "loss_dice")})


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
