"""Received Program -> what a worker runs: checked source, decoded values, shipped functions, local() blocks.

The bodies of `local()` blocks are cut out of the source the server runs (they run on the client), so no
spelling of a context manager can make the server run them. Imports torch, tether.runtime/values/v1, policy.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tether.caching import bytes_lru_cache
from tether.protocol import CLIENT_MODULE, PROGRAM_KIND_NAMES
from tether.runtime import ops
from tether.runtime.body import assigned_names, body_span, loaded_names, local_withs
from tether.runtime.capture import OPS_NAME, parse
from tether.runtime.envoy import Envoy, path_of
from tether.runtime.errors import TetherError
from tether.runtime.model import job_copy, persistent_edits
from tether.runtime.program import Program, block_of
from tether.runtime.rename import resolve as resolve_aliases
from tether.tensor_codec import decode_tensor, tensor_size
from tether.v1 import program_pb2, values_pb2
from tether.values import Attributes, from_value, to_value
from tether.wire import decode_value_map

from . import sources
from .errors import InvalidProgram
from .policy import Policy
from .registry import HostedModel
from .source_check import check_source

__all__ = ["ClientOnly", "DecodedProgram", "LocalSite", "ValueCodec", "decode_program"]

_KINDS = PROGRAM_KIND_NAMES
_LOCAL_HINT = "wrap the call in `with tether.local():` to run it on your own machine"
CHECKED_TENSOR_BYTES = 16 << 20  # bytes of a program's tensors the front door builds (the rest: meta)
_MUTABLE = (list, dict, Attributes)  # outside values whose in-place changes go back to the client


class ClientOnly:
    """Stands for an object that exists only on the client: a `@tether.trace` function, or a value a local()
    block produced that the server refuses to load. Calling it explains; it is never sent back."""

    def __init__(self, name: str, why: str = ""):
        self.name = name
        self.why = why or "it is a client-only function (decorated with @tether.trace)"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidProgram(f"`{self.name}` cannot be used on the server: {self.why}; {_LOCAL_HINT}.")

    def __repr__(self) -> str:
        return f"<client-only {self.name}>"


@dataclass(frozen=True)
class LocalSite:
    """A `local()` block as the server knows it: where its body starts, its id and what it reads."""

    block_id: str
    filename: str  # the user's file name
    first_line: int  # first body line, in the user's file
    reads: tuple[str, ...]  # names the body loads (sent when they hold data on the server)
    assigns: tuple[str, ...] = ()  # names the body binds: the client sends back those the remote code reads


class CheckedTensors:
    """The tensors of one program as the front door checks it: each message checked, and built only within a
    budget (what batching reads: token ids, small inputs); past it, a meta tensor of its shape and dtype
    stands in. A request must not make the door allocate: an lz4 block decompresses ~250x."""

    def __init__(self, budget: int = CHECKED_TENSOR_BYTES):
        self.left = budget

    def __call__(self, msg: values_pb2.Tensor) -> torch.Tensor:
        dtype, nbytes = tensor_size(msg)
        if nbytes > self.left:
            return torch.empty(tuple(msg.shape), dtype=dtype, device="meta")
        self.left -= nbytes
        return decode_tensor(msg)


class ValueCodec:
    """Values of one job: decoded with the policy's unpickler and resolvers, encoded with model references.
    `checking`: only check them, building no more than a request's own size (the front door: CheckedTensors,
    Policy.check_loads); the worker that runs the job decodes them within its memory limit."""

    def __init__(self, policy: Policy, hosted: HostedModel, *, checking: bool = False):
        self.policy, self.hosted = policy, hosted
        self._unpickler = policy.check_loads if checking else policy.loads
        self._tensor = CheckedTensors() if checking else decode_tensor
        self.root: Any = None  # the job's own root Envoy on the replica that runs it; set by DecodedProgram.bind
        self.aliases: dict[str, str] = {}  # the client's `rename=` aliases (alias path -> path), bound by bind

    def decode(self, value: values_pb2.Value, what: str) -> Any:
        """The object for a received Value; InvalidProgram naming `what` when it is refused."""
        try:
            return from_value(
                value,
                unpickler=self._unpickler,
                resolve_reference=self._reference,
                resolve_model=self._model,
                tensor=self._tensor,
            )
        except InvalidProgram:
            raise
        except Exception as error:  # UnsafePickleError, PolicyViolation, malformed tensors...
            raise InvalidProgram(f"{what} was refused: {error}") from None

    def decode_map(self, values: Mapping[str, values_pb2.Value], what: str) -> dict[str, Any]:
        return {name: self.decode(v, f"{what} `{name}`") for name, v in values.items()}

    def decode_answer(self, data: bytearray) -> dict[str, Any]:
        """The names a local() block assigned, from their serialized ValueMap. One the server refuses to load
        (a pickle outside its allow-list, a module it does not run) becomes a ClientOnly stand-in."""
        try:
            return decode_value_map(data, unpickler=self.policy.loads, resolve_reference=self._reference,
                                    resolve_model=self._model)
        except Exception:  # some value is refused: decode one by one, keeping what can be kept
            pass
        out = {}
        for name, value in values_pb2.ValueMap.FromString(bytes(data)).values.items():
            try:
                out[name] = self.decode(value, f"the local() block's value of `{name}`")
            except InvalidProgram as error:
                out[name] = ClientOnly(name, str(error))
        return out

    def encode(self, obj: Any) -> values_pb2.Value:
        """The Value for an object going back to the client (submodules become ModelReferences)."""
        return to_value(obj, default=self.model_reference)

    def _reference(self, ref: values_pb2.Reference) -> Any:
        if ref.module == CLIENT_MODULE:
            return ClientOnly(ref.qualname)
        return self.policy.resolve_reference(ref)

    def _model(self, ref: values_pb2.ModelReference) -> Any:
        if ref.name != self.hosted.name:
            raise InvalidProgram(
                f"the program runs on model {self.hosted.name!r} but refers to model {ref.name!r}; a job "
                "can use only the model it runs on."
            )
        module, where = self.hosted.module, "the model"
        for part in filter(None, ref.path.split(".")):
            if part not in module._modules:
                raise InvalidProgram(
                    f"model {ref.name!r} has no submodule {ref.path!r} (no {part!r} in {where}); paths are "
                    "as in named_modules(), e.g. 'transformer.h.0'."
                )
            module, where = module._modules[part], part
        if ref.aliases:
            self.aliases.update((a.alias_path, a.path) for a in ref.aliases)
            try:
                resolve_aliases(self.hosted.module, None, self.aliases)
            except TetherError as error:
                raise InvalidProgram(f"the model's `rename=` aliases were refused: {error}") from None
        return _ModelPath(ref.path) if self.root is None else self._envoy(ref.path)

    def _envoy(self, path: str) -> Any:
        envoy = self.root
        for part in filter(None, path.split(".")):
            envoy = getattr(envoy, part)  # Envoy.__getattr__ gives the child Envoy ("0" included)
        return envoy

    def resolve(self, obj: Any) -> Any:
        """`obj` with the model references decoded before the job had a replica replaced by its Envoys."""
        if isinstance(obj, _ModelPath):
            return self._envoy(obj.path)
        if type(obj) in (list, tuple):
            return type(obj)(self.resolve(v) for v in obj)
        if type(obj) is dict:
            return {self.resolve(k): self.resolve(v) for k, v in obj.items()}
        return obj

    def model_reference(self, obj: Any) -> values_pb2.Value | None:
        """A `default` for tether.values: Envoys (the model, its submodules) go as ModelReferences."""
        if isinstance(obj, Envoy):
            path = path_of(obj).partition(".")[2]  # Envoy paths start with "model" for the root
            return values_pb2.Value(model_reference=values_pb2.ModelReference(name=self.hosted.name, path=path))
        return None


@dataclass(frozen=True)
class _ModelPath:
    """A ModelReference decoded before the job has a replica (its Envoys are made by `bind`)."""

    path: str


@dataclass
class _Function:
    name: str  # the name the body calls it by
    defined: str  # the name its `def`/`class` binds
    filename: str  # the registered file name it is compiled under (see sources.py)
    text: str  # its source, cut and padded to its file's line numbers
    namespace: dict  # its globals: its decoded bindings


@dataclass
class _Edit:
    program: Program  # the edit's body (kind "trace"), compiled under `filename`
    filename: str  # the registered file name it is compiled under (see sources.py)
    namespace: dict  # its decoded bindings


@dataclass
class DecodedProgram:
    """Everything a worker needs to run one job; built (and checked) before the job is queued."""

    program: Program  # body with local() bodies cut out; run with filename=body_filename
    body_filename: str
    bindings: dict[str, Any]
    codec: ValueCodec
    user_files: dict[str, str]  # registered file name (see sources.py) -> the user's file name
    local_sites: dict[tuple[str, int], LocalSite]  # (registered file name, first body line) -> site
    functions: list[_Function] = field(default_factory=list)
    edits: list[_Edit] = field(default_factory=list)  # the model's persistent edits, in order
    bound_args: dict[str, int] = field(default_factory=dict)  # free names that are positional inputs (by index)
    outside: dict[str, bytes] = field(default_factory=dict)  # mutable bindings (lists, dicts, plain objects)
    # -> their received Value, deterministic bytes: a job sends back those its body changed
    remote_loads: set[str] = field(default_factory=set)  # names the code the server runs reads (every source)

    @property
    def has_local_blocks(self) -> bool:
        return bool(self.local_sites)

    def needs_no_answer(self, site: LocalSite) -> bool:
        """Whether the code the server runs reads none of the names `site`'s block binds: the client then sends
        back no values (it sends those the remote code reads, a subset of these), and the job need not wait
        for the answer to go on (its failure still ends the job)."""
        return not self.remote_loads.intersection(site.assigns)

    def with_outside_changes(self, values: dict[str, Any], log: Callable[..., None]) -> dict[str, Any]:
        """`values` (what `execute` returned) plus the outside lists, dicts and plain objects the body changed
        in place, so the client applies the same changes to its own objects as a local run makes."""
        changed = {}
        for name, sent in self.outside.items():
            obj = self.bindings.get(name)
            if name in values or type(obj) not in _MUTABLE:
                continue
            try:
                now = self.codec.encode(obj).SerializeToString(deterministic=True)
            except Exception as error:  # something appended that has no wire form
                log(f"tether: the changes to `{name}` stay on the server: {error}")
                continue
            if now != sent:
                changed[name] = obj
        return {**changed, **values} if changed else values

    def bind(self, replica: Any) -> Any:
        """Give the job its own root on `replica` (the NNsight its worker runs): model references become its
        Envoys, and its edits stay its own. Returns that root."""
        codec = self.codec
        codec.root = job_copy(replica, codec.aliases)  # this job's own root: the hosted model keeps its names
        self.program.args = codec.resolve(self.program.args)
        self.program.kwargs = codec.resolve(self.program.kwargs)
        self.bindings.update({k: codec.resolve(v) for k, v in self.bindings.items()})
        self.bindings.update({k: self.program.args[i] for k, i in self.bound_args.items()})  # the same objects
        for fn in self.functions:
            fn.namespace.update({k: codec.resolve(v) for k, v in fn.namespace.items()})
        for edit in self.edits:  # on this job's root only: the hosted model never changes
            edit.namespace.update({k: codec.resolve(v) for k, v in edit.namespace.items()})
            edit.namespace[OPS_NAME] = ops
            persistent_edits(codec.root).append((block_of(edit.program, edit.filename), edit.namespace))
        return codec.root

    def define_functions(self, log: Callable[..., None]) -> None:
        """Run the shipped `def`s (in the worker: decorators are user code) and bind them for the body."""
        defined = {}
        for fn in self.functions:
            fn.namespace.setdefault("print", log)
            exec(sources.compiled(fn.text, fn.filename), fn.namespace)
            defined[fn.name] = fn.namespace[fn.defined]
        for fn in self.functions:  # shipped functions may call each other
            for name, obj in defined.items():
                fn.namespace.setdefault(name, obj)
        self.bindings.update(defined)

    def release(self) -> None:
        """Let go of the job's source text (registered for tracebacks and local() lookups) and values."""
        names, self.user_files = list(self.user_files), {}
        for name in names:  # idempotent: a second call finds nothing to release
            sources.release(name)
        self.bindings.clear()
        self.outside.clear()
        for edit in self.edits:
            edit.namespace.clear()
        for fn in self.functions:
            fn.namespace.clear()


