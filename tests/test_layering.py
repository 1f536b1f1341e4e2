"""Imports flow one way: every import of lmdistill code, lazy ones inside functions included,
goes from a package (or top-level module) to one listed before it in ORDER, and no two
modules import each other, directly or round a longer loop. docs/architecture.md draws the
same order."""

from __future__ import annotations

import ast
from pathlib import Path

import lmdistill

ROOT = Path(lmdistill.__file__).parent

# Lowest first. A unit is a subpackage of lmdistill or a module directly in it.
ORDER = [
    "errors", "atomic", "markdown", "config_values", "config", "recipe", "schedule", "dist", "models", "data",
    "loss", "teacher_cache", "student", "generate",
    "evaluate", "measure", "card", "train", "teacher_text",
    "report", "demo", "cli", "__main__",
]


def module_name(path: Path) -> str:
    parts = ("lmdistill", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The lmdistill modules that ``path`` imports (``from X import name`` counts as X.name
    when that is a module, else X)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lmdistill")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("lmdistill"):
                target = node.module
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return found - {name}


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else module


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def test_every_unit_is_placed():
    assert {unit(m) for m in MODULES} - {"lmdistill"} == set(ORDER)


def test_imports_go_only_to_lower_units():
    upward = []
    for name, path in MODULES.items():
        for target in imported_modules(path):
            if unit(target) != unit(name) and unit(target) in ORDER and unit(name) in ORDER \
                    and ORDER.index(unit(target)) > ORDER.index(unit(name)):
                upward.append(f"{name} imports {target}")
    assert not upward, "imports that go up the layers:\n" + "\n".join(sorted(upward))


def test_no_module_import_cycles():
    graph = {name: {t for t in imported_modules(path) if t in MODULES} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    # A package's __init__ importing its own modules is not a cycle of two jobs.
    cycles = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_and_relative_imports():
    assert "lmdistill.train.run" in imported_modules(MODULES["lmdistill.cli.commands"])  # inside a function
    assert "lmdistill.loss.sparse" in imported_modules(MODULES["lmdistill.teacher_cache.reader"])  # ..loss.sparse
