"""The package's import graph has no circle: every module can be imported on its own, and read in order.

What broke before: comfy/files.py imported `Deployment` from comfy/interpret.py (under TYPE_CHECKING) while
interpret.py imported files.py.  Edges are counted from the source (ast), TYPE_CHECKING imports included; an
edge goes to the module imported (`from . import files`) or to the module a name is imported from.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "qwen_edit_worker"


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, (path, is_package) in known.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges[name] |= {alias.name for alias in node.names if alias.name in known}
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known or target in known:
                        edges[name].add(sub if sub in known else target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in order:
            visit(node)
    return found


def test_the_package_has_no_import_circle() -> None:
    edges = import_graph(PACKAGE)
    assert "qwen_edit_worker.comfy.deployment" in edges["qwen_edit_worker.comfy.files"]
    assert circles(edges) == []


def test_a_circle_is_found(tmp_path: Path) -> None:
    """The check can fail: the circle this change cut, rebuilt in a scratch package, is reported."""
    package = tmp_path / "demo"
    (package / "comfy").mkdir(parents=True)
    for init in (package / "__init__.py", package / "comfy" / "__init__.py"):
        init.write_text("")
    (package / "comfy" / "files.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .interpret import Deployment\n")
    (package / "comfy" / "interpret.py").write_text("from . import files\n")
    assert circles(import_graph(package)) == [["demo.comfy.files", "demo.comfy.interpret"]]
