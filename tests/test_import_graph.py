"""The project's import graph, read from the source's import statements (those inside functions too).

The plugin sits at the bottom: nothing in ``flwr_invariant`` imports ``simulation``, ``baselines`` or
``benchmarks``; and no module imports itself back through a chain of imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flwr_invariant", "simulation", "baselines", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (package ``__init__`` implied by
    ``from package import module`` is not counted: Python runs it, but it is not a dependency)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [f"{base}.{alias.name}" for alias in node.names]
            submodules = [c for c in candidates if c in known]
            found.update(submodules if len(submodules) == len(candidates) else [base, *submodules])
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_plugin_imports_nothing_above_it() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if module.startswith("flwr_invariant")
        for target in targets
        if not target.startswith("flwr_invariant")
    )
    assert upward == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_checker_sees_imports_inside_functions_and_relative_imports(tmp_path) -> None:
    source = "from . import b\n\ndef f():\n    from .c import thing\n    import pkg.d\n"
    path = tmp_path / "a.py"
    path.write_text(source)
    known = {"pkg.a", "pkg.b", "pkg.c", "pkg.d"}
    assert imported_modules("pkg.a", path, known) == {"pkg.b", "pkg.c", "pkg.d"}
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
