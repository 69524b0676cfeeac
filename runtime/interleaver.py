"""Interleave intervention bodies with a model's forward pass.

Each invoke's body runs in its own greenlet (a `Mediator`). When the body asks for a module value it
switches back to the model's greenlet, which installs a hook on that module only (PyTorch's public hook
API) and runs on; the hook hands the value over and waits until the body asks for something else.
Only one side runs at a time, so no locks are needed. Imports torch and greenlet, nothing of networks.
"""

from __future__ import annotations

import builtins
import sys
import threading
from collections.abc import Callable
from types import FunctionType
from typing import Any

import torch
from greenlet import GreenletExit, getcurrent
from greenlet import greenlet as Greenlet

from . import batching
from .errors import OutOfOrderError, RunStopped, TetherError
from .skipping import SkipGate, SkipSlot

__all__ = ["Request", "Mediator", "Interleaver", "HookPlan", "current_mediator", "current_interleaver", "EarlyStop",
           "cancel_scope"]

_limits = threading.local()


class cancel_scope:
    """While open, every run in this thread checks `cancel()` at each module boundary (server jobs)."""

    def __init__(self, cancel: Callable[[], bool] | None):
        self._cancel = cancel

    def __enter__(self) -> None:
        self._previous = getattr(_limits, "cancel", None)
        _limits.cancel = self._cancel

    def __exit__(self, *exc) -> None:
        _limits.cancel = self._previous


class EarlyStop(BaseException):
    """Unwinds the model's forward pass after `.stop()`; never reaches the user."""


class _Abort(BaseException):
    """Unwinds the forward pass after a body failed; the body's own exception is re-raised after."""


# Which hook serves a request of each kind: the forward hook, the pre-hook, the skip gate (skipping.py), or
# none (`stop`, `barrier`: the driver acts on them at once).
_GROUPS = {"output": "fwd", "input": "pre", "inputs": "pre", "skip": "skip", "control": "control"}


class Request:
    """What a body asks the model side for: a module's value at one iteration, to read or replace."""

    __slots__ = ("module", "kind", "iteration", "op", "value", "path", "group")

    def __init__(self, module: Any, kind: str, iteration: int, op: str, value: Any = None, path: str = ""):
        self.module = module  # a torch module, or a pseudo-module such as the generator
        self.kind = kind  # "output" | "input" | "inputs" | "skip" | "control"
        self.iteration = iteration
        self.op = op  # "get" | "set" | "stop" (after the module running now) | "stop_at" (after this one) | "barrier"
        self.value = value
        self.path = path  # e.g. "model.layer1", for messages
        self.group = _GROUPS[kind]  # which hook serves it

    @property
    def label(self) -> str:
        return f"`{self.path}.{self.kind}`" if self.path else f"`{self.kind}`"


_DONE = object()
_ENDED = object()  # what a body greenlet hands its driver when the body returned or raised


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


class HookPlan:
    """Which hooks the same bodies asked for the last time they ran on this model.

    The next run registers them before the forward pass, in one tight loop, instead of one at a time
    between layers (where each registration costs several times more). A planned hook whose module no
    body asks for this time does nothing, exactly as if it were absent, and is dropped from the plan.
    `closures` remembers, per requested hook, the hooks it needs with it (its ancestors', see _ensure_hook).
    """

    __slots__ = ("hooks", "closures", "single_pass")

    def __init__(self) -> None:
        self.hooks: list[tuple[torch.nn.Module, str]] = []  # (module, "fwd" | "pre"), in request order
        self.closures: dict[tuple[int, str], tuple] = {}  # hook key -> ((key, module, group), ...)
        self.single_pass = True  # whether the closures are for one forward pass (the root is not hooked)


