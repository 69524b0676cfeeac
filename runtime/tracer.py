"""Tracer and Invoker: one batched run of a model (a forward pass or a generation) with its bodies.

`model.trace(x)` makes one implicit invoke of the whole body; `model.trace()` runs the body first to
collect `tracer.invoke(...)` blocks, batches their inputs and runs each block as its own mediator.
"""

from __future__ import annotations

import contextlib
import io
import sys
import weakref
from collections.abc import Callable
from typing import Any

from .capture import Block
from .contexts import Cond, Context, Iterator, LocalBlock
from .envoy import body_without_input, noting_sets
from .errors import NotInTraceError
from .interleaver import Interleaver, Mediator, current_mediator

__all__ = ["Tracer", "Invoker"]

_MISSING = object()


class Invoker(Context):
    """`with tracer.invoke(inputs):` — one batch entry (or several rows) and the body that edits it."""

    def __init__(self, tracer: Tracer, args: tuple, kwargs: dict):
        self._tracer = weakref.ref(tracer)  # the tracer holds its invokes: no cycle for the collector
        self._model, self._given = tracer._model, (args, kwargs)
        self._inputs = None
        self._ns: dict | None = None

    @property
    def inputs(self) -> Any:
        """This invoke's inputs prepared for the batch (tokenized, for a LanguageModel), made when the model
        first needs them: a remote trace sends them as given and never tokenizes here."""
        if self._inputs is None:
            self._inputs = self._model._prepare(*self._given)
        return self._inputs

    def _execute(self, ns: dict) -> None:
        self._ns = ns
        self._tracer()._invokes.append(self)


class _Steps:
    """`tracer.iter[0:3]`, `tracer.iter[:]` — loop over generation steps; `tracer.iter(seq)` — a loop block."""

    def __init__(self, tracer: Tracer):
        self._tracer = tracer

    def __getitem__(self, index: int | slice):
        mediator = _mediator("iter")
        if isinstance(index, slice) and index.stop is None:
            mediator.open_loop_from(sys._getframe(1))
        limit = self._tracer._max_iterations()
        steps = range(limit)[index] if isinstance(index, slice) else [index]
        return self._steps(mediator, steps)

    @staticmethod
    def _steps(mediator: Mediator, steps):
        for step in steps:
            mediator.iteration = step
            yield step

    def __call__(self, items, return_context: bool = False) -> Iterator:
        return Iterator(items, return_context=return_context, log=self._tracer.log)


class _AllSteps(Context):
    """What `tracer.all()` returns: as a statement it turns on every-step mode for the rest of the body;
    iterated (`for step in tracer.all():`) it loops over steps; as `with tracer.all():` it runs its
    block at every step (nnsight 0.8's spelling)."""

    _hands_back = False

    def __init__(self, tracer: Tracer, mediator: Mediator):
        self._tracer, self._mediator = tracer, mediator

    def __iter__(self):
        self._mediator.all_tail = None
        self._mediator.open_loop_from(sys._getframe(1))
        return _Steps._steps(self._mediator, range(self._mediator.iteration, self._tracer._max_iterations()))

    def __enter__(self) -> _AllSteps:
        frame = sys._getframe(1)
        self._mediator.all_tail = None
        self._mediator.open_loop_from(frame)
        return self._enter_from(frame)

    def _execute(self, ns: dict) -> None:
        code = self._block.code()
        for step in range(self._mediator.iteration, self._tracer._max_iterations()):
            self._mediator.iteration = step
            exec(code, ns)


def _mediator(what: str) -> Mediator:
    mediator = current_mediator()
    if mediator is None:
        raise NotInTraceError(f"`tracer.{what}` only works inside the body of a trace or invoke.")
    return mediator


