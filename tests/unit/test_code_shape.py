"""The shape issue 16 asks of production code: no file over 500 lines, and no function over 60 lines unless
its docstring says why ("Long on purpose")."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRODUCTION = [p for folder in ("runtime", "client", "server", "tether") for p in sorted((ROOT / folder).glob("*.py"))]


@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_production_file_has_at_most_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500


@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_long_function_says_why(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60
            and "Long on purpose" not in (ast.get_docstring(node) or "")]
    assert not long, long
