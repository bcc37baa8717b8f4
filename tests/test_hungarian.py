"""maskformer_fast.hungarian against scipy.optimize.linear_sum_assignment, index for index."""

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from maskformer_fast import _ops
from maskformer_fast.hungarian import Status, batch_linear_sum_assignment, linear_sum_assignment

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
]  # fmt: skip


def scipy_solve(item: np.ndarray, maximize: bool = False):
    """scipy's (row_ind, col_ind), or its error message."""
    try:
        return scipy.optimize.linear_sum_assignment(item, maximize=maximize)
    except ValueError as exc:
        return str(exc)


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def assert_batch_matches_scipy(cost: torch.Tensor, sizes=None, maximize=False) -> int:
    """Solves the batch with errors="status" and checks every item against scipy."""
    res = batch_linear_sum_assignment(cost, sizes, maximize=maximize, errors="status")
    pairs = res.pairs()
    B, N, M = cost.shape
    for b in range(B):
        n, m = (N, M) if sizes is None else (int(sizes[b][0]), int(sizes[b][1]))
        want = scipy_solve(to_numpy64(cost[b, :n, :m]), maximize)
        if isinstance(want, str):
            code = Status.INFEASIBLE if "infeasible" in want else Status.INVALID
            assert int(res.status[b]) == code, (b, want)
            assert (res.col4row[b] == -1).all()
            continue
        assert int(res.status[b]) == 0, (b, cost[b, :n, :m])
        rows, cols = pairs[b]
        np.testing.assert_array_equal(rows.numpy(), want[0], err_msg=f"item {b}")
        np.testing.assert_array_equal(cols.numpy(), want[1], err_msg=f"item {b}")
        assert (res.col4row[b, n:] == -1).all()
    return B


def random_costs(g: torch.Generator, B: int, N: int, M: int, kind: str) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(B, N, M, generator=g, dtype=torch.float64)
    if kind == "ties":  # few distinct values: the hard case for tie-breaking
        return torch.randint(0, 4, (B, N, M), generator=g).double()
    if kind == "constant":
        return torch.full((B, N, M), 3.0, dtype=torch.float64)
    if kind == "signed_zero":
        signs = torch.randint(0, 2, (B, N, M), generator=g).bool()
        zero = torch.where(signs, torch.tensor(-0.0), torch.tensor(0.0)).double()
        return torch.where(torch.rand(B, N, M, generator=g) < 0.5, zero, torch.ones(B, N, M).double())
    if kind == "forbidden":  # +inf edges, some items infeasible
        c = torch.randint(0, 5, (B, N, M), generator=g).double()
        return c.masked_fill(torch.rand(B, N, M, generator=g) < 0.4, float("inf"))
    if kind == "normal_wide":
        return torch.randn(B, N, M, generator=g, dtype=torch.float64) * 1e6
    raise ValueError(kind)


