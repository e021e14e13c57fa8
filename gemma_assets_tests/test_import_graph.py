"""The package's import graph, lazy imports (inside functions) included, has no cycle: each
module can be understood, and imported, after the ones it uses."""

from __future__ import annotations

import ast
from pathlib import Path

import gemma_assets

PACKAGE = Path(gemma_assets.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _with_parents(module: str, modules: dict[str, Path]) -> set[str]:
    """A module and the packages above it: importing a.b.c runs a/__init__ and a/b/__init__ too."""
    parts = module.split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts) + 1)} & set(modules)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body, with their packages."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` imports the module; `from module import name` the module
                targets |= {
                    f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules
                }
                targets.add(node.module)
        imported = {found for target in targets if target in modules for found in _with_parents(target, modules)}
        graph[name] = imported - _with_parents(name, modules)  # a module's own packages run before it
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module."""
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


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "gemma_assets.runner" in graph["gemma_assets.preflight"]  # an import inside a function counts
    assert "gemma_assets.core.sae_architecture" in graph["gemma_assets.core.sae"]
    assert cycles(graph) == [], "modules that import each other (lazily or not)"


def test_the_cycle_finder_finds_a_lazy_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
