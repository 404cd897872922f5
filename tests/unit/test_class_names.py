"""Names that say what a thing is: no two classes share a name, and every cache, store and
storage class is in docs/architecture.md's table of which to use when."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "kvcache"
DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def class_names() -> list[tuple[str, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                found.append((node.name, str(path.relative_to(SRC))))
    return found


def test_no_two_classes_share_a_name():
    counts = Counter(name for name, _ in class_names())
    assert not [n for n, c in counts.items() if c > 1], [(n, p) for n, p in class_names() if counts[n] > 1]


def test_every_cache_store_and_storage_is_in_the_table():
    kv_classes = {n for n, _ in class_names() if re.search(r"(Cache|Store|Storage)$", n)}
    section = DOC.read_text().split("## Which cache, store or storage", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(\w+(?:Cache|Store|Storage))`", section))
    assert kv_classes == listed, (kv_classes - listed, listed - kv_classes)
