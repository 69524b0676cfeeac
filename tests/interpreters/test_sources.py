"""Every module of tether compiles under this Python and imports no standard-library module some supported
Python lacks: the parts that need torch cannot run under every minor, but they must not need another one."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("tether", "runtime", "client", "server") for p in (ROOT / folder).glob("*.py"))
# standard-library modules that some supported Python lacks: added in 3.11, or removed in 3.12 and 3.13
NOT_EVERYWHERE = {"tomllib", "wsgiref.types", "distutils", "imp", "asynchat", "asyncore", "smtpd", "aifc",
                  "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib", "nis", "nntplib",
                  "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib", "lib2to3"}


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_module_compiles_and_uses_only_stdlib_every_python_has(path):
    text = path.read_text()
    compile(text, str(path), "exec")
    bad = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        bad += [f"{path.name}:{node.lineno} imports {n}" for n in names
                if n in NOT_EVERYWHERE or n.split(".")[0] in NOT_EVERYWHERE]
        if isinstance(node, ast.ImportFrom) and names and names[0].split(".")[0] in sys.stdlib_module_names:
            module = importlib.import_module(names[0])  # e.g. `from typing import Self` needs 3.11
            bad += [f"{path.name}:{node.lineno} imports {names[0]}.{a.name}, which this Python lacks"
                    for a in node.names if a.name != "*" and not _has(module, a.name)]
    assert not bad, "\n".join(bad)


def _has(module, name: str) -> bool:
    """Whether `from module import name` works: an attribute, or a submodule (`from concurrent import futures`)."""
    return hasattr(module, name) or importlib.util.find_spec(f"{module.__name__}.{name}") is not None


def test_sources_found():
    assert len(SOURCES) > 40
