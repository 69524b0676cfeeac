"""Checks program text against the server's Policy before anything runs: imports, calls, attributes and
names outside its allow-lists are refused with the user's line and a hint to use `local()` instead.

Imports the standard library, tether.v1 and the policy; parses with tether.runtime.capture.parse.
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from tether.caching import bytes_lru_cache
from tether.runtime.capture import parse
from tether.v1 import program_pb2, values_pb2

from .errors import PolicyViolation
from .policy import (
    ALLOW_HINT,
    CLASS_DUNDERS,
    DATA_LOADERS,
    DEFAULT_POLICY,
    LOADER_RULE,
    MOVE_HINT,
    Policy,
)

__all__ = ["check_function_source", "check_program", "check_program_source", "check_source"]


def check_program(policy: Policy, program: program_pb2.Program) -> None:
    """Checks a whole Program: its body, its shipped functions and the references among its values."""
    for part in (program, *program.functions):  # a shipped function carries the same fields as the body
        check_source(
            policy,
            part.source,
            filename=part.filename,
            first_line=part.first_line or 1,
            local_block_spans=part.local_blocks,
            bound_names=_bound_paths(part.bindings),
        )
    nested = [v for v in program.bindings.values() if v.WhichOneof("kind") != "reference"]
    for value in (*program.args, *program.kwargs.values(), *nested):  # direct bindings: checked above
        for path in _reference_paths(value):
            policy.check_reference(path, filename=program.filename, line=program.first_line)


def check_source(
    policy: Policy,
    source: str,
    *,
    filename: str,
    first_line: int,
    local_block_spans: Iterable[Any] = (),
    bound_names: Mapping[str, str | None] | None = None,
) -> None:
    """Raises PolicyViolation for the first refused construct of `source` outside local() blocks.

    first_line: line of the source's first line in `filename`. local_block_spans: (first, last) line
    pairs, or LocalBlock messages, in filename's lines; code there runs on the client and is skipped.
    bound_names: the free names the client binds, each to an import path (for modules, functions and
    classes sent as references) or None (for data).
    """
    spans = tuple(sorted(_span(s) for s in local_block_spans))
    bound = frozenset((bound_names or {}).items())
    _check_cached(policy, source, filename, first_line, spans, bound)


def check_program_source(
    source: str,
    *,
    filename: str,
    first_line: int,
    local_block_spans: Iterable[Any] = (),
    allowed_modules: Iterable[str] | None = None,
    allowed_callables: Iterable[str] | None = None,
    bound_names: Mapping[str, str | None] | None = None,
    policy: Policy = DEFAULT_POLICY,
) -> None:
    """Checks a program body against `policy` (allowed_modules / allowed_callables replace its lists).

    Raises PolicyViolation(message, line) naming the refused call or import and the user's own line.
    """
    if allowed_modules is not None:
        policy = replace(policy, allowed_modules=frozenset(allowed_modules))
    if allowed_callables is not None:
        policy = replace(policy, allowed_callables=frozenset(allowed_callables))
    check_source(
        policy,
        source,
        filename=filename,
        first_line=first_line,
        local_block_spans=local_block_spans,
        bound_names=bound_names,
    )


check_function_source = check_program_source  # a shipped `def` is checked by the same rules


# ----------------------------------------------------------------------------------------- the checker


def _span(s: Any) -> tuple[int, int]:
    if hasattr(s, "first_line"):
        return (int(s.first_line), int(s.last_line))
    first, last = s
    return (int(first), int(last))


def _bound_paths(bindings: Mapping[str, values_pb2.Value]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, value in bindings.items():
        ref = value.reference if value.WhichOneof("kind") == "reference" else None
        out[name] = ".".join(filter(None, (ref.module, ref.qualname))) if ref is not None else None
    return out


def _reference_paths(value: values_pb2.Value) -> Iterable[str]:
    kind = value.WhichOneof("kind")
    if kind == "reference":
        yield ".".join(filter(None, (value.reference.module, value.reference.qualname)))
    elif kind in ("list_value", "tuple_value"):
        for item in getattr(value, kind).items:
            yield from _reference_paths(item)
    elif kind == "map_value":
        for entry in value.map_value.entries:
            yield from _reference_paths(entry.key)
            yield from _reference_paths(entry.value)


@bytes_lru_cache()
def _check_cached(
    policy: Policy,
    source: str,
    filename: str,
    first_line: int,
    spans: tuple[tuple[int, int], ...],
    bound: frozenset[tuple[str, str | None]],
) -> None:
    tree, offset = _parse(source, filename, first_line)
    checker = _Checker(policy, filename, offset, spans, dict(bound))
    checker.record_local_imports(tree)
    for name, path in checker.aliases.items():  # modules, functions, classes the client bound by name
        reason = policy.path_refusal(path) if path is not None else ""
        line = checker.first_use(tree, name) if reason else None
        if line is not None:
            shown = reason if name == path else f"'{name}' is {path}, and {reason}"
            raise PolicyViolation(f"{shown}; {ALLOW_HINT}", line, filename=filename)
    checker.visit(tree)


def _parse(source: str, filename: str, first_line: int) -> tuple[ast.AST, int]:
    """The AST and the offset from its line numbers to the user's; indented bodies are parsed in place."""
    try:
        return parse(source, filename=filename), first_line - 1
    except IndentationError:
        pass
    except SyntaxError as e:
        raise PolicyViolation(
            f"cannot parse the program: {e.msg}", first_line - 1 + (e.lineno or 1), filename=filename
        ) from None
    try:
        return parse("if True:\n" + source, filename=filename), first_line - 2
    except SyntaxError as e:
        raise PolicyViolation(
            f"cannot parse the program: {e.msg}", first_line - 2 + (e.lineno or 2), filename=filename
        ) from None


