import os
import platform
import statistics
import time

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. The
# variable must be set before any @triton.jit decorator runs, so before the kernel
# modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # the widest vectors the CPU has (the solver's code differs between AVX2 and AVX-512)
    cpu += f" ({torch.backends.cpu.get_cpu_capability()})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {gpu}"


def _interleaved(fns: dict, seconds: float = 1.0, min_rounds: int = 7) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn, round after round, so that
    a slow moment of the machine falls on all of them alike. A turn repeats a fast function
    until it lasts about 0.2 ms (a single microsecond call is below the clock's noise)."""
    reps = {}
    for name, fn in fns.items():  # warm-up, and the repetitions per turn
        fn()
        start = time.perf_counter()
        fn()
        reps[name] = max(1, int(2e-4 / max(time.perf_counter() - start, 1e-7)))
    times = {name: [] for name in fns}
    deadline = time.perf_counter() + seconds * len(fns)
    rounds = 0
    while rounds < min_rounds or time.perf_counter() < deadline:
        for name, fn in fns.items():
            n = reps[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}


class Table:
    """Collects one number per (table, case, implementation): the median time of a benchmark
    or another measured value (peak memory), and prints ratio tables at the end."""

    UNITS = {  # unit: (scale of the stored value, what the table shows)
        "ms": (1e3, "median ms"),  # stored in seconds
        "MB": (1e-6, "peak MB allocated during the call"),  # bytes
        "GB/s": (1e-9, "GB/s: the least bytes the kernel must move / median time"),  # bytes per second
    }

    def __init__(self):
        self.rows: dict[str, dict[str, dict[str, float]]] = {}
        self.units: dict[str, str] = {}

    def add(self, table: str, case: str, solver: str, benchmark) -> None:
        if benchmark.disabled or benchmark.stats is None:
            return
        self.add_value(table, case, solver, benchmark.stats.stats.median, "ms")

    def add_value(self, table: str, case: str, solver: str, value: float, unit: str) -> None:
        """`value` in the stored unit of `unit` (see UNITS)."""
        self.units[table] = unit
        self.rows.setdefault(table, {}).setdefault(case, {})[solver] = value

    def render(self) -> list[str]:
        lines = []
        for table, cases in self.rows.items():
            scale, what = self.UNITS[self.units[table]]
            solvers = list(dict.fromkeys(s for row in cases.values() for s in row))
            lines += ["", f"## {table} ({what}; ratio = other / maskformer_fast)", ""]
            lines.append("| case | " + " | ".join(solvers) + " |")
            lines.append("|---" * (len(solvers) + 1) + "|")
            for case, row in cases.items():
                ours = row.get("maskformer_fast")
                cells = []
                for s in solvers:
                    t = row.get(s)
                    if t is None:
                        cells.append("")
                    elif ours and s != "maskformer_fast":
                        cells.append(f"{scale * t:.3g} ({t / ours:.1f}x)")
                    else:
                        cells.append(f"{scale * t:.3g}")
                lines.append(f"| {case} | " + " | ".join(cells) + " |")
        return lines


@pytest.fixture(scope="session")
def interleaved():
    """_interleaved: each function's median seconds, the functions timed in turn."""
    return _interleaved


@pytest.fixture(scope="session")
def table(request):
    t = Table()
    yield t
    if t.rows:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"machine: {machine_name()}"] + t.render()
        for line in lines:
            reporter.write_line(line)
        with open(os.path.join(request.config.rootpath, ".benchmarks", "tables.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
