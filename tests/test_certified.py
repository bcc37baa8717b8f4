"""The certified fast path (method="certified"): scipy's indices on every problem, the proof
taken where the optimum is unique by a margin, refused where it is not.

Which path produced an item shows in its duals: those of the certified path (Jonker-
Volgenant's) differ from those of scipy's order, which an item whose proof fails is solved
again in.
"""

import itertools

import numpy as np
import pytest
import scipy.optimize
import torch

from maskformer_fast.hungarian import batch_linear_sum_assignment, linear_sum_assignment

OPS = torch.ops.maskformer_fast
CERTIFIED, ORDERED = 1, 2


def duals(cost, method, maximize=False):
    return OPS.lsa_duals(cost, None, maximize, 1, None, method)


def took_fast_path(cost: torch.Tensor, maximize=False) -> list[bool]:
    """Per item, whether method="certified" kept its own result (its duals are not scipy-order's)."""
    fast, ordered = duals(cost, CERTIFIED, maximize), duals(cost, ORDERED, maximize)
    return [not (torch.equal(fast[2][b], ordered[2][b]) and torch.equal(fast[3][b], ordered[3][b]))
            for b in range(cost.shape[0])]


def assert_scipy_indices(cost: torch.Tensor, maximize=False, method="certified"):
    res = batch_linear_sum_assignment(cost, maximize=maximize, method=method)
    for b, (rows, cols) in enumerate(res.pairs()):
        want = scipy.optimize.linear_sum_assignment(cost[b].double().numpy(), maximize=maximize)
        np.testing.assert_array_equal(rows.numpy(), want[0], err_msg=f"item {b}")
        np.testing.assert_array_equal(cols.numpy(), want[1], err_msg=f"item {b}")


def near_ties(g, B, n, ulps):
    """A unique optimum that beats the next assignment by `ulps` units in the last place:
    every entry 1.0, the diagonal lowered by ulps ulp of 1.0."""
    cost = torch.ones(B, n, n, dtype=torch.float64)
    cost.diagonal(dim1=1, dim2=2).sub_(ulps * np.spacing(1.0))
    perm = torch.randperm(n, generator=g)
    return cost[:, perm]