KINDS = ["uniform", "ties", "constant", "signed_zero", "forbidden", "normal_wide"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("maximize", [False, True])
def test_parity_ragged_corpus(kind, maximize):
    """Sizes 0..64 in both orientations, ragged inside a NaN-padded batch."""
    g = torch.Generator().manual_seed(2 * KINDS.index(kind) + maximize)
    solved = 0
    for N, M in [(1, 1), (1, 9), (9, 1), (8, 8), (16, 5), (5, 16), (33, 64), (64, 33), (64, 64)]:
        B = 160
        cost = random_costs(g, B, N, M, kind)
        sizes = torch.stack(
            [torch.randint(0, N + 1, (B,), generator=g), torch.randint(0, M + 1, (B,), generator=g)], 1
        )
        sizes[:4] = torch.tensor([[N, M], [0, M], [N, 0], [0, 0]])
        padded = cost.clone()
        for b in range(B):
            n, m = sizes[b].tolist()
            padded[b, n:, :] = float("nan")
            padded[b, :, m:] = float("nan")
        solved += assert_batch_matches_scipy(padded, sizes, maximize)
    assert solved == 9 * 160


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_every_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        cost = torch.rand(200, 7, 9, generator=g) < 0.5
    elif dtype.is_floating_point:
        cost = (torch.randn(200, 7, 9, generator=g) * 50).to(dtype)
    else:
        lo = 0 if dtype == torch.uint8 else -20
        cost = torch.randint(lo, 20, (200, 7, 9), generator=g).to(dtype)
    assert_batch_matches_scipy(cost)
    assert_batch_matches_scipy(cost.transpose(1, 2), maximize=True)
    r, c = linear_sum_assignment(cost[0])
    want = scipy.optimize.linear_sum_assignment(to_numpy64(cost[0]))
    assert r.dtype == torch.int64 and c.dtype == torch.int64
    assert r.tolist() == want[0].tolist() and c.tolist() == want[1].tolist()


def test_parity_strided_views():
    g = torch.Generator().manual_seed(2)
    base = torch.randint(0, 6, (40, 30, 50), generator=g).float()
    views = [
        base.transpose(1, 2),
        base[:, ::2, ::3],
        base[::2, 1:, :-1].transpose(1, 2),
        base.permute(2, 0, 1)[:20, :10],
        base[:1, :1].expand(8, 12, 50),
    ]
    for view in views:
        assert not view.is_contiguous()
        assert_batch_matches_scipy(view)
    arr = base.numpy()[:, ::-1, ::2]  # negative strides
    res = batch_linear_sum_assignment(arr)
    for b, (rows, cols) in enumerate(res.pairs()):
        want = scipy.optimize.linear_sum_assignment(arr[b])
        assert rows.tolist() == want[0].tolist() and cols.tolist() == want[1].tolist()


def test_parity_seeded_random_volume():
    """Twelve thousand more problems across shapes, orientations and tie levels."""
    g = torch.Generator().manual_seed(3)
    solved = 0
    for it in range(60):
        N, M = torch.randint(1, 41, (2,), generator=g).tolist()
        levels = [2, 3, 10, 1000, 0][it % 5]
        if levels:
            cost = torch.randint(0, levels, (200, N, M), generator=g).float()
        else:
            cost = torch.rand(200, N, M, generator=g)
        solved += assert_batch_matches_scipy(cost, maximize=bool(it % 2))
    assert solved == 12000


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=12),
        elements=st.sampled_from([0.0, -0.0, 1.0, 2.0, 2.5, -3.0, 1e300, -1e300, np.inf]),
    ),
    st.booleans(),
)
def test_parity_hypothesis(cost, maximize):
    want = scipy_solve(cost, maximize)
    if isinstance(want, str):
        with pytest.raises(ValueError, match=want):
            linear_sum_assignment(cost, maximize=maximize)
        return
    rows, cols = linear_sum_assignment(cost, maximize=maximize)
    assert isinstance(rows, np.ndarray) and rows.dtype == np.int64
    np.testing.assert_array_equal(rows, want[0])
    np.testing.assert_array_equal(cols, want[1])


@pytest.mark.parametrize("lanes", [2, 32, 256, 1024])
def test_simulated_teams_identical(lanes):
    """A team of any width gives the sequential team's indices and bit-identical duals."""
    g = torch.Generator().manual_seed(lanes)
    op = torch.ops.maskformer_fast.lsa_duals
    for kind in KINDS:
        for N, M in [(7, 7), (20, 45), (45, 20), (64, 64)]:
            cost = random_costs(g, 20, N, M, kind)
            seq = op(cost, None, False, 1)
            sim = op(cost, None, False, lanes)
            for a, b in zip(seq, sim):
                assert torch.equal(a, b), kind
            assert torch.equal(seq[2].view(torch.int64), sim[2].view(torch.int64))
            assert torch.equal(seq[3].view(torch.int64), sim[3].view(torch.int64))


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_batches_small_and_large_on_two_threads(two_threads):
    """Below 16K entries in all a batch is solved by the calling thread, above by both
    threads taking items as they come: scipy's indices either way (ragged, tied)."""
    g = torch.Generator().manual_seed(12)
    for B in (8, 80):  # 8 * 1200 and 80 * 1200 entries
        cost = torch.randint(0, 4, (B, 40, 30), generator=g).float()
        assert assert_batch_matches_scipy(cost) == B
        sizes = torch.stack([torch.randint(0, 41, (B,), generator=g),
                             torch.randint(0, 31, (B,), generator=g)], 1)
        assert assert_batch_matches_scipy(cost, sizes) == B


