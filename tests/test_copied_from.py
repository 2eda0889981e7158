"""`# Copied from recipes/<file>.py:<name>` marks a function or class copied unchanged from another recipe (STYLE,
"Copy-paste hygiene"); this test keeps every marked copy identical to its source (AST comparison: code and
docstrings, not comments or formatting)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\s*# Copied from (recipes/[\w./-]+\.py):(\w+)\s*$")


def definitions(path: Path) -> dict[str, ast.AST]:
    """Top-level functions and classes of a file by name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {node.name: node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def marked_copies() -> list[tuple[Path, int, str, str]]:
    """(file, line, source file, source name) for every marker, the marker directly above a def/class/decorator."""
    found = []
    for path in sorted((ROOT / "recipes").rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            match = MARKER.match(line)
            if match:
                found.append((path, i + 1, match.group(1), match.group(2)))
    return found


def copied_definition(path: Path, marker_line: int) -> ast.AST:
    """The def/class that the marker at `marker_line` (1-based) sits on: the first one starting right below it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if start == marker_line + 1:
                return node
    raise AssertionError(f"{path.relative_to(ROOT)}:{marker_line}: a '# Copied from' marker must sit directly above "
                         "a top-level def or class")


def test_markers_exist():
    # The recipes share many functions; without markers this test would silently check nothing.
    assert len(marked_copies()) >= 10


@pytest.mark.parametrize("path, line, source, name", marked_copies(),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_copy_equals_source(path, line, source, name):
    copy = copied_definition(path, line)
    assert copy.name == name, f"{path.name}:{line}: marker names {name!r} but sits above {copy.name!r}"
    source_path = ROOT / source
    assert source_path.is_file(), f"{path.name}:{line}: source {source} does not exist"
    original = definitions(source_path).get(name)
    assert original is not None, f"{path.name}:{line}: {source} has no top-level {name!r}"
    assert ast.dump(copy) == ast.dump(original), (
        f"{path.name}:{line}: {name} differs from {source}:{name}; copy the change over (or drop the marker if "
        "the difference is intended)")
