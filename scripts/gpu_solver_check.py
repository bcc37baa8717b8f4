"""The CUDA solver on a GPU: parity, determinism, no host sync, and one timing table.

    python3 scripts/gpu_solver_check.py --out DIR [--budget SECONDS]
    python3 scripts/gpu_solver_check.py --smoke   # this script's own code, on the CPU, small

1. Parity: the corpus of hard cases (maskformer_fast.selfcheck.corpus) on CUDA against the
   CPU path (indices, status, duals bit for bit) and scipy (indices, status), with every team
   width; then every timed case, every width, three runs each, bit for bit against the CPU.
2. No host sync: the public API with errors="status" under
   torch.cuda.set_sync_debug_mode("error"), and captured in a CUDA graph and replayed.
3. Timings, warm, medians: CUDA events for the GPU paths, the wall clock for the host ones.
   Ours with the plan's width and with each width forced (lsa_duals), torch-linear-assignment
   when installed (its Triton path only: a fallback to scipy is reported, not timed), the
   scipy loop (.cpu() and one scipy call per item) and this library's CPU path on a CPU
   tensor.

Writes DIR/solver.json; prints the table last. Exit status 1 when any
parity or sync check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maskformer_fast import _ops  # noqa: E402
from maskformer_fast.hungarian import batch_linear_sum_assignment, compiled_backends  # noqa: E402
from maskformer_fast.selfcheck import check_parity, corpus, median_ms  # noqa: E402

WIDTHS = (32, 64, 128, 256, 512)  # every team width the plan can pick
DEVICE = "cuda"  # "cpu" with --smoke
LSA, DUALS = torch.ops.maskformer_fast.lsa, torch.ops.maskformer_fast.lsa_duals
TLA_CASES = ("B=208 300x100", "B=208 300x300", "B=208 300x600")


def cases(g: torch.Generator, smoke: bool = False):
    """(name, cost [B, N, M] float32 on the CPU, sizes [B, 2] or None)."""
    ragged = torch.stack([torch.full((32,), 100), torch.randint(1, 21, (32,), generator=g)], 1)
    if smoke:
        return [("B=8 30x60", torch.rand(8, 30, 60, generator=g), None),
                ("B=32 100x[1,20]", torch.rand(32, 100, 20, generator=g), ragged)]
    return [
        ("B=208 300x100", torch.rand(208, 300, 100, generator=g), None),
        ("B=208 300x300", torch.rand(208, 300, 300, generator=g), None),
        ("B=208 300x600", torch.rand(208, 300, 600, generator=g), None),
        ("B=32 100x[1,20]", torch.rand(32, 100, 20, generator=g), ragged),
        ("B=256 50x50", torch.rand(256, 50, 50, generator=g), None),
        ("1000x1000", torch.rand(1, 1000, 1000, generator=g), None),
        ("2000x2000", torch.rand(1, 2000, 2000, generator=g), None),
    ]


def same_bits(got, want) -> bool:
    """col4row, status, u, v equal, the duals bit for bit."""
    for a, b in zip(got, want):
        a, b = a.cpu(), b.cpu()
        if a.is_floating_point():
            a, b = a.view(torch.int64), b.view(torch.int64)
        if not torch.equal(a, b):
            return False
    return True


def machine() -> dict:
    info = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads()}
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu_count"] = os.cpu_count()
    return info


def parity_corpus(failures: list[str]) -> None:
    for seed in (0, 1):
        failures += check_parity(corpus(seed), DEVICE)
    for lanes in WIDTHS:
        for case in corpus(seed=lanes):
            sizes = case.sizes.to(DEVICE) if case.sizes is not None else None
            want = DUALS(case.cost, case.sizes, case.maximize, 1)
            if not same_bits(DUALS(case.cost.to(DEVICE), sizes, case.maximize, lanes), want):
                failures.append(f"corpus {case.name}: width {lanes} differs from the CPU")
    print(f"parity corpus: {len(failures)} failure(s)", flush=True)


def no_sync(name, gpu, sizes, failures: list[str]) -> None:
    """errors="status" must not synchronise; a captured call must replay to the same result."""
    if DEVICE != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = batch_linear_sum_assignment(gpu, sizes, errors="status")
    except RuntimeError as exc:
        failures.append(f"{name}: errors='status' synchronised: {exc}")
        return
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = batch_linear_sum_assignment(gpu, sizes, errors="status")
    graph.replay()
    torch.cuda.synchronize()
    if not (torch.equal(captured.col4row, eager.col4row) and torch.equal(captured.status, eager.status)):
        failures.append(f"{name}: the CUDA graph's replay differs from the eager call")


def tla_solver():
    """torch-linear-assignment's Triton path, or None with the reason."""
    if DEVICE != "cuda":
        return None, "not timed on the CPU"
    try:
        import torch_linear_assignment as tla
        from torch_linear_assignment import assignment
    except ImportError as exc:
        return None, f"not installed ({exc})"
    probe = torch.rand(1, 3, 3, device="cuda")
    if not assignment._cuda_uses_triton(probe):
        return None, "its Triton path is unavailable here (it would fall back to scipy)"
    return tla.batch_linear_assignment, "0.1.0 Triton"


