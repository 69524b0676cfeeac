"""The server's policy: which program sources it runs, which names values may refer to, which pickles load.

Owns the allow-lists (one frozen Policy); imports the standard library, tether.v1, tether.safe_pickle and
tether.runtime.errors only. A guard against mistakes and casual abuse, not an OS sandbox: run workers isolated.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
import string
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tether.runtime.capture import parse
from tether.runtime.errors import TetherError
from tether.safe_pickle import DEFAULT_ALLOW_LIST, PickleAllowList, safe_loads
from tether.v1 import program_pb2, values_pb2

__all__ = [
    "DEFAULT_POLICY",
    "Policy",
    "PolicyViolation",
    "check_function_source",
    "check_program_source",
]

_MOVE_HINT = "move it into a `with tether.local():` block to run it on your own machine"
_ALLOW_HINT = f"{_MOVE_HINT}, or ask the server operator to allow it"


class PolicyViolation(TetherError, ValueError):
    """A program uses something the server's policy refuses; the server answers INVALID_ARGUMENT."""

    def __init__(self, message: str, line: int, *, filename: str = ""):
        where = f"{filename}, line {line}" if filename else f"line {line}"
        super().__init__(f"{where}: {message}")
        self.message, self.line, self.filename = message, line, filename


@dataclass(frozen=True)
class Policy:
    """What the server runs. Module and callable entries are dotted names matched with their sub-names.

    allowed_modules: modules a program may import or reach (by their real __name__).
    allowed_callables: extra dotted names allowed although outside allowed_modules or denied below
        (e.g. "os.path.join"), and bare builtin names to lift from denied_builtins (e.g. "open").
    denied_builtins: builtins a program may not use (unless the client bound a value of that name).
    denied_callables: names refused even inside allowed modules (file and process access, extensions).
    denied_attributes: attribute names refused on any object (frames, raw file access).
    pickle_allow: globals a Pickled value may load (see tether.safe_pickle).
    """

    allowed_modules: frozenset[str] = frozenset(
        {"torch", "math", "operator", "collections", "itertools", "functools", "einops", "numpy", "tether"}
    )
    allowed_callables: frozenset[str] = frozenset()
    denied_builtins: frozenset[str] = frozenset(
        {"exec", "eval", "compile", "open", "globals", "locals", "vars", "setattr", "delattr", "breakpoint"}
        | {"input", "help", "exit", "quit", "license", "credits", "copyright"}
    )
    denied_callables: frozenset[str] = frozenset(
        # files, processes, native code
        {"torch.load", "torch.save", "torch.serialization", "torch.hub", "torch.from_file", "torch.storage"}
        | {
            "torch.ops.load_library",
            "torch.classes.load_library",
            "torch.utils",
            "torch.onnx",
            "torch.export",
        }
        | {"torch.jit.load", "torch.jit.save", "torch.package", "torch.profiler", "torch.autograd.profiler"}
        | {"torch.multiprocessing", "torch.distributed", "torch.testing", "torch.fx", "torch.compiler"}
        | {"numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt"}
        | {"numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.fromregex", "numpy.memmap"}
        | {"numpy.lib.format", "numpy.lib.npyio", "numpy.ctypeslib", "numpy.DataSource", "numpy.f2py"}
        | {"numpy.testing", "tether.client", "tether.server"}
        # process-wide state shared with other jobs
        | {"torch.set_default_dtype", "torch.set_default_device", "torch.set_default_tensor_type"}
        | {"torch.set_num_threads", "torch.set_num_interop_threads", "torch.library"}
    )
    denied_attributes: frozenset[str] = frozenset(
        # frames and code objects (a way around the dunder rule)
        {"gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "tb_frame", "tb_next"}
        | {"f_globals", "f_locals", "f_builtins", "f_back", "f_code", "co_code"}
        # raw file access on tensors and arrays
        | {"tofile", "from_file", "load_library", "dump"}
        # hooks and weights that would outlive the job on a shared model
        | {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook"}
        | {"register_full_backward_pre_hook", "register_backward_hook", "load_state_dict"}
        | {f"register_module_{kind}" for kind in ("forward_hook", "forward_pre_hook", "full_backward_hook")}
        | {f"register_module_{kind}" for kind in ("full_backward_pre_hook", "backward_hook")}
    )
    pickle_allow: PickleAllowList = field(default=DEFAULT_ALLOW_LIST)

    # ------------------------------------------------------------------------------------ programs

    def check_program(self, program: program_pb2.Program) -> None:
        """Checks a whole Program: its body, its shipped functions and the references among its values."""
        bound = _bound_paths(program.bindings)
        self.check_source(
            program.source,
            filename=program.filename,
            first_line=program.first_line or 1,
            local_block_spans=program.local_blocks,
            bound_names=bound,
        )
        for fn in program.functions:
            self.check_source(
                fn.source,
                filename=fn.filename,
                first_line=fn.first_line or 1,
                local_block_spans=fn.local_blocks,
                bound_names=_bound_paths(fn.bindings),
            )
        nested = [v for v in program.bindings.values() if v.WhichOneof("kind") != "reference"]
        for value in (*program.args, *program.kwargs.values(), *nested):  # direct bindings: checked above
            for path in _reference_paths(value):
                self.check_reference(path, filename=program.filename, line=program.first_line)

    def check_source(
        self,
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
        _check_cached(self, source, filename, first_line, spans, bound)

    def check_reference(self, path: str, *, filename: str = "", line: int = 0) -> None:
        """Raises PolicyViolation unless the module/function/class at dotted `path` may be used."""
        reason = self._path_refusal(path)
        if reason:
            raise PolicyViolation(f"{reason}; {_ALLOW_HINT}", line, filename=filename)

    # --------------------------------------------------------------------------- values, for tether.values

    def resolve_reference(self, ref: values_pb2.Reference) -> Any:
        """A resolve_reference for tether.values.from_value that imports only what the policy allows."""
        path = ".".join(filter(None, (ref.module, ref.qualname)))
        self.check_reference(path)
        obj: Any = importlib.import_module(ref.module)
        for part in filter(None, ref.qualname.split(".")):
            obj = getattr(obj, part)
        return obj

    def loads(self, data: bytes, *, persistent_load: Callable[[Any], Any] | None = None) -> Any:
        """An unpickler for tether.values.from_value restricted to pickle_allow."""
        return safe_loads(data, allow=self.pickle_allow, persistent_load=persistent_load)

    # ------------------------------------------------------------------------------------------ names

    def _listed(self, path: str, entries: frozenset[str]) -> bool:
        return any(path == e or path.startswith(e + ".") for e in entries)

    def _lifted(self, path: str) -> bool:
        return self._listed(path, self.allowed_callables)

    def _path_refusal(self, path: str) -> str:
        """Why dotted `path` (as spelled, e.g. "torch.nn.functional.gelu") is refused; "" if allowed."""
        if self._lifted(path):
            return ""
        parts = path.split(".")
        if not self._listed(parts[0], self.allowed_modules):
            return f"'{path}' is not allowed on the server: module '{parts[0]}' is not on its allow-list"
        if self._listed(path, self.denied_callables):
            return f"'{path}' is not allowed on the server (it reaches files, processes or shared state)"
        if any(p.startswith("_") for p in parts[1:]):
            return f"'{path}' is not allowed on the server: private names of modules are off-limits"
        if any(p in self.denied_attributes for p in parts[1:]):
            return f"'{path}' is not allowed on the server (it would outlive the job or reach files)"
        return _resolved_refusal(self, path)

    def _module_refusal(self, module: types.ModuleType, spelled: str) -> str:
        name = getattr(module, "__name__", "") or spelled
        if self._lifted(name) or self._lifted(spelled):
            return ""
        if not self._listed(name, self.allowed_modules) or self._listed(name, self.denied_callables):
            return f"'{spelled}' is not allowed on the server: it is the module '{name}'"
        return ""

    def _object_refusal(self, obj: Any, spelled: str) -> str:
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str) or self._lifted(spelled):
            return ""
        canonical = f"{module}.{qualname}"
        if module == "builtins":  # tether.list is list: as usable as the bare name, unless that is denied
            denied = qualname in self.denied_builtins and not self._lifted(qualname)
            return (
                f"'{spelled}' is not allowed on the server: it is the builtin '{qualname}'" if denied else ""
            )
        if module.startswith("_") and "." not in module:  # a C accelerator: _functools.reduce is functools'
            module = module[1:]
        if not self._listed(module, self.allowed_modules) or self._listed(canonical, self.denied_callables):
            return f"'{spelled}' is not allowed on the server: it is '{canonical}'"
        return ""


@functools.lru_cache(maxsize=4096)
def _resolved_refusal(policy: Policy, path: str) -> str:
    """Walks `path` on the server's own modules: every module reached (torch.os is os!) and the final
    function or class must be allowed by their real names. Unresolvable paths are left to fail at run time."""
    parts = path.split(".")
    try:
        obj: Any = importlib.import_module(parts[0])
    except ImportError:
        return ""
    for i, part in enumerate(parts[1:], start=2):
        spelled = ".".join(parts[:i])
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not isinstance(obj, types.ModuleType):
                return ""
            try:  # a submodule not imported yet (under an allowed, not denied, name)
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            except ImportError:
                return ""
        if isinstance(obj, types.ModuleType):
            if reason := policy._module_refusal(obj, spelled):
                return reason
        elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            return policy._object_refusal(obj, spelled)
        else:
            return ""  # a constant or instance (torch.float32, torch.ops.aten.add): its attributes are data
    if isinstance(obj, types.ModuleType):
        return policy._module_refusal(obj, path)
    return ""


DEFAULT_POLICY = Policy()


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
    policy.check_source(
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


@functools.lru_cache(maxsize=1024)
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
        reason = policy._path_refusal(path) if path is not None else ""
        line = checker.first_use(tree, name) if reason else None
        if line is not None:
            shown = reason if name == path else f"'{name}' is {path}, and {reason}"
            raise PolicyViolation(f"{shown}; {_ALLOW_HINT}", line, filename=filename)
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
            self.fail(node, f"relative imports are not allowed on the server; {_MOVE_HINT}")
        for alias in node.names:
            if alias.name == "*":
                self.fail(
                    node,
                    f"'from {node.module} import *' is not allowed on the server; import names one by one or {_MOVE_HINT}",
                )
            path = f"{node.module}.{alias.name}"
            self._check_path(node, path)
            self._check_name(node, alias.asname or alias.name)
            self.aliases[alias.asname or alias.name] = path

    # names and attributes

    def visit_Name(self, node: ast.Name) -> None:
        self._check_name(node, node.id)
        if node.id in self.policy.denied_builtins and not self.policy._lifted(node.id):
            if not isinstance(node.ctx, ast.Load):  # a store would shadow it only from some point on
                self.fail(node, f"'{node.id}' names a builtin the server refuses; rename the variable")
            if node.id not in self.bound:  # a value the client bound under that name shadows it
                self.fail(node, f"'{node.id}' is not allowed on the server; {_ALLOW_HINT}")

    def _check_name(self, node: ast.AST, name: str) -> None:
        if name.startswith("__"):
            self.fail(
                node,
                f"the name '{name}' is not allowed on the server (dunder names reach interpreter internals); {_MOVE_HINT}",
            )

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr.startswith("__"):
            self.fail(
                node,
                f"the attribute '{node.attr}' is not allowed on the server (dunder attributes reach "
                f"interpreter internals); {_MOVE_HINT}",
            )
        if node.attr in self.policy.denied_attributes:
            self.fail(node, f"the attribute '{node.attr}' is not allowed on the server; {_ALLOW_HINT}")
        dotted = self._dotted(node)
        if dotted is None:
            self.generic_visit(node)
            return
        path, root = dotted
        if not isinstance(node.ctx, ast.Load):
            self.fail(node, f"assigning to '{path}' would change the server for every job; {_MOVE_HINT}")
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
        reason = self.policy._path_refusal(path)
        if reason:
            self.fail(node, f"{reason}; {_ALLOW_HINT}")

    # calls and strings

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        dotted = self._dotted(func)
        name = dotted[0] if dotted else func.id if isinstance(func, ast.Name) else None
        if name in _GETATTR_LIKE:
            index = _GETATTR_LIKE[name]
            args = node.args if index is None else node.args[index : index + 1]
            for arg in args:
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    self.fail(
                        node,
                        f"{name}() with a computed attribute name is not allowed on the server; use the attribute directly or {_MOVE_HINT}",
                    )
                for attr in arg.value.split("."):
                    if attr.startswith("__") or attr in self.policy.denied_attributes:
                        self.fail(node, f"{name}() of '{attr}' is not allowed on the server; {_MOVE_HINT}")
        if isinstance(func, ast.Attribute) and func.attr in ("format", "format_map"):
            receiver = func.value
            if not (isinstance(receiver, ast.Constant) and isinstance(receiver.value, str)):
                self.fail(
                    node,
                    f"'.{func.attr}()' on a computed string is not allowed on the server; use an f-string",
                )
            for _, field_name, spec, _ in string.Formatter().parse(receiver.value):
                if "__" in (field_name or "") + (spec or ""):
                    self.fail(
                        node,
                        f"a format field reaching '__' attributes is not allowed on the server; {_MOVE_HINT}",
                    )
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and _DUNDER_STRING.fullmatch(node.value):
            self.fail(
                node,
                f"the string '{node.value}' names an interpreter internal and is not allowed on the server; {_MOVE_HINT}",
            )

    # definitions and patterns that bind or reach names

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self._check_name(node, node.name)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_arg(self, node: ast.arg) -> None:
        self._check_name(node, node.arg)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global | ast.Nonlocal) -> None:
        for name in node.names:
            self._check_name(node, name)

    visit_Nonlocal = visit_Global

    def visit_MatchClass(self, node: ast.MatchClass) -> None:
        for attr in node.kwd_attrs:
            if attr.startswith("__") or attr in self.policy.denied_attributes:
                self.fail(node, f"matching the attribute '{attr}' is not allowed on the server; {_MOVE_HINT}")
        self.generic_visit(node)