@pytest.mark.parametrize("kind", KINDS)
def test_single_wide_problem_on_two_threads(kind, two_threads):
    """A single problem of 512 columns or more (after orientation) is solved by two threads
    together (lsa::PairTeam): scipy's indices and statuses, and the duals of the simulated
    team, bit for bit; the same with one thread. Tall (transposed and copied), maximised,
    float32 read in place, NaN entries in either half of the columns (each thread checks
    its own) and an infeasible row before a NaN (invalid wins) are each one case.
    (Parting mid-solve, which depends on timing, is forced in the harness: test_build.)"""
    g = torch.Generator().manual_seed(11)
    op = torch.ops.maskformer_fast.lsa_duals
    for N, M, maximize in [(300, 700, False), (520, 520, True), (800, 530, False)]:
        cost = random_costs(g, 1, N, M, kind)
        assert_batch_matches_scipy(cost, maximize=maximize)
        pair, sim = op(cost, None, maximize, 1), op(cost, None, maximize, 32)
        torch.set_num_threads(1)
        alone = op(cost, None, maximize, 1)
        torch.set_num_threads(2)
        for other in (sim, alone):
            assert torch.equal(pair[0], other[0]) and torch.equal(pair[1], other[1])
            assert torch.equal(pair[2].view(torch.int64), other[2].view(torch.int64))
            assert torch.equal(pair[3].view(torch.int64), other[3].view(torch.int64))
    cost = torch.rand(1, 600, 600, generator=g)  # float32, read in place: checked in halves
    assert_batch_matches_scipy(cost)
    for row, col in [(5, 7), (590, 7), (5, 590), (590, 590)]:
        bad = cost.clone()
        bad[0, row, col] = float("nan")
        res = batch_linear_sum_assignment(bad, errors="status")
        assert int(res.status[0]) == Status.INVALID, (row, col)
    bad[0, 3, :] = float("inf")  # infeasible at row 3, long before the NaN at row 590
    assert int(batch_linear_sum_assignment(bad, errors="status").status[0]) == Status.INVALID
    bad[0, 590, 590] = 0.5
    assert int(batch_linear_sum_assignment(bad, errors="status").status[0]) == Status.INFEASIBLE


@pytest.mark.parametrize("kind", ["uniform", "ties", "normal_wide", "forbidden"])
def test_duals_certify_optimality(kind):
    """Independent check of the LP optimality conditions, from the duals alone:
    u_i + v_j <= c_ij everywhere, with equality on the matching, v <= 0, and v = 0 on
    unmatched columns (rows n <= m; the caller's orientation swaps u and v otherwise)."""
    g = torch.Generator().manual_seed(7)
    for N, M in [(10, 10), (12, 30), (30, 12)]:
        cost = random_costs(g, 30, N, M, kind)
        col4row, status, u, v = torch.ops.maskformer_fast.lsa_duals(cost, None, False, 1)
        scale = cost[torch.isfinite(cost)].abs().max().item() if torch.isfinite(cost).any() else 1
        tol = 1e-9 * max(scale, 1.0)
        for b in range(30):
            if status[b] != 0:
                continue
            c = cost[b]
            slack = c - u[b][:, None] - v[b][None, :]
            assert (slack[torch.isfinite(c)] >= -tol).all()
            rows = torch.nonzero(col4row[b] >= 0).flatten()
            cols = col4row[b][rows]
            assert slack[rows, cols].abs().max() <= tol
            # the side with more entries carries the non-positive duals
            free_side, matched = (v[b], cols) if N <= M else (u[b], rows)
            assert (free_side <= tol).all()
            unmatched = torch.ones(len(free_side), dtype=torch.bool)
            unmatched[matched] = False
            assert (free_side[unmatched] == 0).all()
            # strong duality: the matching's cost equals the dual objective
            total = c[rows, cols].sum()
            assert torch.isclose(total, u[b].sum() + v[b].sum(), rtol=1e-9, atol=tol)


