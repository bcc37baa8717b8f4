"""Command line: `python -m maskformer_fast demo` (the default)."""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import scipy.optimize
import torch

from maskformer_fast.hungarian import batch_linear_sum_assignment


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def demo(batch: int, queries: int, max_targets: int, layers: int, seed: int) -> None:
    """Matches a Mask2Former-sized batch (every decoder layer of every image) in one call
    and compares it with the per-image scipy loop trainers use today."""
    g = torch.Generator().manual_seed(seed)
    items = batch * layers
    counts = torch.randint(1, max_targets + 1, (batch,), generator=g).repeat(layers)
    cost = torch.rand(items, queries, max_targets, generator=g)
    cost.masked_fill_(torch.arange(max_targets) >= counts[:, None, None], float("nan"))
    sizes = torch.stack([torch.full_like(counts, queries), counts], 1)

    def scipy_loop():
        out = []
        for b in range(items):  # what DETR / Mask2Former do: .cpu(), then scipy per image
            c = cost[b, :, : int(counts[b])].cpu().numpy()
            out.append(scipy.optimize.linear_sum_assignment(c))
        return out

    ours = batch_linear_sum_assignment(cost, sizes).pairs()
    ref = scipy_loop()
    same = all(
        np.array_equal(r.numpy(), rr) and np.array_equal(c.numpy(), cc)
        for (r, c), (rr, cc) in zip(ours, ref)
    )
    t_ours = _median_ms(lambda: batch_linear_sum_assignment(cost, sizes), 30)
    t_ref = _median_ms(scipy_loop, 10)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{items} problems ({batch} images x {layers} decoder layers), {queries} queries x "
        f"1..{max_targets} targets"
    )
    print(f"  scipy loop (.cpu() + scipy per image): {t_ref:8.3f} ms")
    print(f"  maskformer_fast, one batched call:     {t_ours:8.3f} ms   ({t_ref / t_ours:.1f}x)")
    print(f"  index-identical to scipy on every problem: {same}")
    if not same:
        raise SystemExit("mismatch with scipy")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="maskformer-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p_demo = sub.add_parser("demo", help="batched Hungarian matching vs the scipy loop")
    p_demo.add_argument("--batch", type=int, default=16)
    p_demo.add_argument("--queries", type=int, default=100)
    p_demo.add_argument("--max-targets", type=int, default=20)
    p_demo.add_argument("--layers", type=int, default=10)
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        defaults = parser.parse_args(["demo"]) if args.command is None else args
        demo(defaults.batch, defaults.queries, defaults.max_targets, defaults.layers, defaults.seed)
