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


# ------------------------------------------------ non-finite and huge predictions

ON_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a CUDA device")])


def to_device(outputs, targets, device):
    return ({k: v.to(device) for k, v in outputs.items()},
            [{k: v.to(device) for k, v in t.items()} for t in targets])


def transformers_match(outputs, targets, w_class, w_mask, w_dice, mask_cost, num_points=0, generator=None,
                       clamp=True):
    """transformers' matchers, per image: the cost (here the float64 reference), then, in
    Mask2FormerHungarianMatcher (``clamp``), ``torch.minimum(cost, 1e10)``, ``torch.maximum(cost,
    -1e10)``, ``torch.nan_to_num(cost, 0)``; MaskFormerHungarianMatcher hands it to scipy as it
    is (which raises a ValueError on NaN or -inf)."""
    out = []
    for cost in reference_costs(outputs, targets, w_class, w_mask, w_dice, mask_cost, num_points, generator):
        if clamp:
            cost = torch.minimum(cost, torch.tensor(1e10, dtype=cost.dtype))
            cost = torch.maximum(cost, torch.tensor(-1e10, dtype=cost.dtype))
            cost = torch.nan_to_num(cost, 0)
        r, c = scipy.optimize.linear_sum_assignment(cost.numpy())
        out.append((torch.as_tensor(r), torch.as_tensor(c)))
    return out


def hf_call(matcher, outputs, targets):
    return matcher(outputs["pred_masks"], outputs["pred_logits"], [t["masks"] for t in targets],
                   [t["labels"] for t in targets])


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("num_points", [0, 300])
def test_hf_mask2former_matcher_clamps_nonfinite_costs_as_transformers(num_points, device):
    """NaN / inf predictions: transformers' Mask2FormerHungarianMatcher clamps its cost to
    [-1e10, 1e10] and sets NaN to 0, so such queries still match; HFHungarianMatcher does the
    same by default (it used to raise)."""
    g = torch.Generator().manual_seed(4)
    outputs, targets = make_batch(g, counts=[3, 6, 1, 0, 9], B=5, H=32, W=32)
    masks, logits = outputs["pred_masks"], outputs["pred_logits"]
    masks[0, 2] = float("nan")  # a diverged query: cost 0 for every target, the cheapest
    masks[1, 4, 3:9, 5:11] = float("inf")
    masks[2, 1] = -float("inf")
    logits[3, 0] = float("nan")  # an image without targets
    logits[4, 7, 0] = float("inf")  # softmax: NaN
    masks[4, 3] = 1e38  # finite, huge: clamped to 1e10
    assert HFHungarianMatcher().nonfinite == "clamp"
    hf = HFHungarianMatcher(2.0, 5.0, 5.0, num_points=num_points, generator=torch.Generator().manual_seed(2))
    got = hf_call(hf, *to_device(outputs, targets, device))
    want = transformers_match(outputs, targets, 2.0, 5.0, 5.0, "bce", num_points, torch.Generator().manual_seed(2))
    assert_same(got, want)
    assert 2 in got[0][0].tolist() and 7 in got[4][0].tolist()  # the NaN queries are matched
    # the same policy in the DETR convention
    detr = HungarianMatcher(2.0, 5.0, 5.0, num_points, nonfinite="clamp", generator=torch.Generator().manual_seed(2))
    assert_same(detr(*to_device(outputs, targets, device)), want)


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("where", ["nan_mask", "inf_pixel", "-inf_pixel", "inf_class"])
def test_hf_maskformer_matcher_refuses_nan_costs_as_transformers(where, device):
    """transformers' MaskFormerHungarianMatcher hands its cost to scipy unclamped: NaN or inf
    predictions (a NaN cost: BCE with logits is NaN at +-inf) raise scipy's ValueError, except
    in an image without targets (an empty cost). HFMaskFormerHungarianMatcher raises there too."""
    g = torch.Generator().manual_seed(5)
    outputs, targets = make_batch(g, counts=[3, 0, 5], B=3, H=32, W=32)
    value = {"nan_mask": float("nan"), "inf_pixel": float("inf"), "-inf_pixel": -float("inf"),
             "inf_class": float("inf")}[where]
    if where == "inf_class":
        outputs["pred_logits"][2, 4, 1] = value
    else:
        outputs["pred_masks"][2, 4, 3, 3] = value
    outputs["pred_masks"][1, 0] = float("nan")  # no targets: no cost, no error
    assert HFMaskFormerHungarianMatcher().nonfinite == "scipy"
    with pytest.raises(ValueError, match="invalid numeric entries"):
        transformers_match(outputs, targets, 1.0, 20.0, 1.0, "focal", clamp=False)
    hf = HFMaskFormerHungarianMatcher(1.0, 20.0, 1.0)
    with pytest.raises(ValueError, match="image 2 holds NaN"):
        hf_call(hf, *to_device(outputs, targets, device))
    outputs["pred_masks"][2, 4] = 0.0
    outputs["pred_logits"][2, 4] = 0.0
    assert_same(hf_call(hf, *to_device(outputs, targets, device)),
                transformers_match(outputs, targets, 1.0, 20.0, 1.0, "focal", clamp=False))


