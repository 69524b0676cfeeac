"""One invoke's side of the interleaving: its body, run in a greenlet (a `Mediator`), and the `Request`s it
hands the model side. Body greenlets are pooled per thread (starting one costs ~10x a switch). Imports torch
and greenlet only; the model side (hooks, the driver) is interleaver.py.
"""

from __future__ import annotations

import builtins
import sys
import threading
from types import FunctionType
from typing import Any

import torch
from greenlet import GreenletExit, getcurrent
from greenlet import greenlet as Greenlet

from .errors import TetherError

__all__ = ["DONE", "ENDED", "Failed", "Mediator", "Request", "body_greenlet", "current_mediator", "release_body"]


# Which hook serves a request of each kind: the forward hook, the pre-hook, the skip gate (skipping.py), or
# none (`stop`, `barrier`: the driver acts on them at once).
_GROUPS = {"output": "fwd", "input": "pre", "inputs": "pre", "skip": "skip", "control": "control"}


class Request:
    """What a body asks the model side for: a module's value at one iteration, to read or replace."""

    __slots__ = ("module", "kind", "iteration", "op", "value", "path", "group", "hook_key", "seen_key")

    def __init__(self, module: Any, kind: str, iteration: int, op: str, value: Any = None, path: str = ""):
        self.module = module  # a torch module, or a pseudo-module such as the generator
        self.kind = kind  # "output" | "input" | "inputs" | "skip" | "control"
        self.iteration = iteration
        self.op = op  # "get" | "set" | "stop" (after the module running now) | "stop_at" (after this one) | "barrier"
        self.value = value
        self.path = path  # e.g. "model.layer1", for messages
        self.group = _GROUPS[kind]  # which hook serves it
        # the keys the model side files it under, made once (a read's request is kept for the next trace)
        self.hook_key = (id(module), self.group)  # which hook serves it, as in Interleaver._handles
        self.seen_key = (id(module), kind, iteration)  # its value in Mediator.seen

    @property
    def label(self) -> str:
        return f"`{self.path}.{self.kind}`" if self.path else f"`{self.kind}`"


DONE = object()
ENDED = object()  # what a body greenlet hands its driver when the body returned or raised


class Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class _BodyGreenlet(Greenlet):
    """Runs bodies one after another: a finished body leaves it idle in its thread's pool for the next.

    Starting a fresh greenlet and letting it die costs ~10x a switch, and every trace starts one body per
    invoke; a body that is killed (GreenletExit) ends its greenlet instead of returning it.
    """

    mediator: Mediator | None = None

    def __init__(self) -> None:
        super().__init__(run=_run_bodies)


def _run_bodies(task: tuple[Mediator, Any]) -> None:
    while True:
        _run_task(task)
        task = None  # an idle greenlet holds nothing of the body it ran
        task = getcurrent().parent.switch(ENDED)


def _run_task(task: tuple[Mediator, Any]) -> None:
    mediator, code = task
    mediator.outcome = mediator._run(code)


_idle = threading.local()  # .greenlets: this thread's finished body greenlets, ready for another body
_MAX_IDLE = 8


def body_greenlet(driver: Greenlet) -> _BodyGreenlet:
    idle = getattr(_idle, "greenlets", None)
    body = idle.pop() if idle else _BodyGreenlet()
    body.parent = driver
    return body


def release_body(body: _BodyGreenlet) -> None:
    body.mediator = None
    idle = getattr(_idle, "greenlets", None)
    if idle is None:
        idle = _idle.greenlets = []
    if len(idle) < _MAX_IDLE:
        idle.append(body)


def current_mediator() -> Mediator | None:
    """The mediator whose body is running right now, if any."""
    body = getcurrent()
    return body.mediator if type(body) is _BodyGreenlet else None


