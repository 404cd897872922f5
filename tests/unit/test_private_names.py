"""No module of the package reaches into another object's private names (`other._x`).

The layer order itself is checked by `lint-imports` (pyproject.toml); this checks the other
half of an honest interface: a caller uses what a module makes public. Private names of
torch and ctypes, which offer no public spelling for them, are the only exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvcache

SRC = Path(kvcache.__file__).parent
FOREIGN = {"torch", "ctypes"}  # third-party privates we rely on knowingly


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not own and _root(node.value) not in FOREIGN:
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvcache"):
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return sorted(found)


def test_the_check_sees_a_private_use():
    assert private_uses(ast.parse("self.llm._prepare(x)\nself._ok\nfrom kvcache.a import _b")) == [
        (1, "self.llm._prepare"), (3, "from kvcache.a import _b")]


def test_no_module_uses_another_objects_private_names():
    found = [f"{path.relative_to(SRC)}:{line}: {text}" for path in sorted(SRC.rglob("*.py"))
             for line, text in private_uses(ast.parse(path.read_text()))]
    assert found == []
