"""Tracer and Invoker: one batched run of a model (a forward pass or a generation) with its bodies.

`model.trace(x)` makes one implicit invoke of the whole body; `model.trace()` runs the body first to
collect `tracer.invoke(...)` blocks, batches their inputs and runs each block as its own mediator.
"""

from __future__ import annotations

import contextlib
import io
import weakref
from collections.abc import Callable
from typing import Any

from .barrier import Barrier
from .capture import Block
from .contexts import Cond, Context, LocalBlock, RemoteRequest
from .envoy import body_without_input, noting_sets
from .errors import TetherError
from .interleaver import Interleaver
from .mediator import Mediator, current_mediator
from .saving import save
from .steps import AllSteps, Steps, all_steps, body_mediator

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

    @property
    def given_input(self) -> bool:
        """Whether this invoke adds rows; an empty `tracer.invoke()` sees the whole batch the others make."""
        args, kwargs = self._given
        return bool(args or kwargs)

    def _execute(self, ns: dict) -> None:
        self._ns = ns
        self._tracer()._invokes.append(self)


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
        self._result: Any = None
        if args or kwargs:
            self.invoker = Invoker(self, args, {**kwargs, **self._invoker_args})

    def remote_request(self) -> RemoteRequest:
        """What this block asks of a remote run (the client's encoder reads this)."""
        trace_options: dict[str, Any] = {}
        if self._mode != "scan":
            trace_options.update({"scan": True} if self._scan else {})
            trace_options.update({"validate": True} if self._validate else {})
            trace_options.update({"invoker_args": dict(self._invoker_args)} if self._invoker_args else {})
        return RemoteRequest(self._model, self._mode, self._remote_options, trace_options)

    # ---- the user's API inside the body ---------------------------------------------------------
    @property
    def result(self) -> Any:
        """What the run returned: inside the body, this invoke's rows of it once the run ends (`generate`: the
        token ids, as `model.generator.output`; a trace: the model's output, as `model.output`); after the
        block, the whole of it."""
        if current_mediator() is None:
            return self._result
        if self._mode == "generate":
            return self._model.generator.output
        return self._model.output
    @property
    def iter(self) -> Steps:
        """`tracer.iter[...]` / `tracer.iter(seq)` (made on use: a stored one would be a reference cycle)."""
        return Steps(self._max_iterations(), self.log)

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

    def barrier(self, n: int) -> Barrier:
        """A meeting point for `n` invokes: each calls `barrier()`, and none goes on until all have."""
        return Barrier(n)

    def cond(self, condition: Any) -> Cond:
        """`with tracer.cond(condition):` — run the block only where `condition` holds."""
        return Cond(condition)

    def all(self) -> AllSteps:
        """Every step from here on (see `steps.AllSteps` for its three spellings)."""
        return all_steps()

    def next(self, step: int = 1) -> None:
        """Move every module to its next call (the next generation step)."""
        body_mediator("tracer.next()").iteration += step

    def local(self) -> LocalBlock:
        """`with tracer.local():` — the same as `tether.local()`: run the block on this machine."""
        return LocalBlock()

    def cache(self, modules: list | None = None, device: Any = "cpu", dtype: Any = None, detach: bool = True,
              include_output: bool = True, include_inputs: bool = False, non_blocking: bool = False) -> Any:
        """Record the values of `modules` (Envoys or paths; all modules by default) during this run; returns a
        saved `CacheView` (see cache.py), read by path (`cache["model.transformer.h.0"].output`) or by
        navigation (`cache.model.transformer.h[0].output`), a list per module across generation steps.

        Keywords: `device` and `dtype` move and cast each value as it is recorded (on the server, for a
        remote run, before download); `detach` records values without their autograd graph;
        `include_output` / `include_inputs` pick what is recorded; `non_blocking` is passed to the device
        move."""
        from .cache import start_cache

        view = start_cache(self._model, body_mediator("tracer.cache()"), modules, device=device, dtype=dtype, detach=detach,
                           include_output=include_output, include_inputs=include_inputs, non_blocking=non_blocking)
        return save(view)

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
        given = [inv for inv in invokes if inv.given_input]
        if not given:
            raise TetherError("No invoke has an input: give `tracer.invoke(...)` an input (an empty "
                              "`tracer.invoke()` sees the batch the other invokes make).")
        args, kwargs, given_rows, batch_size = model._batch([inv.inputs for inv in given])
        if len(given) == 1:
            given_rows = [None]
        row_of = dict(zip(map(id, given), given_rows))
        rows = [row_of.get(id(inv)) for inv in invokes]  # an empty invoke: the whole batch (None)
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
            self._result = interleaver.run(lambda: model._run(self._mode, args, kwargs, self._run_kwargs))
        if self._mode == "generate":
            interleaver.serve(model._generator_key(), "output", self._result)
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
