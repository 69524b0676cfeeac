"""`.source`: the operations inside a module's `forward` (calls and assignments), readable and writable.

A module whose operations a trace asks for runs, for that trace only, a copy of its `forward` compiled
from its source with each operation routed through `_Site.op`, which serves the bodies waiting there
(Interleaver.serve_point). Imports torch and the engine; never client or server.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
import types
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .errors import NotInTraceError, TetherError
from .interleaver import current_interleaver
from .mediator import Request, current_mediator

__all__ = ["SourceView", "Operation"]

_OP, _BIND = "__tether_op__", "__tether_bind__"


# ---- compiling a function with its operations named ------------------------------------------------------

@dataclass(frozen=True)
class _Compiled:
    maker: types.CodeType  # code of `def maker(__tether_op__, __tether_bind__, *freevars): def fn...; return fn`
    names: tuple[str, ...]  # operation labels in the order they run
    lines: dict[str, int]  # label -> line of the operation, counted from the source's second line (0)
    text: list[str]  # the function's source lines, decorators included
    def_index: int  # index in `text` of the `def` line


class _Namer(ast.NodeTransformer):
    """Wrap each call `f(a)` as `__tether_op__("f_0", f, a)` and each `x = v` as
    `x = __tether_op__("x_0", __tether_bind__, v)`; labels count per name in evaluation order."""

    def __init__(self, first_line: int):
        self.counts: dict[str, int] = {}
        self.names: list[str] = []
        self.lines: dict[str, int] = {}
        self.first_line = first_line
        self.depth = 0

    def _label(self, name: str, node: ast.AST) -> str:
        n = self.counts.get(name, 0)
        self.counts[name] = n + 1
        label = f"{name}_{n}"
        self.names.append(label)
        self.lines[label] = node.lineno - self.first_line
        return label

    def _wrap(self, label: str, fn: ast.expr, args: list, keywords: list, node: ast.AST) -> ast.Call:
        call = ast.Call(func=ast.Name(_OP, ast.Load()), args=[ast.Constant(label), fn, *args], keywords=keywords)
        return ast.copy_location(call, node)

    def visit_FunctionDef(self, node):  # only the function itself: nested defs and lambdas run as written
        self.depth += 1
        if self.depth == 1:
            self.generic_visit(node)
        self.depth -= 1
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "super":
            return node  # zero-argument super() must run in the function's own frame
        return self._wrap(self._label(_call_name(node.func), node), node.func, node.args, node.keywords, node)

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        self.generic_visit(node)
        target = node.targets[0] if len(node.targets) == 1 else None
        while isinstance(target, ast.Subscript):  # `cache.is_updated[i] = v` -> "cache_is_updated"
            target = target.value
        if isinstance(target, (ast.Name, ast.Attribute)):
            label = self._label(_call_name(target), node)
            node.value = self._wrap(label, ast.Name(_BIND, ast.Load()), [node.value], [], node.value)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        self.generic_visit(node)
        if node.value is not None and isinstance(node.target, ast.Name):
            label = self._label(node.target.id, node)
            node.value = self._wrap(label, ast.Name(_BIND, ast.Load()), [node.value], [], node.value)
        return node


def _call_name(func: ast.expr) -> str:
    """`self.q_proj` -> "self_q_proj", `torch.nn.functional.softmax` -> "torch_nn_functional_softmax";
    a method of a computed value (`f(x).view`) -> "view"."""
    parts, node = [], func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return "_".join([node.id, *reversed(parts)])
    return parts[0] if parts else "call"


@functools.lru_cache(maxsize=256)
def _compile(raw: types.FunctionType) -> _Compiled:
    try:
        lines, start = inspect.getsourcelines(raw)
        filename = inspect.getsourcefile(raw) or "<source>"
    except (OSError, TypeError):
        raise TetherError(f"`.source` needs Python source, and {raw.__qualname__} has none here "
                          "(a builtin, or code compiled from a string).") from None
    text = textwrap.dedent("".join(lines))
    tree = ast.parse(text)
    fdef = tree.body[0]
    if not isinstance(fdef, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise TetherError(f"`.source` found no `def` for {raw.__qualname__}.")
    def_index = fdef.lineno - 1
    fdef.decorator_list = []
    namer = _Namer(2)  # lines are numbered from the source's second line (the first is marked `*`)
    namer.visit(fdef)
    params = [_OP, _BIND, *raw.__code__.co_freevars]
    maker = ast.FunctionDef(
        name="__tether_maker__",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(p) for p in params], kwonlyargs=[], kw_defaults=[],
                           defaults=[]),
        body=[fdef, ast.Return(ast.Name(fdef.name, ast.Load()), lineno=fdef.end_lineno, col_offset=0,
                               end_lineno=fdef.end_lineno, end_col_offset=0)],
        decorator_list=[], returns=None, lineno=fdef.lineno, col_offset=0, end_lineno=fdef.end_lineno,
        end_col_offset=0)
    if sys.version_info >= (3, 12):
        maker.type_params = []
    module = ast.Module(body=[maker], type_ignores=[])
    ast.fix_missing_locations(module)
    ast.increment_lineno(module, start - 1)
    code = compile(module, filename, "exec")
    maker_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    return _Compiled(maker_code, tuple(namer.names), namer.lines, text.split("\n"), def_index)


def _bind(value: Any) -> Any:
    return value


def _raw(fn: Any) -> types.FunctionType:
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    if not isinstance(fn, types.FunctionType):
        raise TetherError(f"`.source` works on Python functions; {fn!r} is not one.")
    return fn


def _instrumented(fn: Any, op) -> Any:
    """`fn` (a function or bound method, maybe decorated) with its operations routed to `op`."""
    bound_to = getattr(fn, "__self__", None) if isinstance(fn, types.MethodType) else None
    outer = fn.__func__ if bound_to is not None else fn
    raw = _raw(outer)
    compiled = _compile(raw)
    cells = [c.cell_contents for c in (raw.__closure__ or ())]
    maker = types.FunctionType(compiled.maker, raw.__globals__, "__tether_maker__")
    new = maker(op, _bind, *cells)
    new.__defaults__, new.__kwdefaults__ = raw.__defaults__, raw.__kwdefaults__
    new = _rewrap(outer, raw, new)
    return types.MethodType(new, bound_to) if bound_to is not None else new


def _rewrap(fn: Any, raw: types.FunctionType, new: types.FunctionType) -> Any:
    """Rebuild the decorators around `raw` (functools.wraps chains) around `new` instead."""
    if fn is raw:
        return new
    inner = fn.__wrapped__
    new_inner = _rewrap(inner, raw, new)
    closure = fn.__closure__ or ()
    if not isinstance(fn, types.FunctionType) or not any(c.cell_contents is inner for c in closure):
        raise TetherError(f"`.source` cannot see through the decorator around {raw.__qualname__}.")
    cells = tuple(types.CellType(new_inner) if c.cell_contents is inner else c for c in closure)
    out = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    out.__kwdefaults__ = fn.__kwdefaults__
    out.__dict__.update(fn.__dict__)
    out.__wrapped__ = new_inner
    return out


# ---- running: one site per module ---------------------------------------------------------------------

class _Point:
    """The place in the interleaver's eyes (like a module) where one operation's values are served."""

    __slots__ = ("label", "__weakref__")

    def __init__(self, label: str):
        self.label = label


class _Site:
    """A module's operations while traces use them: which are wanted, and the forward that serves them."""

    def __init__(self, module: Any):
        self.module = weakref.ref(module)
        self.points: dict[str, _Point] = {}
        self.wanted: set[str] = set()
        self.inner: set[str] = set()  # operations whose called function runs instrumented too
        self.callees: dict[str, Any] = {}  # label -> the function it called last
        self.installed = False

    def point(self, label: str) -> _Point:
        point = self.points.get(label)
        if point is None:
            point = self.points[label] = _Point(label)
        return point

    def want(self, label: str) -> _Point:
        """Serve `label` in this run: install the instrumented forward until the run ends."""
        self.wanted.add(label)
        if not self.installed:
            interleaver = current_interleaver()
            module = self.module()
            module.forward = _instrumented(type(module).forward.__get__(module), self._op(""))
            self.installed = True
            interleaver.on_exit(self.uninstall)
        return self.point(label)

    def uninstall(self) -> None:
        module = self.module()
        if module is not None:
            module.__dict__.pop("forward", None)
        self.installed = False
        self.wanted.clear()
        self.inner.clear()
        self.callees.clear()

    def _op(self, prefix: str):
        def op(label: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
            full = prefix + label
            interleaver = current_interleaver()
            if interleaver is None or full not in self.wanted:
                return fn(*args, **kwargs)
            point = self.points[full]
            self.callees[full] = fn
            args, kwargs = interleaver.serve_point(point, "pre", (args, kwargs))
            if full in self.inner:
                fn = _instrumented(fn, self._op(full + "."))
            return interleaver.serve_point(point, "fwd", fn(*args, **kwargs))

        return op


_sites: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _site(module: Any) -> _Site:
    site = _sites.get(module)
    if site is None:
        site = _sites[module] = _Site(module)
    return site


# ---- what users see -------------------------------------------------------------------------------------

class SourceView:
    """`module.source`: print it to list the operations; `.name` gives one (an `Operation`)."""

    def __init__(self, envoy: Any, fn: Any, prefix: str):
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_prefix", prefix)  # "" for the module's forward, "op_0." for a callee's

    @classmethod
    def of(cls, envoy: Any) -> SourceView:
        module = envoy._module
        return cls(envoy, type(module).forward, "")

    def _compiled(self) -> _Compiled:
        return _compile(_raw(self._fn))

    def __getattr__(self, name: str) -> Operation:
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in self._compiled().names:
            raise AttributeError(
                f"`{self._envoy._path}.source` has no operation {name!r}; print(`{self._envoy._path}.source`) "
                "lists them.")
        return Operation(self._envoy, self._prefix + name)

    def __dir__(self) -> list[str]:
        return list(self._compiled().names)

    def __reduce_ex__(self, protocol):
        raise TypeError("a `.source` view belongs to its model in this process; it cannot be sent or pickled")

    def __repr__(self) -> str:
        compiled = self._compiled()
        width = max((len(n) for n in compiled.names), default=0)
        by_line: dict[int, list[str]] = {}
        for name in compiled.names:
            by_line.setdefault(compiled.lines[name], []).append(name)
        out = []
        for index, line in enumerate(compiled.text):
            number = index - 1
            names = by_line.get(number, [])
            mark = "*" if number < 0 else number
            out.append(f" {names[0] if names else '':<{width}} {'->' if names else '  '}{mark:>3} {line}")
            indent = line[:len(line) - len(line.lstrip())]
            out.extend(f" {name:<{width}} ->{'+':>3} {indent}..." for name in names[1:])
        return "\n".join(out)


class Operation:
    """One operation in a forward (`attn.source.attention_interface_0`): `.output`, `.input`, `.inputs`
    read and write inside a trace, as a module's do; `.source` opens the function it calls."""

    def __init__(self, envoy: Any, label: str):
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_label", label)

    @property
    def _path(self) -> str:
        return f"{self._envoy._path}.source.{self._label}"

    def _request(self, kind: str, op: str, value: Any = None) -> Any:
        mediator = current_mediator()
        if mediator is None:
            raise NotInTraceError(f"`{self._path}.{kind}` is only available inside a tracing context.")
        point = _site(self._envoy._module).want(self._label)
        return mediator.request(Request(point, kind, mediator.iteration, op, value, self._path))

    @property
    def output(self) -> Any:
        return self._request("output", "get")

    @property
    def input(self) -> Any:
        return self._request("input", "get")

    @property
    def inputs(self) -> tuple[tuple, dict]:
        return self._request("inputs", "get")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in ("output", "input", "inputs"):
            raise AttributeError(f"`{self._path}` has only `.output`, `.input` and `.inputs` to set.")
        self._request(name, "set", value)

    @property
    def source(self) -> SourceView:
        """The operations of the function this operation calls (inside a trace: it is found as it runs)."""
        if current_mediator() is None:
            raise NotInTraceError(f"`{self._path}.source` is only available inside a trace: the function an "
                                  "operation calls is known when it runs.")
        self._request("inputs", "get")  # wait until the operation is about to run
        site = _site(self._envoy._module)
        callee = site.callees[self._label]
        if isinstance(callee, torch.nn.Module):
            raise TetherError(f"`{self._path}` calls a module, which has its own `.source`: use the module's "
                              "Envoy (e.g. `model.<path to it>.source`).")
        _compile(_raw(callee))  # a builtin has no source: say so here, at the user's line
        site.inner.add(self._label)
        return SourceView(self._envoy, callee, self._label + ".")

    def __repr__(self) -> str:
        return f"Operation({self._path})"

    def __reduce_ex__(self, protocol):
        raise TypeError("a `.source` operation belongs to its model in this process; it cannot be sent or pickled")