class RecordedCost:
    """batch_linear_sum_assignment, recording the cost it is given."""

    def __init__(self):
        self.costs = []

    def __call__(self, cost, *args, **kwargs):
        self.costs.append(cost.cpu())
        return batch_linear_sum_assignment(cost, *args, **kwargs)


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("path", ["cpu_kernel", "torch_ops"])
@pytest.mark.parametrize("preset", ["maskformer", "mask2former"])
def test_huge_finite_logits_are_costed_exactly(preset, path, device, monkeypatch):
    """Mask logits of +-1e38 (and float32's largest) are finite: their cost is the float64
    formula's, not an overflow refused as "NaN or inf". The fp32 kernels' pixel sums overflow
    there, so such an image is costed again in float64; with MaskFormer's focal weight 20 the
    cost (up to 1.5e39) does not fit in float32 and the cost matrix is float64."""
    from maskformer_fast import matcher as matcher_module
    from maskformer_fast.kernels import reference as kernel_reference

    if path == "torch_ops":  # the torch ops of kernels/reference.py, not the compiled CPU kernel
        monkeypatch.setattr(kernel_reference, "_use_cpu_kernel", lambda x: False)
    recorded = RecordedCost()
    monkeypatch.setattr(matcher_module, "batch_linear_sum_assignment", recorded)
    g = torch.Generator().manual_seed(21)
    outputs, targets = make_batch(g, B=3, Q=10, counts=[4, 6, 3])
    masks = outputs["pred_masks"]
    masks[0, 1] = 1e38
    masks[0, 2] = -1e38
    masks[1, 3, :8], masks[1, 3, 8:] = 1e38, -1e38
    masks[1, 5, 2, 2] = -torch.finfo(torch.float32).max
    outputs["pred_logits"][2, 6, 2] = 1e38  # a class logit: softmax has no trouble
    weights = (1.0, 20.0, 1.0, 0, "focal") if preset == "maskformer" else (2.0, 5.0, 5.0, 300, "bce")
    num_points, mask_cost = weights[3:]
    want_costs = reference_costs(outputs, targets, *weights[:3], mask_cost, num_points,
                                 torch.Generator().manual_seed(5))
    assert all(torch.isfinite(c).all() for c in want_costs)
    for nonfinite in ("raise", "forbid"):
        matcher = HungarianMatcher(*weights[:3], num_points, mask_cost, nonfinite=nonfinite,
                                   generator=torch.Generator().manual_seed(5))
        got = matcher(*to_device(outputs, targets, device))
        assert_same(got, reference_match(outputs, targets, *weights[:3], mask_cost, num_points,
                                         torch.Generator().manual_seed(5)))
        cost = recorded.costs[-1]
        assert cost.dtype == (torch.float64 if preset == "maskformer" else torch.float32)
        for b, want in enumerate(want_costs):
            c = cost[b, :, : want.shape[1]].double()
            assert torch.isfinite(c).all()
            assert torch.allclose(c, want, rtol=1e-5, atol=1e-4), b


# ------------------------------------------------ targets of several sizes in a batch


def several_sizes_batch(seed, B=4, Q=10, counts=(3, 4, 0, 5), sizes=((16, 16), (24, 20), (40, 40), (9, 31))):
    """Targets of a different size in every image (image 2, without targets, the largest)."""
    g = torch.Generator().manual_seed(seed)
    outputs, targets = make_batch(g, B=B, Q=Q, counts=list(counts))
    for t, (H, W) in zip(targets, sizes):
        t["masks"] = (torch.rand(len(t["labels"]), H, W, generator=g) < 0.4).float()
    return outputs, targets


def padded_to_largest(targets):
    """MaskFormer's padding: zeros at the bottom and right, to the largest target size."""
    sizes = [t["masks"].shape[-2:] for t in targets if len(t["labels"])]
    H, W = max(s[0] for s in sizes), max(s[1] for s in sizes)
    return [dict(t, masks=F.pad(t["masks"], (0, W - t["masks"].shape[-1], 0, H - t["masks"].shape[-2])))
            if len(t["labels"]) else t for t in targets]


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("hf", [False, True])
def test_point_sampled_matching_of_targets_of_several_sizes(hf, device):
    """Mask2Former's matcher (and transformers') samples each image's targets, at their own
    size, at that image's points: target sizes may differ within a batch (they used to raise)."""
    outputs, targets = several_sizes_batch(30)
    cls = HFHungarianMatcher if hf else HungarianMatcher
    matcher = cls(2.0, 5.0, 5.0, num_points=200, generator=torch.Generator().manual_seed(3))
    data = to_device(outputs, targets, device)
    got = hf_call(matcher, *data) if hf else matcher(*data)
    assert_same(got, reference_match(outputs, targets, 2.0, 5.0, 5.0, "bce", 200, torch.Generator().manual_seed(3)))
    if not hf:  # every decoder output in one call: the points of the first layer come first
        matcher.generator.manual_seed(3)
        layers = matcher.match_layers([data[0], data[0]], data[1])
        matcher.generator.manual_seed(3)
        assert torch.equal(layers[0], matcher(*data, as_tensor=True))


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_full_mask_matching_of_targets_of_several_sizes(device):
    """Full masks: MaskFormer's matcher zero-pads the targets to the largest size, then resizes
    them (nearest) to the prediction size; transformers' resizes each image's on its own."""
    outputs, targets = several_sizes_batch(31)
    data = to_device(outputs, targets, device)
    want = reference_match(outputs, padded_to_largest(targets), 1.0, 20.0, 1.0, "focal")
    assert_same(HungarianMatcher.maskformer()(*data), want)
    want_hf = reference_match(outputs, targets, 1.0, 20.0, 1.0, "focal")
    assert_same(hf_call(HFMaskFormerHungarianMatcher(1.0, 20.0, 1.0), *data), want_hf)
    assert any(c.tolist() != cc.tolist() for (_, c), (_, cc) in zip(want, want_hf))  # the two differ here


