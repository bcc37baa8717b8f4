"""The matching-cost kernels against the per-image Mask2Former formulation, which builds
the cost of one image at a time with [Q, P] intermediates (BCE-with-logits against ones and
against zeros, sigmoid) and three matmuls.

B=8 images, Q=100 queries, T=20 targets, at P=12,544 sampled points and at full 128x128 and
256x256 resolution: time and peak memory allocated during the call (torch's CPU profiler),
as ratios. The embeddings path (``mask_cost_from_embeddings``, C=128 channels) is compared
with the einsum followed by the per-image formulation: its peak memory should not grow with
H * W. On a GPU (when present): the Triton kernel against the torch reference on the same
device, each with the GB/s it reaches at the bytes-moved floor (the least bytes any
implementation must move; the floor and its time at the device's peak bandwidth label the row).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from maskformer_fast.kernels import mask_cost_from_embeddings, pairwise_mask_cost
from maskformer_fast.selfcheck import peak_bandwidth

B, Q, T, K, C = 8, 100, 20, 80, 128
CASES = {"P=12,544 points": 12544, "128x128 pixels": 128 * 128, "256x256 pixels": 256 * 256}
WEIGHTS = dict(w_class=2.0, w_mask=5.0, w_dice=5.0)


def mask2former_cost(x, y, logits, labels):
    """Mask2Former's matcher (``batch_sigmoid_ce_loss``, ``batch_dice_loss``), image by image:
    x [B, Q, P] logits, y [B, T, P] targets -> [B, Q, T]."""
    out = []
    for b in range(x.shape[0]):
        inputs, targets = x[b].float(), y[b].float()
        P = inputs.shape[1]
        pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
        neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
        cost_mask = (torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)) / P
        p = inputs.sigmoid()
        cost_dice = 1 - (2 * torch.einsum("nc,mc->nm", p, targets) + 1) / (
            p.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)
        cost_class = -logits[b].softmax(-1)[:, labels[b]]
        out.append(WEIGHTS["w_mask"] * cost_mask + WEIGHTS["w_class"] * cost_class + WEIGHTS["w_dice"] * cost_dice)
    return torch.stack(out)


def peak_bytes(fn) -> int:
    """Peak of the memory allocated (and not yet freed) while `fn` runs, from the CPU
    profiler's allocation events: each op's own allocations at its start, frees as they
    happen."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def inputs(P, device, small):
    g = torch.Generator().manual_seed(0)
    b, q = (2, 16) if small else (B, Q)
    x = torch.randn(b, q, P, generator=g) * 3
    y = (torch.rand(b, T, P, generator=g) < 0.3).float()
    logits, labels = torch.randn(b, q, K + 1, generator=g), torch.randint(0, K, (b, T), generator=g)
    embed, feat = torch.randn(b, q, C, generator=g) / C**0.5, torch.randn(b, C, P, generator=g)
    return [t.to(device) for t in (x, y, logits, labels, embed, feat)]


def run(benchmark, fn, check):
    """Times `fn` (or runs it once as a test), after checking its result against `check`."""
    torch.testing.assert_close(fn(), check, rtol=1e-4, atol=1e-4)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["maskformer_fast", "Mask2Former per image"])
@pytest.mark.parametrize("case", list(CASES))
def test_cost_cpu(benchmark, table, case, impl):
    P = CASES[case] if not benchmark.disabled else 32 * 32
    x, y, logits, labels, _, _ = inputs(P, "cpu", benchmark.disabled)
    if impl == "maskformer_fast":
        fn = lambda: pairwise_mask_cost(x, y, None, logits, labels, **WEIGHTS)  # noqa: E731
    else:
        fn = lambda: mask2former_cost(x, y, logits, labels)  # noqa: E731
    benchmark.group = f"cost: {case}"
    run(benchmark, fn, mask2former_cost(x, y, logits, labels))
    name = f"Matching cost from logits, B={B} Q={Q} T={T} (CPU)"
    table.add(name, case, impl, benchmark)
    if not benchmark.disabled:
        table.add_value(name + ": memory", case, impl, peak_bytes(fn), "MB")


@pytest.mark.parametrize("impl", ["maskformer_fast", "einsum + Mask2Former per image"])
@pytest.mark.parametrize("case", [c for c in CASES if "pixels" in c])
def test_cost_from_embeddings_cpu(benchmark, table, case, impl):
    P = CASES[case] if not benchmark.disabled else 32 * 32
    _, y, logits, labels, embed, feat = inputs(P, "cpu", benchmark.disabled)
    side = int(P**0.5)
    feat4, y4 = feat.view(*feat.shape[:2], side, side), y.view(*y.shape[:2], side, side)
    if impl == "maskformer_fast":
        fn = lambda: mask_cost_from_embeddings(embed, feat4, y4, None, logits, labels, **WEIGHTS)  # noqa: E731
    else:
        fn = lambda: mask2former_cost(torch.bmm(embed, feat), y, logits, labels)  # noqa: E731
    benchmark.group = f"cost from embeddings: {case}"
    run(benchmark, fn, mask2former_cost(torch.bmm(embed, feat), y, logits, labels))
    name = f"Matching cost from embeddings (C={C}), B={B} Q={Q} T={T} (CPU)"
    table.add(name, case, impl, benchmark)
    if not benchmark.disabled:
        table.add_value(name + ": memory", case, impl, peak_bytes(fn), "MB")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["maskformer_fast", "torch reference", "Mask2Former per image"])
@pytest.mark.parametrize("case", list(CASES))
def test_cost_gpu(benchmark, table, case, impl):
    x, y, logits, labels, _, _ = inputs(CASES[case], "cuda", benchmark.disabled)
    backend = "triton" if impl == "maskformer_fast" else "torch"

    def fn():
        if impl == "Mask2Former per image":
            out = mask2former_cost(x, y, logits, labels)
        else:
            out = pairwise_mask_cost(x, y, None, logits, labels, **WEIGHTS, backend=backend)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"cost on {torch.cuda.get_device_name()}: {case}"
    run(benchmark, fn, mask2former_cost(x, y, logits, labels))
    name = f"Matching cost from logits, B={B} Q={Q} T={T} ({torch.cuda.get_device_name()})"
    table.add(name, case, impl, benchmark)
    if impl != "Mask2Former per image" and not benchmark.disabled:
        # the least any implementation must move: read the logits, targets, class logits and
        # labels once, write the cost; shown with its time at the device's peak bandwidth
        floor = sum(t.numel() * t.element_size() for t in (x, y, logits, labels)) + B * Q * T * 4
        peak = peak_bandwidth("cuda")
        at_peak = f" = {floor / peak * 1e3:.3f} ms at {peak / 1e9:.0f} GB/s" if peak else ""
        row = f"{case} (floor {floor / 1e6:.1f} MB{at_peak})"
        table.add_value(name + ": bandwidth", row, impl, floor / benchmark.stats.stats.median, "GB/s")
