"""Build the JobSpec of a captured context: its Program, the values of the names it reads, shipped sources.

Decides what travels by value (data, as tether.values), by reference (modules, library functions, the
hosted model and its submodules) or as source (the user's own functions and classes). Never imports grpc.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import sys
import textwrap
import threading
import types
import uuid
from dataclasses import dataclass, field
from typing import Any

from tether.protocol import CLIENT_MODULE, PROGRAM_KINDS
from tether.runtime.body import body_span, loaded_names, split_local, stored_names, written_names
from tether.runtime.capture import parse
from tether.runtime.compat import is_traced_function
from tether.runtime.contexts import Context
from tether.runtime.envoy import Envoy, module_of, path_of, root_of
from tether.runtime.errors import TetherError
from tether.runtime.model import hosted_name, persistent_edits
from tether.runtime.program import free_names, program_of
from tether.runtime.rename import declared as declared_aliases
from tether.runtime.saving import StandIn, error_of
from tether.v1 import jobs_pb2, program_pb2, values_pb2
from tether.values import to_value

from .outside import as_namespace, is_plain_object

__all__ = ["Job", "BlockSource", "build_job", "model_name_of", "CLIENT_MODULE"]

_KINDS = PROGRAM_KINDS
_HAS_PATH = "path" in values_pb2.ModelReference.DESCRIPTOR.fields_by_name


@dataclass
class BlockSource:
    """Where one local() block's body is: the user's file, its text when the job was built, the line."""

    filename: str
    text: str
    first_line: int


@dataclass
class Job:
    """A JobSpec and what the client needs to run its local() blocks and read its result."""

    spec: jobs_pb2.JobSpec
    model: Any  # the root NNsight the context belongs to
    model_name: str
    assigned: tuple[str, ...]  # names the body assigns: what the caller gets back
    sites: dict[str, BlockSource] = field(default_factory=dict)  # block_id -> where its body is
    remote_loads: frozenset[str] = frozenset()  # names remote code reads: local() blocks send back only these
    sent: dict[str, bytes] = field(default_factory=dict)  # binding name -> its serialized Value

    @property
    def has_local_blocks(self) -> bool:
        return bool(self.sites)


def model_name_of(model: Any, options: dict) -> str:
    name = options.get("model_name") or hosted_name(model)
    if not name:
        raise TetherError(
            "tether does not know which hosted model this is: pass `model_name='...'` (the server's name "
            "for it, see `tether serve --model NAME=...`) to trace/generate/session, or load the model "
            "by that name: `LanguageModel('NAME')`."
        )
    return str(name)


def build_job(context: Any, ns: dict) -> Job:
    """The job for a captured (entered and skipped) Tracer or Session, with the caller's names `ns`."""
    request = context.remote_request()
    options, model, kind = request.options, request.model, request.kind
    model_name = model_name_of(model, options)
    program = program_of(context, kind)
    program.kwargs.update(request.trace_options)  # the server's `model.trace(...)` takes them as the caller's did
    block = context.block
    body = _body_of(block)
    encoder = _Encoder(model, model_name)

    msg = program_pb2.Program(
        kind=_KINDS[kind],
        source=program.source,
        filename=program.filename,
        first_line=program.first_line,
        model=model_name,
        tracer_name=program.tracer_name,
        enclosing_function=program.enclosing_function,
    )
    for edit_block, edit_ns in persistent_edits(model):
        msg.edits.append(_edit(encoder, edit_block, edit_ns))
    msg.args.extend(encoder.value(a) for a in program.args)
    for key, value in program.kwargs.items():
        msg.kwargs[key].CopyFrom(encoder.value(value))

    job = Job(spec=jobs_pb2.JobSpec(request_id=uuid.uuid4().hex), model=model, model_name=model_name,
              assigned=tuple(block.assigned), remote_loads=frozenset(body.remote_loads))
    for name in free_names(block, ns):
        if name not in body.remote_loads or name == program.tracer_name or isinstance(ns[name], Context):
            continue  # read only inside local() blocks (stays on the client), or the tracer itself
        arg = next((i for i, a in enumerate(program.args) if a is ns[name]), None)
        if arg is not None and not isinstance(ns[name], (int, float, str, bool)):
            msg.bound_args[name] = arg  # the same object as the input, on the server too
            continue
        if is_plain_object(ns[name], _is_library):
            _check_plain_object(name, ns[name], block)
        try:
            value = encoder.binding(name, ns[name])
        except (TypeError, TetherError):
            if name in block.assigned:
                continue  # a stale value the body overwrites before reading; a local run ignores it too
            raise
        if value is not None:
            msg.bindings[name].CopyFrom(value)
            job.sent[name] = value.SerializeToString(deterministic=True)
    locals_ = body.local_blocks(body.remote_stores) if body.locals else []
    text = "".join(linecache.getlines(block.filename)) if locals_ else ""
    for local in locals_:
        msg.local_blocks.append(local)
        job.sites[local.block_id] = BlockSource(block.filename, text, local.first_line)
    job.remote_loads |= encoder.remote_loads  # (a block in a shipped function binds what that function reads)
    for fn, site in encoder.shipped():
        msg.functions.append(fn)
        for local in fn.local_blocks:
            job.sites[local.block_id] = BlockSource(site.filename, site.text, local.first_line)
    job.spec.program.CopyFrom(msg)
    return job


