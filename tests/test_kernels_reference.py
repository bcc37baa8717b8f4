"""maskformer_fast.kernels against a direct float64 evaluation of the published formulas,
image by image and pair by pair: the torch references (the CPU path: with the compiled CPU
kernel, and without it, "torch-ops"), the Triton kernels through Triton's interpreter on the
CPU (conftest.py sets TRITON_INTERPRET=1 when there is no GPU), and the Triton kernels on a
GPU (marked cuda; skipped without one).

Tolerances: the cost kernels compute in fp32 (their GPU dots use tf32x3, about fp32 accuracy),
so 1e-5 on costs of order 1. The einsum on a GPU uses TF32 for fp32 inputs (as torch does when
TF32 is allowed): 2e-2 there, from TF32's 2^-11 relative rounding over C products.
"""

import os
import subprocess
import sys

import pytest
import torch

from maskformer_fast.kernels import mask_cost_from_embeddings, mask_einsum, pairwise_mask_cost
from maskformer_fast.kernels import reference

cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
IMPLS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("torch", "cpu", id="torch-ops", marks=pytest.mark.torch_ops),
    pytest.param("triton", "cpu", id="triton-interpreter"),
    pytest.param("triton", "cuda", id="triton-cuda", marks=cuda),
]
COST_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _torch_ops_only(request, monkeypatch):
    """"torch-ops": the torch reference without its compiled CPU kernel (mask_cost_sums), i.e.
    the torch ops that CUDA tensors and builds without the kernel run."""
    if request.node.get_closest_marker("torch_ops"):
        monkeypatch.setattr(reference, "_use_cpu_kernel", lambda x: False)


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
                zero = torch.zeros_like(xx)  # log(1 + e^-x), log(1 + e^x) without overflow for |x| > 709
                bce1 = torch.logaddexp(zero, -xx)  # BCE(x, 1)
                bce0 = torch.logaddexp(zero, xx)  # BCE(x, 0)
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


# (B, Q, T, P): ragged counts in every case; T > Q; T = 0; more queries than a tile (64) and
# P not a multiple of the pixel tile (16); more targets than a tile (32).
SHAPES = [(3, 5, 4, 37), (2, 3, 7, 64), (2, 4, 0, 10), (1, 1, 1, 1), (2, 70, 20, 70), (1, 3, 70, 5)]


