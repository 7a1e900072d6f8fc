"""The package has no import circle: a module never imports, even for type checking, one that
imports it back (engines, state objects and hook specs sit below the learner)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metaopt"


def _modules(package: Path) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(tree: ast.Module, modules: dict[str, Path]) -> set[str]:
    """metaopt modules imported at module level, inside ``if TYPE_CHECKING:`` and ``try:`` included."""
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "metaopt":
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                out.update(subs or [node.module])
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.split(".")[0] == "metaopt")
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return out


def import_cycles(package: Path = PACKAGE) -> list[list[str]]:
    modules = _modules(package)
    graph = {
        m: {d for d in _imports(ast.parse(p.read_text()), modules) if d in modules and d != m}
        for m, p in modules.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return cycles


def test_no_import_circle():
    assert import_cycles() == []


def test_the_check_sees_a_circle(tmp_path):
    """The checker itself: two modules that import each other (one only for type checking) are found."""
    package = tmp_path / "metaopt"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from metaopt.b import x\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from metaopt.a import y\n")
    assert import_cycles(package) == [["metaopt.a", "metaopt.b"]]
