#!/usr/bin/env python3
"""One prepared run of the Triton kernels on a GPU machine: accuracy against float64,
determinism of the split-pixel cost, timings against Mask2Former's per-image torch code and
the bytes-moved floor, and the batched matching step (host syncs, CUDA graph).

    python3 scripts/gpu_kernels_check.py --out "$OUT"     # GPU: within about 150 s (--budget)
    python3 scripts/gpu_kernels_check.py --cpu-smoke      # here: tiny sizes, the interpreter

Sections (each on its own: one that fails is recorded and the next runs):

1. environment: versions, GPU, whether the compiled CUDA solver is there;
2. bandwidth: a 1 GiB device-to-device copy, (bytes read + written) / median time;
3. accuracy: pairwise_mask_cost (logits), mask_cost_from_embeddings and mask_einsum
   (forward, grad_embed, grad_feat) at B = 8, Q = 100, T = 20 (ragged), P = 12,544 points,
   128 x 128 and 256 x 256 pixels (C = 256), fp32 and bf16 inputs, bce and focal, against
   float64 evaluations of the formulas on the same input values: max |out - ref| / max |ref|
   over the valid entries (non-finite: inf, never a pass), padding entries +inf;
4. determinism: 200 reruns of the split-pixel cost (bce, focal; logits and embeddings) and
   50 of the split-K grad_embed, counting reruns whose bits differ from the first;
5. timings (CUDA events, median, L2 flushed: triton.testing.do_bench) of the fused cost vs
   Mask2Former's per-image torch formulation (MaskFormer's for focal) looped over the images,
   and vs the bytes floor (every input read once, the output written once, at the measured
   copy bandwidth);
6. matching: HungarianMatcher.match_layers over 10 decoder outputs (mask2former settings,
   nonfinite="forbid", check=False: the variant documented to need no host sync) vs the
   per-image reference (cost on the GPU, .cpu(), scipy, image by image, layer by layer), the
   indices compared; the same call under torch.cuda.set_sync_debug_mode("error"); and
   captured in a CUDA graph, replayed, the replay's col4row compared with the eager one.
   The batched solver is the compiled CUDA op when maskformer_fast._C is built for this
   Python (section 1 says); without it the matcher falls back to scipy, which syncs.

The references run with torch's defaults (fp32 matmuls without TF32), as Mask2Former does.
Writes $OUT/kernels.json (everything) and $OUT/kernels.txt (the summary table, printed last).
--budget (seconds, default 130) skips the items left once it is spent, saying so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from functools import partial

START = time.perf_counter()  # the budget counts the imports too
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for kernels.json and kernels.txt (default: none)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU through Triton's interpreter (no CUDA events, no graph)")
    parser.add_argument("--budget", type=float, default=130.0,
                        help="seconds after which no new item starts (default 130: the run ends within about 150)")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit runs (the kernels import lazily)
sys.path.insert(0, ROOT)

import scipy.optimize  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from maskformer_fast.kernels import mask_cost_from_embeddings, mask_einsum, pairwise_mask_cost  # noqa: E402
from maskformer_fast.hungarian import compiled_backends  # noqa: E402
from maskformer_fast.matcher import HungarianMatcher  # noqa: E402

SMOKE = ARGS.cpu_smoke
DEVICE = torch.device("cpu" if SMOKE else "cuda")

if SMOKE:
    B, Q, K1, C = 2, 5, 4, 8
    COUNTS = [3, 1]
    SIZES = [("P=40 points", 40, None), ("6x6", 36, 6), ("8x8", 64, 8)]
    LOW = torch.float16  # the interpreter has no bfloat16
    RERUNS, RERUNS_EINSUM, LAYERS, PRED_SIDE, TGT_SIDE, POINTS, MATCH_REPS = 3, 2, 2, 8, 16, 20, 1
else:
    B, Q, K1, C = 8, 100, 134, 256  # COCO panoptic: 133 classes + no-object
    COUNTS = [20, 5, 13, 1, 20, 8, 17, 9]
    SIZES = [("P=12544 points", 12544, 112), ("128x128", 128 * 128, 128), ("256x256", 256 * 256, 256)]
    LOW = torch.bfloat16
    RERUNS, RERUNS_EINSUM, LAYERS, PRED_SIDE, TGT_SIDE, POINTS, MATCH_REPS = 200, 50, 10, 128, 512, 12544, 5
T = max(COUNTS)
COST_TOL = 1e-4  # fp32 arithmetic, tf32x3 dots; inputs compared on the same values
EINSUM_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # outputs in the inputs' dtype
M2F = dict(w_class=2.0, w_mask=5.0, w_dice=5.0)
MASKFORMER = dict(w_class=1.0, w_mask=20.0, w_dice=1.0)
WEIGHTS = {"bce": M2F, "focal": MASKFORMER}
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

results: dict = {"mode": "cpu-smoke" if SMOKE else "gpu", "sections": {}}
summary: list[tuple[str, str, str, str]] = []  # (section, item, value, verdict)


# --------------------------------------------------------------------------- helpers

def elapsed() -> float:
    return time.perf_counter() - START


def over_budget() -> bool:
    return elapsed() > ARGS.budget


def clean(value):
    """JSON-safe: non-finite floats as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def save():
    """kernels.json and kernels.txt as they stand (after every section: a run killed at its
    time limit keeps what it did)."""
    if ARGS.out:
        os.makedirs(ARGS.out, exist_ok=True)
        results["elapsed_s"] = round(elapsed(), 1)
        results["summary"] = [list(r) for r in summary]
        with open(os.path.join(ARGS.out, "kernels.json"), "w") as f:
            json.dump(clean(results), f, indent=1)
        with open(os.path.join(ARGS.out, "kernels.txt"), "w") as f:
            f.write(summary_text() + "\n")