_DUNDER_STRING = re.compile(r"__\w+__")


def _is_super_dunder(func: ast.expr) -> bool:
    """`super().NAME` or `super(C, self).NAME` with NAME one of the dunder methods a class may define (not
    `super(C, other)`, which would re-run a constructor on someone else's object)."""
    if not (isinstance(func, ast.Attribute) and func.attr in CLASS_DUNDERS and isinstance(func.value, ast.Call)):
        return False
    call = func.value
    if not (isinstance(call.func, ast.Name) and call.func.id == "super") or call.keywords:
        return False
    return not call.args or (len(call.args) == 2 and isinstance(call.args[0], ast.Name)
                             and isinstance(call.args[1], ast.Name) and call.args[1].id == "self")
_GETATTR_LIKE = {
    "getattr": 1,
    "operator.attrgetter": None,
    "operator.methodcaller": 0,
}  # arg index, None: all


class _Checker(ast.NodeVisitor):
    """Walks one source; raises PolicyViolation at the first refused node outside local() spans."""

    def __init__(self, policy: Policy, filename: str, offset: int, spans, bound: dict[str, str | None]):
        self.policy, self.filename, self.offset, self.spans = policy, filename, offset, spans
        self.bound = bound  # free names the client binds (values shadow builtins)
        self.aliases: dict[str, str | None] = dict(bound)  # name -> import path (None: data)
        self.methods: set[int] = set()  # ids of defs directly in a class body (they may be CLASS_DUNDERS)

    def record_local_imports(self, tree: ast.AST) -> None:
        """Names imported inside local() blocks come back from the client: uses outside are checked."""
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or not self._in_local_block(node):
                continue
            for alias in node.names:
                if isinstance(node, ast.Import):
                    top = alias.name.split(".")[0]
                    self.aliases[alias.asname or top] = alias.name if alias.asname else top
                elif node.module and not node.level and alias.name != "*":
                    self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def first_use(self, tree: ast.AST, name: str) -> int | None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == name and not self._in_local_block(node):
                return node.lineno + self.offset
        return None

    def fail(self, node: ast.AST, message: str) -> None:
        raise PolicyViolation(message, getattr(node, "lineno", 1) + self.offset, filename=self.filename)

    def _in_local_block(self, node: ast.AST) -> bool:
        line = getattr(node, "lineno", None)
        return line is not None and any(a <= line + self.offset <= b for a, b in self.spans)

    def visit(self, node: ast.AST) -> None:
        if not self._in_local_block(node):
            super().visit(node)

    # imports

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_path(node, alias.name)
            bound_as = alias.asname or alias.name.split(".")[0]
            self._check_name(node, bound_as)
            self.aliases[bound_as] = alias.name if alias.asname else alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            self.fail(node, f"relative imports are not allowed on the server; {MOVE_HINT}")
        for alias in node.names:
            if alias.name == "*":
                self.fail(
                    node,
                    f"'from {node.module} import *' is not allowed on the server; import names one by one or {MOVE_HINT}",
                )
            path = f"{node.module}.{alias.name}"
            self._check_path(node, path)
            self._check_name(node, alias.asname or alias.name)
            self.aliases[alias.asname or alias.name] = path

    # names and attributes

    def visit_Assign(self, node: ast.Assign) -> None:
        """`L = torch.nn.Linear`: L is an alias of that path from here on (so `L.forward = f`, which changes the
        class for every job, is refused as when spelled out); an alias given anything else is data again."""
        self.generic_visit(node)
        dotted = self._dotted(node.value)  # (a name or an attribute chain on an alias; None for anything else)
        path = dotted[0] if dotted else None
        for target in node.targets:
            if isinstance(target, ast.Name) and (path is not None or target.id in self.aliases):
                self.aliases[target.id] = path

    def visit_Name(self, node: ast.Name) -> None:
        self._check_name(node, node.id)
        if node.id in self.policy.denied_builtins and not self.policy.lifted(node.id):
            if not isinstance(node.ctx, ast.Load):  # a store would shadow it only from some point on
                self.fail(node, f"'{node.id}' names a builtin the server refuses; rename the variable")
            if node.id not in self.bound:  # a value the client bound under that name shadows it
                self.fail(node, f"'{node.id}' is not allowed on the server; {ALLOW_HINT}")

    def _check_name(self, node: ast.AST, name: str) -> None:
        if name.startswith("__"):
            self.fail(
                node,
                f"the name '{name}' is not allowed on the server (dunder names reach interpreter internals); {MOVE_HINT}",
            )

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr.startswith("__"):
            self.fail(
                node,
                f"the attribute '{node.attr}' is not allowed on the server (dunder attributes reach "
                f"interpreter internals); {MOVE_HINT}",
            )
        if node.attr in self.policy.denied_attributes:
            self.fail(node, f"the attribute '{node.attr}' is not allowed on the server; {ALLOW_HINT}")
        if node.attr in ("format", "format_map"):
            self._check_format(node)
        dotted = self._dotted(node)
        if dotted is None:
            self.generic_visit(node)
            return
        path, root = dotted
        if not isinstance(node.ctx, ast.Load):
            self.fail(node, f"assigning to '{path}' would change the server for every job; {MOVE_HINT}")
        self._check_path(node, path)
        self.visit(root)  # inner attributes are prefixes of an allowed path: not checked on their own

    def _dotted(self, node: ast.AST) -> tuple[str, ast.Name] | None:
        """The import path an attribute chain spells (np.linalg.norm -> numpy.linalg.norm) and its root
        name, if the root is an imported or client-bound module, function or class."""
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or self.aliases.get(node.id) is None:
            return None
        return ".".join([self.aliases[node.id], *reversed(parts)]), node

    def _check_path(self, node: ast.AST, path: str) -> None:
        reason = self.policy.path_refusal(path)
        if reason:
            self.fail(node, f"{reason}; {ALLOW_HINT}")

    # calls and strings

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if _is_super_dunder(func):  # super().__init__(...) in a shipped class: the one dunder call allowed
            self.visit(func.value)
            for arg in (*node.args, *node.keywords):
                self.visit(arg)
            return
        dotted = self._dotted(func)
        name = dotted[0] if dotted else func.id if isinstance(func, ast.Name) else None
        if name in DATA_LOADERS:
            self._check_loader(node)
        if name in _GETATTR_LIKE:
            index = _GETATTR_LIKE[name]
            args = node.args if index is None else node.args[index : index + 1]
            for arg in args:
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    self.fail(
                        node,
                        f"{name}() with a computed attribute name is not allowed on the server; use the attribute directly or {MOVE_HINT}",
                    )
                for attr in arg.value.split("."):
                    if self.policy.refuses_attribute(attr):
                        self.fail(node, f"{name}() of '{attr}' is not allowed on the server; {MOVE_HINT}")
        self.generic_visit(node)

    def _check_format(self, node: ast.Attribute) -> None:
        """`.format` / `.format_map` (called at once or kept for later: `f = "...".format`) only on a string
        literal whose fields reach no `__` attribute: a format field is an attribute read by name."""
        receiver = node.value
        if not (isinstance(receiver, ast.Constant) and isinstance(receiver.value, str)):
            self.fail(node, f"'.{node.attr}()' on a computed string is not allowed on the server; use an f-string")
        for _, field_name, spec, _ in string.Formatter().parse(receiver.value):
            if "__" in (field_name or "") + (spec or ""):
                self.fail(node, f"a format field reaching '__' attributes is not allowed on the server; {MOVE_HINT}")

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and _DUNDER_STRING.fullmatch(node.value):
            self.fail(
                node,
                f"the string '{node.value}' names an interpreter internal and is not allowed on the server; {MOVE_HINT}",
            )

    # definitions and patterns that bind or reach names

    def _check_loader(self, node: ast.Call) -> None:
        """A DataLoader runs in the job's own thread: no worker processes (num_workers stays 0)."""
        workers = [k.value for k in node.keywords if k.arg in ("num_workers", "multiprocessing_context")]
        if (len(node.args) > 5 or any(k.arg is None for k in node.keywords)
                or any(not (isinstance(v, ast.Constant) and v.value in (0, None)) for v in workers)):
            self.fail(node, f"{LOADER_RULE} (no worker processes, no multiprocessing_context, no **kwargs)")

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        if not (id(node) in self.methods and node.name in CLASS_DUNDERS):
            self._check_name(node, node.name)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._check_name(node, node.name)
        if node.keywords:
            self.fail(node, f"class keywords (metaclass=...) are not allowed on the server; {MOVE_HINT}")
        self.methods.update(id(s) for s in node.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)))
        self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        self._check_name(node, node.arg)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global | ast.Nonlocal) -> None:
        for name in node.names:
            self._check_name(node, name)

    visit_Nonlocal = visit_Global

    def visit_MatchClass(self, node: ast.MatchClass) -> None:
        for attr in node.kwd_attrs:
            if self.policy.refuses_attribute(attr):
                self.fail(node, f"matching the attribute '{attr}' is not allowed on the server; {MOVE_HINT}")
        self.generic_visit(node)
