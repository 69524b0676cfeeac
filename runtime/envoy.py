"""Envoy: a module's stand-in inside tether, giving `.output`, `.input`, `.inputs`, `.next()`, `.all()`.

Reading `.output` inside a trace body asks the running interleaver for that module's value; outside a
trace the same attributes raise a clear error. Everything else falls through to the torch module.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any, overload

import torch
from greenlet import getcurrent

from . import rename
from .batch_index import warn_if_batch_index
from .errors import NotInTraceError, TetherError
from .mediator import Mediator, Request, current_mediator
from .steps import AllSteps, all_steps

__all__ = ["Envoy", "EnvoySequence", "module_of", "path_of", "root_of", "body_without_input", "noting_sets"]

_body = threading.local()  # .without_input: a trace body with no input runs now, to collect its invokes


class noting_sets:
    """Around a model run: an exception the model raises gets a note naming the body's `.output = ...`
    lines, since a wrongly shaped value fails deep inside the model, far from the line that set it.
    (A class, not a generator context manager: every trace enters one, and this costs two calls, not five.)"""

    __slots__ = ("_before",)

    def __enter__(self) -> None:
        self._before = getattr(_body, "sets", None)
        _body.sets = []

    def __exit__(self, exc_type, error, tb) -> None:
        sets, _body.sets = _body.sets, self._before
        if (sets and isinstance(error, Exception) and not isinstance(error, TetherError)
                and hasattr(error, "add_note")):  # 3.11+
            lines = "; ".join(f"`{path} = ...` ({shape}) at {file}, line {line}"
                              for path, file, line, shape in sets[-3:])
            error.add_note(f"tether: the model failed after the trace set {lines}. If the value's shape or type "
                           "differs from what the module returns, the model fails later like this: check it.")


@contextlib.contextmanager
def body_without_input() -> Iterator[None]:
    """While a trace body with no input runs (only its `tracer.invoke` blocks see the model), module
    values read outside those blocks get an error that says so."""
    before = getattr(_body, "without_input", False)
    _body.without_input = True
    try:
        yield
    finally:
        _body.without_input = before


_OWN_SLOTS = frozenset({"_module", "_path", "_root", "_children"})


class Envoy:
    """Wraps one torch module; children are reached by attribute, ModuleLists by index or slice."""

    def __init__(self, module: Any, path: str, root: Any = None):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root", root if root is not None else self)
        object.__setattr__(self, "_children", {})

    # ---- tree ----------------------------------------------------------------------------------
    def _child(self, key: str, module: Any) -> Envoy:
        children = self._children
        if key not in children or children[key]._module is not module:
            kind = EnvoySequence if isinstance(module, _INDEXED) else Envoy
            children[key] = kind(module, f"{self._path}.{key}", self._root)
        return children[key]

    def __getattr__(self, name: str) -> Any:
        if name in _OWN_SLOTS:  # an Envoy made without __init__ (copy, pickle, an inspector): no module yet
            raise AttributeError(name)
        module = self._module
        submodules = module.__dict__.get("_modules", {})
        if name in submodules:
            return self._child(name, submodules[name])
        if self._root.__dict__.get("_aliases"):  # `rename=` aliases (rename.py)
            aliased = rename.lookup(self, name)
            if aliased is not None:
                return aliased
        return getattr(module, name)

    @overload
    def __getitem__(self, index: int) -> Envoy: ...

    @overload
    def __getitem__(self, index: slice) -> list[Envoy]: ...

    def __getitem__(self, index: int | slice) -> Envoy | list[Envoy]:
        module = self._module
        if isinstance(index, slice):
            return [self[k] for k in range(len(module))[index]]
        position = index if index >= 0 else len(module) + index
        key = str(position)
        child = module._modules.get(key) if isinstance(module, torch.nn.ModuleList) else module[position]
        if child is None:
            raise IndexError(f"index {index} is out of range for {self._path} ({len(module)} modules)")
        return self._child(key, child)

    def __iter__(self):
        module = self._module
        if not isinstance(module, torch.nn.ModuleList):
            return iter([self[i] for i in range(len(module))])
        members = tuple(module._modules.values())  # a trace body loops over blocks: their Envoys are kept
        cached = self.__dict__.get("_members")
        if cached is None or cached[0] != members:
            cached = (members, [self._child(key, child) for key, child in module._modules.items()])
            object.__setattr__(self, "_members", cached)
        return iter(cached[1])

    def __len__(self) -> int:
        return len(self._module)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            self._set(name, value)
        else:
            setattr(self._module, name, value)

    def __repr__(self) -> str:
        if self._root.__dict__.get("_aliases"):
            return rename.render(self)
        return repr(self._module)

    def __dir__(self) -> list[str]:
        """Children, tether's attributes and the module's own: what tab completion offers."""
        module = self.__dict__.get("_module")
        return sorted(set(super().__dir__()) | (set(dir(module)) if module is not None else set()))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)

    def modules(self) -> list[Envoy]:
        """This Envoy and every one below it, depth first (as `torch.nn.Module.modules`)."""
        return [self] + [e for child in self._direct_children() for e in child.modules()]

    def _direct_children(self) -> list[Envoy]:
        return [self._child(name, m) for name, m in self._module.named_children()]

    # ---- values --------------------------------------------------------------------------------
    def _mediator(self, what: str) -> Mediator:
        mediator = current_mediator()
        if mediator is None and getattr(_body, "without_input", False):
            raise NotInTraceError(
                f"`{self._path}.{what}` was used in a trace that has no input, so the model does not run "
                f"there: give the input to the trace (`with model.trace(x):`) or use `{self._path}.{what}` "
                "inside `with tracer.invoke(x):` blocks."
            )
        if mediator is None:
            raise NotInTraceError(
                f"`{self._path}.{what}` is only available inside a tracing context "
                f"(`with model.trace(...):`). Save it there with `.save()` to use it afterwards."
            )
        return mediator

    def _request(self, kind: str, op: str, value: Any = None) -> Any:
        mediator = current_mediator()
        if mediator is None:
            self._mediator(kind)  # raises NotInTraceError
        module, offsets = self._module, mediator.offsets
        iteration = mediator.iteration if offsets is None else mediator.iteration + offsets.get(id(module), 0)
        return mediator.greenlet.parent.switch(  # Mediator.request, inlined: every module value read runs it
            Request(module, kind, iteration, op, value, self._path))

    def _set(self, kind: str, value: Any) -> None:
        caller = sys._getframe(2)  # the body line `module.output = value` (via __setattr__)
        sets = getattr(_body, "sets", None)
        if sets is not None:
            shape = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            sets.append((f"{self._path}.{kind}", caller.f_code.co_filename, caller.f_lineno, shape))
        self._request(kind, "set", value)

    @property
    def output(self) -> Any:
        """This module's output at the body's current iteration (a view of the invoke's rows).

        `_request("output", "get")` inlined, as the read every save makes: the body's mediator without a call
        (`current_mediator`'s body greenlets carry it; other greenlets have none), and the request, which a
        read never changes, kept on the Envoy for the next trace."""
        mediator = getattr(getcurrent(), "mediator", None)
        if mediator is None:
            self._mediator("output")  # raises NotInTraceError
        module, offsets = self._module, mediator.offsets
        iteration = mediator.iteration if offsets is None else mediator.iteration + offsets.get(id(module), 0)
        req = self.__dict__.get("_output_request")
        if req is None or req.iteration != iteration or req.module is not module:
            req = Request(module, "output", iteration, "get", None, self._path)
            object.__setattr__(self, "_output_request", req)
        value = mediator.greenlet.parent.switch(req)
        warn_if_batch_index(value, self._path, sys._getframe(1))
        return value

    @property
    def input(self) -> Any:
        """The first argument this module is called with (the first keyword argument if none)."""
        return self._request("input", "get")

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """`(args, kwargs)` this module is called with."""
        return self._request("inputs", "get")

    def _stop_at(self, kind: str) -> None:
        """`module.output.stop()`: stop the model once this module's value exists (see Interleaver)."""
        self._request(kind, "stop_at")

    def skip(self, replacement: Any) -> None:
        """Do not run this module at its current call: `replacement` is its output (e.g. its own `.input`).

        Call it before the module runs (reading the module's own input first is fine). In a batch of invokes,
        every invoke must skip it, as the module runs once for all rows.
        """
        self._request("skip", "set", replacement)

    def next(self, step: int = 1) -> Envoy:
        """Refer to this module's next call (the next generation step) from here on.

        Each module keeps its own call index, as nnsight's walkthrough defines it: `.next()` moves this module
        and the modules inside it, not the others (`tracer.next()`, or the root's `.next()`, moves them all).
        """
        mediator = self._mediator("next()")
        if self is self._root:
            mediator.iteration += step
        else:
            mediator.advance(self._module, step)
        return self

    def all(self) -> AllSteps:
        """Apply the rest of the body at every iteration (every generated token), as `tracer.all()` does."""
        self._mediator("all()")
        return all_steps()

    @property
    def source(self) -> Any:
        """The operations of this module's `forward`, by name: `print(m.source)`, `m.source.<op>.output`."""
        from .source import SourceView

        return SourceView.of(self)


_INDEXED = (torch.nn.ModuleList, torch.nn.Sequential)

# The Envoy of a ModuleList or Sequential (`llm.model.layers`). It is made with `type()`, not a class
# statement, on purpose: jedi (the completer IPython and Jupyter use by default) infers `layers[0]` from a
# class's source code when it can find it, which only says "an Envoy"; for a class without a statement it
# indexes the live object, so `llm.model.layers[0].mlp.<Tab>` completes the block's real children.
EnvoySequence = type("EnvoySequence", (Envoy,), {
    "__doc__": "An Envoy of a ModuleList or Sequential: its blocks by index, so completion sees them.",
    "__module__": __name__,
})


def module_of(envoy: Envoy) -> Any:
    """The torch module an Envoy wraps (for client and server code: no attribute of it can shadow this)."""
    return envoy.__dict__["_module"]


def path_of(envoy: Envoy) -> str:
    """An Envoy's dotted path from its root, the root included (`model.transformer.h.0`)."""
    return envoy.__dict__["_path"]


def root_of(envoy: Envoy) -> Envoy:
    """The wrapped model an Envoy belongs to."""
    return envoy.__dict__["_root"]
