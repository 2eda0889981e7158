"""`# Copied from recipes/<file>.py:<name>` marks a function or class copied unchanged from another recipe (STYLE,
"Copy-paste hygiene"); `# Copied from recipes/<file>.py:<first>..<last>` marks a run of top-level statements, from the
def/class below the marker through the def/class `<last>`, copied unchanged (in order, assignments such as `ATTN`
included) from the same run in the source. This test keeps every marked copy identical to its source (AST comparison:
code and docstrings, not comments or formatting)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\s*# Copied from (recipes/[\w./-]+\.py):(\w+)(?:\.\.(\w+))?(?:\s+#.*)?\s*$")
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def marked_copies() -> list[tuple[Path, int, str, str, str]]:
    """(file, line, source file, first name, last name) for every marker (last == first for a single definition)."""
    found = []
    for path in sorted((ROOT / "recipes").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines()):
            match = MARKER.match(line)
            if match:
                found.append((path, i + 1, match.group(1), match.group(2), match.group(3) or match.group(2)))
    return found


def statement_run(body: list[ast.stmt], start: int, last: str, where: str) -> list[ast.stmt]:
    """body[start:] through the top-level def/class named `last`."""
    for end in range(start, len(body)):
        if isinstance(body[end], DEFS) and body[end].name == last:
            return body[start:end + 1]
    raise AssertionError(f"{where}: no top-level def/class {last!r} after {getattr(body[start], 'name', '?')!r}")


def copied_run(path: Path, marker_line: int, last: str) -> list[ast.stmt]:
    """The statements a marker at `marker_line` (1-based) covers: from the def/class right below it through `last`."""
    body = ast.parse(path.read_text()).body
    for i, node in enumerate(body):
        if isinstance(node, DEFS) and min([node.lineno] + [d.lineno for d in node.decorator_list]) == marker_line + 1:
            return statement_run(body, i, last, f"{path.name}:{marker_line}")
    raise AssertionError(f"{path.relative_to(ROOT)}:{marker_line}: a '# Copied from' marker must sit directly above "
                         "a top-level def or class")


def source_run(source: Path, first: str, last: str) -> list[ast.stmt]:
    body = ast.parse(source.read_text()).body
    starts = [i for i, node in enumerate(body) if isinstance(node, DEFS) and node.name == first]
    assert starts, f"{source.name} has no top-level {first!r}"
    return statement_run(body, starts[0], last, source.name)


def test_markers_cover_the_shared_code():
    # The recipes share most of their code; without markers this test would silently check nothing.
    covered = [node for path, line, _, _, last in marked_copies() for node in copied_run(path, line, last)]
    assert sum(isinstance(node, DEFS) for node in covered) >= 10


@pytest.mark.parametrize("path, line, source, first, last", marked_copies(),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_copy_equals_source(path, line, source, first, last):
    copy = copied_run(path, line, last)
    assert copy[0].name == first, f"{path.name}:{line}: marker names {first!r} but sits above {copy[0].name!r}"
    source_path = ROOT / source
    assert source_path.is_file(), f"{path.name}:{line}: source {source} does not exist"
    original = source_run(source_path, first, last)
    names = lambda run: [getattr(node, "name", type(node).__name__) for node in run]  # noqa: E731
    assert names(copy) == names(original), f"{path.name}:{line}: {first}..{last} holds other statements than {source}"
    for a, b in zip(copy, original):
        assert ast.dump(a) == ast.dump(b), (
            f"{path.name}:{line}: {names([a])[0]} differs from {source}; copy the change over (or end the marked run "
            "before it if the difference is intended)")
