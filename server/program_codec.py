"""Received Program -> what a worker runs: checked source, decoded values, shipped functions, local() blocks.

Its texts are cut and checked by program_texts (the bodies of `local()` blocks never reach the server's code);
this module decodes its values and builds the job's objects. Imports torch, tether.runtime/values/v1, policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tether.protocol import CLIENT_MODULE, PROGRAM_KIND_NAMES
from tether.runtime import ops
from tether.runtime.capture import OPS_NAME
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
from .guards import GuardedModule, guarded_module
from .policy import Policy
from .program_texts import LOCAL_HINT, LocalSite, body_source, edit_source, function_source
from .registry import HostedModel

__all__ = ["ClientOnly", "DecodedProgram", "LocalSite", "ValueCodec", "decode_program"]

_KINDS = PROGRAM_KIND_NAMES
CHECKED_TENSOR_BYTES = 16 << 20  # bytes of a program's tensors the front door builds (the rest: meta)
_MUTABLE = (list, dict, Attributes)  # outside values whose in-place changes go back to the client


class ClientOnly:
    """Stands for an object that exists only on the client: a `@tether.trace` function, or a value a local()
    block produced that the server refuses to load. Calling it explains; it is never sent back."""

    def __init__(self, name: str, why: str = ""):
        self.name = name
        self.why = why or "it is a client-only function (decorated with @tether.trace)"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidProgram(f"`{self.name}` cannot be used on the server: {self.why}; {LOCAL_HINT}.")

    def __repr__(self) -> str:
        return f"<client-only {self.name}>"


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
        """A `default` for tether.values: Envoys (the model, its submodules) go as ModelReferences, a module the
        program reached (guarded: Policy.guarded) as a Reference to that module."""
        if isinstance(obj, Envoy):
            path = path_of(obj).partition(".")[2]  # Envoy paths start with "model" for the root
            return values_pb2.Value(model_reference=values_pb2.ModelReference(name=self.hosted.name, path=path))
        if isinstance(obj, GuardedModule):
            return values_pb2.Value(reference=values_pb2.Reference(module=guarded_module(obj).__name__))
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
        guarded = codec.policy.program_builtins()  # (its imports give guarded modules, as its bindings do)
        for namespace in (self.bindings, *(fn.namespace for fn in self.functions),
                          *(edit.namespace for edit in self.edits)):
            namespace["__builtins__"] = guarded
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
    filename, first_line, body, sites, used, loads = body_source(program, policy)
    codec = ValueCodec(policy, hosted, checking=checking)
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
    filename, first_line, source, sites, defined, used, loads = function_source(fn, policy)
    decoded.remote_loads.update(loads)
    text = "\n" * (first_line - 1) + source
    name = sources.hold(filename, text)
    decoded.user_files[name] = filename
    decoded.local_sites.update({(name, line): site for line, site in sites.items()})
    namespace = codec.decode_map({k: v for k, v in fn.bindings.items() if k in used}, f"in `{fn.name}`, the value of")
    return _Function(fn.name or defined, defined, name, text, namespace)


def _edit(edit: program_pb2.Edit, policy: Policy, codec: ValueCodec, decoded: DecodedProgram) -> _Edit:
    filename, first_line, source, used, loads = edit_source(edit, policy)
    decoded.remote_loads.update(loads)
    name = sources.hold(filename, "\n" * (first_line - 1) + source)
    decoded.user_files[name] = filename
    namespace = codec.decode_map({k: v for k, v in edit.bindings.items() if k in used}, "in a model edit, the value of")
    return _Edit(Program(kind="trace", source=source, filename=filename, first_line=first_line), name, namespace)
