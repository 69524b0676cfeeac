"""Capture the source of a `with` block, skip it in the caller, and compile it for the Executor.

A tracing context's body is real Python that tether runs itself, interleaved with the model.
This module finds the block in the caller's source (file, notebook cell or server-registered text),
stops the caller from running it, and compiles it with `.save()`/`.grad`/`.stop()` routed to tether.
Imports only the standard library.
"""

from __future__ import annotations

import ast
import copy
import linecache
import textwrap
import threading
from dataclasses import dataclass, field
from types import CodeType, FrameType

from ..caching import bytes_lru_cache
from .body import assigned_names, loaded_names, local_blocks
from .cpython import SkipBody, entered_with_item, restore_trace, skip_body
from .errors import SourceUnavailableError

__all__ = ["parse", "compile_source", "Block", "SkipBody", "find_block", "find_in_text", "skip_body",
           "restore_trace", "bind_target", "register_source", "OPS_NAME"]

OPS_NAME = "__tether__"

# CPython 3.11's parser and compiler share a recursion counter across threads ("AST constructor
# recursion depth mismatch"); server workers parse concurrently, so parsing and compiling take turns.
_compile_lock = threading.Lock()


@dataclass(eq=False)
class Block:
    """One `with` block: where it is, its body as source and AST, and what it assigns."""

    filename: str
    with_line: int  # line of the `with` keyword
    first_line: int  # first line of the body
    last_line: int  # last line of the body
    node: ast.With  # the whole with statement, as parsed from the file
    source: str  # the body, dedented
    assigned: tuple[str, ...]  # names the body binds, outside nested function scopes
    loaded: frozenset[str]  # names the body reads
    local_blocks: list[tuple[int, int]] = field(default_factory=list)  # body.local_blocks: (first, last) lines
    item: int | None = None  # which of the with statement's items is tether's (set when first entered)
    scope: str = "<module>"  # the function the `with` statement is in: the body's frames carry its name
    _code: dict = field(default_factory=dict)

    @classmethod
    def of(cls, filename: str, node: ast.With, source: str, first_line: int | None = None) -> Block:
        """The Block of with statement `node` (its body dedented: `source`), with the names it reads and
        assigns and its local() blocks; `first_line` defaults to the first body statement's line."""
        body = node.body
        return cls(filename=filename, with_line=node.lineno,
                   first_line=body[0].lineno if first_line is None else first_line,
                   last_line=body[-1].end_lineno or body[-1].lineno, node=node, source=source,
                   assigned=tuple(assigned_names(body)), loaded=loaded_names(body), local_blocks=local_blocks(body))

    @property
    def target(self) -> ast.expr | None:
        """The `as` target of tether's item of the with statement (None without one)."""
        return self.node.items[self.item or 0].optional_vars

    def target_code(self) -> CodeType:
        """`<as target> = __tether___item`, compiled (for tuple targets)."""
        if "target" not in self._code:
            bind = ast.Assign(targets=[self.target],
                              value=ast.Name(id=f"{OPS_NAME}_item", ctx=ast.Load()))
            module = ast.Module(body=[ast.copy_location(bind, self.node)], type_ignores=[])
            with _compile_lock:
                self._code["target"] = compile(ast.fix_missing_locations(module), self.filename, "exec")
        return self._code["target"]

    def code(self, *, start: int = 0, target: ast.expr | None = None) -> CodeType:
        """Compile the body (from top-level statement `start`), optionally after binding `target`."""
        key = (start, ast.dump(target) if target is not None else None)
        if key not in self._code:
            stmts = list(self.node.body[start:])
            if target is not None:
                bind = ast.Assign(targets=[target], value=ast.Name(id=f"{OPS_NAME}_item", ctx=ast.Load()))
                ast.copy_location(bind, self.node)
                stmts.insert(0, bind)
            module = ast.Module(body=[_RouteTetherCalls().visit(copy.deepcopy(s)) for s in stmts], type_ignores=[])
            ast.fix_missing_locations(module)
            with _compile_lock:
                code = compile(module, self.filename, "exec")
            if self.scope != code.co_name:  # a traceback then reads `in work`, as if the body ran in place
                code = code.replace(co_name=self.scope, **({"co_qualname": self.scope}
                                                            if hasattr(code, "co_qualname") else {}))
            self._code[key] = code
        return self._code[key]

    def top_level_index(self, line: int) -> int:
        """Index of the top-level body statement that contains `line`."""
        for index, stmt in enumerate(self.node.body):
            if stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno):
                return index
        raise ValueError(f"line {line} is not in the block at {self.filename}:{self.with_line}")


def register_source(filename: str, text: str) -> None:
    """Make `text` readable as `filename` (for programs received over the wire)."""
    lines = text.splitlines(keepends=True)
    linecache.cache[filename] = (len(text), None, lines, filename)


