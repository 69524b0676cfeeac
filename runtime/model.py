"""NNsight: wrap any torch module so its internals can be read and written inside `with` blocks.

Wrapping installs nothing on the module: hooks exist only while a trace runs, so an untraced model runs
at plain speed. Subclasses (LanguageModel) override how inputs are prepared, batched and run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch

from .batching import concat_inputs, to_device
from .envoy import Envoy
from .hook_plan import HookPlan, parents_of
from .model_options import OWN, remote_defaults, unexpected
from .numerics import warm_vector_math
from .rename import declared as declared_aliases
from .rename import resolve as resolve_aliases
from .session import Edit, Session
from .tracer import Tracer

__all__ = ["NNsight", "Prepared", "hosted_name", "job_copy", "over_module", "persistent_edits"]

_REMOTE_OPTIONS = ("backend", "blocking", "api_key", "model_name", "verbose")
_MAX_PLANS = 64  # hook plans kept per model (one per distinct set of trace bodies)
_TRACE_OPTIONS = ("scan", "validate", "invoker_args", "remote", *_REMOTE_OPTIONS)


@dataclass
class Prepared:
    """One invoke's inputs, ready to batch: positional and keyword arguments and their row count."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    rows: int = 1


class _Caches:
    """What a wrapper learns about its module between traces. One object, shared with the copies that
    server jobs run on (`_edited_copy`), so every job profits from what earlier jobs learned."""

    __slots__ = ("parents", "plans", "first_parameter")

    def __init__(self) -> None:
        self.parents: tuple[tuple, dict[int, torch.nn.Module]] | None = None  # (child tuple, parents_of map)
        self.plans: dict[tuple, HookPlan] = {}  # trace bodies' code objects -> their hook plan
        self.first_parameter: tuple | None = None  # (child tuple, owner module, name, parameter): see _device


