"""Property-based fuzzing of the public entry points against their references.

CI runs a slice (the default profile, 400 examples per test). The long run, at least 100,000
solver cases, selects the solver's tests (named ``test_fuzz_solver_*``):

    FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/test_fuzz.py -k fuzz_solver -q -p no:randomly

Each case of ``test_fuzz_solver_equals_scipy`` is a whole batch of up to 6 random problems
(random shapes, dtypes, strides, NaN / inf patterns, ragged sizes), so FUZZ_EXAMPLES examples
check several times as many problems. Without ``-k`` FUZZ_EXAMPLES applies to the kernels'
and the matcher's tests too, which are much slower per example.
"""

import os

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from maskformer_fast.hungarian import batch_linear_sum_assignment, linear_sum_assignment

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 400,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The Triton kernels through the interpreter (tests run it when there is no GPU): slower per case.
TRITON_FUZZ = settings(FUZZ, max_examples=max(100, EXAMPLES // 4))
# The cost references' torch ops without their compiled CPU kernel: a second path, sampled less.
TORCH_OPS_FUZZ = settings(FUZZ, max_examples=max(100, EXAMPLES // 4))

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 1e-30, 65504.0]


@st.composite
def batches(draw):
    """A [B, N, M] cost of any dtype and layout, optional ragged sizes, and maximize."""
    B = draw(st.integers(0, 6))
    N, M = draw(st.integers(0, 24)), draw(st.integers(0, 24))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    levels = draw(st.sampled_from([2, 5, 1000, 0]))
    if dtype == torch.bool:
        cost = torch.rand(B, N, M, generator=g) < 0.5
    elif dtype.is_floating_point:
        if levels:
            cost = torch.randint(0, levels, (B, N, M), generator=g).double()
        else:
            scale = draw(st.sampled_from([1e-20, 1.0, 1e20]))
            cost = torch.randn(B, N, M, generator=g, dtype=torch.float64) * scale
        special = torch.rand(B, N, M, generator=g) < draw(st.sampled_from([0.0, 0.02, 0.3]))
        picks = torch.tensor(SPECIALS, dtype=torch.float64)[torch.randint(0, len(SPECIALS), (B, N, M), generator=g)]
        cost = torch.where(special, picks, cost).to(dtype)
    else:  # up to +-2**60: int64 costs round on their way to float64, as in scipy
        info = torch.iinfo(dtype)
        bound = min(info.max, levels or 2**60)
        cost = torch.randint(-bound if info.min < 0 else 0, bound, (B, N, M), generator=g).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed":
        cost = cost.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        big = torch.zeros(B, 2 * N, 3 * M, dtype=cost.dtype)
        big[:, 1::2, ::3] = cost
        cost = big[:, 1::2, ::3]
    sizes = None
    if draw(st.booleans()):
        sizes = torch.stack([torch.randint(0, N + 1, (B,), generator=g), torch.randint(0, M + 1, (B,), generator=g)], 1)
    return cost, sizes, draw(st.booleans())


def scipy_item(item: np.ndarray, maximize: bool):
    try:
        return scipy.optimize.linear_sum_assignment(item, maximize=maximize)
    except ValueError as exc:
        return 1 if "infeasible" in str(exc) else 2


@FUZZ
@given(batches())
def test_fuzz_solver_equals_scipy(case):
    cost, sizes, maximize = case
    method = "certified" if cost.shape[1] == cost.shape[2] and cost.shape[0] % 2 else "auto"
    res = batch_linear_sum_assignment(cost, sizes, maximize=maximize, errors="status", method=method)
    B, N, M = cost.shape
    assert res.col4row.shape == (B, N) and res.status.shape == (B,)
    for b, (rows, cols) in enumerate(res.pairs()):
        n, m = (N, M) if sizes is None else sizes[b].tolist()
        want = scipy_item(cost[b, :n, :m].double().numpy(), maximize)
        if isinstance(want, int):
            assert int(res.status[b]) == want
            assert len(rows) == 0
        else:
            assert int(res.status[b]) == 0
            assert rows.tolist() == want[0].tolist() and cols.tolist() == want[1].tolist()


@st.composite
def square_batches(draw):
    """Square float costs for the certified path: ties, near ties, offsets, continuous."""
    B, n = draw(st.integers(1, 4)), draw(st.integers(2, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["levels", "continuous", "near_tie", "offset"]))
    if kind == "levels":
        cost = torch.randint(0, draw(st.sampled_from([2, 3, 10, 1000])), (B, n, n), generator=g).double()
    elif kind == "continuous":
        cost = torch.rand(B, n, n, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-20, 1.0, 1e20]))
    elif kind == "near_tie":  # one entry per row a few ulps off a tie with the rest
        cost = torch.ones(B, n, n, dtype=torch.float64)
        cols = torch.randint(0, n, (B, n, 1), generator=g)
        ulps = torch.randint(-4, 5, (B, n, 1), generator=g).double() * np.spacing(1.0)
        cost.scatter_add_(2, cols, ulps)
    else:
        cost = 1e9 + torch.randint(0, 4, (B, n, n), generator=g).double() * draw(st.sampled_from([1e-7, 1e-3, 1.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return cost.to(dtype), draw(st.booleans())


@FUZZ
@given(square_batches())
def test_fuzz_solver_certified_equals_scipy(case):
    cost, maximize = case
    res = batch_linear_sum_assignment(cost, maximize=maximize, method="certified")
    for b, (rows, cols) in enumerate(res.pairs()):
        want = scipy.optimize.linear_sum_assignment(cost[b].double().numpy(), maximize=maximize)
        assert rows.tolist() == want[0].tolist() and cols.tolist() == want[1].tolist()


@FUZZ
@given(st.data())
def test_fuzz_solver_bad_input_is_a_clear_error(data):
    """Wrong shapes, dtypes and sizes raise TypeError / ValueError, never crash."""
    kind = data.draw(st.sampled_from(["ndim", "sizes_range", "sizes_shape", "sizes_dtype", "dtype"]))
    B, N, M = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    cost = torch.rand(B, N, M)
    if kind == "ndim":
        shape = data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=5).filter(lambda s: len(s) != 3))
        with pytest.raises(ValueError, match="expected a batch of matrices"):
            batch_linear_sum_assignment(torch.rand(shape))
    elif kind == "sizes_range":
        bad = data.draw(st.sampled_from([(-1, 0), (N + 1, M), (0, M + 1), (-5, -5)]))
        sizes = torch.tensor([[N, M]] * B)
        b = data.draw(st.integers(0, B - 1))
        sizes[b] = torch.tensor(bad)
        with pytest.raises(ValueError, match=rf"sizes\[{b}\]"):
            batch_linear_sum_assignment(cost, sizes)
    elif kind == "sizes_shape":
        with pytest.raises(ValueError, match="shape"):
            batch_linear_sum_assignment(cost, torch.zeros(B + 1, 2, dtype=torch.int64))
    elif kind == "sizes_dtype":
        with pytest.raises(TypeError, match="integers"):
            batch_linear_sum_assignment(cost, torch.zeros(B, 2))
    else:
        with pytest.raises(TypeError):
            linear_sum_assignment(np.array([["x"] * M] * N))


@FUZZ
@given(st.integers(1, 30), st.integers(1, 30), st.sampled_from([1e-30, 1e-3, 1.0, 1e15, 1e30]),
       st.integers(0, 2**31 - 1))
def test_fuzz_solver_numerical_range(n, m, scale, seed):
    """Costs spanning many magnitudes and both signs stay exact: float64 inside."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.pow(10.0, torch.randint(-30, 31, (n, m), generator=g).double())
    cost = torch.randn(n, m, generator=g, dtype=torch.float64) * mags * scale
    rows, cols = linear_sum_assignment(cost.numpy())
    want = scipy.optimize.linear_sum_assignment(cost.numpy())
    assert rows.tolist() == want[0].tolist() and cols.tolist() == want[1].tolist()
    half = (torch.rand(n, m, generator=g) * 2 - 1).mul(65504).half()  # float16 at its limits
    rows, cols = linear_sum_assignment(half)
    want = scipy.optimize.linear_sum_assignment(half.double().numpy())
    assert rows.tolist() == want[0].tolist() and cols.tolist() == want[1].tolist()


# --------------------------------------------------------------------------------------------
# The cost and mask kernels (CPU path, backend="torch") and the matcher.
#
# The references are the ones the unit tests use: `direct_cost` (tests/test_kernels_reference.py)
# evaluates the published formulas in float64 pair by pair; `reference_costs` (tests/test_matcher.py)
# builds each image's cost as the DETR / MaskFormer / Mask2Former matchers do, in float64, and
# scipy solves it.

import contextlib  # noqa: E402
import re  # noqa: E402

from test_kernels_reference import direct_cost  # noqa: E402
from test_matcher import reference_costs  # noqa: E402

from maskformer_fast.kernels import mask_cost_from_embeddings, mask_einsum, pairwise_mask_cost  # noqa: E402
from maskformer_fast.kernels import reference as kernel_reference  # noqa: E402
from maskformer_fast.matcher import HFHungarianMatcher, HungarianMatcher, pad_targets  # noqa: E402

LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TARGET_DTYPES = [torch.float32, torch.float16, torch.float64, torch.bool, torch.uint8]
NONFINITE = torch.tensor([float("nan"), float("inf"), -float("inf")])
WEIGHTS = [0.0, 0.5, 1.0, 2.0, 20.0]
INF = float("inf")


def relayout(t, kind):
    """The same values in another memory layout (a view into a larger or permuted buffer)."""
    if kind == "contiguous" or t.dim() < 2:
        return t
    if kind == "reversed":  # every stride order reversed
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1] + 1)  # "strided": every other element, offset 1
    big[..., 1::2] = t
    return big[..., 1::2]


LAYOUTS = st.sampled_from(["contiguous", "reversed", "strided"])


def sprinkle(t, g, rate):
    """NaN, +inf or -inf at a random `rate` of the entries."""
    if rate == 0 or t.numel() == 0:
        return t
    hit = torch.rand(t.shape, generator=g) < rate
    return torch.where(hit, NONFINITE[torch.randint(0, 3, t.shape, generator=g)].to(t.dtype), t)


def random_masks(draw, g, shape):
    """Targets in [0, 1]: hard (empty, random or full) in any dtype, or soft floats."""
    dtype = draw(st.sampled_from(TARGET_DTYPES))
    if dtype.is_floating_point and draw(st.booleans()):
        return torch.rand(shape, generator=g).to(dtype)
    return (torch.rand(shape, generator=g) < draw(st.sampled_from([0.0, 0.4, 1.0]))).to(dtype)


@contextlib.contextmanager
def one_thread():
    """The references are many tiny ops: on a loaded machine each OpenMP fork-join of a tiny op
    costs a scheduler quantum (milliseconds), so they run on one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def chunk_elements(n):
    """Forces the references' pixel chunking (several chunks, a ragged last one)."""
    saved = kernel_reference.CHUNK_ELEMENTS
    kernel_reference.CHUNK_ELEMENTS = n
    try:
        yield
    finally:
        kernel_reference.CHUNK_ELEMENTS = saved


@contextlib.contextmanager
def without_cpu_kernel():
    """The references' torch ops, as CUDA tensors and builds without the compiled CPU kernel
    (mask_cost_sums) run them."""
    saved = kernel_reference._use_cpu_kernel
    kernel_reference._use_cpu_kernel = lambda x: False
    try:
        yield
    finally:
        kernel_reference._use_cpu_kernel = saved


def cost_args(draw, g, B, Q, T, rate):
    """counts (None or [B], garbage in the padding), class logits and labels (or None), weights."""
    counts = None
    if draw(st.booleans()):
        counts = torch.randint(0, T + 1, (B,), generator=g)
        counts = counts.to(draw(st.sampled_from([torch.int64, torch.int32])))
    logits = labels = None
    if draw(st.booleans()):
        K = draw(st.integers(1, 4))
        logits = torch.randn(B, Q, K + 1, generator=g) * draw(st.sampled_from([1.0, 10.0]))
        logits = relayout(sprinkle(logits, g, rate).to(draw(st.sampled_from(LOGIT_DTYPES))), draw(LAYOUTS))
        labels = torch.randint(0, K + 1, (B, T), generator=g)
        if counts is not None:
            for b, n in enumerate(counts.tolist()):
                labels[b, n:] = draw(st.sampled_from([-7, K + 1, 10**6]))  # padding labels: anything
    weights = tuple(draw(st.sampled_from(WEIGHTS)) for _ in range(3))
    return counts, logits, labels, weights, draw(st.sampled_from(["bce", "focal"]))


def garbage_padding(y, counts, g):
    """Padding targets hold anything: NaN, inf, 7, 255."""
    if counts is None:
        return y
    y = y.clone()
    junk = {torch.bool: [True], torch.uint8: [255]}.get(y.dtype, [float("nan"), INF, 7.0])
    for b, n in enumerate(counts.tolist()):
        y[b, n:] = junk[int(torch.randint(0, len(junk), (), generator=g))]
    return y


def assert_cost_close(got, want, xabs, weights, counts):
    """`got` (fp32) against the float64 formulas: non-finite exactly where they are (a non-finite
    logit's row; +inf exactly in the padding columns), elsewhere within fp32 rounding of the
    size of the summed terms (|x| of the row's logits)."""
    B, Q, T = want.shape
    assert got.dtype == torch.float32 and got.shape == (B, Q, T)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), "non-finite entries differ"
    if counts is not None:
        padding = (torch.arange(T) >= counts.long()[:, None])[:, None, :].expand(B, Q, T)
        assert (got[padding] == INF).all()
    wc, wm, wd = (abs(w) for w in weights)
    size = torch.nan_to_num(xabs, nan=0.0, posinf=0.0).mean(-1, keepdim=True)  # [B, Q, 1]
    tol = (2e-5 * (wc + (wm + wd) * (1 + size))).expand(B, Q, T)
    err = (got.double() - want).abs()
    assert (err[finite] <= tol[finite]).all(), f"max error {(err - tol)[finite].max()} above tolerance"


@st.composite
def pairwise_cases(draw):
    B, Q, T = draw(st.integers(0, 3)), draw(st.integers(0, 5)), draw(st.integers(0, 5))
    P = draw(st.sampled_from([1, 2, 5, 16, 37]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rate = draw(st.sampled_from([0.0, 0.0, 0.05, 0.3]))
    x = torch.randn(B, Q, P, generator=g) * draw(st.sampled_from([0.1, 3.0, 30.0, 1e4]))
    x = sprinkle(x, g, rate).to(draw(st.sampled_from(LOGIT_DTYPES)))
    counts, logits, labels, weights, mask_cost = cost_args(draw, g, B, Q, T, rate)
    y = garbage_padding(random_masks(draw, g, (B, T, P)), counts, g)
    x, y = relayout(x, draw(LAYOUTS)), relayout(y, draw(LAYOUTS))
    return x, y, counts, logits, labels, weights, mask_cost


def check_pairwise(case, chunk, backend):
    x, y, counts, logits, labels, weights, mask_cost = case
    wc, wm, wd = weights
    with chunk_elements(chunk):
        got = pairwise_mask_cost(x, y, counts, logits, labels, w_class=wc, w_mask=wm, w_dice=wd,
                                 mask_cost=mask_cost, backend=backend)
    full = counts if counts is not None else torch.full((x.shape[0],), y.shape[1])
    with one_thread():  # a zero class weight drops the term: the kernel does not read the logits then
        want = direct_cost(x, y, full, logits if wc else None, labels, wc, wm, wd, mask_cost)
    assert_cost_close(got, want, x.double().abs(), weights, counts)


@FUZZ
@given(pairwise_cases(), st.sampled_from([1, 13, 1 << 20]))
def test_fuzz_pairwise_mask_cost_equals_formulas(case, chunk):
    """Any B, Q, T >= 0 and P >= 1, fp32 / fp16 / bf16 logits with NaN / inf, float / bool / uint8
    targets, garbage padding, any strides: the float64 formulas, pair by pair."""
    check_pairwise(case, chunk, "torch")


@TORCH_OPS_FUZZ
@given(pairwise_cases(), st.sampled_from([1, 13, 1 << 20]))
def test_fuzz_pairwise_mask_cost_torch_ops_equal_formulas(case, chunk):
    """The same cases through the references' torch ops (no compiled CPU kernel)."""
    with without_cpu_kernel():
        check_pairwise(case, chunk, "torch")


@TRITON_FUZZ
@given(pairwise_cases())
def test_fuzz_pairwise_mask_cost_triton_interpreter(case):
    """The same cases through the Triton kernel in the interpreter (no bfloat16 there)."""
    assume(not any(t is not None and t.dtype == torch.bfloat16 for t in case[:5]))
    check_pairwise(case, 1 << 20, "triton")


@st.composite
def embedding_cases(draw):
    B, Q, T, C = (draw(st.integers(0, 3)), draw(st.integers(0, 5)), draw(st.integers(0, 5)),
                  draw(st.integers(0, 6)))
    H, W = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rate = draw(st.sampled_from([0.0, 0.0, 0.05, 0.3]))
    embed = torch.randn(B, Q, C, generator=g) * draw(st.sampled_from([0.3, 1.0, 4.0]))
    feat = torch.randn(B, C, H, W, generator=g) * draw(st.sampled_from([0.3, 1.0, 4.0]))
    embed = relayout(sprinkle(embed, g, rate).to(draw(st.sampled_from(LOGIT_DTYPES))), draw(LAYOUTS))
    feat = relayout(sprinkle(feat, g, rate / 4).to(draw(st.sampled_from(LOGIT_DTYPES))), draw(LAYOUTS))
    counts, logits, labels, weights, mask_cost = cost_args(draw, g, B, Q, T, rate)
    y = relayout(garbage_padding(random_masks(draw, g, (B, T, H, W)), counts, g), draw(LAYOUTS))
    return embed, feat, y, counts, logits, labels, weights, mask_cost


def check_embeddings(case, chunk, backend):
    embed, feat, y, counts, logits, labels, weights, mask_cost = case
    wc, wm, wd = weights
    with chunk_elements(chunk):
        got = mask_cost_from_embeddings(embed, feat, y, counts, logits, labels, w_class=wc, w_mask=wm,
                                        w_dice=wd, mask_cost=mask_cost, backend=backend)
    x = torch.einsum("bqc,bchw->bqhw", embed.double(), feat.double()).flatten(2)
    xabs = torch.einsum("bqc,bchw->bqhw", embed.double().abs(), feat.double().abs()).flatten(2)
    full = counts if counts is not None else torch.full((x.shape[0],), y.shape[1])
    with one_thread():
        want = direct_cost(x, y.flatten(2), full, logits if wc else None, labels, wc, wm, wd, mask_cost)
    assert_cost_close(got, want, xabs, weights, counts)


@FUZZ
@given(embedding_cases(), st.sampled_from([1, 13, 1 << 20]))
def test_fuzz_cost_from_embeddings_equals_formulas(case, chunk):
    """The cost of einsum(embed, feat) without the logits: the formulas on the float64 einsum."""
    check_embeddings(case, chunk, "torch")


@TORCH_OPS_FUZZ
@given(embedding_cases(), st.sampled_from([1, 13, 1 << 20]))
def test_fuzz_cost_from_embeddings_torch_ops_equal_formulas(case, chunk):
    """The same cases through the references' torch ops (no compiled CPU kernel)."""
    with without_cpu_kernel():
        check_embeddings(case, chunk, "torch")


@TRITON_FUZZ
@given(embedding_cases())
def test_fuzz_cost_from_embeddings_triton_interpreter(case):
    """The same cases through the Triton kernel in the interpreter (no bfloat16 there)."""
    assume(not any(t is not None and t.dtype == torch.bfloat16 for t in case[:6]))
    check_embeddings(case, 1 << 20, "triton")


@FUZZ
@given(st.data())
def test_fuzz_mask_einsum_values_and_gradients(data):
    """Any sizes (empty ones included), dtypes (mixed ones promoted), strides, NaN / inf: the
    float64 einsum, within the dot-product rounding of the promoted dtype; gradients too."""
    draw = data.draw
    B, T, C, H, W = (draw(st.integers(0, 3)), draw(st.integers(0, 5)), draw(st.integers(0, 6)),
                     draw(st.integers(0, 5)), draw(st.integers(0, 5)))
    embed_dtype, feat_dtype = (draw(st.sampled_from(LOGIT_DTYPES + [torch.float64])) for _ in range(2))
    dtype = torch.promote_types(embed_dtype, feat_dtype)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rate = draw(st.sampled_from([0.0, 0.0, 0.05]))
    scales = st.sampled_from([0.3, 4.0])
    embed = sprinkle(torch.randn(B, T, C, generator=g) * draw(scales), g, rate).to(embed_dtype)
    feat = sprinkle(torch.randn(B, C, H, W, generator=g) * draw(scales), g, rate).to(feat_dtype)
    embed = relayout(embed, draw(LAYOUTS)).detach().requires_grad_(True)
    feat = relayout(feat, draw(LAYOUTS)).detach().requires_grad_(True)
    out = mask_einsum(embed, feat, backend="torch")
    assert out.shape == (B, T, H, W) and out.dtype == dtype
    e64, f64 = embed.detach().double(), feat.detach().double()

    def check(got, want, size, terms, dtype=dtype):
        assert got.dtype == dtype
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        tol = (terms + 2) * torch.finfo(dtype).eps * size + torch.finfo(dtype).smallest_normal
        assert ((got.detach().double() - want).abs() <= tol)[finite].all()

    check(out, torch.einsum("btc,bchw->bthw", e64, f64),
          torch.einsum("btc,bchw->bthw", e64.abs(), f64.abs()), C)
    if rate == 0 and out.numel():
        grad = torch.randn(out.shape, generator=g).to(dtype)
        g_embed, g_feat = torch.autograd.grad(out, (embed, feat), grad)
        g64 = grad.double()  # each gradient in its input's dtype (rounded to it at the end)
        check(g_embed, torch.einsum("bthw,bchw->btc", g64, f64),
              torch.einsum("bthw,bchw->btc", g64.abs(), f64.abs()), H * W, embed_dtype)
        check(g_feat, torch.einsum("bthw,btc->bchw", g64, e64),
              torch.einsum("bthw,btc->bchw", g64.abs(), e64.abs()), T, feat_dtype)


@st.composite
def matcher_cases(draw):
    entry = draw(st.sampled_from(["forward", "as_tensor", "match_layers", "hf"]))
    # mostly non-empty: an empty batch or no queries is an edge case, not the common case
    B, Q = draw(st.sampled_from([0, 1, 2, 2, 3, 3])), draw(st.sampled_from([0, 1, 2, 3, 4, 5, 5]))
    K = draw(st.integers(1, 4))
    L = draw(st.integers(1, 3)) if entry == "match_layers" else 1
    counts = [draw(st.integers(0, 7)) for _ in range(B)]  # 0 targets, T > Q
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))  # 1x1: P = 1
    H, W = (h, w) if draw(st.booleans()) else (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    weights = draw(st.tuples(*[st.sampled_from(WEIGHTS)] * 3).filter(any))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype, scale = draw(st.sampled_from(LOGIT_DTYPES)), draw(st.sampled_from([0.3, 3.0, 30.0, 1e4]))
    rate = draw(st.sampled_from([0.0, 0.0, 0.02, 0.15]))
    layers = []
    for _ in range(L):
        logits = sprinkle(torch.randn(B, Q, K + 1, generator=g) * scale, g, rate).to(dtype)
        masks = sprinkle(torch.randn(B, Q, h, w, generator=g) * scale, g, rate).to(dtype)
        if B and Q and draw(st.booleans()):  # a diverged query: all of its mask NaN
            b, q = int(torch.randint(0, B, (), generator=g)), int(torch.randint(0, Q, (), generator=g))
            masks[b, q] = float("nan")
        layers.append({"pred_logits": relayout(logits, draw(LAYOUTS)),
                       "pred_masks": relayout(masks, draw(LAYOUTS))})
    targets = []
    for t in counts:
        size = (H, W) if t or draw(st.booleans()) else (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
        targets.append({"labels": torch.randint(0, K, (t,), generator=g),
                        "masks": relayout(random_masks(draw, g, (t, *size)), draw(LAYOUTS))})
    return dict(entry=entry, layers=layers, targets=targets, weights=weights,
                num_points=draw(st.sampled_from([0, 0, 1, 5, 17])),
                mask_cost="bce" if entry == "hf" else draw(st.sampled_from(["bce", "focal"])),
                nonfinite=draw(st.sampled_from(["raise", "forbid"])), autocast=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def run_matcher(case):
    """Calls the entry point; returns one col4row [B, Q] per layer, or the ValueError's message."""
    wc, wm, wd = case["weights"]
    kw = dict(nonfinite=case["nonfinite"], generator=torch.Generator().manual_seed(case["seed"]),
              backend="torch")
    layers, targets = case["layers"], case["targets"]
    B, Q = layers[0]["pred_logits"].shape[:2]
    if case["entry"] == "hf":
        matcher = HFHungarianMatcher(wc, wm, wd, case["num_points"], **kw)
    else:
        matcher = HungarianMatcher(wc, wm, wd, case["num_points"], case["mask_cost"], **kw)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["autocast"]):
            if case["entry"] == "match_layers":
                return matcher.match_layers(layers, targets)
            if case["entry"] == "as_tensor":
                return [matcher(layers[0], targets, as_tensor=True)]
            if case["entry"] == "hf":
                pairs = matcher(layers[0]["pred_masks"], layers[0]["pred_logits"],
                                [t["masks"] for t in targets], [t["labels"] for t in targets])
            else:
                pairs = matcher(layers[0], targets)
    except ValueError as exc:
        return str(exc)
    assert len(pairs) == B
    col4row = torch.full((B, Q), -1, dtype=torch.int64)
    for b, (rows, cols) in enumerate(pairs):
        assert rows.dtype == cols.dtype == torch.int64 and rows.shape == cols.shape
        assert (rows[1:] > rows[:-1]).all()
        col4row[b, rows] = cols
    return [col4row]


@FUZZ
@given(matcher_cases())
def test_fuzz_matcher_equals_per_image_scipy(case):
    """HungarianMatcher.forward (pairs and as_tensor), match_layers and HFHungarianMatcher on
    random batches: 0 targets, T > Q, P = 1, point sampling, fp32 / fp16 / bf16 predictions
    (under autocast or not), float / bool / uint8 targets of another size, strides, NaN / inf.

    The reference builds each image's cost in float64 (tests/test_matcher.py) and solves it with
    scipy. nonfinite="raise": a ValueError naming the first image (and decoder output) whose
    cost is not finite; "forbid": those pairs are scipy's +inf, an image without a complete
    matching raises naming it (as_tensor: comes back all -1)."""
    got = run_matcher(case)
    layers, targets, (wc, wm, wd) = case["layers"], case["targets"], case["weights"]
    gen = torch.Generator().manual_seed(case["seed"])  # the points, drawn in the matcher's order
    costs = []
    for layer in layers:  # a zero class weight drops the class term (the logits are not read)
        if not wc:
            layer = dict(layer, pred_logits=torch.zeros(layer["pred_logits"].shape))
        with one_thread():
            costs.append(reference_costs(layer, targets, wc, wm, wd, case["mask_cost"],
                                         case["num_points"], gen))
    items = [(l, b, c) for l, per_image in enumerate(costs) for b, c in enumerate(per_image)]
    bad = [(l, b) for l, b, c in items if not torch.isfinite(c).all()]
    if case["nonfinite"] == "raise" and bad:
        l, b = bad[0]
        assert isinstance(got, str), "expected a ValueError for a non-finite cost"
        assert re.search(rf"image {b} is not finite", got) and ("decoder output" in got) == (l > 0), got
        if l:
            assert f"decoder output {l}" in got
        return
    solved, infeasible = {}, []
    for l, b, c in items:
        c = torch.where(torch.isfinite(c), c, INF)
        try:
            solved[l, b] = c, scipy.optimize.linear_sum_assignment(c.numpy())
        except ValueError:
            infeasible.append((l, b))
    if infeasible and case["entry"] != "as_tensor":
        assert isinstance(got, str) and f"image {infeasible[0][1]} has no complete matching" in got, got
        return
    assert not isinstance(got, str), got
    assert len(got) == len(layers)
    for (l, b), (c, (r, cc)) in solved.items():
        row = got[l][b]
        assert row.dtype == torch.int64
        rows = torch.nonzero(row >= 0).flatten()
        assert_same_optimum(c, rows, row[rows], r, cc, layers[l]["pred_masks"][b], case["weights"])
    for l, b in infeasible:
        assert (got[l][b] == -1).all()


def assert_same_optimum(cost, rows, cols, want_rows, want_cols, masks, weights):
    """scipy's indices; or, only on a near-tie that fp32 costs cannot resolve (the matcher
    computes in fp32, the reference in float64), another complete matching of the same
    total cost within fp32 rounding."""
    assert len(rows) == len(want_rows) == min(cost.shape)
    if rows.tolist() == want_rows.tolist() and cols.tolist() == want_cols.tolist():
        return
    assert len(set(cols.tolist())) == len(cols) and (cols < cost.shape[1]).all()
    size = torch.nan_to_num(masks.double().abs(), nan=0.0, posinf=0.0).max() if masks.numel() else 0
    wc, wm, wd = weights
    tol = 2 * len(rows) * 2e-5 * (wc + (wm + wd) * (1 + size))
    ours, best = cost[rows, cols].sum(), cost[want_rows, want_cols].sum()
    assert torch.isfinite(ours) and abs(ours - best) <= tol, (rows, cols, want_rows, want_cols, ours, best)


@FUZZ
@given(st.data())
def test_fuzz_kernels_and_matcher_reject_bad_input(data):
    """Disagreeing shapes, unknown options and malformed targets: a ValueError saying what is
    wrong, never a crash."""
    draw = data.draw
    kind = draw(st.sampled_from(["cost_shapes", "counts", "class", "pair", "options", "embed_shapes",
                                 "einsum_shapes", "n_targets", "labels_masks", "mask_sizes", "matcher_args"]))
    B, Q, T, P = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)),
                  draw(st.integers(1, 9)))
    x, y = torch.randn(B, Q, P), torch.rand(B, T, P)
    other = st.integers(0, 5)
    if kind == "cost_shapes":
        xs = draw(st.lists(other, min_size=1, max_size=4))
        ys = draw(st.lists(other, min_size=1, max_size=4))
        if len(xs) == len(ys) == 3 and xs[0] == ys[0] and xs[2] == ys[2]:
            ys[2] += 1
        with pytest.raises(ValueError, match="pairwise_mask_cost"):
            pairwise_mask_cost(torch.randn(xs), torch.rand(ys), backend="torch")
    elif kind == "counts":
        n = draw(st.integers(0, 5).filter(lambda n: n != B))
        with pytest.raises(ValueError, match="tgt_counts"):
            pairwise_mask_cost(x, y, torch.zeros(n, dtype=torch.int64), backend="torch")
    elif kind == "class":
        shape = draw(st.lists(other, min_size=1, max_size=4))
        labels = torch.zeros(B, T, dtype=torch.int64)
        if len(shape) == 3 and shape[:2] == [B, Q]:
            labels = torch.zeros(B, T + 1, dtype=torch.int64)  # then the labels disagree
        with pytest.raises(ValueError, match="class_logits|tgt_labels"):
            pairwise_mask_cost(x, y, None, torch.randn(shape), labels, backend="torch")
    elif kind == "pair":
        args = draw(st.sampled_from([(torch.randn(B, Q, 3), None),
                                     (None, torch.zeros(B, T, dtype=torch.int64))]))
        with pytest.raises(ValueError, match="go together"):
            pairwise_mask_cost(x, y, None, *args, backend="torch")
    elif kind == "options":
        name = "no-such-" + draw(st.text(max_size=5))
        option = draw(st.sampled_from(["mask_cost", "backend"]))
        fn = draw(st.sampled_from([lambda **k: pairwise_mask_cost(x, y, **k),
                                   lambda **k: mask_cost_from_embeddings(x, torch.randn(B, P, 2, 2),
                                                                         torch.rand(B, T, 2, 2), **k)]))
        with pytest.raises(ValueError, match=option):
            fn(**{option: name})
    elif kind in ("embed_shapes", "einsum_shapes"):
        shapes = [[B, Q, 3], [B, 3, 4, 5], [B, T, 4, 5]]
        # the dimensions that must agree (Q, T, and H, W for mask_einsum, are free); None: one too many
        if kind == "embed_shapes":
            tied = [[0, 2, None], [0, 1, 2, 3, None], [0, 2, 3, None]]
        else:
            tied = [[0, 2, None], [0, 1, None]]
        which = draw(st.integers(0, len(tied) - 1))
        dim = draw(st.sampled_from(tied[which]))
        if dim is None:
            shapes[which].append(2)
        else:
            shapes[which][dim] += draw(st.integers(1, 3))
        tensors = [torch.randn(s) for s in shapes]
        name = "mask_cost_from_embeddings" if kind == "embed_shapes" else "mask_einsum"
        with pytest.raises(ValueError, match=name):
            if kind == "embed_shapes":
                mask_cost_from_embeddings(*tensors, backend="torch")
            else:
                mask_einsum(*tensors[:2], backend="torch")
    elif kind == "matcher_args":
        args = draw(st.sampled_from([dict(cost_class=0, cost_mask=0, cost_dice=0), dict(mask_cost="l2"),
                                     dict(nonfinite="ignore"), dict(num_points=-1)]))
        with pytest.raises(ValueError):
            HungarianMatcher(**args)
    else:
        outputs = {"pred_logits": torch.randn(B, Q, 3), "pred_masks": torch.randn(B, Q, 4, 4)}
        targets = [{"labels": torch.zeros(T, dtype=torch.int64), "masks": torch.ones(T, 4, 4)}
                   for _ in range(B)]
        b = draw(st.integers(0, B - 1))
        if kind == "n_targets":
            targets = targets + [targets[0]] if draw(st.booleans()) else targets[:-1]
            match = f"{len(targets)} targets for a batch of {B}"
        elif kind == "labels_masks":
            targets[b]["masks"] = torch.ones(T + draw(st.sampled_from([-1, 1])), 4, 4)
            match = rf"targets\[{b}\]"
        else:
            # the matcher takes targets of several sizes; pad_targets' strict mode does not
            targets = targets + [{"labels": torch.zeros(1, dtype=torch.int64),
                                  "masks": torch.ones(1, 5, 4)}]
            with pytest.raises(ValueError, match="share one size"):
                pad_targets(targets, torch.device("cpu"))
            return
        with pytest.raises(ValueError, match=match):
            HungarianMatcher()(outputs, targets)