def find_block(frame: FrameType) -> Block:
    """The `with` block whose context manager is being entered at `frame`'s current line."""
    filename = frame.f_code.co_filename
    line = frame.f_lineno
    lines = linecache.getlines(filename, frame.f_globals)
    hit = _recent.get((filename, line))
    if hit is not None and hit[0] is lines:
        return hit[1]
    if not lines:
        raise SourceUnavailableError(
            f"tether cannot read the source of the tracing context at {filename}:{frame.f_lineno}. "
            "Run the code from a file or a notebook cell (not `python -c` or an interactive prompt "
            "without source), so its body can be executed."
        )
    block = find_in_text(filename, "".join(lines), line)
    if block.item is None:
        block.item = entered_with_item(frame, block.node)
        block.scope = frame.f_code.co_name
    if len(_recent) > 1024:
        _recent.clear()
    _recent[(filename, line)] = (lines, block)
    return block


_recent: dict[tuple[str, int], tuple[list[str], Block]] = {}  # (file, line) -> (linecache's lines, block)


def parse(text: str, filename: str = "<unknown>") -> ast.Module:
    """`ast.parse`, safe to call from several threads at once (see `_compile_lock`)."""
    with _compile_lock:
        return ast.parse(text, filename)


def compile_source(source, filename: str, mode: str = "exec") -> CodeType:
    """`compile`, safe to call from several threads at once (see `_compile_lock`)."""
    with _compile_lock:
        return compile(source, filename, mode)


@bytes_lru_cache()
def _parse(text: str, filename: str) -> ast.Module:
    with _compile_lock:
        return ast.parse(text, filename)


@bytes_lru_cache()
def find_in_text(filename: str, text: str, line: int) -> Block:
    """The innermost `with` block of `text` whose `with` line range holds `line` (cached by value)."""
    tree = _parse(text, filename)
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)) and node.lineno <= line < node.body[0].lineno:
            if best is None or node.lineno >= best.lineno:
                best = node
    if best is None:
        raise SourceUnavailableError(
            f"tether found no `with` statement at {filename}:{line}. Tracing contexts must be used as "
            "`with model.trace(...):` blocks written in the source file."
        )
    first = best.body[0].lineno
    last = best.body[-1].end_lineno or best.body[-1].lineno
    source = textwrap.dedent("".join(text.splitlines(keepends=True)[first - 1 : last]))
    return Block.of(filename, best, source)


def bind_target(block: Block, value: object, ns: dict) -> dict:
    """Bind the block's `as` target to `value` in `ns`; returns the names bound."""
    target = block.target
    if target is None:
        return {}
    if isinstance(target, ast.Name):
        ns[target.id] = value
        return {target.id: value}
    ns[f"{OPS_NAME}_item"] = value
    exec(block.target_code(), ns)
    del ns[f"{OPS_NAME}_item"]
    return {n.id: ns[n.id] for n in ast.walk(target) if isinstance(n, ast.Name)}


def _ops_call(name: str, node: ast.AST, *args: ast.expr) -> ast.Call:
    call = ast.Call(
        func=ast.Attribute(value=ast.Name(id=OPS_NAME, ctx=ast.Load()), attr=name, ctx=ast.Load()),
        args=list(args),
        keywords=[],
    )
    return ast.copy_location(call, node)


_MODULE_VALUES = ("output", "input", "inputs")


class _RouteTetherCalls(ast.NodeTransformer):
    """Route `.save()`, `.stop()`, `.grad`, `.value` and `with x.backward():` to tether's ops.

    Done in the compiled body so no method is ever mounted on torch or built-in types.
    """

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr in ("save", "stop")) or node.args or node.keywords:
            return node
        owner = func.value
        if func.attr == "stop" and isinstance(owner, ast.Attribute) and owner.attr in _MODULE_VALUES:
            # `module.output.stop()` stops at that module without fetching its value (it may have run)
            return _ops_call("stop_at", node, owner.value, ast.Constant(owner.attr))
        return _ops_call(func.attr, node, owner)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.ctx, ast.Load) and node.attr in ("grad", "value"):
            return _ops_call(node.attr, node, node.value)
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        target = node.targets[0]
        if len(node.targets) == 1 and isinstance(target, ast.Attribute) and target.attr == "grad":
            value = self.visit(node.value)
            owner = self.visit(target.value)
            return ast.copy_location(ast.Expr(_ops_call("set_grad", node, owner, value)), node)
        return self.generic_visit(node)

    def visit_With(self, node: ast.With) -> ast.AST:
        for item in node.items:
            expr = item.context_expr
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "backward":
                call = _ops_call("backward", expr, self.visit(expr.func.value), *[self.visit(a) for a in expr.args])
                call.keywords = [ast.keyword(arg=k.arg, value=self.visit(k.value)) for k in expr.keywords]
                item.context_expr = call
            else:
                item.context_expr = self.visit(expr)
            if item.optional_vars is not None:
                item.optional_vars = self.visit(item.optional_vars)
        node.body = [self.visit(s) for s in node.body]
        return node
