"""The Triton kernels on a GPU at realistic sizes, against float64 evaluations of the formulas.

B = 8 images, Q = 100 queries, T = 20 targets (ragged counts), P = 12,544 points (Mask2Former's
matcher) or 112 x 112 pixels from C = 256 embedding channels: 16 query x target tiles, so the
pixels of each tile are split over many programs (checked), and the embedding gradient's K
over many too. Run on a GPU machine with ``pytest -m cuda tests/test_kernels_cuda.py``;
skipped without CUDA.

Tolerances, relative to the largest reference value: 1e-4 for the costs (fp32 arithmetic,
dots in tf32x3: about fp32 accuracy; P-long fp32 sums) and for fp32 einsums; bf16 inputs are
compared on the same bf16 values, so only bf16 outputs (the einsum's) need more: 1e-2
(bf16 keeps 8 bits).
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from maskformer_fast.kernels import mask_cost_from_embeddings, mask_einsum, pairwise_mask_cost

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

B, Q, T, K1, C, SIDE = 8, 100, 20, 134, 256, 112  # SIDE * SIDE = 12,544
COUNTS = [20, 5, 13, 0, 20, 1, 17, 9]
COST_TOL = 1e-4
WEIGHTS = dict(w_class=2.0, w_mask=5.0, w_dice=5.0)  # Mask2Former's


def cost64(x, y, counts, class_logits, labels, w_class, w_mask, w_dice, mask_cost):
    """float64 ``[B, Q, T]`` cost straight from the formulas, +inf beyond each image's count."""
    x, y = x.double(), y.double()
    P = x.shape[-1]
    p = torch.sigmoid(x)
    zero = torch.zeros_like(x)
    pos, neg = torch.logaddexp(zero, -x), torch.logaddexp(zero, x)  # BCE(x, 1), BCE(x, 0)
    if mask_cost == "focal":
        pos, neg = 0.25 * (1 - p) ** 2 * pos, 0.75 * p**2 * neg
    mask = (pos @ y.transpose(1, 2) + neg @ (1 - y).transpose(1, 2)) / P
    dice = 1 - (2 * p @ y.transpose(1, 2) + 1) / (p.sum(-1)[:, :, None] + y.sum(-1)[:, None, :] + 1)
    cost = w_mask * mask + w_dice * dice
    if class_logits is not None:
        prob = class_logits.double().softmax(-1)
        cost = cost - w_class * torch.gather(prob, 2, labels[:, None, :].expand(-1, x.shape[1], -1))
    valid = torch.arange(y.shape[1], device=x.device) < counts[:, None]
    return cost.masked_fill(~valid[:, None, :], float("inf")), valid[:, None, :].expand_as(cost)


