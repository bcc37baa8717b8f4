"""The compiled CPU cost kernels (csrc/cost/) on their own: mask_cost_sums against a direct
float64 evaluation of its formulas, bilinear_sample against F.grid_sample bit for bit, and
both through torch.library.opcheck (schemas, fake kernels)."""

import pytest
import torch
import torch.nn.functional as F

from maskformer_fast.kernels.reference import has_cpu_kernel
from maskformer_fast.matcher import point_sample

pytestmark = pytest.mark.skipif(not has_cpu_kernel("mask_cost_sums"),
                                reason="maskformer_fast._C built without the CPU cost kernels")
ops = torch.ops.maskformer_fast
INF, NAN = float("inf"), float("nan")


def direct_sums(x, y, counts, mask_cost, alpha, gamma):
    """float64: dots [B, 2, Q, T] = ((neg - pos) . y, p . y), sums [B, 2, Q] = (sum neg, sum p),
    and the same with every term's absolute value (the scale of the rounding errors)."""
    x, y = x.double(), torch.nan_to_num(y.double(), nan=0.0)  # padding: never read, any value
    zero = torch.zeros_like(x)
    p = torch.sigmoid(x)
    neg, pos = torch.logaddexp(zero, x), torch.logaddexp(zero, -x)  # BCE(x, 0), BCE(x, 1)
    if mask_cost == "focal":
        neg, pos = (1 - alpha) * p**gamma * neg, alpha * (1 - p) ** gamma * pos
    valid = (torch.arange(y.shape[1]) < counts[:, None])[:, None, None, :]  # [B, 1, 1, T]

    def sums(d, p, neg):
        dots = torch.stack([torch.einsum("bqp,btp->bqt", d, y), torch.einsum("bqp,btp->bqt", p, y)], 1)
        return torch.where(valid, dots, 0.0), torch.stack([neg.sum(-1), p.sum(-1)], 1)  # padding: 0

    return sums(neg - pos, p, neg), sums((neg - pos).abs() + neg.abs() + pos.abs(), p, neg.abs())


def check_sums(x, y, counts, mask_cost, alpha=0.25, gamma=2.0, chunk=13):
    got = ops.mask_cost_sums(x, y, counts, mask_cost, alpha, gamma, chunk)
    full = counts.long().clamp(0, y.shape[1]) if counts is not None else torch.full((x.shape[0],), y.shape[1])
    want, scale = direct_sums(x, y, full, mask_cost, alpha, gamma)
    for g, w, s in zip(got, want, scale):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert torch.equal(torch.isfinite(g), torch.isfinite(w)), "non-finite entries differ"
        finite = torch.isfinite(w)
        # fp32: a few ulp per term (the activations), then sums of such terms
        assert ((g.double() - w).abs() <= 1e-6 * (s + 1e-30))[finite].all(), \
            f"max relative error {((g.double() - w).abs() / (s + 1e-30))[finite].max():.2e}"