@pytest.mark.parametrize("backend,device", IMPLS)
@pytest.mark.parametrize("mask_cost", ["bce", "focal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_pairwise_cost_equals_formulas(backend, device, mask_cost, shape, monkeypatch):
    B, Q, T, P = shape
    g = torch.Generator().manual_seed(B * 100 + T)
    x, y, counts, logits, labels = batch(g, B, Q, T, P)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * B * Q)  # several chunks, a ragged last one
    y_padded = y.clone()
    for b in range(B):
        y_padded[b, int(counts[b]):] = float("nan")  # padding never makes NaN
    on = dict(device=device)
    got = pairwise_mask_cost(x.to(**on), y_padded.to(**on), counts.to(**on), logits.to(**on), labels.to(**on),
                             w_class=2.0, w_mask=5.0, w_dice=3.0, mask_cost=mask_cost, backend=backend)
    want = direct_cost(x, y, counts, logits, labels, 2.0, 5.0, 3.0, mask_cost)
    assert got.dtype == torch.float32 and got.shape == (B, Q, T) and got.device.type == device
    torch.testing.assert_close(got.cpu().double(), want, **COST_TOL)


@pytest.mark.parametrize("backend,device", IMPLS)
@pytest.mark.parametrize("mask_cost", ["bce", "focal"])
def test_half_precision_strided_inputs_and_no_class_term(backend, device, mask_cost):
    """fp16 logits, bool targets, both read through non-contiguous views."""
    g = torch.Generator().manual_seed(1)
    x, y, counts, _, _ = batch(g, dtype=torch.float16)
    x_t = x.to(device).transpose(1, 2).contiguous().transpose(1, 2)  # [B, Q, P] with P-stride Q
    y_s = torch.stack([y, y], -1).bool().to(device)[..., 0]  # every other element
    assert not x_t.is_contiguous() and not y_s.is_contiguous()
    got = pairwise_mask_cost(x_t, y_s, counts.to(device), w_mask=1.0, w_dice=1.0, mask_cost=mask_cost,
                             backend=backend)
    want = direct_cost(x.float(), y, counts, None, None, 0.0, 1.0, 1.0, mask_cost)
    torch.testing.assert_close(got.cpu().double(), want, **COST_TOL)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("mask_cost", ["bce", "focal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_logits_on_gpu(device, mask_cost, shape):
    """bf16 logits (GPU only: the interpreter has no bfloat16). The kernel reads them exactly
    and computes in fp32, so the fp32 tolerance holds against the formulas on the same
    bf16-rounded values."""
    B, Q, T, P = shape
    g = torch.Generator().manual_seed(B * 100 + T)
    x, y, counts, logits, labels = batch(g, B, Q, T, P, dtype=torch.bfloat16)
    got = pairwise_mask_cost(*(t.to(device) for t in (x, y, counts, logits, labels)), w_class=2.0, w_mask=5.0,
                             w_dice=3.0, mask_cost=mask_cost, backend="triton")
    want = direct_cost(x.float(), y, counts, logits, labels, 2.0, 5.0, 3.0, mask_cost)
    assert got.dtype == torch.float32 and got.device.type == device
    torch.testing.assert_close(got.cpu().double(), want, **COST_TOL)


@pytest.mark.parametrize("backend,device", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=cuda)])
@pytest.mark.parametrize("shape", [(2, 6, 8, 9, 7, 5), (1, 70, 40, 5, 11, 3), (2, 3, 4, 2, 2, 0)])
def test_cost_from_embeddings_equals_cost_of_einsum(backend, device, dtype, shape, monkeypatch):
    """(B, Q, C, H, W, T): C and H * W not multiples of the tiles (16), Q over a tile (64), T = 0.
    bfloat16 on the GPU only (the interpreter has none)."""
    if dtype == torch.bfloat16 and device != "cuda":
        pytest.skip("bfloat16 is checked on the GPU only")
    g = torch.Generator().manual_seed(2)
    B, Q, C, H, W, T = shape
    embed = (torch.randn(B, Q, C, generator=g) / C**0.5).to(dtype)
    feat = torch.randn(B, C, H, W, generator=g).to(dtype)
    tgt = (torch.rand(B, T, H, W, generator=g) < 0.4).float()
    counts = torch.randint(0, T + 1, (B,), generator=g)
    logits, labels = torch.randn(B, Q, 3, generator=g), torch.randint(0, 3, (B, T), generator=g)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * B * Q)
    x = torch.einsum("bqc,bchw->bqhw", embed.double(), feat.double()).flatten(2)
    for mask_cost in ("bce", "focal"):
        got = mask_cost_from_embeddings(*(t.to(device) for t in (embed, feat, tgt, counts, logits, labels)),
                                        mask_cost=mask_cost, backend=backend)
        want = direct_cost(x, tgt.flatten(2), counts, logits, labels, 1.0, 1.0, 1.0, mask_cost)
        torch.testing.assert_close(got.cpu().double(), want, **COST_TOL)


@pytest.mark.parametrize("backend,device", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=cuda)])
@pytest.mark.parametrize("shape", [(2, 5, 7, 6, 4), (1, 70, 40, 9, 13), (2, 0, 3, 2, 2), (1, 2, 0, 3, 3)])
def test_mask_einsum_values_and_gradients(backend, device, dtype, shape):
    """(B, T, C, H, W): every dimension off the tiles (64 x 64 x 32), T = 0, C = 0; the
    gradients of both inputs against torch autograd of the float64 einsum. bfloat16 on the
    GPU only (the interpreter has none)."""
    if dtype == torch.bfloat16 and device != "cuda":
        pytest.skip("bfloat16 is checked on the GPU only")
    B, T, C, H, W = shape
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(B, T, C, generator=g).to(dtype)
    feat = torch.randn(B, C, H, W, generator=g).to(dtype)
    grad = torch.randn(B, T, H, W, generator=g).to(dtype)
    leaves = [t.to(device).requires_grad_() for t in (embed, feat)]
    out = mask_einsum(*leaves, backend=backend)
    got = (out, *torch.autograd.grad(out, leaves, grad.to(device)))
    ref_leaves = [t.double().requires_grad_() for t in (embed, feat)]
    ref = torch.einsum("btc,bchw->bthw", *ref_leaves)
    want = (ref, *torch.autograd.grad(ref, ref_leaves, grad.double()))
    # fp16 / bf16 results are rounded (2^-11 / 2^-8 relative); on a GPU fp32 dots use TF32 (2^-11)
    tol = 2e-2 if dtype != torch.float32 or device == "cuda" else 1e-5
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.device.type == device
        torch.testing.assert_close(a.cpu().double(), b, rtol=tol, atol=tol * max(C, T, H * W) ** 0.5)


