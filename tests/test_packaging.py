"""The package's shape: the drop-in module as a facade whose imports flow one way."""

from __future__ import annotations

import ast
from pathlib import Path

import maskformer_fast
from maskformer_fast import hungarian, lsa, matcher

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "maskformer_fast"


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
