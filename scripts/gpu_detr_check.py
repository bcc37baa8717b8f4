"""DETR's solve step on a GPU: what its matcher does today against the one-line swap.

    python3 scripts/gpu_detr_check.py --out DIR
    python3 scripts/gpu_detr_check.py --smoke   # this script's own code, on the CPU, small

The cost `C [B, Q, sum T]` lies on the device, as DETR computes it. Stock: DETR's matcher.py
from there on (`C.cpu()`, scipy per `C.split(sizes, -1)` block, `torch.as_tensor`); ours:
`batch_linear_sum_assignment(C, col_splits=sizes).pairs()` (index pairs on the device, one
copy to the host and one back). Checks the two index for index, counts our host syncs with
torch.cuda.set_sync_debug_mode, and times both (wall clock, warm, interleaved medians).
Writes DIR/detr.json; exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import scipy.optimize
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maskformer_fast.hungarian import batch_linear_sum_assignment  # noqa: E402


def detr_step(C, sizes):
    C = C.cpu()
    indices = [scipy.optimize.linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            for i, j in indices]


def swapped_step(C, sizes):
    return batch_linear_sum_assignment(C, col_splits=sizes).pairs()


def swapped_step_on_cpu(C, sizes):
    """The swap with the solve on the CPU: one copy of C to the host, CPU pairs."""
    return batch_linear_sum_assignment(C.cpu(), col_splits=sizes).pairs()


def syncs_of(fn) -> int:
    """Host syncs of fn(), as torch.cuda.set_sync_debug_mode("warn") reports them."""
    if not torch.cuda.is_available():
        return -1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in record)


def interleaved_ms(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(1e3 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    g = torch.Generator().manual_seed(0)
    rows, failed = [], False
    for B, Q in ([(4, 20)] if args.smoke else [(2, 100), (8, 100), (32, 100), (32, 300), (32, 900)]):
        sizes = torch.randint(1, 21, (B,), generator=g).tolist()
        C = torch.rand(B, Q, sum(sizes), generator=g).to(device)
        got, want = swapped_step(C, sizes), detr_step(C, sizes)
        same = all(torch.equal(a.cpu(), x) and torch.equal(b.cpu(), y) for (a, b), (x, y) in zip(got, want))
        syncs = syncs_of(lambda: swapped_step(C, sizes))
        t = interleaved_ms({"ours": lambda: swapped_step(C, sizes), "detr": lambda: detr_step(C, sizes),
                            "ours_cpu": lambda: swapped_step_on_cpu(C, sizes)},
                           rounds=5 if args.smoke else 50)
        failed |= not same or syncs > 1
        rows.append(dict(case=f"B={B} Q={Q}", same=same, syncs=syncs, ours_ms=t["ours"], detr_ms=t["detr"],
                         ours_cpu_ms=t["ours_cpu"]))
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    print(f"DETR solve step on {name}, C on the device; median ms (ratios: DETR loop / that column)")
    print("| case | maskformer_fast | DETR loop | maskformer_fast, solve on the CPU | host syncs (ours) "
          "| index-identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ours_ms']:.3f} | {r['detr_ms']:.3f} ({r['detr_ms'] / r['ours_ms']:.1f}x) "
              f"| {r['ours_cpu_ms']:.3f} ({r['detr_ms'] / r['ours_cpu_ms']:.1f}x) | {r['syncs']} | {r['same']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "detr.json").write_text(json.dumps(dict(device=name, rows=rows), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