def _edit(encoder: _Encoder, block: Any, ns: dict) -> program_pb2.Edit:
    """A persistent edit as the server applies it: its body and the values it read when it was made."""
    if block.local_blocks:
        raise TetherError(
            f"{block.filename}, line {block.first_line}: this model's edit (`model.edit()`) has a `local()` block, "
            "which a remote job cannot run in every trace; move that code out of the edit, or run locally."
        )
    msg = program_pb2.Edit(source=block.source, filename=block.filename, first_line=block.first_line)
    for name in free_names(block, ns):
        if isinstance(ns[name], Context):
            continue
        value = encoder.binding(name, ns[name])
        if value is not None:
            msg.bindings[name].CopyFrom(value)
    return msg


def _check_plain_object(name: str, obj: Any, block: Any) -> None:
    """A plain object travels as its attributes: refuse, before the job, a body that uses its class's methods
    or properties there (the server would not have them)."""
    spans = list(block.local_blocks)  # code there runs here, with the real object
    for node in ast.walk(block.node):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == name
                and node.attr not in vars(obj) and hasattr(type(obj), node.attr)
                and not any(a <= node.lineno <= b for a, b in spans)):
            raise TetherError(
                f"{block.filename}, line {node.lineno}: `{name}.{node.attr}` belongs to the class "
                f"{type(obj).__qualname__}, which stays here: a remote job gets `{name}`'s attributes only. "
                f"Read or set attributes of `{name}` in the body, or use it inside `with tether.local():`."
            )


# ---------------------------------------------------------------------------------------------- the body


class _Body:
    """A body's (or a shipped function's) local() blocks as LocalBlock messages, and what the code outside
    them reads and binds (runtime.body.split_local)."""

    def __init__(self, stmts: list[ast.stmt], line_offset: int = 0):
        self.offset = line_offset
        names = split_local(stmts)
        self.remote_loads, self.remote_stores, self.locals = names.remote_loads, names.remote_stores, names.locals

    def local_blocks(self, remote_assigned: set[str], filename_tag: str = "") -> list[program_pb2.LocalBlock]:
        blocks = []
        for node in sorted(self.locals, key=lambda n: n.lineno):
            first, last = (line + self.offset for line in body_span(node))
            blocks.append(program_pb2.LocalBlock(
                block_id=f"{filename_tag}{first}", first_line=first, last_line=last,
                reads=sorted(loaded_names(node.body) & remote_assigned), writes=written_names(node.body),
            ))
        return blocks


_BODY_CACHE_SIZE = 512
_bodies: dict[tuple[str, int, str], _Body] = {}  # (filename, first_line, source) -> its _Body (read-only)
_bodies_lock = threading.Lock()


def _body_of(block: Any) -> _Body:
    """The _Body of a captured block, walked once per distinct body (the walk is the costly part)."""
    key = (block.filename, block.first_line, block.source)
    body = _bodies.get(key)
    if body is None:
        body = _Body(block.node.body)
        with _bodies_lock:
            if len(_bodies) >= _BODY_CACHE_SIZE:
                _bodies.clear()
            _bodies[key] = body
    return body


# --------------------------------------------------------------------------------------------- values


def _is_library(obj: Any) -> bool:
    """Whether `obj` comes from an installed package or the standard library (the server imports those)."""
    module = getattr(obj, "__module__", None) or ""
    top = module.split(".")[0]
    if not top or top == "__main__":
        return False
    if top in sys.stdlib_module_names or top in ("builtins", "tether", "torch"):
        return True
    file = getattr(sys.modules.get(top), "__file__", None) or ""
    return "site-packages" in file or "dist-packages" in file