def adversarial(kind: str, g: torch.Generator, B: int, n: int) -> torch.Tensor:
    """Square costs built to defeat a certificate that accepts too much."""
    if kind == "uniform32":
        return torch.rand(B, n, n, generator=g)
    if kind == "uniform64":
        return torch.rand(B, n, n, generator=g, dtype=torch.float64)
    if kind.startswith("ulp"):  # ulp1 .. ulp4
        return near_ties(g, B, n, int(kind[3:]))
    if kind == "offset":  # a huge common offset, differences near its rounding
        return 1e12 + torch.randint(0, 3, (B, n, n), generator=g).double() * 2.0**-12
    if kind == "offset_unique":  # the same offset, differences far above its rounding
        return 1e6 + torch.rand(B, n, n, generator=g, dtype=torch.float64)
    if kind == "dup_rows":
        c = torch.rand(B, n, n, generator=g, dtype=torch.float64)
        c[:, n // 2] = c[:, 0]
        return c
    if kind == "dup_cols":
        c = torch.rand(B, n, n, generator=g, dtype=torch.float64)
        c[:, :, -1] = c[:, :, 1]
        return c
    if kind == "integers":
        return torch.randint(0, 10, (B, n, n), generator=g).double()
    if kind == "binary":
        return torch.randint(0, 2, (B, n, n), generator=g).float()
    if kind == "constant":
        return torch.full((B, n, n), 7.0)
    if kind == "wide":
        return torch.randn(B, n, n, generator=g, dtype=torch.float64) * 1e6
    raise ValueError(kind)


KINDS = ["uniform32", "uniform64", "ulp1", "ulp2", "ulp3", "ulp4", "offset", "offset_unique",
         "dup_rows", "dup_cols", "integers", "binary", "constant", "wide"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("maximize", [False, True])
def test_certified_parity_adversarial(kind, maximize):
    g = torch.Generator().manual_seed(len(kind) + maximize)
    for n in (2, 3, 5, 8, 17, 40, 97):
        assert_scipy_indices(adversarial(kind, g, 6, n), maximize)


@pytest.mark.parametrize("kind", ["ulp1", "ulp2", "ulp4", "offset", "dup_rows", "dup_cols",
                                  "integers", "binary", "constant"])
def test_proof_refused_without_margin(kind):
    """Ties, and optima unique by less than rounding, are solved again in scipy's order."""
    g = torch.Generator().manual_seed(7)
    cost = adversarial(kind, g, 8, 30)
    assert not any(took_fast_path(cost)), kind
    assert_scipy_indices(cost)


@pytest.mark.parametrize("kind", ["uniform32", "uniform64", "offset_unique", "wide"])
def test_proof_taken_on_unique_optima(kind):
    """Continuous costs have a unique optimum by a wide margin: the fast path keeps its result
    (the test would pass vacuously if every item fell back)."""
    g = torch.Generator().manual_seed(3)
    cost = adversarial(kind, g, 8, 60)
    assert all(took_fast_path(cost)), kind
    assert all(took_fast_path(cost, maximize=True)), kind
    assert_scipy_indices(cost)
    col4row, status, u, v = duals(cost, CERTIFIED)
    reduced = cost.double() - u[:, :, None] - v[:, None, :]
    scale = cost.double().abs().amax() + u.abs().amax() + v.abs().amax()
    assert (reduced >= -1e-12 * scale).all()  # JV's duals are feasible and complementary
    assert reduced.gather(2, col4row[:, :, None]).abs().max() <= 1e-12 * scale


def test_rectangular_and_small_items_take_scipy_order():
    g = torch.Generator().manual_seed(5)
    for shape in [(4, 30, 50), (4, 50, 30), (4, 1, 1)]:
        cost = torch.rand(*shape, generator=g)
        assert not any(took_fast_path(cost))
        assert_scipy_indices(cost)


def test_auto_picks_the_path():
    """auto: certified for larger square continuous costs, ordered for few distinct values."""
    g = torch.Generator().manual_seed(11)
    uniform = torch.rand(2, 150, 150, generator=g)
    integers = torch.randint(0, 10, (2, 150, 150), generator=g).float()
    small = torch.rand(2, 20, 20, generator=g)
    for cost, fast in [(uniform, True), (integers, False), (small, False)]:
        auto = OPS.lsa_duals(cost, None, False, 1, None, 0)
        ordered = duals(cost, ORDERED)
        assert torch.equal(auto[2], ordered[2]) != fast
        assert_scipy_indices(cost, method="auto")


def test_single_wide_problem_two_threads():
    """B=1 with many columns: JV's start, then the two-thread team, then the proof."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(2)
    for cost in [torch.rand(1, 700, 700, generator=g), torch.randint(0, 3, (1, 600, 600), generator=g).float()]:
        for method in ("auto", "certified"):
            assert_scipy_indices(cost, method=method)
    fast = torch.rand(1, 640, 640, generator=g)
    assert took_fast_path(fast) == [True]


def test_method_argument():
    cost = np.random.default_rng(0).random((90, 90))
    want = scipy.optimize.linear_sum_assignment(cost)
    for method in ("auto", "certified", "ordered"):
        rows, cols = linear_sum_assignment(cost, method=method)
        np.testing.assert_array_equal(cols, want[1])
        rows, cols = linear_sum_assignment(cost, method=method, backend="scipy")
        np.testing.assert_array_equal(cols, want[1])
    with pytest.raises(ValueError, match="method must be one of"):
        linear_sum_assignment(cost, method="fast")
    with pytest.raises(ValueError, match="method must be one of"):
        batch_linear_sum_assignment(cost[None], method=None)
    with pytest.raises(ValueError, match="method must be 0"):
        OPS.lsa(torch.rand(1, 3, 3), None, False, False, None, 5)


# The proof alone (lsa_certificate), on matchings and duals built by hand.

def certificate(cost, col4row, u=None, v=None) -> bool:
    n = len(col4row)
    u = torch.zeros(n, dtype=torch.float64) if u is None else torch.as_tensor(u, dtype=torch.float64)
    v = torch.zeros(n, dtype=torch.float64) if v is None else torch.as_tensor(v, dtype=torch.float64)
    return OPS.lsa_certificate(torch.as_tensor(cost, dtype=torch.float64),
                               torch.as_tensor(col4row, dtype=torch.int64), u, v)


def with_tight(n, edges, slack=1.0):
    """Identity matching, zero duals: the diagonal and `edges` cost 0, the rest `slack`."""
    cost = np.full((n, n), slack)
    np.fill_diagonal(cost, 0.0)
    for i, j in edges:
        cost[i, j] = 0.0
    return cost


def test_certificate_cycles():
    """A tight edge (i, j) lets row i take row j's column: a directed cycle of them is another
    optimum. One cycle too many must be refused."""
    n = 5
    assert certificate(with_tight(n, []), range(n))
    assert certificate(with_tight(n, [(0, 1), (1, 2), (2, 3), (3, 4)]), range(n))  # a path
    assert certificate(with_tight(n, [(0, 1), (1, 2), (0, 2), (3, 2)]), range(n))  # no directed cycle
    assert not certificate(with_tight(n, [(0, 1), (1, 0)]), range(n))
    assert not certificate(with_tight(n, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]), range(n))
    assert not certificate(with_tight(n, [(0, 1), (1, 2), (3, 4), (2, 0)]), range(n))
    assert not certificate(with_tight(n, [(4, 3), (3, 4)]), range(n))
    # The same through a permuted matching (the graph goes through row4col).
    perm = [3, 0, 4, 1, 2]
    cost = with_tight(n, [])[:, perm]
    col4row = [perm.index(i) for i in range(n)]
    assert certificate(cost, col4row)
    cost[0, col4row[1]] = cost[1, col4row[0]] = 0.0
    assert not certificate(cost, col4row)


def test_certificate_margin():
    """An edge is tight up to tau, which exceeds both solvers' rounding: reduced costs of a
    few ulps close a cycle, one of 1e-3 does not."""
    n = 4
    for slack, proven in [(1e-3, True), (1e-9, True), (4 * np.spacing(1.0), False), (1e-14, False)]:
        cost = with_tight(n, [(0, 1), (1, 2), (2, 3)])
        cost[3, 0] = slack
        assert certificate(cost, range(n)) == proven, slack
    # Duals that are not feasible (a negative reduced cost beyond rounding) prove nothing.
    assert not certificate(with_tight(n, []), range(n), v=[0, 0, 0.5, 0])
    # A matching that is not optimal for its duals proves nothing either.
    assert not certificate(with_tight(n, []) + np.eye(n) * 0.1, range(n))


def test_certificate_sound_by_brute_force():
    """Wherever the proof is taken, every other permutation costs more: enumerated over all
    permutations of small problems with many ties."""
    rng = np.random.default_rng(1)
    taken = refused = 0
    for trial in range(400):
        n = int(rng.integers(2, 7))
        levels = [2, 3, 100, 0][trial % 4]
        cost = rng.integers(0, levels, (n, n)).astype(np.float64) if levels else rng.random((n, n))
        col4row, _, u, v = duals(torch.from_numpy(cost)[None], ORDERED)
        proven = certificate(cost, col4row[0], u[0], v[0])
        best = cost[np.arange(n), col4row[0].numpy()].sum()
        others = [cost[np.arange(n), p].sum() for p in itertools.permutations(range(n))
                  if list(p) != col4row[0].tolist()]
        unique = all(o > best for o in others)
        assert unique or not proven, cost
        taken += proven
        refused += not proven
    assert taken > 50 and refused > 50