def test_status_mixed_batch_and_raise():
    cost = torch.rand(7, 4, 4, dtype=torch.float64)
    cost[1, 2, :] = float("inf")  # row 2 has no finite edge: infeasible
    cost[3, 0, 1] = float("nan")
    cost[4, 3, 3] = -float("inf")
    cost[6, 0, :] = float("inf")  # infeasible at the first row, invalid at the last: invalid
    cost[6, 3, 0] = float("nan")
    res = batch_linear_sum_assignment(cost, errors="status")
    assert res.status.tolist() == [0, 1, 0, 2, 2, 0, 2]
    assert (res.col4row[[1, 3, 4, 6]] == -1).all()
    assert_batch_matches_scipy(cost)
    assert batch_linear_sum_assignment(cost.float(), errors="status").status.tolist() == res.status.tolist()
    # the op's own check (C++, csrc/lsa/status.h) and the Python one (scipy backend) alike
    for backend in ("auto", "scipy"):
        with pytest.raises(ValueError) as info:
            batch_linear_sum_assignment(cost, backend=backend)
        assert str(info.value) == "cost matrix is infeasible (batch item 1)"
        with pytest.raises(ValueError) as info:
            batch_linear_sum_assignment(cost[2:], backend=backend)  # item 3 is item 1 here
        assert str(info.value) == "matrix contains invalid numeric entries (batch item 1)"
    res_max = batch_linear_sum_assignment(torch.tensor([[[1.0, float("inf")]]]), maximize=True,
                                          errors="status")
    assert res_max.status.tolist() == [2]