def test_criterion_pads_targets_of_several_sizes():
    """As MaskFormer's criterion (nested_tensor_from_tensor_list): targets zero-padded to the
    largest size, the predictions upsampled to it."""
    outputs, targets = several_sizes_batch(32)
    matcher = HungarianMatcher(1.0, 5.0, 5.0, mask_cost="focal")
    criterion = SetCriterion(5, matcher, {}, mask_losses=("bce", "brier", "focal", "dice"))
    losses = criterion(outputs, targets)
    padded = padded_to_largest(targets)
    up = F.interpolate(outputs["pred_masks"], size=padded[0]["masks"].shape[-2:], mode="bilinear",
                       align_corners=False)
    want = direct_losses(outputs["pred_logits"], up, padded, matcher(outputs, targets), 5, 0.1)
    assert_losses(losses, want)


# ------------------------------------------------ empty batches, no queries


@pytest.mark.parametrize("num_points", [0, 50])
def test_criterion_on_an_empty_batch_gives_zero_losses_that_backprop(num_points):
    """B = 0 (it raised from interpolate on full masks, and gave a NaN cross-entropy with
    points): every loss 0, tied to the outputs, so backward reaches the parameters."""
    head = torch.nn.Linear(8, 4 + 16)
    x = head(torch.randn(0, 6, 8))
    layer = {"pred_logits": x[..., :4], "pred_masks": x[..., 4:].reshape(0, 6, 4, 4)}
    outputs = dict(layer, aux_outputs=[{k: v * 2 for k, v in layer.items()}])
    matcher = HungarianMatcher(1.0, 5.0, 5.0, num_points=num_points, generator=torch.Generator().manual_seed(0))
    criterion = SetCriterion(3, matcher, {"loss_ce": 1.0, "loss_bce": 5.0, "loss_dice": 5.0},
                             num_points=num_points, generator=torch.Generator().manual_seed(1))
    losses = criterion(outputs, [])
    assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "bce", "dice") for s in ("", "_0")}
    for v in losses.values():
        assert v.shape == () and v.item() == 0 and v.requires_grad
    criterion.total(losses).backward()
    assert head.weight.grad is not None and (head.weight.grad == 0).all()


def test_criterion_refuses_outputs_without_queries():
    """Q = 0: the cross-entropy is a mean over no query (it came back NaN without a word)."""
    _, targets = make_batch(torch.Generator().manual_seed(22), B=2, counts=[2, 0])
    criterion = SetCriterion(5, HungarianMatcher(), {})
    empty = {"pred_logits": torch.randn(2, 0, 6), "pred_masks": torch.randn(2, 0, 16, 16)}
    with pytest.raises(ValueError, match=r"outputs has no queries \(pred_logits of shape \[2, 0, 6\]"):
        criterion(empty, targets)
    full = {"pred_logits": torch.randn(2, 3, 6), "pred_masks": torch.randn(2, 3, 16, 16)}
    with pytest.raises(ValueError, match=r"outputs\['aux_outputs'\]\[1\] has no queries"):
        criterion(dict(full, aux_outputs=[full, empty]), targets)


@pytest.mark.parametrize("num_points", [0, 50])
def test_matcher_without_queries_matches_nothing(num_points):
    """Q = 0: no pairs (scipy on a [0, T] cost returns none), col4row [B, 0]; B = 0: nothing."""
    _, targets = make_batch(torch.Generator().manual_seed(23), B=2, counts=[2, 0])
    empty = {"pred_logits": torch.randn(2, 0, 6), "pred_masks": torch.randn(2, 0, 16, 16)}
    matcher = HungarianMatcher(num_points=num_points)
    for pairs in (matcher(empty, targets), hf_call(HFHungarianMatcher(num_points=num_points), empty, targets)):
        assert [(r.tolist(), c.tolist()) for r, c in pairs] == [([], []), ([], [])]
        assert all(r.dtype == c.dtype == torch.int64 for r, c in pairs)
    assert matcher(empty, targets, as_tensor=True).shape == (2, 0)
    assert matcher({k: v[:0] for k, v in empty.items()}, []) == []