def parents_of(root: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """id(module) -> its parent, for every module under `root`."""
    return {id(child): module for module in root.modules() for child in module._modules.values()
            if child is not None}


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
        task = getcurrent().parent.switch(_ENDED)


def _run_task(task: tuple[Mediator, Any]) -> None:
    mediator, code = task
    mediator.outcome = mediator._run(code)


_idle = threading.local()  # .greenlets: this thread's finished body greenlets, ready for another body
_MAX_IDLE = 8


def _body_greenlet(driver: Greenlet) -> _BodyGreenlet:
    idle = getattr(_idle, "greenlets", None)
    body = idle.pop() if idle else _BodyGreenlet()
    body.parent = driver
    return body


def _release(body: _BodyGreenlet) -> None:
    body.mediator = None
    idle = getattr(_idle, "greenlets", None)
    if idle is None:
        idle = _idle.greenlets = []
    if len(idle) < _MAX_IDLE:
        idle.append(body)


def current_interleaver() -> Interleaver | None:
    """The interleaver whose model runs in this thread right now, if any (`.source`, `tracer.cache`)."""
    return getattr(_limits, "running", None)


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
        self.outcome: object = None  # _DONE or _Failed, set when the body ends
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
            return _Failed(error)
        return _DONE


class Interleaver:
    """Drives mediators from hooks during one run of the model."""

    def __init__(self, root: torch.nn.Module, mediators: list[Mediator], batch_size: int, max_iterations: int = 1,
                 cancel: Callable[[], bool] | None = None, parents: dict[int, torch.nn.Module] | None = None,
                 plan: HookPlan | None = None):
        self.root = root
        self.mediators = mediators
        self.batch_size = batch_size
        self.max_iterations = max_iterations
        self.iteration = 0
        self._cancel = cancel or getattr(_limits, "cancel", None)
        self._driver = getcurrent()
        self._root_calls = 0
        self._handles: dict[tuple[int, str], Any] = {}
        self._demanded: dict[tuple[int, str], tuple[torch.nn.Module, str]] = {}  # hooks some body needs
        self._plan = plan
        self._closures: dict[tuple[int, str], tuple] = {}
        if plan is not None:
            if plan.single_pass != (max_iterations == 1):  # the same bodies, run the other way: start afresh
                plan.closures, plan.single_pass = {}, max_iterations == 1
            self._closures = plan.closures
        self._serving: tuple | None = None  # (module, group, slot, iteration) of the hook running now
        self._fired: dict[tuple[int, str], int] = {}
        self._stop = False
        self._failure: BaseException | None = None
        self._unstarted = len(mediators)  # bodies not started yet (see _start_ready)
        for mediator in mediators:
            mediator.limit = max_iterations
        # whether a body may call `.skip()`: then each module whose input is asked for gets a skip gate at once,
        # since a body that reads a module's input and then skips it does so while the module is being called
        self._may_skip = any("skip" in mediator.code.co_names for mediator in mediators)
        self._parent_map = parents  # id(module) -> parent; built on first use when not given

    @property
    def stopped(self) -> bool:
        """Whether a body stopped the model early."""
        return self._stop

    # ---- running -------------------------------------------------------------------------------
    def run(self, forward: Callable[[], Any]) -> Any:
        """Start every body, run `forward()` with hooks, and finish the bodies; returns forward's result."""
        result = None
        previous, _limits.running = getattr(_limits, "running", None), self
        if self.max_iterations > 1:  # a single pass needs no step counting
            self._handles[(id(self.root), "root")] = self.root.register_forward_pre_hook(self._root_pre_hook)
        try:
            if self._plan is not None:
                handles, hook = self._handles, self._forward_hook
                for module, group in self._plan.hooks:
                    if group == "fwd":  # (most planned hooks: _register's first case, without a call each)
                        handles[(id(module), "fwd")] = module.register_forward_hook(hook)
                    else:
                        self._register(module, group)
            self._start_ready()
            self._raise_failure()
            if not self._stop:
                try:
                    result = forward()
                    if self.max_iterations == 1 and (self._unstarted or self._waited_at(self.root)):
                        result = self._serve_value(self.root, "fwd", result)  # the root's output is forward's return
                except (EarlyStop, _Abort):
                    pass
            self._raise_failure()
            return result
        finally:
            for handle in self._handles.values():
                handle.remove()
            self._handles.clear()
            if self._plan is not None:
                self._plan.hooks = list(self._demanded.values())
            _limits.running = previous
            for undo in self.__dict__.pop("_on_exit", ()):
                undo()

    # ---- extensions (`tracer.cache`, `.source`): only traces that use them pay for them ---------------
    def on_exit(self, undo: Callable[[], None]) -> None:
        """Call `undo()` when this run ends (after its hooks are removed), e.g. to restore a module's forward."""
        self.__dict__.setdefault("_on_exit", []).append(undo)

    def observe(self, module: torch.nn.Module, group: str, observer: Callable[[Any], None]) -> None:
        """Call `observer(value)` each time `module` runs in the model's pass, after the bodies' edits there:
        group "fwd" gives its output, "pre" its `(args, kwargs)`. Hooks `module` now; it must not be running."""
        key = (id(module), group)
        observers = self.__dict__.setdefault("_observers", {})
        if key not in observers:
            observers[key] = []
            old = self._handles.pop(key, None)
            if old is not None:
                old.remove()
            if group == "fwd":
                self._handles[key] = module.register_forward_hook(self._observed_forward_hook)
            else:
                self._handles[key] = module.register_forward_pre_hook(self._observed_pre_hook, with_kwargs=True)
        observers[key].append(observer)

    def _observed_forward_hook(self, module, args, output):
        result = self._forward_hook(module, args, output)
        if getcurrent() is self._driver:
            for observer in self._observers[(id(module), "fwd")]:
                observer(output if result is None else result)
        return result

    def _observed_pre_hook(self, module, args, kwargs):
        result = self._pre_hook(module, args, kwargs)
        if getcurrent() is self._driver:
            for observer in self._observers[(id(module), "pre")]:
                observer((args, kwargs) if result is None else result)
        return result

    def serve_point(self, point: Any, group: str, value: Any) -> Any:
        """Serve the bodies waiting for `point`, a place inside a module's forward (a `.source` operation),
        at this iteration; returns `value`, or what a body replaced it with."""
        if getcurrent() is not self._driver:
            return value
        slot = batching.Slot(value, self.batch_size)
        self._serve(point, group, slot)
        return slot.value

    def serve(self, module: Any, kind: str, value: Any) -> Any:
        """Serve requests for a pseudo-module (e.g. the generator's output) outside any hook."""
        self._end_open_loops()
        try:
            value = self._serve_value(module, "fwd" if kind == "output" else "pre", value, any_iteration=True)
        except (EarlyStop, _Abort):
            pass
        self._raise_failure()
        return value

    def _serve_value(self, module: Any, group: str, value: Any, *, any_iteration: bool = False) -> Any:
        slot = batching.Slot(value, self.batch_size)
        self._serve(module, group, slot, any_iteration=any_iteration)
        return slot.value

    def finish(self) -> None:
        """End every body still waiting: silently after a stop or in `.all()` mode, else with an error."""
        self._end_open_loops()
        if not self._stop:
            self._start_ready(force=True)
            self._raise_failure()
        for mediator in self.mediators:
            req = mediator.pending
            if req is None or mediator.greenlet is None:
                continue
            mediator.pending = None
            if req.op == "barrier":
                barrier, n = req.module, req.module.n
                arrived, barrier.waiting = len(barrier.waiting), []
                self._drive(mediator, throw=TetherError(
                    f"`tracer.barrier({n})` was reached by only {arrived} invoke(s): every one of the {n} invokes "
                    "that share it must call it, or give `tracer.barrier()` the number that do."))
                self._raise_failure()
                continue
            if req.op == "stop_at":  # its module had run before the body asked: stop there after all
                self._stop_retroactively(mediator, req)
                continue
            if self._stop or mediator.all_tail is not None:
                self._end(mediator)
                continue
            self._drive(mediator, throw=self._unreachable(req))
            self._raise_failure()
        self.kill()

    def _end_open_loops(self) -> None:
        """Bodies waiting in an open step loop for a step that never came continue after the loop."""
        for mediator in self.mediators:
            req = mediator.pending
            if req is None or mediator.after_loop is None or req.iteration < max(self._root_calls, 1):
                continue
            mediator.pending = None
            self._end(mediator)
            code, mediator.after_loop = mediator.after_loop, None
            self._start(mediator, code)
        self._raise_failure()

    def kill(self) -> None:
        """End every body without running more of it (after a failure)."""
        for mediator in self.mediators:
            self._end(mediator)

    @staticmethod
    def _end(mediator: Mediator) -> None:
        """Unwind a body that is still waiting; its greenlet ends with it."""
        body, mediator.greenlet = mediator.greenlet, None
        if body is not None:
            body.throw(GreenletExit)

    # ---- hooks ---------------------------------------------------------------------------------
    def _root_pre_hook(self, module, args):
        if getcurrent() is not self._driver:
            return None
        self._root_calls += 1
        self.iteration = self._root_calls - 1
        if self.iteration > 0:
            self._begin_iteration()
        return None

    def _waited_at(self, module: Any) -> bool:
        """Whether a body waits for `module`'s value."""
        for mediator in self.mediators:
            req = mediator.pending
            if req is not None and req.module is module:
                return True
        return False

    def _forward_hook(self, module, args, output):
        if getcurrent() is not self._driver or (id(module), "fwd") not in self._demanded:
            return None  # (a planned hook no body asked for this time)
        slot = batching.Slot(output, self.batch_size)
        self._serve(module, "fwd", slot)
        return slot.value if slot.changed else None

    def _pre_hook(self, module, args, kwargs=None):
        if getcurrent() is not self._driver or (id(module), "pre") not in self._demanded:
            return None
        kwargs = {} if kwargs is None else kwargs
        slot = batching.Slot((args, kwargs), self.batch_size)
        self._serve(module, "pre", slot)
        return slot.value if slot.changed else None

    def _ensure_hook(self, req: Request, key: tuple[int, str]) -> None:
        """Hook the requested module, and its ancestors' outputs while they have not started running.

        PyTorch decides when a module is called whether to look for hooks at all, so a module that is
        already running cannot be hooked; hooking a module's ancestors together with it means a later
        request for an enclosing module (`block.mlp.output`, then `block.output`) is still served.
        """
        closure = self._closures.get(key)
        if closure is None:
            closure = self._closures[key] = self._closure(req.module, key)
        demanded, handles = self._demanded, self._handles
        for hook_key, module, group in closure:
            if hook_key not in demanded:
                demanded[hook_key] = (module, group)
                if hook_key not in handles:  # not planned: registered now
                    self._register(module, group)

    def _closure(self, module: Any, key: tuple[int, str]) -> tuple:
        """The hooks a request for `key` needs: its own and its ancestors' outputs (see _ensure_hook)."""
        if not isinstance(module, torch.nn.Module):
            return ()
        single = self.max_iterations == 1
        if module is self.root and key[1] == "fwd" and single:
            return ()  # served from forward's return value
        out = [(key, module, key[1])]
        parents = self._parents()
        parent = parents.get(id(module))
        while parent is not None and not (parent is self.root and single):
            if not isinstance(parent, _CONTAINERS):
                out.append(((id(parent), "fwd"), parent, "fwd"))
            parent = parents.get(id(parent))
        return tuple(out)

    def _register(self, module: torch.nn.Module, group: str) -> None:
        if group == "fwd":
            self._handles[(id(module), group)] = module.register_forward_hook(self._forward_hook)
        elif group == "pre":
            self._handles[(id(module), group)] = module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            if self._may_skip and (id(module), "skip") not in self._handles:
                self._handles[(id(module), "skip")] = SkipGate(module, self._skip_gate)
        elif (id(module), group) not in self._handles:
            self._handles[(id(module), group)] = SkipGate(module, self._skip_gate)

    def _skip_gate(self, module: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """In place of `module.forward` while gated: the bodies' replacements if they skip this call."""
        if getcurrent() is not self._driver or (id(module), "skip") not in self._demanded:
            return forward(*args, **kwargs)
        slot = SkipSlot()
        self._serve(module, "skip", slot)
        if not slot.parts:
            return forward(*args, **kwargs)
        try:
            return slot.replacement(self.batch_size, self.root, module)
        except TetherError as error:
            self._failure = error
            raise _Abort() from None

    def _parents(self) -> dict[int, torch.nn.Module]:
        if self._parent_map is None:
            self._parent_map = parents_of(self.root)
        return self._parent_map

    # ---- serving -------------------------------------------------------------------------------
    def _serve(self, module, group: str, slot, *, any_iteration: bool = False) -> None:
        previous = self._serving
        iteration = None if any_iteration else self.iteration
        self._serving = (module, group, slot, iteration)
        try:
            for mediator in self.mediators:
                req = mediator.pending
                if (req is not None and req.module is module and req.group == group
                        and (iteration is None or req.iteration == iteration)):
                    mediator.pending = None
                    if req.op == "get" and req.kind == "output" and mediator.rows is None:
                        # _apply's commonest case (a whole output read), without a call per served value
                        value = mediator.seen[(id(module), "output", req.iteration)] = slot.value
                        self._drive(mediator, value)
                        continue
                    if req.op == "stop_at":
                        self._stop = True  # the body waits there until finish() ends it
                        continue
                    self._drive(mediator, self._apply(mediator, req, slot))
            if self._unstarted:
                self._start_ready()
        finally:
            self._serving = previous
        self._fired[(id(module), group)] = self.iteration
        if self._failure is not None:
            raise _Abort()
        if self._stop:
            raise EarlyStop()
        if self._cancel is not None and self._cancel():
            self._failure = RunStopped("The job was cancelled while the model was running.")
            raise _Abort()

    def _apply(self, mediator: Mediator, req: Request, slot) -> Any:
        rows = mediator.rows
        if req.op == "set":
            slot.set(req.kind, rows, req.value)
        value = slot.value if rows is None and req.kind == "output" else slot.get(req.kind, rows)
        mediator.seen[(id(req.module), req.kind, req.iteration)] = value
        if rows is not None:
            batching.record_views(value, slot.get(req.kind, None), rows, mediator.views)
        return value if req.op == "get" else None

    def _start_ready(self, *, force: bool = False) -> None:
        """Start, in invoke order, the bodies not yet started whose inputs from earlier invokes exist."""
        if self._unstarted == 0:
            return
        for mediator in self.mediators:
            if not mediator.started and (force or mediator.ready()):
                self._unstarted -= 1
                self._start(mediator, mediator.code)

    def _start(self, mediator: Mediator, code) -> None:
        mediator.started = True
        body = mediator.greenlet = _body_greenlet(self._driver)
        body.mediator = mediator
        self._drive(mediator, (mediator, code))

    def _drive(self, mediator: Mediator, value: Any = None, *, throw: BaseException | None = None) -> None:
        """Switch into the body and answer what it asks until it waits for a hook that is not running."""
        while True:
            if throw is not None:
                event, throw = mediator.greenlet.throw(throw), None
            else:
                event = mediator.greenlet.switch(value)
            value = None
            if type(event) is not Request:  # the body ended (_ENDED): its greenlet is free for another
                outcome, mediator.outcome = mediator.outcome, None
                if isinstance(outcome, _Failed):
                    self._failure = outcome.error
                body, mediator.greenlet = mediator.greenlet, None
                if event is _ENDED:
                    _release(body)
                return
            req = event
            if req.group == "control":
                if req.op == "stop":
                    self._stop = True
                    mediator.pending = None
                    return
                if not self._arrive(mediator, req):
                    return
                continue
            serving = self._serving
            if (serving is not None and req.module is serving[0] and req.group == serving[1]
                    and (serving[3] is None or req.iteration == serving[3])):
                if req.op == "stop_at":
                    self._stop = True
                    mediator.pending = None
                    return
                value = self._apply(mediator, req, serving[2])
                continue
            if req.op == "stop_at":
                req.value = serving[0] if serving is not None else None  # the module whose values came later
                if (id(req.module), req.kind, req.iteration) in mediator.seen or self._ran(req):
                    self._stop_retroactively(mediator, req)
                    return
            key = (id(req.module), req.group)
            if req.iteration < self.iteration or key in self._fired:  # it ran: a value seen before, or too late
                if req.op == "get":
                    seen = mediator.seen.get((key[0], req.kind, req.iteration), _DONE)
                    if seen is not _DONE:
                        value = seen
                        continue
                if self._ran(req):
                    throw = self._unreachable(req)
                    continue
            if key not in self._demanded:
                closure = self._closures.get(key)  # _ensure_hook's commonest case inlined: a cached closure
                if closure is None:
                    self._ensure_hook(req, key)
                else:
                    demanded = self._demanded
                    for hook_key, module, group in closure:
                        if hook_key not in demanded:
                            demanded[hook_key] = (module, group)
                            if hook_key not in self._handles:  # not planned: registered now
                                self._register(module, group)
            mediator.pending = req
            return

    def _arrive(self, mediator: Mediator, req: Request) -> bool:
        """A body reached a barrier: it waits (False), or it is the last one and every body there goes on
        (True), the earlier ones first, in the order they arrived."""
        barrier = req.module
        barrier.waiting.append(mediator)
        if len(barrier.waiting) < barrier.n:
            mediator.pending = req
            return False
        earlier, barrier.waiting = barrier.waiting[:-1], []
        for other in earlier:
            other.pending = None
            self._drive(other)
        return True

    def _ran(self, req: Request) -> bool:
        """Whether the module `req` asks for has already run at `req`'s iteration."""
        fired = self._fired.get((id(req.module), req.group))
        return ((req.iteration < self.iteration or (fired is not None and fired >= req.iteration))
                and isinstance(req.module, torch.nn.Module))

    def _stop_retroactively(self, mediator: Mediator, req: Request) -> None:
        """`.stop()` at a module that ran before the one whose values the body took last: the model stops
        now, and those later values are void, as if the model had stopped where asked (the body's names
        bound to them become NotReached). Values taken at earlier modules are kept."""
        self._stop = True
        mediator.pending = None
        later = req.value
        void = [] if later is None else [v for (module_id, _, iteration), v in mediator.seen.items()
                                         if module_id == id(later) and iteration == req.iteration]
        for name, value in list(mediator.ns.items()):
            if any(value is v for v in void):
                del mediator.ns[name]
        self._end(mediator)

    def _unreachable(self, req: Request) -> BaseException:
        if req.iteration >= max(self._root_calls, 1):
            return OutOfOrderError(
                f"{req.label} was requested for iteration {req.iteration}, but the model ran only "
                f"{max(self._root_calls, 1)} iteration(s). Use fewer `.next()` calls or generate more tokens."
            )
        return OutOfOrderError(
            f"{req.label} was requested after the model had already computed it in this pass (iteration "
            f"{req.iteration}), or the module was never called. Access modules in the order the model runs "
            "them; to use a later value in an earlier module, use a second invoke or `.next()`."
        )

    def _begin_iteration(self) -> None:
        for mediator in self.mediators:
            req = mediator.pending
            if mediator.all_tail is not None:
                if mediator.greenlet is not None and req is not None and req.iteration >= self.iteration:
                    continue
                mediator.pending = None
                self._end(mediator)
                mediator.at(self.iteration)
                self._start(mediator, mediator.all_tail)
            elif req is not None and req.iteration < self.iteration and isinstance(req.module, torch.nn.Module):
                mediator.pending = None
                self._drive(mediator, throw=self._unreachable(req))
        if self._failure is not None:
            raise _Abort()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            error, self._failure = self._failure, None
            self.kill()
            raise error