def rel_err(got, want, valid):
    """max |got - want| / max |want| over the valid entries; inf if any of them is not finite."""
    got, want = got.detach().double()[valid], want.detach()[valid]
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def inputs(embed, dtype, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    counts = torch.tensor(COUNTS, device=device)
    y = (torch.rand(B, T, SIDE * SIDE, generator=g, device=device) < 0.3).float()
    for b, n in enumerate(COUNTS):
        y[b, n:] = float("nan")  # padding is never read
    class_logits = torch.randn(B, Q, K1, generator=g, device=device)
    labels = torch.randint(0, K1 - 1, (B, T), generator=g, device=device)
    if embed:
        x = (torch.randn(B, Q, C, generator=g, device=device) / C**0.5 * 3).to(dtype)
        f = torch.randn(B, C, SIDE, SIDE, generator=g, device=device).to(dtype)
        return (x, f), y, counts, class_logits, labels
    return (torch.randn(B, Q, SIDE * SIDE, generator=g, device=device) * 3).to(dtype), y, counts, class_logits, labels


def run_cost(embed, x, y, counts, class_logits, labels, mask_cost, has_class):
    cls = (class_logits, labels) if has_class else (None, None)
    if embed:
        return mask_cost_from_embeddings(*x, y.view(B, T, SIDE, SIDE), counts, *cls, mask_cost=mask_cost,
                                         backend="triton", **WEIGHTS)
    return pairwise_mask_cost(x, y, counts, *cls, mask_cost=mask_cost, backend="triton", **WEIGHTS)


def test_sizes_reach_the_split_paths():
    from maskformer_fast.kernels import triton_cost, triton_einsum

    device = torch.device("cuda")
    tiles = B * triton.cdiv(Q, triton_cost.BLOCK_Q)  # one tile of targets (T <= 32)
    split, _ = triton_cost._split(SIDE * SIDE, tiles, device, triton_cost._block_p(device))
    assert split > 1, split
    grid = triton.cdiv(C, triton_einsum.BLOCK_N) * triton.cdiv(Q, triton_einsum.BLOCK_M) * B
    assert triton_einsum._split_k(grid, SIDE * SIDE, device, triton_einsum.BLOCK_K_GRAD_EMBED)[0] > 1



@pytest.mark.parametrize("embed", [False, True], ids=["logits", "embeddings"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_class", [True, False], ids=["class", "no-class"])
@pytest.mark.parametrize("mask_cost", ["bce", "focal"])
def test_split_cost_against_float64(embed, dtype, has_class, mask_cost):
    x, y, counts, class_logits, labels = inputs(embed, dtype)
    got = run_cost(embed, x, y, counts, class_logits, labels, mask_cost, has_class)
    logits = torch.einsum("bqc,bchw->bqhw", x[0].double(), x[1].double()).flatten(2) if embed else x
    want, valid = cost64(logits, y.nan_to_num(0.0), counts, class_logits if has_class else None, labels,
                         **WEIGHTS, mask_cost=mask_cost)
    assert got.shape == (B, Q, T) and got.dtype == torch.float32
    assert torch.isinf(got[~valid]).all() and (got[~valid] > 0).all()
    err = rel_err(got, want, valid)
    assert err <= COST_TOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("embed", [False, True], ids=["logits", "embeddings"])
@pytest.mark.parametrize("mask_cost", ["bce", "focal"])
def test_split_cost_is_deterministic(embed, mask_cost):
    """The last program of a tile adds the partials in the order of the pixels, not of arrival:
    20 reruns give the same bits."""
    x, y, counts, class_logits, labels = inputs(embed, torch.float32, seed=1)
    first = run_cost(embed, x, y, counts, class_logits, labels, mask_cost, True)
    differ = sum(not torch.equal(run_cost(embed, x, y, counts, class_logits, labels, mask_cost, True), first)
                 for _ in range(20))
    assert differ == 0, f"{differ} of 20 reruns differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_einsum_and_gradients_against_float64(dtype):
    """Forward, grad_feat and the split-K grad_embed; 20 reruns of the backward bitwise equal."""
    g = torch.Generator(device="cuda").manual_seed(2)
    embed = torch.randn(B, Q, C, generator=g, device="cuda").to(dtype)
    feat = torch.randn(B, C, SIDE, SIDE, generator=g, device="cuda").to(dtype)
    grad = torch.randn(B, Q, SIDE, SIDE, generator=g, device="cuda").to(dtype)
    leaves = [t.clone().requires_grad_() for t in (embed, feat)]
    out = mask_einsum(*leaves, backend="triton")
    got = (out, *torch.autograd.grad(out, leaves, grad))
    ref_leaves = [t.double().requires_grad_() for t in (embed, feat)]
    ref = torch.einsum("btc,bchw->bthw", *ref_leaves)
    want = (ref, *torch.autograd.grad(ref, ref_leaves, grad.double()))
    tol = COST_TOL if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("forward", "grad_embed", "grad_feat"), got, want):
        assert a.dtype == dtype
        err = rel_err(a, b, torch.ones_like(b, dtype=torch.bool))
        assert err <= tol, f"{name}: relative error {err:.2e}"
    for _ in range(20):
        again = torch.autograd.grad(mask_einsum(*leaves, backend="triton"), leaves, grad)
        assert all(torch.equal(a, b) for a, b in zip(again, got[1:]))


def test_tensors_on_another_gpu_launch_there():
    """The launches follow the tensors' device, not the current one."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    for embed in (False, True):
        x, y, counts, class_logits, labels = inputs(embed, torch.float32, seed=3)
        want = run_cost(embed, x, y, counts, class_logits, labels, "bce", True)
        moved = [tuple(t.to("cuda:1") for t in x) if embed else x.to("cuda:1"),
                 *(t.to("cuda:1") for t in (y, counts, class_logits, labels))]
        got = run_cost(embed, *moved, "bce", True)
        assert got.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    embed = torch.randn(2, 5, 16, device="cuda:1", requires_grad=True)
    feat = torch.randn(2, 16, 8, 8, device="cuda:1", requires_grad=True)
    out = mask_einsum(embed, feat, backend="triton")
    out.sum().backward()
    assert out.device == embed.grad.device == feat.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(out, torch.einsum("btc,bchw->bthw", embed, feat), rtol=1e-4, atol=1e-4)
