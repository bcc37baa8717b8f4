"""What a trainer receives: index pairs, DETR's column splits, and arguments on one device."""

import numpy as np
import pytest
import scipy.optimize
import torch

from maskformer_fast.hungarian import (
    batch_linear_sum_assignment, compiled_backends, index_pairs, linear_sum_assignment,
)

needs_ops = pytest.mark.skipif("cpu" not in compiled_backends(), reason="extension not built")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = ["cpu", "scipy"]
OPS = torch.ops.maskformer_fast


def scipy_pairs(items, maximize=False):
    return [scipy.optimize.linear_sum_assignment(np.asarray(c, dtype=np.float64), maximize=maximize)
            for c in items]


def assert_pairs_equal(got, want):
    assert len(got) == len(want)
    for b, ((r, c), (rr, cc)) in enumerate(zip(got, want)):
        for x, y in ((r, rr), (c, cc)):
            x = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
            assert x.dtype == np.int64 and np.array_equal(x, y), f"item {b}"


# 1. Pairs.


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_equal_scipy_item_by_item(backend):
    """Ragged items (empty ones and all-padding rows included), ties, torch and numpy in."""
    g = torch.Generator().manual_seed(0)
    cost = torch.randint(0, 4, (7, 9, 6), generator=g).float()
    sizes = torch.tensor([[9, 6], [9, 0], [0, 6], [4, 6], [9, 1], [2, 2], [6, 9 - 3]])
    want = scipy_pairs([cost[b, :n, :m] for b, (n, m) in enumerate(sizes.tolist())])
    got = batch_linear_sum_assignment(cost, sizes, backend=backend).pairs()
    assert all(isinstance(t, torch.Tensor) for p in got for t in p)
    assert_pairs_equal(got, want)
    got_np = batch_linear_sum_assignment(cost.numpy(), sizes.numpy(), backend=backend).pairs()
    assert all(isinstance(t, np.ndarray) for p in got_np for t in p)
    assert_pairs_equal(got_np, want)


def test_pairs_of_failed_items_are_empty():
    cost = torch.rand(3, 4, 4)
    cost[1, 2, 3] = float("nan")
    cost[2] = float("inf")
    res = batch_linear_sum_assignment(cost, errors="status")
    assert res.status.tolist() == [0, 2, 1]
    got = res.pairs()
    assert_pairs_equal(got[:1], scipy_pairs([cost[0]]))
    assert [len(r) for r, _ in got[1:]] == [0, 0] and [len(c) for _, c in got[1:]] == [0, 0]


def test_pairs_of_an_empty_batch():
    assert batch_linear_sum_assignment(torch.rand(0, 3, 4)).pairs() == []
    assert batch_linear_sum_assignment(np.zeros((0, 3, 4))).pairs() == []


@needs_ops
def test_pairs_are_views_that_behave_as_tensors():
    """The results are views of one buffer: each its own values, writable without
    touching its neighbours, and usable as indices."""
    cost = torch.rand(3, 5, 4)
    (r0, c0), (r1, c1), _ = batch_linear_sum_assignment(cost).pairs()
    before = r1.clone()
    r0 += 1
    r0.add_(1)
    assert torch.equal(r1, before)
    assert cost[1][r1, c1].shape == (4,)
    assert r0.is_contiguous() and r0.dtype == torch.int64 and not r0.requires_grad