def record(section: str, item: str, value: str, verdict: str, **details):
    summary.append((section, item, value, verdict))
    results["sections"].setdefault(section, {"items": []})["items"].append(
        dict(item=item, value=value, verdict=verdict, **details))
    print(f"  [{elapsed():6.1f}s] {section}: {item}: {value} {verdict}", flush=True)


SECTIONS = []


def section(name):
    """Registers the decorated function as a section, run in the order of definition."""
    def register(fn):
        SECTIONS.append((name, fn))
        return fn
    return register


def run_section(name, fn):
    """Runs one section, recording an exception instead of raising it."""
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        if over_budget():
            record(name, "(section)", "-", "SKIPPED (budget)")
        else:
            fn()
    except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others
        tb = traceback.format_exc()
        print(tb, flush=True)
        results["sections"].setdefault(name, {"items": []})["error"] = tb
        record(name, "(section)", f"{type(exc).__name__}: {str(exc)[:200]}", "ERROR")
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    results["sections"].setdefault(name, {"items": []})["seconds"] = round(time.perf_counter() - t0, 2)
    save()


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn) -> float:
    """Median time of fn in ms: CUDA events with the L2 flushed (do_bench) on the GPU, wall
    clock on the CPU."""
    if DEVICE.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def wall_ms(fn, reps) -> float:
    """Median wall-clock time of fn followed by a device sync, in ms (host work included)."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def rel_err(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """max |got - want| / max |want| over the valid entries; inf if any of them is not finite."""
    got, want = got.detach().double(), want.detach().double()
    if valid is not None:
        got, want = got[valid], want[valid]
    if got.numel() == 0:
        return 0.0
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def cost_inputs(P, side, dtype, embed, seed=0):
    """Logits [B, Q, P] (or embeddings [B, Q, C] and a feature [B, C, side, side]), targets
    [B, T, P] with NaN padding beyond each image's count, counts, class logits, labels."""
    g = generator(seed)
    counts = torch.tensor(COUNTS, device=DEVICE)
    y = (torch.rand(B, T, P, generator=g, device=DEVICE) < 0.3).float()
    for b, n in enumerate(COUNTS):
        y[b, n:] = float("nan")  # padding is never read
    class_logits = torch.randn(B, Q, K1, generator=g, device=DEVICE)
    labels = torch.randint(0, K1 - 1, (B, T), generator=g, device=DEVICE)
    if embed:
        e = (torch.randn(B, Q, C, generator=g, device=DEVICE) * (3 / C**0.5)).to(dtype)
        f = torch.randn(B, C, side, side, generator=g, device=DEVICE).to(dtype)
        return (e, f), y, counts, class_logits, labels
    x = (torch.randn(B, Q, P, generator=g, device=DEVICE) * 3).to(dtype)
    return x, y, counts, class_logits, labels