class NNsight(Envoy):
    """The root Envoy of a wrapped model: `trace`, `scan`, `session`, `edit`."""

    def __init__(self, module: torch.nn.Module | str, *, rename: dict | None = None, api_key: str | None = None,
                 backend: Any = None, host: str | None = None, **kwargs: Any):
        """Wrap `module`, or describe the model a server hosts under the name `module` (a remote handle).
        `rename=` ({path or class: alias}) adds module aliases; `host=`/`backend=` ("host:port") and
        `api_key=` set where this model's remote traces go (each trace may still pass its own); any other
        keyword is a TypeError."""
        if kwargs:
            raise unexpected(type(self).__name__, list(kwargs), ("rename", *OWN))
        warm_vector_math()  # (a fresh process's first forward must give the numbers any other gives)
        defaults = remote_defaults(type(self).__name__, api_key, backend, host)
        hosted, declared = None, None
        if isinstance(module, str):  # a model a server hosts: its module tree from the server's spec
            hosted, (module, declared) = module, _hosted_skeleton(module, defaults)
        super().__init__(module, "model")
        object.__setattr__(self, "_remote_defaults", defaults)
        object.__setattr__(self, "_edits", [])
        object.__setattr__(self, "_caches", _Caches())
        object.__setattr__(self, "_remote_name", hosted)  # the server's name for it; kept after dispatch
        self._rename(rename, declared)

    def _rename(self, rename: dict | None, declared: dict[str, str] | None = None) -> None:
        """Bind `rename=` aliases (and those a server declared for its model); see rename.py."""
        if rename or declared:
            reserved = {name for klass in type(self).__mro__ for name in vars(klass)}
            declared = {**declared_aliases(self), **(declared or {})}  # keep those bound already
            object.__setattr__(self, "_aliases", resolve_aliases(self._module, rename, declared, reserved))

    # ---- contexts ------------------------------------------------------------------------------
    @overload
    def trace(self, *inputs: Any, trace: Literal[True] = True, **kwargs: Any) -> Tracer: ...

    @overload
    def trace(self, *inputs: Any, trace: Literal[False], **kwargs: Any) -> Any: ...

    def trace(self, *inputs: Any, trace: bool = True, **kwargs: Any) -> Any:
        """`with model.trace(x):` — run the model once on `x` with the body's interventions.

        Keywords:
            remote: run the block on a tether server (`tether serve`) instead of here.
            backend: where: "host:port" (implies remote), or a `tether.client.RemoteBackend` /
                `tether.client.aio.AsyncBackend`; default the model's `host=`, else `tether.CONFIG.API.HOST`.
            blocking: False submits the job and returns at once (see `RemoteBackend.result`).
            api_key: the key sent to the server; default the model's `api_key=`, else `CONFIG.API.APIKEY`.
            model_name: the server's name for the model (default: the name it was loaded by).
            verbose: keep every job state on its own status line.
            scan: first run the block on fake tensors, to catch shape errors without running the model.
            validate: like scan.
            invoker_args: keyword arguments given to every invoke's inputs.
            trace: False just runs the model on the inputs and returns its output.
            Other keywords go to the model's inputs (and, for a LanguageModel, to the tokenizer or run).
        """
        tracer = self._tracer("trace", inputs, kwargs)
        if trace:
            return tracer
        if tracer._remote:
            from .remote import remote_output

            return remote_output(self, tracer)
        self._dispatch()
        return self._run("trace", *self._batch([self._prepare(inputs, tracer._kwargs)])[:2], tracer._run_kwargs)

    def scan(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """`with model.scan(x):` — shapes and dtypes of module values, computed on fake tensors.

        Takes the keywords of `trace` (remote, backend, blocking, api_key...).
        """
        return self._tracer("scan", inputs, kwargs)

    def session(self, *, remote: bool = False, **options: Any) -> Session:
        """`with model.session():` — several traces in order, sharing values (one job when remote).

        Keywords:
            remote: run the whole session as one job on a tether server.
            options: the remote keywords of `trace` (backend, blocking, api_key, model_name, verbose).
        """
        return Session(self, remote=remote or "backend" in options,
                       remote_options={**self._remote_defaults, **options})

    def edit(self, *, inplace: bool = False) -> Edit:
        """`with model.edit() as edited:` — interventions that persist in every later trace.

        Keywords:
            inplace: True edits this model itself; False (default) returns an edited copy.
        """
        return Edit(self, inplace=inplace)

    def clear_edits(self) -> None:
        """Remove every persistent edit from this model."""
        self._edits.clear()

    def _tracer(self, mode: str, inputs: tuple, kwargs: dict) -> Tracer:
        options = {k: kwargs.pop(k) for k in _TRACE_OPTIONS if k in kwargs}
        remote_options = {k: options.pop(k) for k in _REMOTE_OPTIONS if k in options}
        input_kwargs, run_kwargs = self._split_kwargs(mode, kwargs)
        return Tracer(self, inputs, input_kwargs, mode=mode, scan=options.get("scan", False),
                      validate=options.get("validate", False), invoker_args=options.get("invoker_args"),
                      remote=options.get("remote", False) or "backend" in remote_options,
                      remote_options={**self._remote_defaults, **remote_options}, run_kwargs=run_kwargs)

    def _with_module(self, module: torch.nn.Module) -> NNsight:
        """This wrapper over another copy of its module (a server replica): its own caches, which name modules."""
        copy = self._edited_copy()
        object.__setattr__(copy, "_module", module)
        object.__setattr__(copy, "_caches", _Caches())
        return copy

    def _edited_copy(self) -> NNsight:
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        object.__setattr__(copy, "_children", {})
        object.__setattr__(copy, "_edits", list(self._edits))
        object.__setattr__(copy, "_root", copy)
        return copy

    # ---- what subclasses override --------------------------------------------------------------
    def _split_kwargs(self, mode: str, kwargs: dict) -> tuple[dict, dict]:
        """Keyword arguments of the call: (those that belong to each invoke's inputs, those for the run)."""
        return kwargs, {}

    def _prepare(self, args: tuple, kwargs: dict) -> Prepared:
        first = args[0] if args else None
        rows = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
        return Prepared(tuple(args), dict(kwargs), rows)

    def _batch(self, prepared: list[Prepared]) -> tuple[tuple, dict, list[slice], int]:
        args, kwargs, rows = concat_inputs([(p.args, p.kwargs) for p in prepared])
        device = self._device()
        if device.type not in ("cpu", "meta"):  # inputs follow the model (a device map: its first device)
            args, kwargs = to_device(args, device), to_device(kwargs, device)
        return args, kwargs, rows, rows[-1].stop

    def _run(self, mode: str, args: tuple, kwargs: dict, run_kwargs: dict) -> Any:
        return self._module(*args, **kwargs)

    def _parents(self) -> dict[int, torch.nn.Module]:
        """id(module) -> parent module, cached on the wrapper and rebuilt if the module tree changed."""
        signature = tuple(self._module._modules.values())
        caches = self._caches
        cached = caches.parents
        if cached is None or cached[0] != signature:
            cached = caches.parents = (signature, parents_of(self._module))
        return cached[1]

    def _device(self) -> torch.device:
        """Where inputs go: the first parameter's device (meta for an undispatched skeleton, which only scans;
        cpu without parameters). The parameter is found once, not by walking the module tree each trace, and
        kept while the root's children and its place in its module stay the same; its device is read anew, so
        `model.to(...)`, which keeps the Parameter objects, is seen."""
        module = self._module
        signature = tuple(module._modules.values())
        cached = self._caches.first_parameter
        if cached is None or cached[0] != signature or cached[1]._parameters.get(cached[2]) is not cached[3]:
            found = next(((owner, name, param) for owner in module.modules()
                          for name, param in owner._parameters.items() if param is not None), None)
            if found is None:
                return torch.device("cpu")
            cached = self._caches.first_parameter = (signature, *found)
        return cached[3].device

    def _hook_plan(self, bodies: tuple) -> HookPlan:
        """The hooks these bodies (their code objects) asked for when they last ran on this model."""
        plans = self._caches.plans
        plan = plans.get(bodies)
        if plan is None:
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            plan = plans[bodies] = HookPlan()
        return plan

    def _dispatch(self) -> None:
        """Load real weights if the model is still a meta-device skeleton (LanguageModel)."""

    def _generator_key(self) -> Any:
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)


