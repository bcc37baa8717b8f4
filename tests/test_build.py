"""The CUDA build's resource report, checked without a GPU: scripts/setup.sh keeps nvcc's
`-Xptxas -v` report in build/ptxas.log, and no lsa kernel (warp or block team, any dtype,
any architecture) may spill registers to local memory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from maskformer_fast.hungarian import compiled_backends

PTXAS_LOG = Path(__file__).resolve().parents[1] / "build" / "ptxas.log"


def ptxas_spills(lines: list[str]) -> list[tuple[str, str, int, int]]:
    """(function, architecture, spill store bytes, spill load bytes) per function of a
    `ptxas -v` report."""
    out, function, arch = [], "?", "?"
    for line in lines:
        if m := re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line):
            function, arch = m.groups()
        elif m := re.search(r"Function properties for (\S+)", line):
            function = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            out.append((function, arch, int(m.group(1)), int(m.group(2))))
    return out


def lsa_spill_failures(lines: list[str]) -> list[str]:
    """One message per lsa kernel that spills; a report without lsa kernels is a failure."""
    entries = [e for e in ptxas_spills(lines) if "lsa" in e[0]]
    if not entries:
        return ["no ptxas resource report for the lsa kernels (is `-Xptxas -v` still among "
                "setup.py's nvcc flags?)"]
    return [f"{name} on {arch}: {stores} bytes spill stores, {loads} bytes spill loads"
            for name, arch, stores, loads in entries if stores or loads]


def test_lsa_kernels_do_not_spill():
    if not PTXAS_LOG.exists():
        pytest.skip(f"{PTXAS_LOG} is absent: build with scripts/setup.sh to keep nvcc's report")
    if "cuda" not in compiled_backends():
        pytest.skip("the extension has no CUDA kernel: nvcc compiled nothing")
    lines = PTXAS_LOG.read_text().splitlines()
    assert lsa_spill_failures(lines) == []
    kernels = " ".join(name for name, *_ in ptxas_spills(lines))
    assert "lsa_warp_kernel" in kernels and "lsa_block_kernel" in kernels


def test_spill_check_on_a_synthetic_report():
    warp = "_ZN3lsa4cuda15lsa_warp_kernelIfEEvNS0_5BatchENS0_4PlanEPc"
    block = "_ZN3lsa4cuda16lsa_block_kernelIfEEvNS0_5BatchENS0_4PlanEPc"
    report = f"""\
  ptxas info    : Compiling entry function '{warp}' for 'sm_90'
  ptxas info    : Function properties for {warp}
      16 bytes stack frame, 24 bytes spill stores, 8 bytes spill loads
  ptxas info    : Used 255 registers, used 0 barriers, 536 bytes cmem[0]
  ptxas info    : Compiling entry function '{block}' for 'sm_90'
  ptxas info    : Function properties for {block}
      0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Compiling entry function 'other_kernel' for 'sm_90'
  ptxas info    : Function properties for other_kernel
      0 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads""".splitlines()
    assert ptxas_spills(report) == [(warp, "sm_90", 24, 8), (block, "sm_90", 0, 0),
                                    ("other_kernel", "sm_90", 4, 4)]
    assert lsa_spill_failures(report) == [
        f"{warp} on sm_90: 24 bytes spill stores, 8 bytes spill loads"]
    assert lsa_spill_failures(report[5:]) == []
    assert "no ptxas resource report" in lsa_spill_failures(report[7:])[0]


HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "lsa_harness.cpp"


# The solver's vector code differs by instruction set: a scalar loop (x86-64-v2), AVX2
# (v3) and AVX-512 (v4). Each level's flags, and the CPU flag it needs to run.
LEVELS = {"x86-64-v2": "sse4_2", "x86-64-v3": "avx2", "x86-64-v4": "avx512f"}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_solver_harness_builds_and_runs(tmp_path):
    """benchmarks/lsa_harness.cpp (the solver alone, for comparing two versions) compiles
    against csrc/lsa with the extension's flags for every instruction-set level, and the
    levels this CPU can run find the same matchings with bit-identical duals (hashes of the
    matchings and of the duals' bits) on shapes with tails, ties, and more than 64 columns,
    in scipy's order and on the certified path."""
    flags = ["-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math", "-std=c++20",
             "-pthread"]
    shapes = (["6", "9", "3", "2"], ["70", "70", "2", "1", "1"], ["1", "1", "1", "1"],
              ["13", "50", "20", "1"], ["40", "40", "10", "1", "1"], ["20", "300", "3", "1"])
    runs, have = {}, cpu_flags()
    for level, needs in LEVELS.items():
        exe = tmp_path / f"lsa_harness_{level}"
        subprocess.run(["g++", *flags, f"-march={level}", "-I", str(HARNESS.parents[1] / "csrc" / "lsa"),
                        str(HARNESS), "-o", str(exe)], check=True)
        if needs not in have:
            continue  # compiled, but this CPU cannot run it
        outs = []
        for args in shapes:
            out = subprocess.run([str(exe), *args], capture_output=True, text=True, check=True,
                                 timeout=60).stdout
            assert re.fullmatch(r"\d+x\d+ B=\d+ best [\d.]+ ms hash [0-9a-f]{16} duals \S+ "
                                r"bits [0-9a-f]{16}\n", out), out
            outs.append(out.split(" hash ")[1])
        # The certified path (square items): scipy's matchings; its own duals, which
        # agree across the levels too (ties broken by column, not by vector lane).
        for args in (["50", "50", "20", "1"], ["200", "200", "2", "1"], ["70", "70", "2", "1", "1"]):
            ordered = subprocess.run([str(exe), *args], capture_output=True, text=True,
                                     check=True, timeout=60).stdout
            env = {**os.environ, "LSA_CERTIFIED": "1"}
            out = subprocess.run([str(exe), *args], capture_output=True, text=True, check=True,
                                 timeout=60, env=env).stdout
            assert out.split(" hash ")[1].split()[0] == ordered.split(" hash ")[1].split()[0], args
            outs.append(out.split(" hash ")[1])
        assert subprocess.run([str(exe), "9", "6", "1", "1"], capture_output=True,
                              timeout=60).returncode == 2
        # Two threads on one problem (lsa::PairTeam), together to the end or parting at a
        # given step (member 0 goes on alone): the same matchings and duals, bit for bit.
        for pair in ("1", "2", "37", "400"):
            for args in (["300", "700", "1", "1"], ["600", "600", "1", "1", "1"], ["1", "9", "2", "1"]):
                env = {**os.environ, "LSA_PAIR": "0"}
                alone = subprocess.run([str(exe), *args], capture_output=True, text=True,
                                       check=True, timeout=60, env=env).stdout
                env["LSA_PAIR"] = pair
                both = subprocess.run([str(exe), *args], capture_output=True, text=True,
                                      check=True, timeout=60, env=env).stdout
                assert both.split(" hash ")[1] == alone.split(" hash ")[1], (pair, args)
        runs[level] = outs
    assert runs, "this CPU runs none of the levels?"
    first = next(iter(runs.values()))
    assert all(outs == first for outs in runs.values()), runs


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_pair_team_under_thread_sanitizer(tmp_path):
    """The two threads of lsa::PairTeam share only their key lines: ThreadSanitizer finds no
    race in the harness, together to the end or parting at a forced step, and the matchings
    and duals are the sequential team's."""
    exe = tmp_path / "lsa_harness_tsan"
    built = subprocess.run(["g++", "-O1", "-g", "-fsanitize=thread", "-std=c++20", "-pthread",
                            "-fno-fast-math", "-ffp-contract=off", "-I", str(HARNESS.parents[1] / "csrc" / "lsa"),
                            str(HARNESS), "-o", str(exe)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"no ThreadSanitizer here: {built.stderr[-300:]}")
    for args in (["300", "700", "1", "1"], ["200", "200", "2", "1", "1"]):
        outs = set()
        for pair in ("0", "1", "37"):
            run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "LSA_PAIR": pair, "TSAN_OPTIONS": "halt_on_error=1"})
            assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-2000:]
            outs.add(run.stdout.split(" hash ")[1])
        assert len(outs) == 1, outs


def outlined_team_code(symbols: list[str]) -> list[str]:
    """The sequential team's functions and lambdas that the compiler kept as functions of
    their own (demangled `nm` lines): each is always_inline, and a call per block of eight
    columns made the extension's solver 1.6x slower than the same code in the harness."""
    return [s for s in symbols if "lsa::SequentialTeam::" in s]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_sequential_team_is_inlined():
    if "cpu" not in compiled_backends():
        pytest.skip("the extension is not built")
    import maskformer_fast._C as ext

    out = subprocess.run(["nm", "-C", "--defined-only", ext.__file__], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert any("lsa::solve<lsa::SequentialTeam" in s for s in out), "no solver in the module?"
    assert outlined_team_code(out) == []
    lambda_line = ("0000000000025080 t lsa::SequentialTeam::argmin_rows<false, lsa::Relax<X> >"
                   "(int, lsa::Relax<X> const&, double const*, int const*) const::"
                   "{lambda(int, unsigned char, unsigned char)#1}::operator()(int, unsigned char, "
                   "unsigned char) const [clone .constprop.0]")
    assert outlined_team_code([lambda_line, "00000000000287e0 t int lsa::solve<...>"]) == [lambda_line]