def timed_case(name, cost, sizes, tla, failures, budget_s) -> dict:
    gpu = cost.to(DEVICE)
    gsizes = sizes.to(DEVICE) if sizes is not None else None
    on_gpu = DEVICE == "cuda"
    shapes = sizes.tolist() if sizes is not None else [list(cost.shape[1:])] * cost.shape[0]
    want = DUALS(cost, sizes, False, 1)
    row: dict = {"case": name}
    # Parity and determinism: every width, three runs each, bit for bit against the CPU.
    bad = [lanes for lanes in (1, *WIDTHS) for _ in range(3)
           if not same_bits(DUALS(gpu, gsizes, False, lanes), want)]
    if bad:
        failures.append(f"{name}: widths {sorted(set(bad))} differ from the CPU")
    row["parity"] = not bad
    no_sync(name, gpu, gsizes, failures)

    row["ours"] = median_ms(lambda: LSA(gpu, gsizes, False), on_gpu, budget_s)
    row["widths"] = {w: median_ms(lambda: DUALS(gpu, gsizes, False, w), on_gpu, budget_s / 4)
                     for w in (1, *WIDTHS)}
    row["tla"] = None
    if tla is not None and sizes is None:
        row["tla"] = median_ms(lambda: tla(gpu), on_gpu, budget_s)
        got = tla(gpu).cpu()
        row["tla_differs_from_scipy"] = int((got != want[0]).any(1).sum())

    def scipy_loop():
        host = gpu.cpu().numpy()
        return [scipy.optimize.linear_sum_assignment(host[b, :n, :m]) for b, (n, m) in enumerate(shapes)]

    row["scipy"] = median_ms(scipy_loop, False, budget_s)
    host = cost.clone()
    row["cpu"] = median_ms(lambda: LSA(host, sizes, False), False, budget_s)
    return row


def table(info: dict, rows: list[dict]) -> str:
    head = ["case", "ours (plan)", *(f"w{w}" for w in WIDTHS), "torch-linear-assignment", "scipy loop",
            "ours CPU", "TLA / ours", "scipy / ours", "CPU / ours", "parity"]
    lines = [f"{info['device']} (driver {info.get('driver')}), CPU {info.get('cpu')} "
             f"({info.get('cpu_count')} cores), torch {info['torch']}; median ms",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x: f"{x:.3f}" if x is not None else "n/a"  # noqa: E731
    ratio = lambda x, y: f"{x / y:.1f}x" if x is not None and y else "n/a"  # noqa: E731
    for r in rows:
        cells = [r["case"], fmt(r["ours"]), *(fmt(r["widths"].get(w)) for w in WIDTHS), fmt(r["tla"]),
                 fmt(r["scipy"]), fmt(r["cpu"]), ratio(r["tla"], r["ours"]), ratio(r["scipy"], r["ours"]),
                 ratio(r["cpu"], r["ours"]), "ok" if r["parity"] else "FAILED"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_logs"))
    p.add_argument("--budget", type=float, default=0.6, help="seconds of repetitions per timing")
    p.add_argument("--smoke", action="store_true", help="on the CPU, small cases: the script's own code")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    if not args.smoke and (not torch.cuda.is_available() or "cuda" not in compiled_backends()):
        print(f"needs a GPU and the CUDA kernels (load error: {_ops._LOAD_ERROR})")
        return 1
    info = machine()
    print(json.dumps(info), flush=True)
    failures: list[str] = []
    try:
        parity_corpus(failures)
    except Exception:  # noqa: BLE001 (the timings still run; the failure is reported)
        failures.append("parity corpus raised:\n" + traceback.format_exc())
    tla, tla_note = tla_solver()
    info["torch-linear-assignment"] = tla_note
    print(f"torch-linear-assignment: {tla_note}", flush=True)
    rows = []
    for name, cost, sizes in cases(torch.Generator().manual_seed(1), args.smoke):
        try:
            rows.append(timed_case(name, cost, sizes, tla, failures, args.budget))
            print(f"timed {name}: {json.dumps(rows[-1])}", flush=True)
        except Exception:  # noqa: BLE001
            failures.append(f"{name} raised:\n" + traceback.format_exc())
        (args.out / "solver.json").write_text(json.dumps({"machine": info, "rows": rows,
                                                          "failures": failures}, indent=1))
    text = table(info, rows)
    goals = []
    by = {r["case"]: r for r in rows}
    if all(c in by and by[c]["tla"] for c in TLA_CASES):
        worst = min(by[c]["tla"] / by[c]["ours"] for c in TLA_CASES)
        goals.append(f"goal >= 2x torch-linear-assignment on its three cases: worst {worst:.2f}x")
    if "2000x2000" in by:
        r = by["2000x2000"]
        goals.append(f"goal 2000x2000 faster than the CPU path: {r['cpu'] / r['ours']:.2f}x")
    text += "\n\n" + "\n".join(goals) + f"\n\nfailures: {len(failures)}\n" + "\n".join(failures)
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
