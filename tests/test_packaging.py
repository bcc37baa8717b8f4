"""The package's shape: the drop-in module as a facade whose imports flow one way, the
library importable with its core dependencies alone (the trainer's behind the `train`
extra), and setup.py reading the environment without writing it."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import maskformer_fast
from maskformer_fast import cli, hungarian, lsa, matcher

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "maskformer_fast"
CORE = {"torch", "numpy", "scipy"}
# What the library imports at module level, beyond the standard library and CORE: nothing.
# The trainer's modules add the `train` extra; the Triton kernels (imported on first use on
# CUDA tensors) triton.
LIBRARY = ["__init__", "_ops", "lsa", "hungarian", "matcher", "losses", "kernels/__init__",
           "kernels/reference", "selfcheck", "cli", "__main__"]
TRAINER = ["train", "model", "data", "evaluate", "figures"]
TRITON = ["kernels/triton_cost", "kernels/triton_einsum", "kernels/compile_check"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The modules `path` imports (absolute names), at module level only or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # `from maskformer_fast import _ops`: a module of the package
            out |= {f"{node.module}.{a.name}" for a in node.names
                    if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()
                    or (PACKAGE.parent / node.module.replace(".", "/") / a.name).is_dir()}
    return out


def package_graph() -> dict[str, set[str]]:
    """Every import, at module level or in a function, between the package's modules (the
    package's __init__, which Python runs before any of them, aside)."""
    files = sorted(PACKAGE.rglob("*.py"))
    names = {module_name(f) for f in files} - {"maskformer_fast"}
    return {module_name(f): {m for m in imports(f, False) if m in names and m != module_name(f)}
            for f in files}


def third_party(stem: str) -> set[str]:
    roots = {m.split(".")[0] for m in imports(PACKAGE / f"{stem}.py", True)}
    return roots - set(sys.stdlib_module_names) - {"maskformer_fast", "__future__"}


def test_hungarian_is_a_facade_over_the_solver_and_the_matchers():
    for name in hungarian.__all__:
        owner = matcher if "Matcher" in name else lsa
        assert getattr(hungarian, name) is getattr(owner, name), name
    assert {"Status", "index_pairs", "compiled_backends", "HungarianMatcher"} <= set(hungarian.__all__)
    assert [s.name for s in hungarian.Status] == ["OK", "INFEASIBLE", "INVALID", "BAD_SIZES"]
    assert list(hungarian.Status) == [0, 1, 2, 3]
    assert maskformer_fast.batch_linear_sum_assignment is hungarian.batch_linear_sum_assignment


def test_imports_flow_one_way():
    """No cycle, no module __getattr__, and the compiled ops' loader (_ops) private: only
    the solver's face and the kernels' torch references (and the self-check) import it."""
    graph = package_graph()
    assert graph["maskformer_fast.hungarian"] == {"maskformer_fast.lsa", "maskformer_fast.matcher"}
    assert "maskformer_fast.hungarian" not in graph["maskformer_fast.matcher"]
    assert graph["maskformer_fast.lsa"] == {"maskformer_fast._ops"}
    importers = {m for m, deps in graph.items() if "maskformer_fast._ops" in deps}
    assert importers <= {"maskformer_fast.lsa", "maskformer_fast.kernels.reference",
                         "maskformer_fast.selfcheck"}, importers
    done: set[str] = set()

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        if module not in done:
            for dep in graph[module]:
                visit(dep, path + [module])
            done.add(module)

    for module in graph:
        visit(module, [])
    for f in PACKAGE.rglob("*.py"):
        tree = ast.parse(f.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), f