def decode_program(program: program_pb2.Program, hosted: HostedModel, policy: Policy, *,
                   checking: bool = False) -> DecodedProgram:
    """Check `program` against `policy` and decode its values; InvalidProgram says what and where.
    `checking`: for the front door, which runs nothing: its values are checked, not all built (ValueCodec)."""
    kind = _KINDS.get(program.kind)
    if kind is None:
        raise InvalidProgram(f"the program's kind is {program.kind} (unset or unknown): set trace, generate, "
                             "session or scan.")
    first_line = program.first_line or 1
    filename = program.filename or "<program>"
    codec = ValueCodec(policy, hosted, checking=checking)
    ids = {b.first_line: b.block_id for b in program.local_blocks if b.block_id}

    body, sites = _cut_local_blocks(program.source, filename, first_line, ids)
    used, loads = _check(policy, body, filename, first_line, program.bindings)
    body_file = sources.hold(filename, "\n" * (first_line - 1) + body)  # the text runtime.program registers
    decoded = DecodedProgram(
        program=Program(
            kind=kind,
            source=body,
            filename=filename,
            first_line=first_line,
            args=tuple(codec.decode(v, f"argument {i + 1}") for i, v in enumerate(program.args)),
            kwargs={k: codec.decode(v, f"keyword argument `{k}`") for k, v in program.kwargs.items()},
            tracer_name=program.tracer_name,
            enclosing_function=program.enclosing_function,
        ),
        body_filename=body_file,
        bindings={},
        codec=codec,
        user_files={body_file: filename},
        local_sites={(body_file, line): site for line, site in sites.items()},
        remote_loads=set(loads),
    )
    try:
        decoded.bindings.update(
            codec.decode_map({k: v for k, v in program.bindings.items() if k in used}, "the value of"))
        decoded.bound_args.update({k: i for k, i in program.bound_args.items()
                                   if k in used and 0 <= i < len(decoded.program.args)})
        decoded.bindings.update({k: decoded.program.args[i] for k, i in decoded.bound_args.items()})
        decoded.outside.update({k: program.bindings[k].SerializeToString(deterministic=True)
                                for k, v in decoded.bindings.items() if type(v) in _MUTABLE and k in program.bindings})
        for fn in program.functions:
            decoded.functions.append(_function(fn, policy, codec, decoded))
        for edit in program.edits:
            decoded.edits.append(_edit(edit, policy, codec, decoded))
    except BaseException:
        decoded.release()
        raise
    return decoded