def test_scipy_errors_single():
    with pytest.raises(ValueError, match="matrix contains invalid numeric entries"):
        linear_sum_assignment(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="matrix contains invalid numeric entries"):
        linear_sum_assignment(torch.tensor([[1.0, -float("inf")]]))
    with pytest.raises(ValueError, match="matrix contains invalid numeric entries"):
        linear_sum_assignment([[1.0, float("inf")]], maximize=True)
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        linear_sum_assignment([[np.inf, np.inf], [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"expected a matrix \(2-D array\), got a 1 array"):
        linear_sum_assignment(np.zeros(3))
    with pytest.raises(ValueError, match=r"expected a matrix \(2-D array\), got a 3 array"):
        linear_sum_assignment(torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match="Cannot cast array data"):
        linear_sum_assignment(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(TypeError, match="Cannot cast array data"):
        linear_sum_assignment(np.ones((2, 2), dtype=np.complex128))
    with pytest.raises(TypeError, match="Cannot cast tensor"):
        linear_sum_assignment(torch.ones(2, 2, dtype=torch.complex64))


def test_batch_input_errors():
    cost = torch.rand(3, 4, 5)
    with pytest.raises(ValueError, match=r"expected a batch of matrices"):
        batch_linear_sum_assignment(torch.rand(4, 5))
    with pytest.raises(ValueError, match=r"sizes\[1\] = \(5, 2\) is outside .*batch item 1"):
        batch_linear_sum_assignment(cost, [[1, 1], [5, 2], [0, 0]])
    with pytest.raises(ValueError, match=r"sizes\[2\] = \(-1, 2\)"):
        batch_linear_sum_assignment(cost, [[1, 1], [2, 2], [-1, 2]])
    with pytest.raises(ValueError, match=r"shape \[B, 2\] = \[3, 2\]"):
        batch_linear_sum_assignment(cost, [[1, 1], [2, 2]])
    with pytest.raises(TypeError, match="sizes must hold integers"):
        batch_linear_sum_assignment(cost, torch.ones(3, 2))
    with pytest.raises(ValueError, match="errors must be"):
        batch_linear_sum_assignment(cost, errors="ignore")
    with pytest.raises(ValueError, match="backend must be one of"):
        batch_linear_sum_assignment(cost, backend="gpu")
    with pytest.raises(ValueError, match="needs a cost tensor on cuda"):
        batch_linear_sum_assignment(cost, backend="cuda")
    # the op itself validates too, for callers that bypass the Python face
    with pytest.raises(ValueError, match="outside the padded problem"):
        torch.ops.maskformer_fast.lsa(cost, torch.tensor([[9, 1]] * 3), False)
    with pytest.raises(ValueError, match=r"\[B, N, M\]"):
        torch.ops.maskformer_fast.lsa(torch.rand(3, 3), None, False)


def test_empty_shapes():
    for shape in [(5, 0), (0, 5), (0, 0)]:
        r, c = linear_sum_assignment(np.zeros(shape))
        want = scipy.optimize.linear_sum_assignment(np.zeros(shape))
        assert r.dtype == want[0].dtype == np.int64 and len(r) == len(c) == 0
    res = batch_linear_sum_assignment(torch.zeros(0, 3, 4))
    assert res.col4row.shape == (0, 3) and res.status.shape == (0,)
    assert res.pairs() == []


def test_constant_matrix_gives_identity():
    for n, m in [(5, 5), (3, 7), (7, 3)]:
        r, c = linear_sum_assignment(torch.ones(n, m))
        k = min(n, m)
        assert r.tolist() == list(range(k)) and c.tolist() == list(range(k))


def test_numpy_in_numpy_out_and_list_input():
    cost = [[4, 1, 3], [2, 0, 5], [3, 2, 2]]
    r, c = linear_sum_assignment(cost)
    assert isinstance(r, np.ndarray) and r.tolist() == [0, 1, 2] and c.tolist() == [1, 0, 2]
    res = batch_linear_sum_assignment(np.array([cost, cost]))
    assert isinstance(res.col4row, np.ndarray) and res.col4row.dtype == np.int64
    assert res.status.dtype == np.int32
    assert [p[1].tolist() for p in res.pairs()] == [[1, 0, 2], [1, 0, 2]]


def test_scipy_backend_and_fallback(monkeypatch):
    g = torch.Generator().manual_seed(5)
    cost = torch.randint(0, 3, (50, 6, 9), generator=g).float()
    sizes = torch.stack([torch.randint(0, 7, (50,), generator=g), torch.randint(0, 10, (50,), generator=g)], 1)
    native = batch_linear_sum_assignment(cost, sizes)
    via_scipy = batch_linear_sum_assignment(cost, sizes, backend="scipy")
    assert torch.equal(native.col4row, via_scipy.col4row)
    assert torch.equal(native.status, via_scipy.status)
    monkeypatch.setattr(_ops, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(_ops, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="falling back to scipy"):
        fallback = batch_linear_sum_assignment(cost, sizes)
    assert torch.equal(fallback.col4row, native.col4row)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        batch_linear_sum_assignment(cost, sizes)
    with pytest.raises(RuntimeError, match="no cpu kernel"):
        batch_linear_sum_assignment(cost, backend="cpu")


@pytest.mark.parametrize("op_name", ["lsa", "lsa_duals"])
def test_opcheck(op_name):
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(4, 5, 7, generator=g)
    sizes = torch.tensor([[5, 7], [3, 7], [5, 2], [0, 0]])
    op = getattr(torch.ops.maskformer_fast, op_name).default
    extra = (1,) if op_name == "lsa_duals" else ()
    for args in [(cost, None, False), (cost, sizes, True), (cost.transpose(1, 2), None, False)]:
        torch.library.opcheck(op, args + extra)
    if op_name == "lsa":  # raise_errors on items that all solve
        torch.library.opcheck(op, (cost, sizes, False, True))


def test_torch_compile():
    @torch.compile(backend="eager", fullgraph=True)
    def f(cost):
        return torch.ops.maskformer_fast.lsa(cost, None, False)

    cost = torch.rand(3, 4, 6)
    assert torch.equal(f(cost)[0], batch_linear_sum_assignment(cost).col4row)
