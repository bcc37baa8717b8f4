"""Property-based fuzzing of the public entry points against their references.

CI runs a slice (the default profile). The long run, at least 100,000 solver cases:

    FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/test_fuzz.py -q -p no:randomly

Each case is a whole batch of random problems (random shapes, dtypes, strides, NaN / inf
patterns, ragged sizes), so FUZZ_EXAMPLES examples check several times as many problems.
"""

import os

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskformer_fast.hungarian import batch_linear_sum_assignment, linear_sum_assignment

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 400,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

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
def test_fuzz_batch_equals_scipy(case):
    cost, sizes, maximize = case
    res = batch_linear_sum_assignment(cost, sizes, maximize=maximize, errors="status")
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


@FUZZ
@given(st.data())
def test_fuzz_bad_input_is_a_clear_error(data):
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
def test_fuzz_numerical_range(n, m, scale, seed):
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