@pytest.mark.parametrize("backend,device", IMPLS)
def test_mask_einsum_promotes_mixed_dtypes(backend, device):
    """Regression: as documented, mixed dtypes are promoted (the torch path raised)."""
    g = torch.Generator().manual_seed(6)
    embed, feat = torch.randn(2, 3, 4, generator=g).half(), torch.randn(2, 4, 5, 5, generator=g)
    out = mask_einsum(embed.to(device), feat.to(device), backend=backend)
    assert out.dtype == torch.float32
    want = torch.einsum("btc,bchw->bthw", embed.double(), feat.double())
    tol = 2e-2 if device == "cuda" else 1e-5  # TF32 on a GPU
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)


def test_triton_backend_on_cpu_needs_the_interpreter():
    """Without TRITON_INTERPRET=1, backend="triton" on CPU tensors is a clear error."""
    code = ("import torch; from maskformer_fast.kernels import mask_einsum\n"
            "try:\n    mask_einsum(torch.randn(1, 2, 3), torch.randn(1, 3, 4, 4), backend='triton')\n"
            "except RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "needs CUDA tensors" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr
    # and "auto" on CPU tensors is the torch reference, with no Triton at all
    assert mask_einsum(torch.ones(1, 2, 3), torch.ones(1, 3, 4, 4)).eq(3).all()


@pytest.mark.parametrize("backend,device", IMPLS)
def test_invalid_labels_give_nan_and_padding_never_read(backend, device):
    """A label outside [0, K] of a valid target is NaN (the matcher reports it); padding
    targets and their labels are never read."""
    g = torch.Generator().manual_seed(4)
    x, y, _, logits, labels = batch(g, B=2, Q=3, T=4, K=4)
    counts = torch.tensor([2, 3])
    labels[0, 1] = 5 + 7  # valid target, label > K
    labels[1, 0] = -1
    labels[1, 3] = 10**6  # padding: never read
    y[1, 3] = float("nan")
    on = [t.to(device) for t in (x, y, counts, logits, labels)]
    got = pairwise_mask_cost(*on, backend=backend).cpu()
    assert got[0, :, 1].isnan().all() and got[1, :, 0].isnan().all()
    assert got[0, :, 0].isfinite().all() and got[1, :, 1:3].isfinite().all()
    assert got[0, :, 2:].isinf().all() and got[1, :, 3].isinf().all()


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


@pytest.mark.parametrize("backend,device", IMPLS)
def test_no_pixels(backend, device):
    """P = 0: mask and dice costs are 0 (nothing to compare), only the class term remains."""
    logits, labels = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 4))
    got = pairwise_mask_cost(torch.zeros(2, 3, 0, device=device), torch.zeros(2, 4, 0, device=device), None,
                             logits.to(device), labels.to(device), backend=backend)
    want = -torch.gather(logits.softmax(-1), 2, labels[:, None, :].expand(-1, 3, -1))
    torch.testing.assert_close(got.cpu(), want)


@pytest.mark.parametrize("split", [1, 3, 5])
def test_triton_pixel_split(split, monkeypatch):
    """The pixels of a tile shared by several programs (the partial sums combined by the last
    to arrive) give the same cost as one program, whatever the split."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter's split; on a GPU the split follows the SM count")
    from maskformer_fast.kernels import triton_cost

    monkeypatch.setattr(triton_cost, "INTERPRETER_SPLIT", split)
    g = torch.Generator().manual_seed(5)
    x, y, counts, logits, labels = batch(g, B=2, Q=3, T=5, P=5 * 16 + 7)
    for mask_cost in ("bce", "focal"):
        got = pairwise_mask_cost(x, y, counts, logits, labels, mask_cost=mask_cost, backend="triton")
        want = direct_cost(x, y, counts, logits, labels, 1.0, 1.0, 1.0, mask_cost)
        torch.testing.assert_close(got.double(), want, **COST_TOL)


@pytest.mark.parametrize("split", [1, 3])
def test_triton_einsum_split_k(split, monkeypatch):
    """K cut into several programs' fp32 partials, summed in a fixed order (the embedding's
    gradient on a GPU whose grid is small): the einsum and both gradients as unsplit."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter's split; on a GPU the split follows the SM count")
    from maskformer_fast.kernels import triton_einsum

    monkeypatch.setattr(triton_einsum, "INTERPRETER_SPLIT_K", split)
    g = torch.Generator().manual_seed(7)
    embed, feat = torch.randn(2, 5, 70, generator=g), torch.randn(2, 70, 9, 11, generator=g)  # K: 70 and 99
    grad = torch.randn(2, 5, 9, 11, generator=g)
    leaves = [t.clone().requires_grad_() for t in (embed, feat)]
    out = mask_einsum(*leaves, backend="triton")
    got = (out, *torch.autograd.grad(out, leaves, grad))
    ref_leaves = [t.double().requires_grad_() for t in (embed, feat)]
    ref = torch.einsum("btc,bchw->bthw", *ref_leaves)
    for a, b in zip(got, (ref, *torch.autograd.grad(ref, ref_leaves, grad.double()))):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4)


