"""The package layout: each module imports only modules of earlier stages (README, "How the
package is organized"), at the top of the file."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "netvlad_tutorial"

# The import order, earliest first: a module may import only those before it.
STAGES = ["utils", "files", "precision", "distributed", "config", "dbstruct", "images", "data",
          "datacheck", "synthetic", "world", "features", "backbone", "netvlad", "centroids",
          "pca", "model", "checkpoints", "pretrain", "pooling", "weights", "datasets", "mining",
          "run_model", "evaluate", "search", "rerank", "train", "viz", "lessons", "cli",
          "__main__"]
LAZY_IMPORTS = {"cli"}  # imports inside its functions keep `--help` fast; nothing else may


def _relative_imports(tree):
    """(module imported, line, inside a function) for each `from .x import` / `from . import x`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found += [(name.split(".")[0], node.lineno) for name in names]
    return found


def _function_level(tree):
    """Lines of relative imports inside a function or method."""
    lines = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines += [n.lineno for n in ast.walk(func)
                      if isinstance(n, ast.ImportFrom) and n.level == 1]
    return lines


def test_every_module_has_a_stage():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(STAGES)


def test_modules_import_only_earlier_stages():
    for name in STAGES:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        allowed = set(STAGES[:STAGES.index(name)]) | {"__version__"}
        for imported, line in _relative_imports(tree):
            assert imported in allowed, f"{name}.py:{line} imports .{imported}, a later stage"


def test_no_function_level_imports_outside_the_cli():
    for name in set(STAGES) - LAZY_IMPORTS:
        lines = _function_level(ast.parse((PACKAGE / f"{name}.py").read_text()))
        assert not lines, f"{name}.py imports inside a function at lines {lines}"


def test_the_package_init_imports_only_helpers():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    assert {m for m, _ in _relative_imports(tree)} <= {"utils", "files", "precision", "synthetic"}


def test_the_guide_lists_every_module_in_order_with_its_imports():
    """GUIDE.md's table is the map a reader follows: one row per module, its real imports."""
    guide = (PACKAGE.parent / "GUIDE.md").read_text()
    section = guide.split("## How the package is organized")[1].split("\n## ")[0]
    rows = [r.split("|") for r in section.splitlines() if r.startswith("| `")]
    assert [r[1].strip().strip("`") for r in rows] == STAGES[:-1]
    for row in rows:
        name = row[1].strip().strip("`")
        if name in LAZY_IMPORTS:
            continue
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        real = {m for m, _ in _relative_imports(tree)} - {"__version__"}
        listed = set(re.findall(r"`(\w+)`", row[4]))
        assert listed == real, f"GUIDE.md: {name} imports {sorted(real)}, listed {sorted(listed)}"