@pytest.mark.parametrize("mask_cost", ["bce", "focal"])
@pytest.mark.parametrize("chunk", [1, 13, 16, 1000])
@pytest.mark.parametrize("shape", [(2, 7, 5, 100), (1, 1, 1, 1), (3, 9, 0, 37), (2, 0, 3, 20), (1, 6, 13, 65)])
def test_mask_cost_sums_equal_formulas(mask_cost, chunk, shape):
    """(B, Q, T, P): several chunks and a ragged last one, edges of the 4 x 4 dot blocks, T = 0, Q = 0."""
    B, Q, T, P = shape
    g = torch.Generator().manual_seed(B * 1000 + Q * 10 + T)
    x = torch.randn(B, Q, P, generator=g) * 6
    y = (torch.rand(B, T, P, generator=g) < 0.3).float()
    y[:, : T // 2] = torch.rand(B, T // 2, P, generator=g)  # soft targets too
    counts = torch.randint(0, T + 1, (B,), generator=g)
    for b, n in enumerate(counts.tolist()):
        y[b, n:] = NAN  # padding is never read
    check_sums(x, y, counts, mask_cost, chunk=chunk)
    check_sums(x, y.nan_to_num(), None, mask_cost, chunk=chunk)


@pytest.mark.parametrize("mask_cost", ["bce", "focal"])
def test_mask_cost_sums_extreme_logits_dtypes_and_layouts(mask_cost):
    """|x| up to 1e4 and +-inf / NaN (no overflow; non-finite where the formulas are), fp16,
    bf16 and fp64 logits, logits with a pixel stride, bool targets, counts out of [0, T]."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 300, generator=g) * torch.tensor([0.01, 1.0, 30.0, 100.0, 1e4])[:, None]
    y = torch.rand(2, 4, 300, generator=g) < 0.5
    counts = torch.tensor([7, -1], dtype=torch.int32)
    check_sums(x, y, counts, mask_cost, chunk=64)
    special = x.clone()
    special[0, 1, 3], special[0, 2, 5], special[1, 3, 7] = INF, -INF, NAN
    check_sums(special, y, counts.abs(), mask_cost, chunk=64)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        check_sums(x.clamp(-300, 300).to(dtype), y, None, mask_cost, chunk=100)
    strided = torch.stack([x, x], -1)[..., 0]
    assert strided.stride(-1) == 2
    check_sums(strided, y.float(), None, mask_cost, chunk=100)


def test_mask_cost_sums_other_alpha_gamma():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(2, 3, 50, generator=g) * 4, torch.rand(2, 2, 50, generator=g)
    for alpha, gamma in [(0.5, 0.0), (0.1, 1.5), (0.9, 3.0)]:
        check_sums(x, y, None, "focal", alpha, gamma)


def test_mask_cost_sums_do_not_depend_on_the_thread_count():
    """Runs of chunks are added in a fixed order: 1, 2 or 3 threads give the same bits."""
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(3, 10, 700, generator=g) * 5, torch.rand(3, 6, 700, generator=g)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.mask_cost_sums(x, y, None, "focal", 0.25, 2.0, 32))
    finally:
        torch.set_num_threads(saved)
    for dots, sums in results[1:]:
        assert torch.equal(dots, results[0][0]) and torch.equal(sums, results[0][1])


def test_mask_cost_sums_errors():
    x, y = torch.randn(2, 3, 10), torch.rand(2, 4, 10)
    with pytest.raises(RuntimeError, match=r"logits \[B, Q, P\] and targets \[B, T, P\]"):
        ops.mask_cost_sums(x, y[:, :, :9], None, "bce", 0.25, 2.0, 16)
    with pytest.raises(RuntimeError, match="mask_cost must be"):
        ops.mask_cost_sums(x, y, None, "l2", 0.25, 2.0, 16)
    with pytest.raises(RuntimeError, match="counts must have shape"):
        ops.mask_cost_sums(x, y, torch.tensor([1, 2, 3]), "bce", 0.25, 2.0, 16)
    with pytest.raises(RuntimeError, match="chunk"):
        ops.mask_cost_sums(x, y, None, "bce", 0.25, 2.0, 0)


def grid_sample_per_image(planes, grid):
    """What bilinear_sample promises: F.grid_sample of each image's planes at its points."""
    N = planes.shape[1]
    return torch.stack([F.grid_sample(m[:, None], g[None, None].expand(N, -1, -1, -1), mode="bilinear",
                                      padding_mode="zeros", align_corners=False).flatten(1)
                        for m, g in zip(planes, grid)]) if len(planes) else planes.new_zeros(0, N, grid.shape[1])


@pytest.mark.parametrize("shape", [(2, 5, 128, 128, 3000), (1, 3, 37, 53, 500), (3, 2, 1, 1, 40),
                                   (1, 4, 2, 7, 100), (2, 0, 5, 5, 10), (1, 2, 5, 5, 0), (0, 2, 5, 5, 10)])
def test_bilinear_sample_equals_grid_sample_bit_for_bit(shape):
    """(B, N, H, W, P): points inside, on and beyond the borders (-1, 1, the pixel centres,
    far outside), planes holding NaN and inf (read where the points reach them, never
    beyond the border)."""
    B, N, H, W, P = shape
    g = torch.Generator().manual_seed(H * W + P)
    planes = torch.randn(B, N, H, W, generator=g) * 3
    grid = torch.rand(B, P, 2, generator=g) * 2.6 - 1.3
    if B and P >= 12:
        edges = torch.tensor([-1.0, 1.0, 0.0, -1 + 1 / W, 1 - 1 / H, -1.0 - 1e-7, 1.0 + 1e-7, 5.0, -5.0, 1e30,
                              -1e30, -1 - 2 / W])
        grid[0, :12, 0], grid[0, :12, 1] = edges, edges.roll(3)
    if B and N and H * W > 4:
        planes[0, 0, 0, 0], planes[0, -1, -1, -1], planes[-1, 0, H // 2, W // 2] = NAN, INF, -INF
    got = ops.bilinear_sample(planes, grid)
    want = grid_sample_per_image(planes, grid)
    assert got.shape == want.shape == (B, N, P)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_bilinear_sample_nan_grid_and_layouts():
    """A NaN coordinate gives NaN (as grid_sample); non-contiguous planes and grid."""
    g = torch.Generator().manual_seed(9)
    planes = torch.randn(2, 6, 9, 11, generator=g).transpose(2, 3).contiguous().transpose(2, 3)
    coords = torch.rand(2, 2, 50, generator=g).transpose(1, 2)
    coords[1, 4, 0] = NAN
    grid = 2 * coords - 1
    got = ops.bilinear_sample(planes, grid)
    want = grid_sample_per_image(planes, grid)
    assert got[1, :, 4].isnan().all()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(point_sample(planes, coords).nan_to_num(), got.nan_to_num())  # the matcher's


@pytest.mark.parametrize("tall", [False, True], ids=["wide", "tall"])
def test_bilinear_sample_planes_past_float_precision(tall):
    """Sides above 2**24, where float(W - 1) rounds up: a point whose corners all lie just
    past the last pixel reads nothing (before the bound was an integer, the wide plane gave
    25.0 where grid_sample gives 0 and the tall one read past its scratch)."""
    side = 2**26 + 6
    shape = (side, 1) if tall else (1, side)
    planes = torch.zeros(1, 1, *shape)
    planes[0, 0, 0, 0] = 100.0
    edge = [1.0, -0.5] if not tall else [-0.5, 1.0]
    grid = torch.tensor([[edge, [-1.0, -1.0], [-0.9999999, -0.9999999], [1.0, 1.0], [0.9999, 0.9999]]])
    got = ops.bilinear_sample(planes, grid)
    want = grid_sample_per_image(planes, grid)
    assert got[0, 0, 0] == 0.0
    assert torch.equal(got, want)


def test_bilinear_sample_errors():
    with pytest.raises(RuntimeError, match=r"planes \[B, N, H, W\] and grid \[B, P, 2\]"):
        ops.bilinear_sample(torch.rand(2, 3, 4, 4), torch.rand(2, 5, 3))
    with pytest.raises(RuntimeError, match="float32"):
        ops.bilinear_sample(torch.rand(2, 3, 4, 4).double(), torch.rand(2, 5, 2))


def test_opcheck():
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(2, 3, 40, generator=g), torch.rand(2, 4, 40, generator=g)
    for counts in (None, torch.tensor([4, 1])):
        for mask_cost in ("bce", "focal"):
            torch.library.opcheck(ops.mask_cost_sums.default, (x, y, counts, mask_cost, 0.25, 2.0, 16))
    planes, grid = torch.randn(2, 3, 6, 5, generator=g), torch.rand(2, 7, 2, generator=g) * 2 - 1
    torch.library.opcheck(ops.bilinear_sample.default, (planes, grid))