def fused_cost(embed, x, y, counts, class_logits, labels, mask_cost):
    if embed:
        e, f = x
        return mask_cost_from_embeddings(e, f, y.view(B, T, *f.shape[2:]), counts, class_logits, labels,
                                         mask_cost=mask_cost, backend="triton", **WEIGHTS[mask_cost])
    return pairwise_mask_cost(x, y, counts, class_logits, labels, mask_cost=mask_cost, backend="triton",
                              **WEIGHTS[mask_cost])


def cost64(x, y, counts, class_logits, labels, mask_cost):
    """float64 [B, Q, T] cost from the formulas, and the valid entries (t < count)."""
    w = WEIGHTS[mask_cost]
    x, y = x.double(), y.double().nan_to_num(0.0)
    P = x.shape[-1]
    p = torch.sigmoid(x)
    zero = torch.zeros_like(x)
    pos, neg = torch.logaddexp(zero, -x), torch.logaddexp(zero, x)  # BCE(x, 1), BCE(x, 0)
    del zero
    if mask_cost == "focal":
        pos, neg = 0.25 * (1 - p) ** 2 * pos, 0.75 * p**2 * neg
    yt = y.transpose(1, 2)
    mask = (pos @ yt + neg @ (1 - yt)) / P
    dice = 1 - (2 * p @ yt + 1) / (p.sum(-1)[:, :, None] + y.sum(-1)[:, None, :] + 1)
    prob = class_logits.double().softmax(-1)
    cls = torch.gather(prob, 2, labels[:, None, :].expand(-1, x.shape[1], -1))
    cost = w["w_class"] * -cls + w["w_mask"] * mask + w["w_dice"] * dice
    valid = (torch.arange(y.shape[1], device=x.device) < counts[:, None])[:, None, :].expand_as(cost)
    return cost, valid


# Mask2Former's matcher, per image (mask2former/modeling/matcher.py), and MaskFormer's focal term

def batch_dice_loss(inputs, targets):
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_loss(inputs, targets):
    hw = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, (1 - targets))
    return loss / hw


def batch_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2):
    hw = inputs.shape[1]
    prob = inputs.sigmoid()
    focal_pos = ((1 - prob) ** gamma) * F.binary_cross_entropy_with_logits(
        inputs, torch.ones_like(inputs), reduction="none")
    focal_neg = (prob**gamma) * F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    focal_pos, focal_neg = focal_pos * alpha, focal_neg * (1 - alpha)
    loss = torch.einsum("nc,mc->nm", focal_pos, targets) + torch.einsum("nc,mc->nm", focal_neg, (1 - targets))
    return loss / hw


def per_image_cost(logits_b, masks_b, tgt_b, labels_b, mask_cost):
    """One image's [Q, n] cost as Mask2Former (bce) / MaskFormer (focal) compute it."""
    w = WEIGHTS[mask_cost]
    cost_class = -logits_b.softmax(-1)[:, labels_b]
    masks_b, tgt_b = masks_b.float(), tgt_b.float()
    mask = batch_sigmoid_ce_loss(masks_b, tgt_b) if mask_cost == "bce" else batch_sigmoid_focal_loss(masks_b, tgt_b)
    return w["w_mask"] * mask + w["w_class"] * cost_class + w["w_dice"] * batch_dice_loss(masks_b, tgt_b)


def per_image_costs(class_logits, x, y, labels, mask_cost):
    """The batch's costs image by image, as the reference matchers loop."""
    return [per_image_cost(class_logits[b], x[b], y[b, :n], labels[b, :n], mask_cost) for b, n in enumerate(COUNTS)]