def _hosted_skeleton(name: str, remote: dict) -> tuple[torch.nn.Module, dict]:
    from .errors import TetherError
    from .remote import load_spec

    loaded = load_spec(name, host=remote.get("backend"), api_key=remote.get("api_key"))
    if isinstance(loaded, str):
        raise TetherError(f"NNsight({name!r}) describes a model a tether server hosts, but {loaded}. Wrap a torch "
                          "module, or point at a server that hosts it (`host='host:port'`, "
                          "tether.CONFIG.API.HOST or TETHER_HOST).")
    return loaded[0], loaded[2] or {}  # the module tree and the aliases the server declares


def hosted_name(model: Any) -> str | None:
    """The name a server hosts `model` under: the name it was opened by (`LanguageModel("smollm2")`), kept
    after it was loaded here; None for a model built from a local module."""
    own = getattr(model, "__dict__", {})
    return own.get("_remote_name") or own.get("_source")


def persistent_edits(model: Any) -> list | tuple:
    """The `(block, names)` of each `model.edit()` still in force, oldest first: every job of `model` runs
    them first (a remote job carries them, as its server's copy never keeps them). The model's own list (a
    server appends a job's edits to its job copy); `()` for an object that keeps none, so appending fails."""
    return getattr(model, "__dict__", {}).get("_edits", ())


def job_copy(model: NNsight, aliases: dict[str, str] | None = None) -> NNsight:
    """`model` for one job of a server: the same module, its own edits and aliases (`aliases`: those the job's
    client bound), so nothing a job adds stays on the hosted model."""
    copy = model._edited_copy()
    if aliases:
        copy._rename(None, aliases)
    return copy


def over_module(model: NNsight, module: torch.nn.Module) -> NNsight:
    """`model`'s wrapper over another copy of its module (a server replica), with its own caches."""
    return model._with_module(module)