def _function(fn: program_pb2.FunctionSource, policy: Policy, codec: ValueCodec,
              decoded: DecodedProgram) -> _Function:
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
    decoded.remote_loads.update(loads)
    text = "\n" * (first_line - 1) + source
    name = sources.hold(filename, text)
    decoded.user_files[name] = filename
    decoded.local_sites.update({(name, line): site for line, site in sites.items()})
    namespace = codec.decode_map({k: v for k, v in fn.bindings.items() if k in used}, f"in `{fn.name}`, the value of")
    return _Function(fn.name or defined, defined, name, text, namespace)


def _edit(edit: program_pb2.Edit, policy: Policy, codec: ValueCodec, decoded: DecodedProgram) -> _Edit:
    filename = edit.filename or "<edit>"
    first_line = edit.first_line or 1
    source, sites = _cut_local_blocks(edit.source, filename, first_line, {})
    if sites:
        raise InvalidProgram(f"{filename}, line {first_line}: a model edit with a `local()` block cannot run "
                             "remotely; move that code out of the edit.")
    used, loads = _check(policy, source, filename, first_line, edit.bindings)
    decoded.remote_loads.update(loads)
    name = sources.hold(filename, "\n" * (first_line - 1) + source)
    decoded.user_files[name] = filename
    namespace = codec.decode_map({k: v for k, v in edit.bindings.items() if k in used}, "in a model edit, the value of")
    return _Edit(Program(kind="trace", source=source, filename=filename, first_line=first_line), name, namespace)


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
                f"so the server cannot run it; {_LOCAL_HINT}."
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