def einsum_then_cost(e, f, y, counts, class_logits, labels):
    """The logits [B, Q, H*W] made by torch, then the fused cost of them."""
    return fused_cost(False, torch.einsum("bqc,bchw->bqhw", e, f).flatten(2), y, counts, class_logits, labels, "bce")


def point_sample(masks, coords):
    """Mask2Former's point_sample: grid_sample at coords [N, P, 2] in [0, 1]^2."""
    return F.grid_sample(masks, 2.0 * coords.unsqueeze(2) - 1.0, align_corners=False).squeeze(3)


def m2f_match(layers, targets):
    """Mask2Former's matching of every layer: per image, the cost on the device, .cpu(), scipy."""
    out = []
    for o in layers:
        indices = []
        for b in range(len(targets)):
            out_prob = o["pred_logits"][b].softmax(-1)
            tgt_ids = targets[b]["labels"]
            cost_class = -out_prob[:, tgt_ids]
            out_mask = o["pred_masks"][b][:, None]
            tgt_mask = targets[b]["masks"].to(out_mask)[:, None]
            coords = torch.rand(1, POINTS, 2, device=out_mask.device)
            tgt_mask = point_sample(tgt_mask, coords.repeat(tgt_mask.shape[0], 1, 1)).squeeze(1)
            out_mask = point_sample(out_mask, coords.repeat(out_mask.shape[0], 1, 1)).squeeze(1)
            out_mask, tgt_mask = out_mask.float(), tgt_mask.float()
            cost = (M2F["w_mask"] * batch_sigmoid_ce_loss(out_mask, tgt_mask) + M2F["w_class"] * cost_class
                    + M2F["w_dice"] * batch_dice_loss(out_mask, tgt_mask))
            indices.append(scipy.optimize.linear_sum_assignment(cost.reshape(out_mask.shape[0], -1).cpu()))
        out.append(indices)
    return out


def seed_all(seed):
    torch.manual_seed(seed)  # also seeds every CUDA generator


# --------------------------------------------------------------------------- sections