class Mediator:
    """One invoke: its compiled body, its namespace, its rows of the batch and its iteration cursor."""

    __slots__ = ("block", "code", "ns", "rows", "iteration", "offsets", "limit", "all_tail", "after_loop", "views",
                 "pending", "seen", "started", "outcome", "greenlet", "waits_for")

    def __init__(self, block, code, ns: dict, rows: slice | None):
        self.block = block
        self.code = code
        self.ns = ns
        self.rows = rows
        self.iteration = 0  # which call of each module the body's next access refers to
        self.offsets: dict[int, int] | None = None  # id(module) -> calls its own `.next()` moved it past `iteration`
        self.limit = 1  # how many steps the run may take (set by the Interleaver)
        self.all_tail = None  # compiled statements to re-run at every later iteration (`.all()`)
        self.after_loop = None  # compiled statements after an open `tracer.iter[:]` loop
        self.views: dict[int, tuple[Any, Any, slice]] = {}  # id(row view) -> (view, full tensor, rows)
        self.pending: Request | None = None
        self.seen: dict[tuple[int, str, int], Any] = {}  # values already handed to this body, re-readable
        self.started = False
        self.outcome: object = None  # DONE or Failed, set when the body ends
        self.greenlet: _BodyGreenlet | None = None  # while the body runs or waits; None once it ended
        self.waits_for: dict[str, Any] = {}  # name -> its value before the run: start once an earlier invoke rebinds it

    def at(self, step: int) -> None:
        """Point every module at call `step` (a step loop, `.all()`): per-module `.next()` moves are dropped."""
        self.iteration = step
        self.offsets = None

    def iteration_of(self, module: Any) -> int:
        """Which call of `module` the body's next access refers to."""
        offsets = self.offsets
        return self.iteration if offsets is None else self.iteration + offsets.get(id(module), 0)

    def advance(self, module: torch.nn.Module, step: int) -> None:
        """`module.next()`: move `module` and the modules inside it (their calls are part of its call) on."""
        offsets = self.offsets if self.offsets is not None else {}
        for inner in module.modules():
            offsets[id(inner)] = offsets.get(id(inner), 0) + step
        self.offsets = offsets

    def ready(self) -> bool:
        """Whether every name this body takes from an earlier invoke has been set by it."""
        return all(name in self.ns and self.ns[name] is not before for name, before in self.waits_for.items())

    def request(self, req: Request) -> Any:
        """Called from the body (the mediator `current_mediator()` gave): hand `req` over, wait for the answer."""
        return self.greenlet.parent.switch(req)

    def stop(self) -> None:
        """Stop the model right after the module that is running now."""
        self.request(Request(None, "control", self.iteration, "stop"))

    def enable_all(self) -> None:
        """Re-run the rest of the body at every later iteration (`.all()`)."""
        self.all_tail = self._rest_after(sys._getframe(1), "`.all()`")

    def open_loop_from(self, frame) -> None:
        """An open-ended step loop (`tracer.iter[:]`) started here: if generation ends first, go on after it."""
        self.after_loop = self._rest_after(frame, "`tracer.iter[...]`")

    def _rest_after(self, frame, what: str):
        while frame is not None and frame.f_code is not self.code:
            frame = frame.f_back
        if frame is None:
            raise TetherError(f"{what} must be used directly in the trace body, not from a helper function.")
        return self.block.code(start=self.block.top_level_index(frame.f_lineno) + 1)

    def _run(self, code) -> object:
        try:
            # as `exec(code, self.ns)`, but called as a function: Python runs it in the caller's C frame, so
            # the body's greenlet has less C stack to copy at each switch. exec() would add __builtins__ to a
            # namespace without them (a copy made for a scan, a server's job namespace); a function does not
            if "__builtins__" not in self.ns:
                self.ns["__builtins__"] = builtins
            FunctionType(code, self.ns)()
        except GreenletExit:
            raise
        except BaseException as error:  # the body's own exception goes back to the user
            return Failed(error)
        return DONE
