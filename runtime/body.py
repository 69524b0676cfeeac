"""What a body's AST says about its names and its `local()` blocks: the one analysis the engine (capture,
program), the client (what travels, which blocks run here) and the server (which bodies it cuts) share.

**The rule for a `local()` block.** A `with` or `async with` statement is a `local()` block when one of its
items is a call *without arguments* of a function named `local`, spelled as a bare name or as an attribute
of anything: `with tether.local():`, `with local():` (`from tether import local`), `with tracer.local():`,
`with session.local():`, `async with x.local():`. `local` takes no arguments, so `with x.local(1):` is not
one (the call would fail where it runs, at the user's line). The rule is on spelling only: the server cuts
every such body before it runs anything, whatever the context manager turns out to be, and the client
runs exactly the bodies the server cut.

Names: *read* means an `ast.Name` in load context; *assigned* means bound in the body's own scope (not in
nested functions, lambdas or comprehensions); *stored* means any name a node binds, nested scopes included.
Imports only the standard library.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["LocalWith", "BodyNames", "is_local_with", "local_withs", "local_blocks", "body_span", "loaded_names",
           "assigned_names", "stored_names", "written_names", "split_local"]

LocalWith = ast.With | ast.AsyncWith


def is_local_with(node: ast.AST) -> bool:
    """Whether `node` is a `local()` block (the module docstring's rule)."""
    return isinstance(node, (ast.With, ast.AsyncWith)) and any(_is_local_call(i.context_expr) for i in node.items)


def _is_local_call(expr: ast.expr) -> bool:
    if not isinstance(expr, ast.Call) or expr.args or expr.keywords:
        return False
    func = expr.func
    return (isinstance(func, ast.Attribute) and func.attr == "local") or (
        isinstance(func, ast.Name) and func.id == "local")


def local_withs(stmts: Iterable[ast.stmt]) -> list[LocalWith]:
    """Every `local()` block in `stmts`, nested ones included, by line."""
    found = [n for s in stmts for n in ast.walk(s) if is_local_with(n)]
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


def body_span(node: LocalWith) -> tuple[int, int]:
    """(first, last) line of a with statement's body."""
    return node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno


def local_blocks(stmts: Iterable[ast.stmt]) -> list[tuple[int, int]]:
    """(first, last) body lines of every `local()` block in `stmts`, nested ones included, by line."""
    return [body_span(n) for n in local_withs(stmts)]


def _read_name(node: ast.AST) -> str | None:
    """The name this one node reads: a loaded name, or the target of an augmented assignment (`x += 1` reads
    x before it binds it); None for any other node."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        return node.id
    if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def loaded_names(stmts: Iterable[ast.AST]) -> frozenset[str]:
    """The names `stmts` read, anywhere in them."""
    return frozenset(name for s in stmts for n in ast.walk(s) if (name := _read_name(n)) is not None)


def stored_names(node: ast.AST, *, args: bool = True) -> list[str]:
    """The names this one node binds (a stored or deleted name, a def or class, an import; a parameter
    when `args`); nothing of its children."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
        return [node.id]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    if args and isinstance(node, ast.arg):
        return [node.arg]
    return []


def written_names(stmts: Iterable[ast.stmt]) -> list[str]:
    """Every name `stmts` bind, nested scopes included (parameters not), in first-seen order."""
    names: dict[str, None] = {}
    for s in stmts:
        for n in ast.walk(s):
            names.update(dict.fromkeys(stored_names(n, args=False)))
    return list(names)


def assigned_names(body: Iterable[ast.stmt]) -> list[str]:
    """The names `body` binds in its own scope, in first-seen order: what a block hands back to its caller."""
    names: dict[str, None] = {}

    class Collector(ast.NodeVisitor):
        def visit_Name(self, node: ast.Name) -> None:
            if isinstance(node.ctx, ast.Store):
                names[node.id] = None

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            names[node.name] = None

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_ClassDef(self, node: ast.ClassDef) -> None:
            names[node.name] = None

        def visit_Lambda(self, node: ast.Lambda) -> None:
            return None

        def visit_ListComp(self, node: ast.AST) -> None:
            return None

        visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_ListComp

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = None

        visit_ImportFrom = visit_Import

    for stmt in body:
        Collector().visit(stmt)
    return list(names)


@dataclass
class BodyNames:
    """A body split at its outermost `local()` blocks: what the rest (the code that runs remotely) reads and
    binds, and the blocks themselves."""

    remote_loads: set[str] = field(default_factory=set)
    remote_stores: set[str] = field(default_factory=set)  # stored_names of every node, parameters included
    locals: list[LocalWith] = field(default_factory=list)  # outermost local() blocks, in walk order


def split_local(stmts: Iterable[ast.stmt]) -> BodyNames:
    """The names read and bound outside the outermost `local()` blocks of `stmts`, and those blocks.

    A block's context expression counts as outside (`with tracer.local():` reads `tracer` remotely)."""
    out = BodyNames()
    stack: list[ast.AST] = list(stmts)
    while stack:
        node = stack.pop()
        if is_local_with(node):
            out.locals.append(node)
            stack.extend(item.context_expr for item in node.items)
            continue
        if (name := _read_name(node)) is not None:
            out.remote_loads.add(name)
        out.remote_stores.update(stored_names(node))
        stack.extend(ast.iter_child_nodes(node))
    return out
