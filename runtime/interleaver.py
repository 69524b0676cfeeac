"""Interleave intervention bodies with a model's forward pass.

Each invoke's body runs in its own greenlet (a `Mediator`). When the body asks for a module value it
switches back to the model's greenlet, which installs a hook on that module only (PyTorch's public hook
API) and runs on; the hook hands the value over and waits until the body asks for something else.
Only one side runs at a time, so no locks are needed. Imports torch and greenlet, nothing of networks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from greenlet import GreenletExit, getcurrent

from . import batching
from .errors import OutOfOrderError, RunStopped, TetherError
from .hook_plan import HookPlan, parents_of
from .mediator import DONE, ENDED, Failed, Mediator, Request, body_greenlet, release_body
from .observing import Observing
from .skipping import SkipGate, SkipSlot

__all__ = ["Interleaver", "current_interleaver", "EarlyStop", "cancel_scope"]

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


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


def current_interleaver() -> Interleaver | None:
    """The interleaver whose model runs in this thread right now, if any (`.source`, `tracer.cache`)."""
    return getattr(_limits, "running", None)


class Interleaver(Observing):
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
                    if group == "fwd" and not module._forward_hooks:  # (most planned hooks: _register's first
                        handles[(id(module), "fwd")] = module.register_forward_hook(hook)  # case, inlined)
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
        key = (id(module), "fwd")
        if key not in self._demanded or getcurrent() is not self._driver:
            return None  # (a planned hook no body asked for this time)
        slot = batching.Slot(output, self.batch_size)
        self._serve(module, "fwd", slot, key)
        return slot.value if slot.changed else None

    def _pre_hook(self, module, args, kwargs=None):
        if getcurrent() is not self._driver or (id(module), "pre") not in self._demanded:
            return None
        kwargs = {} if kwargs is None else kwargs
        slot = batching.Slot((args, kwargs), self.batch_size)
        self._serve(module, "pre", slot)
        return slot.value if slot.changed else None

    def _closure(self, module: Any, key: tuple[int, str]) -> tuple:
        """The hooks a request for `key` needs: its own and its ancestors' outputs while they have not started
        running. PyTorch decides when a module is called whether to look for hooks at all, so a module already
        running cannot be hooked; hooking its ancestors with it means a later request for an enclosing module
        (`block.mlp.output`, then `block.output`) is still served."""
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
        """Hook `module` for `group`. As in nnsight, a body sees a module's output as its forward returned it,
        before any other forward hook (so tether's comes first), and its input as forward receives it, after
        every other pre-hook registered by then (so tether's comes last; see _last_pre_hook)."""
        if group == "fwd":  # (prepend only when there is a hook to go before: it costs a keyword and a move)
            self._handles[(id(module), group)] = (module.register_forward_hook(self._forward_hook, prepend=True)
                                                  if module._forward_hooks else
                                                  module.register_forward_hook(self._forward_hook))
        elif group == "pre":
            self._handles[(id(module), group)] = module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            if self._may_skip and (id(module), "skip") not in self._handles:
                self._handles[(id(module), "skip")] = SkipGate(module, self._skip_gate)
        elif (id(module), group) not in self._handles:
            self._handles[(id(module), group)] = SkipGate(module, self._skip_gate)

    def _last_pre_hook(self, module: torch.nn.Module, key: tuple[int, str]) -> None:
        """Move a planned pre-hook after the pre-hooks registered since, when a body first asks for it: the
        body then sees the input it would have if the hook were registered at its read, as on a first run."""
        module._forward_pre_hooks.move_to_end(self._handles[key].id)

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
    def _serve(self, module, group: str, slot, key: tuple | None = None, *, any_iteration: bool = False) -> None:
        """Hand `slot` to every body waiting for `module`'s `group` value (`key`: their hook key, when known)."""
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
                        value = mediator.seen[req.seen_key] = slot.value
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
        self._fired[(id(module), group) if key is None else key] = self.iteration
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
        mediator.seen[req.seen_key] = value
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
        body = mediator.greenlet = body_greenlet(self._driver)
        body.mediator = mediator
        self._drive(mediator, (mediator, code))

    def _drive(self, mediator: Mediator, value: Any = None, *, throw: BaseException | None = None) -> None:
        """Switch into the body and answer what it asks until it waits for a hook that is not running.
        Long on purpose: every module value read runs through this loop; helpers would add calls to each."""
        while True:
            if throw is not None:
                event, throw = mediator.greenlet.throw(throw), None
            else:
                event = mediator.greenlet.switch(value)
            value = None
            if type(event) is not Request:  # the body ended (ENDED): its greenlet is free for another
                outcome, mediator.outcome = mediator.outcome, None
                if isinstance(outcome, Failed):
                    self._failure = outcome.error
                body, mediator.greenlet = mediator.greenlet, None
                if event is ENDED:
                    release_body(body)
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
                if req.seen_key in mediator.seen or self._ran(req):
                    self._stop_retroactively(mediator, req)
                    return
            key = req.hook_key
            if req.iteration < self.iteration or key in self._fired:  # it ran: a value seen before, or too late
                if req.op == "get":
                    seen = mediator.seen.get(req.seen_key, DONE)
                    if seen is not DONE:
                        value = seen
                        continue
                if self._ran(req):
                    throw = self._unreachable(req)
                    continue
            if key not in self._demanded:  # hook the module and its ancestors (_closure), once per run
                closure = self._closures.get(key)
                if closure is None:
                    closure = self._closures[key] = self._closure(req.module, key)
                demanded = self._demanded
                for hook_key, module, group in closure:
                    if hook_key not in demanded:
                        demanded[hook_key] = (module, group)
                        if hook_key not in self._handles:  # not planned: registered now
                            self._register(module, group)
                        elif group == "pre":
                            self._last_pre_hook(module, hook_key)
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
        fired = self._fired.get(req.hook_key)
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
