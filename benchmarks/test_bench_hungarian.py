"""The batched solver against the per-image scipy loop trainers use and against lapx, each
producing what a trainer uses: per item, the (row_ind, col_ind) pairs.

Every solver gets a CPU torch tensor, as a trainer holds it, and returns index pairs: the
scipy loop scipy's (the conversion to numpy timed), ours `.pairs()`, lapx its own. The DETR
cases time DETR's solve step: its cost `C [B, Q, sum T]`, its loop over `C.split(sizes, -1)`
with the `torch.as_tensor` conversion of the results, against the one-line swap
`batch_linear_sum_assignment(C, col_splits=sizes).pairs()`. The solvers of a case are timed
interleaved (the `interleaved` fixture); `pytest benchmarks/ --benchmark-only` prints the table.
Square cases also time the two methods ``auto`` chooses between, each forced.
"""

import functools

import lap
import numpy as np
import pytest
import scipy.optimize
import torch

from maskformer_fast.hungarian import batch_linear_sum_assignment

TABLE = "Hungarian (CPU tensors in, index pairs out)"


def ragged(B, g):
    cost = torch.rand(B, 100, 20, generator=g)
    cols = torch.randint(1, 21, (B,), generator=g)
    return cost, torch.stack([torch.full_like(cols, 100), cols], 1)


CASES = {
    "B=32, 100 x U[1,20] ragged": functools.partial(ragged, 32),
    "B=16, 100x50": lambda g: (torch.rand(16, 100, 50, generator=g), None),
    "B=64, 300x30": lambda g: (torch.rand(64, 300, 30, generator=g), None),
    "B=256, 50x50": lambda g: (torch.rand(256, 50, 50, generator=g), None),
    "B=1, 100 x U[1,20]": functools.partial(ragged, 1),
    "B=2, 100 x U[1,20] ragged": functools.partial(ragged, 2),
    "B=8, 100 x U[1,20] ragged": functools.partial(ragged, 8),
    "1000x1000 float32": lambda g: (torch.rand(1, 1000, 1000, generator=g), None),
    "2000x2000 float32": lambda g: (torch.rand(1, 2000, 2000, generator=g), None),
    "1000x1000 integers in [0,10)": lambda g: (
        torch.randint(0, 10, (1, 1000, 1000), generator=g).float(), None
    ),
}


def items(cost, sizes):
    """The per-item views a per-image loop sees."""
    if sizes is None:
        return [cost[b] for b in range(cost.shape[0])]
    return [cost[b, :n, :m] for b, (n, m) in enumerate(sizes.tolist())]


def scipy_loop(cost, sizes):
    return [scipy.optimize.linear_sum_assignment(c.cpu().numpy()) for c in items(cost, sizes)]


def lapx_loop(fn):
    def run(cost, sizes):
        return [fn(c.cpu().numpy(), extend_cost=True, return_cost=False) for c in items(cost, sizes)]

    return run


def lapx_batch(fn):
    def run(cost, sizes):
        return fn(cost.cpu().numpy(), extend_cost=True, return_cost=False, n_threads=0)

    return run


SOLVERS = {
    "maskformer_fast": lambda cost, sizes: batch_linear_sum_assignment(cost, sizes).pairs(),
    "scipy loop": scipy_loop,
    "lapx lapjvr": lapx_loop(lap.lapjvr),
    "lapx lapjvh": lapx_loop(lap.lapjvh),
    "lapx lapjvr_batch": lapx_batch(lap.lapjvr_batch),
    "lapx lapjvh_batch": lapx_batch(lap.lapjvh_batch),
}


# A square item is solved on the certified path or in scipy's order ("auto" picks): both,
# forced, beside it.
METHODS = {
    f"maskformer_fast {method}": functools.partial(
        lambda cost, sizes, method: batch_linear_sum_assignment(cost, sizes, method=method).pairs(),
        method=method)
    for method in ("certified", "ordered")
}


def assert_same_pairs(got, want):
    assert len(got) == len(want)
    for (r, c), (rr, cc) in zip(got, want):
        np.testing.assert_array_equal(np.asarray(r), rr)
        np.testing.assert_array_equal(np.asarray(c), cc)


@pytest.mark.parametrize("case", list(CASES))
def test_lsa(benchmark, table, interleaved, case):
    cost, sizes = CASES[case](torch.Generator().manual_seed(0))
    large = cost.shape[1] >= 1000
    ours = functools.partial(SOLVERS["maskformer_fast"], cost, sizes)
    square = sizes is None and cost.shape[1] == cost.shape[2]
    variants = {name: functools.partial(fn, cost, sizes) for name, fn in METHODS.items() if square}
    if not benchmark.disabled or not large:  # what is timed is right: scipy's pairs, item by item
        want = scipy_loop(cost, sizes)
        for fn in [ours, *variants.values()]:
            assert_same_pairs(fn(), want)
    if benchmark.disabled:
        benchmark(ours)
        return
    lapx_batch_ok = sizes is None and cost.shape[0] > 1  # equal shapes, and a batch
    fns = {name: functools.partial(fn, cost, sizes) for name, fn in SOLVERS.items()
           if lapx_batch_ok or not name.endswith("_batch")}
    fns.update(variants)
    for name, seconds in interleaved(fns).items():
        table.add_value(TABLE, case, name, seconds, "ms")
    benchmark.group = case
    benchmark(ours)


# DETR's solve step: B=32 images, T in U[1, 20] targets, Q queries.
DETR_CASES = {f"DETR solve step, B=32, Q={q}": q for q in (100, 300, 900)}


def detr_step(C, sizes):
    """DETR's matcher.py from its cost on: `.cpu()`, scipy per split, `torch.as_tensor`."""
    C = C.cpu()
    indices = [scipy.optimize.linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            for i, j in indices]


def swapped_step(C, sizes):
    return batch_linear_sum_assignment(C, col_splits=sizes).pairs()


@pytest.mark.parametrize("case", list(DETR_CASES))
def test_detr_solve_step(benchmark, table, interleaved, case):
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 21, (32,), generator=g).tolist()
    C = torch.rand(32, DETR_CASES[case], sum(sizes), generator=g)
    got, want = swapped_step(C, sizes), detr_step(C, sizes)
    assert all(torch.equal(a, x) and torch.equal(b, y) for (a, b), (x, y) in zip(got, want))
    if not benchmark.disabled:
        fns = {"maskformer_fast": lambda: swapped_step(C, sizes), "DETR loop": lambda: detr_step(C, sizes)}
        for name, seconds in interleaved(fns).items():
            table.add_value(TABLE, case, name, seconds, "ms")
        benchmark.group = case
    benchmark(swapped_step, C, sizes)
