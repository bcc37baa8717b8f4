"""The torch references of maskformer_fast.kernels against a direct float64 evaluation of
the published formulas, image by image and pair by pair."""

import pytest
import torch

from maskformer_fast.kernels import mask_cost_from_embeddings, mask_einsum, pairwise_mask_cost
from maskformer_fast.kernels import reference


def direct_cost(x, y, counts, logits, labels, w_class, w_mask, w_dice, mask_cost):
    """float64, one (query, target) pair at a time, straight from the formulas."""
    B, Q, P = x.shape
    T = y.shape[1]
    out = torch.full((B, Q, T), float("inf"), dtype=torch.float64)
    for b in range(B):
        for t in range(int(counts[b])):
            yy = y[b, t].double()
            for q in range(Q):
                xx = x[b, q].double()
                p = torch.sigmoid(xx)
                bce1 = torch.log1p(torch.exp(-xx))  # BCE(x, 1)
                bce0 = torch.log1p(torch.exp(xx))  # BCE(x, 0)
                if mask_cost == "focal":
                    bce1, bce0 = 0.25 * (1 - p) ** 2 * bce1, 0.75 * p**2 * bce0
                cm = ((bce1 * yy).sum() + (bce0 * (1 - yy)).sum()) / P
                cd = 1 - (2 * (p * yy).sum() + 1) / (p.sum() + yy.sum() + 1)
                cc = -torch.softmax(logits[b, q].double(), -1)[labels[b, t]] if logits is not None else 0.0
                out[b, q, t] = w_class * cc + w_mask * cm + w_dice * cd
    return out


def batch(g, B=3, Q=5, T=4, P=37, K=4, dtype=torch.float32):
    x = (torch.randn(B, Q, P, generator=g) * 4).to(dtype)
    y = (torch.rand(B, T, P, generator=g) < 0.3).float()
    counts = torch.randint(0, T + 1, (B,), generator=g)
    counts[0] = T
    logits = torch.randn(B, Q, K + 1, generator=g)
    labels = torch.randint(0, K, (B, T), generator=g)
    return x, y, counts, logits, labels


@pytest.mark.parametrize("mask_cost", ["bce", "focal"])
@pytest.mark.parametrize("shape", [(3, 5, 4, 37), (2, 3, 7, 64), (2, 4, 0, 10), (1, 1, 1, 1)])
def test_pairwise_cost_equals_formulas(mask_cost, shape, monkeypatch):
    B, Q, T, P = shape
    g = torch.Generator().manual_seed(B * 100 + T)
    x, y, counts, logits, labels = batch(g, B, Q, T, P)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * B * Q)  # several chunks, a ragged last one
    y_padded = y.clone()
    for b in range(B):
        y_padded[b, int(counts[b]):] = float("nan")  # padding never makes NaN
    got = pairwise_mask_cost(x, y_padded, counts, logits, labels, w_class=2.0, w_mask=5.0, w_dice=3.0,
                             mask_cost=mask_cost)
    want = direct_cost(x, y, counts, logits, labels, 2.0, 5.0, 3.0, mask_cost)
    assert got.dtype == torch.float32 and got.shape == (B, Q, T)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_half_precision_inputs_and_no_class_term():
    g = torch.Generator().manual_seed(1)
    x, y, counts, _, _ = batch(g, dtype=torch.float16)
    got = pairwise_mask_cost(x, y.bool(), counts, w_mask=1.0, w_dice=1.0)
    want = direct_cost(x.float(), y, counts, None, None, 0.0, 1.0, 1.0, "bce")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_cost_from_embeddings_equals_cost_of_einsum(monkeypatch):
    g = torch.Generator().manual_seed(2)
    B, Q, C, H, W, T = 2, 6, 8, 9, 7, 5
    embed = torch.randn(B, Q, C, generator=g)
    feat = torch.randn(B, C, H, W, generator=g)
    tgt = (torch.rand(B, T, H, W, generator=g) < 0.4).float()
    counts = torch.tensor([5, 2])
    logits, labels = torch.randn(B, Q, 3, generator=g), torch.randint(0, 2, (B, T), generator=g)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * B * Q)
    for mask_cost in ("bce", "focal"):
        got = mask_cost_from_embeddings(embed, feat, tgt, counts, logits, labels, mask_cost=mask_cost)
        x = torch.einsum("bqc,bchw->bqhw", embed.double(), feat.double()).flatten(2)
        want = direct_cost(x, tgt.flatten(2), counts, logits, labels, 1.0, 1.0, 1.0, mask_cost)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_mask_einsum_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    feat = torch.randn(2, 7, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = mask_einsum(embed, feat)
    ref = torch.einsum("btc,bchw->bthw", embed, feat)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    ga = torch.autograd.grad(out, (embed, feat), grad)
    gb = torch.autograd.grad(ref, (embed, feat), grad)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_kernel_input_errors():
    x = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"mask_logits \[B, Q, P\] and tgt_masks \[B, T, P\]"):
        pairwise_mask_cost(x, torch.rand(2, 4, 9))
    with pytest.raises(ValueError, match="tgt_counts"):
        pairwise_mask_cost(x, torch.rand(2, 4, 10), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="go together"):
        pairwise_mask_cost(x, torch.rand(2, 4, 10), class_logits=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="mask_cost"):
        pairwise_mask_cost(x, torch.rand(2, 4, 10), mask_cost="l2")
    with pytest.raises(ValueError, match="backend"):
        pairwise_mask_cost(x, torch.rand(2, 4, 10), backend="cuda")
    with pytest.raises(ValueError, match="mask_einsum"):
        mask_einsum(torch.randn(2, 3, 4), torch.randn(2, 5, 6, 6))