class _Encoder:
    """Encodes the values of one job, shipping the source of user functions it meets (once each)."""

    def __init__(self, model: Any, model_name: str):
        self._model, self._model_name = model, model_name
        self._functions: list[tuple[program_pb2.FunctionSource, BlockSource]] = []  # in definition order
        self._by_name: dict[str, Any] = {}  # shipped (or being shipped) name -> the object
        self.remote_loads: set[str] = set()  # what the shipped functions read outside their local() blocks

    def shipped(self) -> list[tuple[program_pb2.FunctionSource, BlockSource]]:
        return list(self._functions)

    def binding(self, name: str, value: Any) -> values_pb2.Value | None:
        """The Value for a free name, or None when it is shipped as a FunctionSource instead."""
        if is_traced_function(value):
            return values_pb2.Value(reference=values_pb2.Reference(module=CLIENT_MODULE, qualname=name))
        if isinstance(value, types.ModuleType):
            return values_pb2.Value(reference=values_pb2.Reference(module=value.__name__))
        if isinstance(value, (types.FunctionType, type)) and not _is_library(value):
            self._ship(name, value)
            return None
        return self.value(value)

    def value(self, obj: Any) -> values_pb2.Value:
        return to_value(obj, default=self._default)

    def _default(self, obj: Any) -> values_pb2.Value | None:
        if isinstance(obj, Envoy):
            return values_pb2.Value(model_reference=self._model_reference(obj))
        if isinstance(obj, StandIn):
            raise error_of(obj)
        if isinstance(obj, Context):
            raise TetherError("A tracing context cannot be sent to the server inside another value.")
        if is_plain_object(obj, _is_library):
            return to_value(as_namespace(obj), default=self._default)
        if isinstance(obj, (types.FunctionType, type)) and not _is_library(obj):
            raise TetherError(
                f"{obj.__qualname__} is your own function or class inside a container: the server can only "
                "receive your functions by name. Bind it to a name the body calls, or call it in `tether.local()`."
            )
        return None

    def _model_reference(self, envoy: Envoy) -> values_pb2.ModelReference:
        root = root_of(envoy)
        if root is self._model or (isinstance(self._model, Envoy) and module_of(root) is module_of(self._model)):
            name = self._model_name
        else:
            name = hosted_name(root)
            if not name:
                raise TetherError(
                    "The body uses a second model that the server cannot name: load it by its hosted name "
                    "(`LanguageModel('NAME')`) to use it in a remote job."
                )
        prefix, full = path_of(root) + ".", path_of(envoy)
        path = full[len(prefix):] if full.startswith(prefix) else ""
        if not path:
            aliases = [values_pb2.ModuleAlias(alias_path=a, path=p) for a, p in declared_aliases(root).items()]
            return values_pb2.ModelReference(name=name, aliases=aliases)  # `rename=` given here, bound there
        if not _HAS_PATH:
            raise TetherError(
                f"`{full}` is a submodule bound from outside the body; this server protocol can only "
                "send whole models. Write the full path (`model.…`) inside the body instead."
            )
        return values_pb2.ModelReference(name=name, path=path)

    def _ship(self, name: str, obj: Any) -> None:
        if name in self._by_name:
            if self._by_name[name] is not obj:
                raise TetherError(
                    f"Two different functions named {name!r} are used by this job; the server defines shipped "
                    "functions by name. Rename one of them."
                )
            return
        self._by_name[name] = obj
        try:
            lines, first_line = inspect.getsourcelines(obj)
            filename = inspect.getsourcefile(obj) or getattr(getattr(obj, "__code__", None), "co_filename", "")
        except (OSError, TypeError):
            raise TetherError(
                f"tether cannot read the source of {name!r} to send it to the server (defined interactively?). "
                "Define it in a file or notebook cell, or call it inside `with tether.local():`."
            ) from None
        source = textwrap.dedent("".join(lines))
        try:
            node = parse(source).body[0]
        except SyntaxError:
            node = None
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name != obj.__name__:
            raise TetherError(
                f"{name!r} is a lambda or was made dynamically, so its source cannot be sent to the server. "
                "Define it with `def`, or call it inside `with tether.local():`."
            )
        scope, closure, local_names = _scopes(obj)
        if isinstance(node, ast.ClassDef):  # its methods' own variables are not free names of the class
            local_names = local_names | _method_locals(node)
        fn_body = _Body([node], line_offset=first_line - 1)
        self.remote_loads |= fn_body.remote_loads
        msg = program_pb2.FunctionSource(name=name, source=source, filename=filename, first_line=first_line)
        for free in sorted(loaded_names([node]) - {node.name}):
            if free in closure:
                value = closure[free]
            elif free in local_names or free not in scope:
                continue
            else:
                value = scope[free]
            if isinstance(value, Context):
                continue
            encoded = self.binding(free, value)
            if encoded is not None:
                msg.bindings[free].CopyFrom(encoded)
        tag = f"{filename}:"
        msg.local_blocks.extend(fn_body.local_blocks(fn_body.remote_stores, filename_tag=tag))
        text = "".join(linecache.getlines(filename))
        site = BlockSource(filename, text, 0)
        self._functions.append((msg, site))


def _method_locals(node: ast.ClassDef) -> set[str]:
    """Names the methods of a class bind themselves (arguments, assignments), minus `global` ones."""
    names: set[str] = set()
    declared: set[str] = set()
    for fn in ast.walk(node):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for n in ast.walk(fn):
                if isinstance(n, ast.Global):
                    declared.update(n.names)
                elif n is not fn or isinstance(n, ast.Lambda):
                    names.update(stored_names(n))
            names.update(a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg))
    return names - declared


def _scopes(obj: Any) -> tuple[dict, dict, set[str]]:
    """(globals, closure values, local variable names) that a function or class body resolves names in."""
    if isinstance(obj, types.FunctionType):
        cells = dict(zip(obj.__code__.co_freevars, obj.__closure__ or ()))
        closure = {}
        for name, cell in cells.items():
            try:
                closure[name] = cell.cell_contents
            except ValueError:  # an empty cell
                pass
        return obj.__globals__, closure, set(obj.__code__.co_varnames)
    module = sys.modules.get(obj.__module__)
    return (vars(module) if module else {}), {}, set()