def test_selfcheck_kernel_parity_runs_on_the_interpreter():
    """`python -m maskformer_fast.selfcheck`'s kernel check, on small shapes through the
    interpreter, so that the check a GPU owner runs does not rot."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the self-check itself runs")
    from maskformer_fast.selfcheck import check_kernels

    assert check_kernels("cpu", shapes=[(2, 7, 5, 40, 6), (1, 3, 0, 9, 2)]) == []


@pytest.mark.parametrize("backend,device", IMPLS)
@pytest.mark.parametrize("B, T, C, H, W", [(0, 3, 4, 2, 2), (2, 3, 4, 0, 2), (2, 3, 4, 2, 0), (2, 0, 4, 2, 2),
                                           (2, 3, 0, 2, 2)])
def test_mask_einsum_empty_sizes(backend, device, B, T, C, H, W):
    """Regression: B, H or W = 0 raised, forward and backward (view(B, -1, H, W) of 0 elements
    is ambiguous); the results and gradients are torch.einsum's."""
    leaves = [torch.randn(B, T, C, device=device, requires_grad=True),
              torch.randn(B, C, H, W, device=device, requires_grad=True)]
    out = mask_einsum(*leaves, backend=backend)
    assert out.shape == (B, T, H, W)
    ref = torch.einsum("btc,bchw->bthw", *leaves)
    grad = torch.ones_like(out)
    for a, b in zip((out, *torch.autograd.grad(out, leaves, grad)), (ref, *torch.autograd.grad(ref, leaves, grad))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,device", IMPLS)
def test_targets_as_lists(backend, device):
    """Ragged targets as lists of [T_b, P] masks and [T_b] labels: the padded call's cost."""
    g = torch.Generator().manual_seed(6)
    x, y, counts, logits, labels = batch(g, B=3, Q=4, T=5, P=21)
    counts = torch.tensor([5, 0, 2])
    on = lambda t: t.to(device)  # noqa: E731
    masks = [on(y[b, :n]) for b, n in enumerate(counts.tolist())]
    labs = [on(labels[b, :n]) for b, n in enumerate(counts.tolist())]
    got = pairwise_mask_cost(on(x), masks, None, on(logits), labs, backend=backend)
    want = pairwise_mask_cost(on(x), on(y), on(counts), on(logits), on(labels), backend=backend)
    torch.testing.assert_close(got, want)
    embed, feat = torch.randn(3, 4, 6, generator=g), torch.randn(3, 6, 3, 7, generator=g)
    got = mask_cost_from_embeddings(on(embed), on(feat), [m.view(-1, 3, 7) for m in masks], None, on(logits), labs,
                                    backend=backend)
    want = mask_cost_from_embeddings(on(embed), on(feat), on(y.view(3, 5, 3, 7)), on(counts), on(logits),
                                     on(labels), backend=backend)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="tgt_counts comes from the list"):
        pairwise_mask_cost(on(x), masks, on(counts), backend=backend)
    with pytest.raises(ValueError, match="expected 3 target tensors"):
        pairwise_mask_cost(on(x), masks[:2], backend=backend)


def test_gpu_kernels_check_script_runs_in_cpu_smoke_mode(tmp_path):
    """scripts/gpu_kernels_check.py, the one prepared GPU run, on tiny sizes through the
    interpreter: its Python is proven before GPU time is spent on it."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the script itself runs")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "gpu_kernels_check.py")
    out = subprocess.run([sys.executable, script, "--cpu-smoke", "--budget", "600", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "0 FAIL/ERROR" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "kernels.json").exists() and (tmp_path / "kernels.txt").exists()