class Tracer(Context):
    """The context of `model.trace(...)`, `model.generate(...)` and `model.scan(...)`."""

    def __init__(self, model: Any, args: tuple, kwargs: dict, *, mode: str = "trace", scan: bool = False,
                 validate: bool = False, invoker_args: dict | None = None, remote: bool = False,
                 remote_options: dict | None = None, log: Callable[..., None] = print,
                 cancel: Callable[[], bool] | None = None, run_kwargs: dict | None = None):
        self._model = model
        self._args, self._kwargs = args, kwargs
        self._mode = mode
        self._scan = scan or mode == "scan"
        self._validate = validate
        self._invoker_args = invoker_args or {}
        self._remote = remote
        self._remote_options = remote_options or {}
        self._run_kwargs = run_kwargs or {}
        self._invokes: list[Invoker] = []
        self._stopped = False
        self._cancel = cancel
        self.log = log
        self.invoker: Invoker | None = None
        self.result: Any = None
        if args or kwargs:
            self.invoker = Invoker(self, args, {**kwargs, **self._invoker_args})

    # ---- the user's API inside the body ---------------------------------------------------------
    @property
    def iter(self) -> _Steps:
        """`tracer.iter[...]` / `tracer.iter(seq)` (made on use: a stored one would be a reference cycle)."""
        return _Steps(self)

    def invoke(self, *args: Any, **kwargs: Any) -> Invoker:
        """A batch entry: its inputs join the one batched run; its body sees only its own rows."""
        return Invoker(self, args, kwargs)

    def stop(self) -> None:
        """Stop the model after the module running now (before it runs, when called outside invokes)."""
        mediator = current_mediator()
        if mediator is None:
            self._stopped = True
        else:
            mediator.stop()

    def cond(self, condition: Any) -> Cond:
        """`with tracer.cond(condition):` — run the block only where `condition` holds."""
        return Cond(condition)

    def all(self) -> _AllSteps:
        """Apply the rest of the body (or the `with`/`for` block) at every generation step."""
        mediator = _mediator("all()")
        mediator.enable_all()
        return _AllSteps(self, mediator)

    def next(self, step: int = 1) -> None:
        """Move the body `step` generation steps on."""
        _mediator("next()").iteration += step

    def local(self) -> LocalBlock:
        """`with tracer.local():` — the same as `tether.local()`: run the block on this machine."""
        return LocalBlock()

    # ---- running -------------------------------------------------------------------------------
    def _execute(self, ns: dict) -> None:
        if self._remote:
            from .remote import run_remote

            run_remote(self, ns)
            return
        only_fake = self._mode == "scan"
        if not only_fake and (self._scan or self._validate):
            with contextlib.redirect_stdout(io.StringIO()):
                self._run_pass(dict(ns), fake=True)
        self._run_pass(ns, fake=only_fake)

    def _run_pass(self, ns: dict, *, fake: bool) -> None:
        if self.invoker is not None:
            self.invoker._block, self.invoker._ns = self._block, ns
            invokes = [self.invoker]
        else:
            self._invokes = []
            with body_without_input():
                exec(self._block.code(), ns)
            invokes = self._invokes
        try:
            if not invokes or self._stopped:
                return
            if fake:
                from torch._subclasses.fake_tensor import FakeTensorMode

                with FakeTensorMode(allow_non_fake_inputs=True):
                    self._run_model(invokes)
            else:
                self._model._dispatch()
                self._run_model(invokes)
        finally:  # the body's namespace may hold this tracer (`as tracer`): drop it so no cycle outlives the run
            for invoker in invokes:
                invoker._ns = None
            self._invokes = []

    def _run_model(self, invokes: list[Invoker]) -> None:
        model = self._model
        args, kwargs, rows, batch_size = model._batch([inv.inputs for inv in invokes])
        if len(invokes) == 1:
            rows = [None]
        mediators = [Mediator(block, block.code(), ns, None) for block, ns in model._edits]
        assigned_earlier: set[str] = set()
        for inv, r in zip(invokes, rows):
            mediator = Mediator(inv._block, inv._block.code(), inv._ns, r)
            mediator.waits_for = {n: inv._ns.get(n, _MISSING) for n in inv._block.loaded & assigned_earlier}
            assigned_earlier.update(inv._block.assigned)
            mediators.append(mediator)
        interleaver = Interleaver(model._module, mediators, batch_size, self._max_iterations(), cancel=self._cancel,
                                  parents=model._parents(), plan=model._hook_plan(tuple(m.code for m in mediators)))
        with noting_sets():
            self.result = interleaver.run(lambda: model._run(self._mode, args, kwargs, self._run_kwargs))
        if self._mode == "generate":
            interleaver.serve(model._generator_key(), "output", self.result)
        interleaver.finish()
        self._stopped = interleaver.stopped

    def _max_iterations(self) -> int:
        if self._mode == "generate":
            return int(self._run_kwargs.get("max_new_tokens", 20))
        return 1

    def _why_unreached(self) -> str:
        return "the trace was stopped early" if self._stopped else ""

    @property
    def block(self) -> Block:
        return self._block
