"""A program's texts as the server reads them: `local()` bodies cut out, parsed, checked against the policy.

The bodies of `local()` blocks are cut out of the source the server runs (they run on the client), so no
spelling of a context manager can make the server run them. Every step is cached by the text it reads
(tether.caching), so a program sent again is cut and checked once, and a front door can have a large one's
done in another process (check_process.py). Imports tether.runtime's parsing, tether.v1, policy and
source_check; never torch, values or the job's objects (program_codec builds those).
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Mapping
from dataclasses import dataclass

from tether.caching import bytes_lru_cache
from tether.protocol import CLIENT_MODULE
from tether.runtime.body import assigned_names, body_span, loaded_names, local_withs
from tether.runtime.capture import parse
from tether.v1 import program_pb2, values_pb2

from .errors import InvalidProgram
from .policy import Policy
from .source_check import check_source

__all__ = ["LOCAL_HINT", "LocalSite", "body_source", "check_sources", "edit_source", "function_source"]

LOCAL_HINT = "wrap the call in `with tether.local():` to run it on your own machine"


@dataclass(frozen=True)
class LocalSite:
    """A `local()` block as the server knows it: where its body starts, its id and what it reads."""

    block_id: str
    filename: str  # the user's file name
    first_line: int  # first body line, in the user's file
    reads: tuple[str, ...]  # names the body loads (sent when they hold data on the server)
    assigns: tuple[str, ...] = ()  # names the body binds: the client sends back those the remote code reads


def check_sources(program: program_pb2.Program, policy: Policy) -> None:
    """decode_program's work on the text of every source `program` carries (cutting local() bodies, parsing,
    the policy's check), without its values; InvalidProgram as decode_program raises it. Its results stay in
    this process's caches: a front door has a large program's checked in another process (check_process.py)."""
    body_source(program, policy)
    for fn in program.functions:
        function_source(fn, policy)
    for edit in program.edits:
        edit_source(edit, policy)


def body_source(program: program_pb2.Program,
                 policy: Policy) -> tuple[str, int, str, dict[int, LocalSite], frozenset[str], frozenset[str]]:
    """(filename, first line, cut body, its local() sites, the names it uses, those it reads)."""
    first_line = program.first_line or 1
    filename = program.filename or "<program>"
    ids = {b.first_line: b.block_id for b in program.local_blocks if b.block_id}
    body, sites = _cut_local_blocks(program.source, filename, first_line, ids)
    used, loads = _check(policy, body, filename, first_line, program.bindings)
    return filename, first_line, body, sites, used, loads


def function_source(fn: program_pb2.FunctionSource, policy: Policy) -> tuple[
        str, int, str, dict[int, LocalSite], str, frozenset[str], frozenset[str]]:
    """(filename, first line, cut source, its local() sites, the name it defines, names used, names read)."""
    filename = fn.filename or "<function>"
    first_line = fn.first_line or 1
    ids = {b.first_line: b.block_id for b in fn.local_blocks if b.block_id}
    source, sites = _cut_local_blocks(fn.source, filename, first_line, ids)
    defined = _defined_name(source)
    if defined is None:
        raise InvalidProgram(
            f"the source shipped for function `{fn.name}` ({filename}, line {first_line}) must be exactly one "
            "`def` or `class` statement (decorators included)."
        )
    used, loads = _check(policy, source, filename, first_line, fn.bindings)
    return filename, first_line, source, sites, defined, used, loads


def edit_source(edit: program_pb2.Edit, policy: Policy) -> tuple[str, int, str, frozenset[str], frozenset[str]]:
    """(filename, first line, source, names used, names read) of a model edit (which has no local() blocks)."""
    filename = edit.filename or "<edit>"
    first_line = edit.first_line or 1
    source, sites = _cut_local_blocks(edit.source, filename, first_line, {})
    if sites:
        raise InvalidProgram(f"{filename}, line {first_line}: a model edit with a `local()` block cannot run "
                             "remotely; move that code out of the edit.")
    used, loads = _check(policy, source, filename, first_line, edit.bindings)
    return filename, first_line, source, used, loads


@bytes_lru_cache()
def _defined_name(source: str) -> str | None:
    """The name a shipped source's one `def`/`class` statement binds; None if it is not exactly one."""
    body = parse(source).body
    if len(body) == 1 and isinstance(body[0], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return body[0].name
    return None


# ---------------------------------------------------------------------------------------- source checks


def _parse(source: str, filename: str, first_line: int) -> ast.Module:
    try:
        return parse("\n" * (first_line - 1) + source, filename)
    except SyntaxError as error:
        raise InvalidProgram(f"{filename}, line {error.lineno}: cannot parse the program: {error.msg}") from None


def _cut_local_blocks(source: str, filename: str, first_line: int,
                      ids: Mapping[int, str]) -> tuple[str, dict[int, LocalSite]]:
    """`source` with the body of every (outermost) `with ...local():` replaced by `pass`, line numbers kept.

    Returns the cut source and, by first body line in the user's file, each block's LocalSite: its id (the
    client's LocalBlock.block_id for that line, else the line as text) and the names its body reads.
    """
    cut, sites = _cut_cached(source, filename, first_line, tuple(sorted(ids.items())))
    return cut, dict(sites)


@bytes_lru_cache()
def _cut_cached(source: str, filename: str, first_line: int,
                ids_items: tuple[tuple[int, str], ...]) -> tuple[str, tuple[tuple[int, LocalSite], ...]]:
    ids = dict(ids_items)  # cached by value: the same program sent again is cut once
    tree = _parse(source, filename, first_line)
    offset = first_line - 1
    lines = source.splitlines(keepends=True)
    sites: dict[int, LocalSite] = {}
    cut_until = 0  # last user line already cut (nested blocks go with their outer block)
    for node in local_withs(tree.body):
        first, last = body_span(node)
        if first <= cut_until:
            continue
        cut_until = last
        reads = sorted(loaded_names(node.body))
        sites[first] = LocalSite(ids.get(first, str(first)), filename, first, tuple(reads),
                                 tuple(assigned_names(node.body)))
        head = lines[first - 1 - offset]
        col = len(head.encode()[: node.body[0].col_offset].decode(errors="ignore"))
        newline = "\n" if head.endswith("\n") else ""
        lines[first - 1 - offset] = head[:col] + _stand_in(node, head, col) + newline
        for line in range(first + 1, last + 1):
            lines[line - 1 - offset] = "\n"
    return "".join(lines), tuple(sites.items())


def _stand_in(node: ast.With | ast.AsyncWith, head: str, col: int) -> str:
    """What replaces a local() body: `pass`, or (body on its own lines) `a = b = None` for the names it
    assigns, so the server hands those names back as a local run does (the line never runs: the runtime
    skips a local() body at its first line and asks the client)."""
    if not head[:col].strip() == "" or node.body[0].lineno == node.lineno:
        return "pass"
    names = [n for n in assigned_names(node.body) if not n.startswith("_") and not hasattr(builtins, n)]
    return " = ".join([*names, "None"]) if names else "pass"


def _names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _check(policy: Policy, source: str, filename: str, first_line: int,
           bindings: Mapping[str, values_pb2.Value]) -> tuple[frozenset[str], frozenset[str]]:
    """Check a cut source (no local() bodies left) against the policy; returns the names it uses, and those of
    them it reads."""
    bound = frozenset((name, _path(value)) for name, value in bindings.items())
    return _check_cached(policy, source, filename, first_line, bound)


@bytes_lru_cache()  # a client sending the same program again is checked once
def _check_cached(policy: Policy, source: str, filename: str, first_line: int,
                  bound: frozenset[tuple[str, str | None]]) -> tuple[frozenset[str], frozenset[str]]:
    tree = _parse(source, filename, first_line)
    used = frozenset(_names(tree))
    loads = loaded_names(tree.body)  # (the client's rule for what its code reads: runtime.body)
    for name, path in bound:
        if name in used and path is not None and path.split(".")[0] == CLIENT_MODULE:
            line = min(n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == name)
            raise InvalidProgram(
                f"{filename}, line {line}: `{name}` is a client-only function (decorated with @tether.trace), "
                f"so the server cannot run it; {LOCAL_HINT}."
            )
    try:
        check_source(policy, source, filename=filename, first_line=first_line,
                     bound_names={name: path for name, path in bound if name in used})
    except ValueError as error:  # PolicyViolation
        raise InvalidProgram(str(error)) from None
    return used, loads


def _path(value: values_pb2.Value) -> str | None:
    if value.WhichOneof("kind") != "reference":
        return None
    return ".".join(filter(None, (value.reference.module, value.reference.qualname)))