@section("environment")
def _environment():
    env = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
               interpreter=os.environ.get("TRITON_INTERPRET") == "1",
               cuda_solver="cuda" in compiled_backends(), cpu_solver="cpu" in compiled_backends())
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        env.update(gpu=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    results["environment"] = env
    record("environment", "versions", f"torch {env['torch']}, triton {env['triton']}", "")
    if DEVICE.type == "cuda":
        record("environment", "gpu", f"{env['gpu']}, {env['sms']} SMs, sm_{props.major}{props.minor}", "")
    record("environment", "compiled CUDA solver", str(env["cuda_solver"]),
           "" if env["cuda_solver"] or SMOKE else "(absent: the matcher falls back to scipy, which syncs)")


BANDWIDTH = {"bytes_per_s": None}


@section("bandwidth")
def _bandwidth():
    n = (1 << 22) if SMOKE else (1 << 28)  # fp32 elements: 16 MiB / 1 GiB
    src = torch.ones(n, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    times = []
    for _ in range(5 if SMOKE else 20):
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    BANDWIDTH["bytes_per_s"] = 2 * n * 4 / seconds
    results["bandwidth"] = dict(bytes=2 * n * 4, median_s=seconds, bytes_per_s=BANDWIDTH["bytes_per_s"])
    record("bandwidth", f"copy {n * 4 / 2**30:.3g} GiB (read + write)", f"{BANDWIDTH['bytes_per_s'] / 1e12:.2f} TB/s",
           "")
    del src, dst


@section("accuracy")
def _accuracy():
    for embed in (False, True):
        kernel = "mask_cost_from_embeddings" if embed else "pairwise_mask_cost"
        for name, P, side in SIZES:
            if embed and side is None:
                continue
            name = f"{side}x{side}" if embed else name
            for dtype in (torch.float32, LOW):
                for mask_cost in ("bce", "focal"):
                    if over_budget():
                        record("accuracy", f"{kernel} {name}", "-", "SKIPPED (budget)")
                        continue
                    x, y, counts, class_logits, labels = cost_inputs(P, side, dtype, embed)
                    got = fused_cost(embed, x, y, counts, class_logits, labels, mask_cost)
                    logits = torch.einsum("bqc,bchw->bqhw", x[0].double(), x[1].double()).flatten(2) if embed else x
                    want, valid = cost64(logits, y, counts, class_logits, labels, mask_cost)
                    err = rel_err(got, want, valid)
                    padding_inf = bool(torch.isposinf(got[~valid]).all())
                    ok = err <= COST_TOL and padding_inf
                    record("accuracy", f"{kernel} {name} {DTYPE_NAME[dtype]} {mask_cost}", f"rel err {err:.2e}",
                           verdict(ok), rel_err=err, tol=COST_TOL, padding_inf=padding_inf)
                    del x, y, got, want, logits, valid
    for name, P, side in SIZES:
        if side is None:
            continue
        for dtype in (torch.float32, LOW):
            if over_budget():
                record("accuracy", f"mask_einsum {name}", "-", "SKIPPED (budget)")
                continue
            g = generator(2)
            embed = torch.randn(B, Q, C, generator=g, device=DEVICE).to(dtype)
            feat = torch.randn(B, C, side, side, generator=g, device=DEVICE).to(dtype)
            grad = torch.randn(B, Q, side, side, generator=g, device=DEVICE).to(dtype)
            leaves = [t.clone().requires_grad_() for t in (embed, feat)]
            out = mask_einsum(*leaves, backend="triton")
            got = (out, *torch.autograd.grad(out, leaves, grad))
            ref_leaves = [t.double().requires_grad_() for t in (embed, feat)]
            ref = torch.einsum("btc,bchw->bthw", *ref_leaves)
            want = (ref, *torch.autograd.grad(ref, ref_leaves, grad.double()))
            errs = {k: rel_err(a, b) for k, a, b in zip(("forward", "grad_embed", "grad_feat"), got, want)}
            tol = EINSUM_TOL[dtype]
            ok = all(e <= tol for e in errs.values())
            record("accuracy", f"mask_einsum {name} {DTYPE_NAME[dtype]}",
                   ", ".join(f"{k} {e:.1e}" for k, e in errs.items()), verdict(ok), rel_err=errs, tol=tol)
            del embed, feat, grad, leaves, out, got, ref_leaves, ref, want


@section("determinism")
def _determinism():
    for embed in (False, True):
        name, P, side = next(size for size in SIZES if size[2] is not None or not embed)
        name = f"{side}x{side}" if embed else name
        for mask_cost in ("bce", "focal"):
            x, y, counts, class_logits, labels = cost_inputs(side * side if embed else P, side, torch.float32, embed, 1)
            first = fused_cost(embed, x, y, counts, class_logits, labels, mask_cost)
            runs = [fused_cost(embed, x, y, counts, class_logits, labels, mask_cost) for _ in range(RERUNS)]
            differ = sum(not torch.equal(r, first) for r in runs)
            kernel = "mask_cost_from_embeddings" if embed else "pairwise_mask_cost"
            record("determinism", f"{kernel} {name} {mask_cost}, {RERUNS} reruns", f"{differ} differ",
                   verdict(differ == 0), differ=differ, reruns=RERUNS)
    _, _, side = next(size for size in SIZES if size[2] is not None)
    name = f"{side}x{side}"
    g = generator(4)
    embed = torch.randn(B, Q, C, generator=g, device=DEVICE, requires_grad=True)
    feat = torch.randn(B, C, side, side, generator=g, device=DEVICE)
    grad = torch.randn(B, Q, side, side, generator=g, device=DEVICE)
    out = mask_einsum(embed, feat, backend="triton")
    first = torch.autograd.grad(out, embed, grad, retain_graph=True)[0]
    differ = sum(not torch.equal(torch.autograd.grad(out, embed, grad, retain_graph=True)[0], first)
                 for _ in range(RERUNS_EINSUM))
    record("determinism", f"mask_einsum grad_embed (split K) {name}, {RERUNS_EINSUM} reruns", f"{differ} differ",
           verdict(differ == 0), differ=differ, reruns=RERUNS_EINSUM)


@section("timings")
def _timings():
    bw = BANDWIDTH["bytes_per_s"]
    for name, P, side in SIZES:
        for mask_cost, dtype in (("bce", torch.float32), ("bce", LOW), ("focal", torch.float32)):
            if over_budget():
                record("timings", f"{name} {mask_cost}", "-", "SKIPPED (budget)")
                continue
            x, y, counts, class_logits, labels = cost_inputs(P, side, dtype, False)
            y = y.nan_to_num(0.0)
            fused = bench_ms(partial(fused_cost, False, x, y, counts, class_logits, labels, mask_cost))
            ref = bench_ms(partial(per_image_costs, class_logits, x, y, labels, mask_cost)) \
                if dtype == torch.float32 else None
            nbytes = x.numel() * x.element_size() + y.numel() * 4 + class_logits.numel() * 4 + B * Q * T * 4
            floor = nbytes / bw * 1e3 if bw else float("nan")
            value = (f"fused {fused:.3g} ms" + (f", per-image {ref:.3g} ms ({ref / fused:.1f}x)" if ref else "")
                     + f", floor {floor:.3g} ms ({fused / floor:.1f}x floor)")
            record("timings", f"cost {name} {DTYPE_NAME[dtype]} {mask_cost}", value, "", fused_ms=fused,
                   per_image_ms=ref, floor_ms=floor, bytes=nbytes)
        if side is None or over_budget():
            continue
        # from embeddings: the fused kernel vs the logits made by torch and then costed
        (e, f), y, counts, class_logits, labels = cost_inputs(P, side, torch.float32, True)
        y = y.nan_to_num(0.0)
        fused = bench_ms(partial(fused_cost, True, (e, f), y, counts, class_logits, labels, "bce"))
        two_step = bench_ms(partial(einsum_then_cost, e, f, y, counts, class_logits, labels))
        nbytes = (e.numel() + f.numel() + y.numel() + class_logits.numel() + B * Q * T) * 4
        floor = nbytes / bw * 1e3 if bw else float("nan")
        record("timings", f"cost from embeddings {side}x{side} fp32 bce",
               f"fused {fused:.3g} ms, einsum + cost {two_step:.3g} ms ({two_step / fused:.1f}x), "
               f"floor {floor:.3g} ms ({fused / floor:.1f}x floor)", "", fused_ms=fused, two_step_ms=two_step,
               floor_ms=floor, bytes=nbytes)


def matching_inputs(seed=5):
    g = generator(seed)
    layers = [{"pred_logits": torch.randn(B, Q, K1, generator=g, device=DEVICE),
               "pred_masks": torch.randn(B, Q, PRED_SIDE, PRED_SIDE, generator=g, device=DEVICE) * 3}
              for _ in range(LAYERS)]
    targets = [{"labels": torch.randint(0, K1 - 1, (n,), generator=g, device=DEVICE),
                "masks": (torch.rand(n, TGT_SIDE, TGT_SIDE, generator=g, device=DEVICE) < 0.3).float()}
               for n in COUNTS]
    return layers, targets


@section("matching")
def _matching():
    layers, targets = matching_inputs()
    matcher = HungarianMatcher.mask2former(nonfinite="forbid", backend="triton")
    matcher.num_points = POINTS

    def ours():
        return matcher.match_layers(layers, targets, check=False)

    seed_all(11)
    col4row = [c.clone() for c in ours()]
    seed_all(11)
    reference = m2f_match(layers, targets)
    mismatched = 0
    for layer, (c, ref) in enumerate(zip(col4row, reference)):
        for b, (rows, cols) in enumerate(ref):
            want = torch.full((Q,), -1, dtype=torch.int64)
            want[torch.as_tensor(rows, dtype=torch.int64)] = torch.as_tensor(cols, dtype=torch.int64)
            mismatched += not torch.equal(c[b].cpu(), want)
    items = LAYERS * B
    record("matching", f"indices vs per-image reference ({LAYERS} layers x {B} images)",
           f"{mismatched} of {items} differ", verdict(mismatched == 0), mismatched=mismatched, items=items)

    t_ours = wall_ms(ours, MATCH_REPS)
    t_pairs = wall_ms(lambda: matcher.match_layers(layers, targets), MATCH_REPS)  # + check and pairs to host
    t_ref = wall_ms(lambda: m2f_match(layers, targets), MATCH_REPS)
    record("matching", "match_layers (col4row on the device)", f"{t_ours:.2f} ms vs per-image {t_ref:.2f} ms "
           f"({t_ref / t_ours:.1f}x)", "", ours_ms=t_ours, reference_ms=t_ref, speedup=t_ref / t_ours,
           solver="cuda" if "cuda" in compiled_backends() else "scipy fallback")
    record("matching", "match_layers + check (host sync)", f"{t_pairs:.2f} ms ({t_ref / t_pairs:.1f}x)", "",
           ours_ms=t_pairs)

    if DEVICE.type != "cuda":
        record("matching", "sync debug / CUDA graph", "-", "SKIPPED (no CUDA)")
        return
    if over_budget():
        record("matching", "sync debug / CUDA graph", "-", "SKIPPED (budget)")
        return
    # host syncs: every syncing call of the sync-free variant (mode "warn", each warning's
    # stack kept), then the verdict under mode "error"
    sites = []

    def keep_site(message, category, filename, lineno, file=None, line=None):
        stack = [fr for fr in traceback.extract_stack()[:-1] if "warnings" not in fr.filename]
        sites.append(dict(message=str(message)[:160], stack=[
            f"{fr.filename.replace(ROOT + os.sep, '')}:{fr.lineno} {fr.name}: {fr.line}" for fr in stack[-5:]]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = keep_site
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ours()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sites = [site for site in sites if "synchroniz" in site["message"].lower()]
    if sites:
        print("    host syncs in match_layers(check=False):", flush=True)
        for site in sites:
            print(f"      {site['message']}\n        " + "\n        ".join(site["stack"]), flush=True)
    try:
        torch.cuda.set_sync_debug_mode("error")
        ours()
        sync_verdict, sync_value = "PASS", "no host sync"
    except Exception as exc:  # noqa: BLE001
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename.replace(ROOT + os.sep, '')}:{frames[-1].lineno}" if frames else "?"
        sync_verdict, sync_value = "FAIL", f"{type(exc).__name__} at {where}: {str(exc)[:120]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    record("matching", "match_layers(check=False) under set_sync_debug_mode('error')", sync_value, sync_verdict,
           sync_sites=sites)

    # CUDA graph: capture after a warm-up on a side stream, replay with the eager call's seed
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            ours()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        seed_all(13)
        with torch.cuda.graph(graph):
            static = ours()
    except Exception as exc:  # noqa: BLE001
        record("matching", "CUDA graph capture", f"{type(exc).__name__}: {str(exc)[:200]}", "FAIL",
               traceback=traceback.format_exc())
        return
    seed_all(13)
    eager = [c.clone() for c in ours()]
    seed_all(13)
    graph.replay()
    sync()
    equal = all(torch.equal(a, b) for a, b in zip(static, eager))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    t_graph = statistics.median(times)
    record("matching", "CUDA graph replay == eager", str(equal), verdict(equal))
    record("matching", "CUDA graph replay", f"{t_graph:.2f} ms vs per-image {t_ref:.2f} ms ({t_ref / t_graph:.1f}x)",
           "", graph_ms=t_graph)


# --------------------------------------------------------------------------- summary

def summary_text() -> str:
    rows = [("section", "item", "value", "verdict")] + summary
    widths = [min(max(len(r[i]) for r in rows), 90) for i in range(4)]
    lines = [" | ".join(c[:90].ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append(f"\n{failures()} FAIL/ERROR, {sum(r[3] == 'PASS' for r in summary)} PASS, "
                 f"{sum(r[3].startswith('SKIPPED') for r in summary)} skipped; {elapsed():.0f} s "
                 f"({results['mode']})")
    return "\n".join(lines)


def failures() -> int:
    return sum(r[3] in ("FAIL", "ERROR") for r in summary)


if __name__ == "__main__":
    for name, fn in SECTIONS:
        run_section(name, fn)
    print("\n" + summary_text(), flush=True)
    sys.exit(1 if failures() else 0)