@needs_ops
def test_pairs_refuse_what_is_not_a_col4row():
    with pytest.raises(TypeError, match="int64"):
        index_pairs(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        index_pairs(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="tensor"):
        index_pairs([[0, 1]])


# 2. DETR's layout.


def detr_loop(C, sizes, maximize=False):
    """DETR's matcher: `[linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]`."""
    return scipy_pairs([c[i] for i, c in enumerate(torch.as_tensor(C).split(sizes, -1))], maximize)


@pytest.mark.parametrize("backend", BACKENDS)
def test_col_splits_equal_detr_loop(backend):
    """Random, tied, empty and wide-or-tall targets; a strided (transposed) C; maximize;
    sizes as a list, a tensor or numpy integers; numpy C."""
    g = torch.Generator().manual_seed(1)
    sizes = [3, 0, 7, 1, 12, 4, 0]
    for C in (torch.rand(7, 10, sum(sizes), generator=g),
              torch.randint(0, 3, (7, 10, sum(sizes)), generator=g).float(),
              torch.rand(7, sum(sizes), 10, generator=g).transpose(1, 2)):
        for maximize in (False, True):
            want = detr_loop(C, sizes, maximize)
            for splits in (sizes, torch.tensor(sizes), np.array(sizes, dtype=np.int32)):
                got = batch_linear_sum_assignment(C, col_splits=splits, maximize=maximize,
                                                  backend=backend).pairs()
                assert_pairs_equal(got, want)
            got = batch_linear_sum_assignment(C.numpy(), col_splits=sizes, maximize=maximize,
                                              backend=backend).pairs()
            assert_pairs_equal(got, want)


@needs_ops
def test_col_splits_duals_are_the_items():
    """lsa_duals with col_splits: the duals of each item, in its own columns."""
    g = torch.Generator().manual_seed(2)
    sizes = [2, 5, 0, 3]
    C = torch.rand(4, 3, 10, generator=g, dtype=torch.float64)
    got = OPS.lsa_duals(C, None, False, 1, col_splits=torch.tensor(sizes))
    for b, c in enumerate(C.split(sizes, -1)):
        want = OPS.lsa_duals(c[b : b + 1].contiguous(), None, False, 1)
        m = sizes[b]
        assert torch.equal(got[0][b], want[0][0]) and torch.equal(got[2][b], want[2][0])
        assert torch.equal(got[3][b, :m], want[3][0]) and (got[3][b, m:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_col_splits_raise_saying_which(backend):
    C = torch.rand(3, 4, 10)
    cases = {
        "one entry per batch item": [5, 5],
        r"col_splits\[1\] = -2 is negative": [6, -2, 6],
        "sum to 9, but the cost has 10 columns": [3, 3, 3],
        "more than the cost's 10 columns": [5, 5, 1],
    }
    for message, splits in cases.items():
        with pytest.raises(ValueError, match=message):
            batch_linear_sum_assignment(C, col_splits=splits, backend=backend)
    with pytest.raises(ValueError, match="not both"):
        batch_linear_sum_assignment(C, [[4, 3]] * 3, col_splits=[3, 3, 4], backend=backend)
    with pytest.raises(TypeError, match="integers"):
        batch_linear_sum_assignment(C, col_splits=torch.tensor([3.0, 3.0, 4.0]), backend=backend)


# 3. Every backend checks sizes the same way.


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_sizes_raise_on_every_backend(backend):
    cost = torch.rand(2, 3, 3)
    for sizes in ([[-1, 3], [3, 3]], [[3, 3], [4, 3]], [[3, -2], [3, 3]], [[3, 3], [3, 4]]):
        b = 0 if -1 in sizes[0] or -2 in sizes[0] else 1
        with pytest.raises(ValueError, match=rf"outside the padded problem \[3, 3\] \(batch item {b}\)"):
            batch_linear_sum_assignment(cost, sizes, backend=backend, errors="status")


def test_byte_swapped_arrays_are_accepted_as_scipy_accepts_them():
    a = np.random.default_rng(3).random((4, 6)).astype(">f8")
    want = scipy.optimize.linear_sum_assignment(a)
    got = linear_sum_assignment(a)
    assert all(np.array_equal(x, y) for x, y in zip(got, want))
    got = batch_linear_sum_assignment(a[None].astype(">f4")).pairs()
    assert_pairs_equal(got, [scipy.optimize.linear_sum_assignment(a.astype(np.float32))])


# 4. One device per call.


@needs_ops
def test_ops_refuse_a_meta_argument_beside_real_ones():
    """A meta tensor among CPU ones dispatches to the fake kernel, which must not return
    empty tensors in place of the real kernel's results."""
    cost, meta = torch.rand(2, 3, 3), torch.zeros(2, 2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="one device"):
        OPS.lsa(cost, meta, False)
    with pytest.raises(ValueError, match="one device"):
        OPS.lsa(cost.to("meta"), torch.full((2, 2), 3), False)
    with pytest.raises(ValueError, match="one device"):
        OPS.lsa(cost, None, False, col_splits=torch.zeros(2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        OPS.lsa_duals(cost, meta, False, 1)
    x, y = torch.randn(2, 3, 40), torch.rand(2, 4, 40)
    with pytest.raises(ValueError, match="one device"):
        OPS.mask_cost_sums(x, y, torch.tensor([4, 1], device="meta"), "bce", 0.25, 2.0, 16)
    with pytest.raises(ValueError, match="one device"):
        OPS.mask_cost_sums(x.to("meta"), y, None, "bce", 0.25, 2.0, 16)
    with pytest.raises(ValueError, match="one device"):
        OPS.bilinear_sample(torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, device="meta"))


@needs_ops
def test_meta_in_meta_out():
    cost = torch.rand(2, 3, 5, device="meta")
    col4row, status = OPS.lsa(cost, None, False)
    assert col4row.device.type == status.device.type == "meta"
    assert col4row.shape == (2, 3) and status.shape == (2,)
    out = OPS.bilinear_sample(torch.rand(2, 3, 4, 4, device="meta"), torch.rand(2, 5, 2, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 5)


@cuda
@pytest.mark.cuda
@needs_ops
def test_cuda_ops_refuse_a_cpu_argument():
    cost = torch.rand(2, 3, 3)
    with pytest.raises(ValueError, match="CUDA"):
        OPS.lsa(cost, torch.full((2, 2), 3, device="cuda"), False)
    with pytest.raises(ValueError, match="cost's device"):
        OPS.lsa(cost.cuda(), torch.full((2, 2), 3), False)
    with pytest.raises(ValueError, match="cost's device"):
        OPS.lsa(cost.cuda(), None, False, col_splits=torch.tensor([1, 2]))
    with pytest.raises((ValueError, NotImplementedError)):
        OPS.bilinear_sample(torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, device="cuda"))


@cuda
@pytest.mark.cuda
@needs_ops
def test_cuda_pairs_and_col_splits_equal_detr_loop_with_one_host_copy():
    """On CUDA: index-identical to DETR's loop; the solve does not sync, and pairs copy to
    the host once (torch.cuda.set_sync_debug_mode counts the syncs)."""
    g = torch.Generator().manual_seed(4)
    sizes = [3, 0, 7, 1, 12, 4, 0, 20]
    C = torch.rand(8, 100, sum(sizes), generator=g)
    C[:, :, 5:9] = 0.25  # ties
    want = detr_loop(C, sizes)
    Cd, splits = C.cuda(), torch.tensor(sizes).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = batch_linear_sum_assignment(Cd, col_splits=splits, errors="status")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            got = res.pairs()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len([w for w in record if "synchroniz" in str(w.message)]) == 1
    assert all(r.device == Cd.device and c.device == Cd.device for r, c in got)
    assert_pairs_equal(got, want)
    assert_pairs_equal(batch_linear_sum_assignment(Cd, col_splits=sizes).pairs(), want)
    assert_pairs_equal(batch_linear_sum_assignment(C.transpose(1, 2).contiguous().transpose(1, 2).cuda(),
                                                   col_splits=sizes).pairs(), want)


@cuda
@pytest.mark.cuda
@needs_ops
def test_cuda_bad_col_splits():
    """A host list is checked on the host (ValueError); a device tensor by the kernel
    (status 3 for the items it makes impossible, every item when the sum is wrong)."""
    C = torch.rand(3, 4, 10, device="cuda")
    with pytest.raises(ValueError, match="sum to 9"):
        batch_linear_sum_assignment(C, col_splits=[3, 3, 3])
    with pytest.raises(ValueError, match="one entry per batch item"):
        batch_linear_sum_assignment(C, col_splits=torch.tensor([3, 7], device="cuda"))
    res = batch_linear_sum_assignment(C, col_splits=torch.tensor([3, 3, 3], device="cuda"),
                                      errors="status")
    assert res.status.tolist() == [3, 3, 3]
    res = batch_linear_sum_assignment(C, col_splits=torch.tensor([12, -2, 0], device="cuda"),
                                      errors="status")
    assert res.status.tolist() == [3, 3, 0]
