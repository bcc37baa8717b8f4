"""The batched solver against the per-image scipy loop trainers use and against lapx.

Every solver gets a CPU torch tensor, as a trainer holds it, so conversion to numpy is
timed. `pytest benchmarks/ --benchmark-only` prints a table of ratios at the end.
"""

import lap
import numpy as np
import pytest
import scipy.optimize
import torch

from maskformer_fast.hungarian import batch_linear_sum_assignment


def _ragged(g):
    cost = torch.rand(32, 100, 20, generator=g)
    cols = torch.randint(1, 21, (32,), generator=g)
    return cost, torch.stack([torch.full_like(cols, 100), cols], 1)


CASES = {
    "B=32, 100 x U[1,20] ragged": _ragged,
    "B=16, 100x50": lambda g: (torch.rand(16, 100, 50, generator=g), None),
    "B=64, 300x30": lambda g: (torch.rand(64, 300, 30, generator=g), None),
    "B=256, 50x50": lambda g: (torch.rand(256, 50, 50, generator=g), None),
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
    "maskformer_fast": lambda cost, sizes: batch_linear_sum_assignment(cost, sizes),
    "scipy loop": scipy_loop,
    "lapx lapjvr": lapx_loop(lap.lapjvr),
    "lapx lapjvh": lapx_loop(lap.lapjvh),
    "lapx lapjvr_batch": lapx_batch(lap.lapjvr_batch),
    "lapx lapjvh_batch": lapx_batch(lap.lapjvh_batch),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("case", list(CASES))
def test_lsa(benchmark, table, case, solver):
    cost, sizes = CASES[case](torch.Generator().manual_seed(0))
    if solver.endswith("_batch") and (sizes is not None or cost.shape[0] == 1):
        pytest.skip("lapx batch functions take equal shapes; a single problem is no batch")
    if benchmark.disabled and solver != "maskformer_fast" and cost.shape[1] >= 1000:
        pytest.skip("large anchors only when timing")
    fn = SOLVERS[solver]
    if solver == "maskformer_fast":
        # what is timed is what is right: identical to scipy on every item
        got = fn(cost, sizes).pairs()
        if not benchmark.disabled or cost.shape[1] < 1000:
            for (r, c), (rr, cc) in zip(got, scipy_loop(cost, sizes)):
                np.testing.assert_array_equal(r.numpy(), rr)
                np.testing.assert_array_equal(c.numpy(), cc)
    benchmark.group = case
    benchmark(fn, cost, sizes)
    table.add("Hungarian (CPU tensors in)", case, solver, benchmark)