def test_module_level_imports_match_the_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[ <>=;!~\[]", r, maxsplit=1)[0] for r in requirements}

    assert names(project["dependencies"]) == CORE
    extras = project["optional-dependencies"]
    assert names(extras["train"]) == set(cli.TRAIN_EXTRAS)
    assert "triton" in names(extras["cuda"]) and "triton" in names(extras["test"])
    for stem in LIBRARY:
        assert third_party(stem) <= CORE, stem
    for stem in TRAINER:
        assert third_party(stem) <= CORE | names(extras["train"]), stem
    for stem in TRITON:
        assert third_party(stem) <= CORE | {"triton"}, stem


BLOCK_EXTRAS = """
import sys
for name in ("einops", "tqdm", "matplotlib", "pycocotools", "triton", "pytest", "hypothesis"):
    sys.modules[name] = None  # import fails, as where the package is not installed
"""


def test_the_library_runs_without_the_extras(tmp_path):
    """The solver, the matcher and the criterion on the CPU with torch, numpy and scipy
    alone; `maskformer-fast demo` too, while train and eval name the extra they need."""
    code = BLOCK_EXTRAS + """
import torch
from maskformer_fast.hungarian import HungarianMatcher, Status, linear_sum_assignment
from maskformer_fast.losses import SetCriterion
from maskformer_fast import cli, selfcheck

assert linear_sum_assignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]])[1].tolist() == [1, 0, 2]
g = torch.Generator().manual_seed(0)
outputs = {"pred_logits": torch.randn(2, 5, 4, generator=g),
           "pred_masks": torch.randn(2, 5, 8, 8, generator=g)}
targets = [{"labels": torch.tensor([0, 2]), "masks": (torch.rand(2, 8, 8, generator=g) > 0.5).float()},
           {"labels": torch.tensor([1]), "masks": (torch.rand(1, 8, 8, generator=g) > 0.5).float()}]
pairs = HungarianMatcher(num_points=0)(outputs, targets)
assert [len(r) for r, _ in pairs] == [2, 1], pairs
cli.main(["demo", "--batch", "2", "--layers", "1", "--queries", "5", "--max-targets", "3"])
for argv in (["--steps", "1"], ["eval", "checkpoint.pt"]):
    try:
        cli.main(argv)
    except SystemExit as exc:
        print("EXIT", exc)
assert "maskformer_fast.train" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    exits = [line for line in result.stdout.splitlines() if line.startswith("EXIT")]
    assert len(exits) == 2 and all("pip install 'maskformer_fast[train]'" in e for e in exits), exits
    assert "maskformer-fast train: error: needs the training extras, einops, tqdm" in exits[0]
    assert "index-identical to scipy on every problem: True" in result.stdout


SETUP_PROBE = """
import json, os, runpy, sys
before = dict(os.environ)
sys.argv = ["setup.py", "--name"]
g = runpy.run_path("setup.py")
from torch.utils import cpp_extension
ext = g["extension"]()
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"changed": changed, "arch_flags": g["cuda_arch_flags"](),
                  "nvcc": ext.extra_compile_args.get("nvcc") if isinstance(ext.extra_compile_args, dict) else None,
                  "cuda_home": cpp_extension.CUDA_HOME}))
"""


@pytest.mark.parametrize("arch_list", [None, "9.0"])
def test_setup_py_reads_the_environment_without_writing_it(arch_list):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST")}
    if arch_list:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    result = subprocess.run([sys.executable, "-c", SETUP_PROBE], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    # (setuptools' own distutils.util.check_environ sets PLAT and HOME)
    assert set(got["changed"]) <= {"PLAT", "HOME"}, got["changed"]
    default = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_86,code=sm_86",
               "-gencode=arch=compute_89,code=sm_89", "-gencode=arch=compute_90,code=sm_90",
               "-gencode=arch=compute_90,code=compute_90"]
    # with the variable set, torch turns it into flags itself
    assert got["arch_flags"] == ([] if arch_list else default)
    if got["nvcc"] is not None:  # nvcc found: the CUDA sources are built
        assert [f for f in got["nvcc"] if "arch" in f] == got["arch_flags"]
    if os.path.isdir("/usr/local/cuda"):
        assert got["cuda_home"] == "/usr/local/cuda"
