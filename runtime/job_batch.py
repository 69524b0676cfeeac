"""Cross-job batching: several Programs as one batched forward pass or generation, each job its own invoke
with its own window, namespace, log, local() handler, cancel and outcome (its solo run's). Beside
`program.execute`; imports nothing of networks, client or server."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from greenlet import GreenletExit

from . import ops
from .capture import OPS_NAME
from .contexts import _trimmed, local_handler
from .errors import RunStopped
from .interleaver import EarlyStop, Interleaver, cancel_scope
from .job_compat import batch_key, batch_tokens, batchable, is_language_model
from .job_rows import SharedValueError, Window, lend, pad_rows, splice, write_back
from .mediator import Mediator, Request, current_mediator
from .program import Program, block_of, context_of, run_local_block
from .saving import SaveScope, hand_back

__all__ = ["BatchJob", "BatchOutcome", "batchable", "batch_key", "batch_tokens", "execute_batch"]

@dataclass
class BatchJob:
    """One program to run in a batch, with what `execute` would take for it alone."""

    program: Program
    bindings: dict
    model: Any = None  # the job's own root over the batch's module (its Envoys); the batch's model when None
    filename: str | None = None
    local: Callable[[Any, dict], dict] | None = None  # this job's `local()` handler
    log: Callable[..., None] = print
    cancel: Callable[[], bool] | None = None  # checked at module boundaries and generation steps


@dataclass
class BatchOutcome:
    """A job's end: the values `execute` would return, or the error it would raise."""

    values: dict[str, Any] | None = None
    error: BaseException | None = None
    batch_size: int = 1  # jobs that shared the run, this one included


class _Refused(Exception):
    """A job tried to replace a value the batch shares: the error is raised in its body, at its line."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


@dataclass(eq=False)
class _Job:
    """A job while its batch runs: its spec, window, namespace and how it ended."""

    spec: BatchJob
    index: int
    tracer: Any = None
    block: Any = None
    ns: dict = field(default_factory=dict)
    window: Window | None = None
    max_steps: int = 1
    steps: int | None = None  # generation steps it ran, once its generation ended (own max_new_tokens or EOS)
    generated: Any = None  # the batch's token ids when its generation ended
    mediator: Any = None
    owned: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)  # its lent copies
    stopped: bool = False
    error: BaseException | None = None
    outcome: BatchOutcome | None = None

    @property
    def ended(self) -> bool:
        """Ended abnormally: failed, cancelled or stopped (its body runs no more)."""
        return self.error is not None or self.stopped

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error


class _JobMediator(Mediator):
    """A job's invoke: its failure ends this job's body only, never the batch's run."""

    __slots__ = ("job",)

    def _run(self, code) -> object:
        try:
            exec(code, self.ns)
        except GreenletExit:
            raise
        except BaseException as error:  # the job's own exception: its outcome, not the batch's
            self.job.fail(_trimmed(error))
        return None


class _BatchInterleaver(Interleaver):
    """An Interleaver whose bodies are jobs: per-job windows, cancels, ends of generation and outcomes."""

    def __init__(self, model: Any, jobs: list[_Job], batch_size: int, max_iterations: int, width: int,
                 on_close: Callable[[_Job], None]):
        mediators = [job.mediator for job in jobs]
        super().__init__(model._module, mediators, batch_size, max_iterations, parents=model._parents(),
                         plan=model._hook_plan(tuple(m.code for m in mediators)))
        self._cancel = None  # each job has its own (see check_jobs)
        self.jobs = jobs
        self.width = width  # padded prompt positions (0: no column windows)
        self.generator = model._generator_key()
        self._closing = False
        self._on_close = on_close
        self._driving: Mediator | None = None  # the body being driven now (see _apply)
        self._lent: list = []  # copies handed to the body driven now, whose edits go back (job_rows.lend)

    def running(self) -> int | None:
        """The index of the job whose body runs now (None: the model runs); safe to call from any thread."""
        mediator = self._driving
        return None if mediator is None else mediator.job.index

    # ---- stops: a body's `.stop()` ends that job; the model stops only when no job is left -----------
    @property
    def _stop(self) -> bool:
        return self.__dict__.get("_halt", False)

    @_stop.setter
    def _stop(self, value: bool) -> None:
        if value:
            self._stop_asked = True  # by the body driven now, or a stop_at served in _serve

    def _drive(self, mediator: Mediator, value: Any = None, *, throw: BaseException | None = None) -> None:
        if type(value) is _Refused:
            value, throw = None, value.error
        outer, asked = self._driving, self.__dict__.get("_stop_asked", False)
        self._driving, self._stop_asked = mediator, False
        try:
            while True:
                try:
                    super()._drive(mediator, value, throw=throw)
                    break
                except _Refused as refused:  # its set was refused: raise the error at the body's line
                    value, throw = None, refused.error
        finally:
            write_back(self._lent)  # the body's turn ended: its in-place edits reach its rows now
            stopped = self._stop_asked
            self._driving, self._stop_asked = outer, asked
        if stopped:
            self._stopped(mediator)

    def _stopped(self, mediator: Mediator) -> None:
        """A body asked to stop: its job ends here (what it assigned so far is kept), the batch runs on."""
        mediator.job.stopped = True
        mediator.pending = None
        self._end(mediator)

    # ---- values: each job's own window --------------------------------------------------------
    def _apply(self, mediator: Mediator, req: Request, slot) -> Any:
        job = mediator.job
        window = job.window
        if req.module is self.generator and req.module is not None:
            end = None if job.steps is None else self.width + job.steps
            window = Window(window.rows, window.first_col, 0, end)
        elif req.iteration > 0 or not self.width:
            window = Window(window.rows)
        write_back(self._lent)  # edits of values taken earlier in this turn come first
        full = slot.get(req.kind, None)
        if req.op == "set":
            try:
                full = splice(full, window, req.value, self.batch_size)
            except SharedValueError as error:
                if self._driving is mediator:
                    raise _Refused(error) from None
                return _Refused(error)
            slot.set(req.kind, None, full)
        value = lend(full, window, self.batch_size, self._lent, job.owned)
        mediator.seen[req.seen_key] = value
        return value if req.op == "get" else None

    # ---- per-job ends ---------------------------------------------------------------------------
    def _serve(self, module, group: str, slot, key: tuple | None = None, *, any_iteration: bool = False) -> None:
        if self._closing:
            super()._serve(module, group, slot, key, any_iteration=any_iteration)
            return
        self.check_jobs()
        iteration = None if any_iteration else self.iteration
        stopping = [m for m in self.mediators if m.pending is not None and m.pending.op == "stop_at"
                    and m.pending.module is module and m.pending.group == group
                    and (iteration is None or m.pending.iteration == iteration)]
        self._stop_asked = False
        super()._serve(module, group, slot, key, any_iteration=any_iteration)
        if self._stop_asked:
            self._stop_asked = False
            for mediator in stopping:
                self._stopped(mediator)
        self.settle()

    def _begin_iteration(self) -> None:
        self.check_jobs()
        for job in self.jobs:
            if job.outcome is None and job.steps is not None and job.steps <= self.iteration:
                self.close(job, job.generated)  # its generation ended: it gets no more steps
        self.settle()
        super()._begin_iteration()

    def check_jobs(self) -> None:
        """End the bodies of jobs cancelled (or past their time) since the last module boundary."""
        for job in self.jobs:
            cancel = job.spec.cancel
            if job.outcome is None and not job.ended and cancel is not None and cancel():
                job.fail(RunStopped("The job was cancelled while the model was running."))
                job.mediator.pending = None
                self._end(job.mediator)

    def settle(self) -> None:
        """Close the jobs that ended abnormally; stop the model when no job is left running."""
        for job in self.jobs:
            if job.outcome is None and job.ended:
                self.close(job, None)
        if all(job.outcome is not None for job in self.jobs):
            self._halt = True
            raise EarlyStop()

    def close(self, job: _Job, generated: Any) -> None:
        """Finish one job as its solo run would end (generator output, unreachable requests), then its outcome."""
        if job.outcome is not None:
            return
        live, calls = self.mediators, self._root_calls
        self.mediators, self._closing = [job.mediator], True
        if job.steps is not None:
            self._root_calls = job.steps  # as far as this job's own run went
        try:
            if generated is not None and not job.ended:
                super().serve(self.generator, "output", generated)
            self._stop_asked = False
            self.finish()
            if self._stop_asked:  # a stop_at whose module had run before: stopped retroactively
                job.stopped = True
        except BaseException as error:
            job.fail(error)
            self.kill()
        finally:
            self.mediators = [m for m in live if m is not job.mediator]
            self._root_calls, self._closing = calls, False
        self._on_close(job)


class _Steps:
    """A transformers StoppingCriteria: notes when each job's own generation ends (its max_new_tokens, or EOS
    on all its rows) and marks its rows finished, so the batch runs on only for the others."""

    def __init__(self, jobs: list[_Job], width: int, batch_size: int, eos: list[int]):
        self.jobs, self.width = jobs, width
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.seen_eos = torch.zeros(batch_size, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        last = input_ids[:, -1].cpu()
        if len(self.eos):
            self.seen_eos |= torch.isin(last, self.eos)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for job in self.jobs:
            if job.steps is None and (step >= job.max_steps or bool(self.seen_eos[job.window.rows].all())):
                job.steps, job.generated = step, input_ids
            if job.steps is not None:
                done[job.window.rows] = True
        return done.to(input_ids.device)


def _criteria(steps: _Steps) -> Any:
    from transformers.generation import StoppingCriteria, StoppingCriteriaList

    class JobSteps(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return steps(input_ids, scores, **kwargs)

    return StoppingCriteriaList([JobSteps()])


def _eos_ids(model: Any, run_kwargs: dict) -> list[int]:
    eos = run_kwargs.get("eos_token_id")
    if eos is None:
        config = getattr(model._module, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def execute_batch(model: Any, jobs: list[BatchJob], *,
                  on_done: Callable[[int, BatchOutcome], None] | None = None,
                  on_start: Callable[[Callable[[], int | None]], None] | None = None) -> list[BatchOutcome]:
    """Run `jobs` (equal `batch_key`s) on `model` as one batched run; each gets what `execute` alone gives.

    `on_done(index, outcome)` is called as soon as a job's outcome is final (a job whose generation ended
    early, or that failed, need not wait for the batch). `on_start(running)` gets, before the model runs, a
    function any thread may call: the index of the job whose body runs now (None while the model runs), so
    a watchdog interrupts only a job that is itself stuck. Outcomes come back in the jobs' order.
    """
    states = [_Job(spec, i) for i, spec in enumerate(jobs)]
    outcomes: list[BatchOutcome | None] = [None] * len(jobs)
    scope = SaveScope()

    def conclude(job: _Job) -> None:
        if job.outcome is not None:
            return
        if job.error is not None:
            job.outcome = BatchOutcome(error=job.error)
        else:
            why = "the trace was stopped early" if job.stopped else ""
            values = hand_back(job.ns, job.block.assigned, scope, job.spec.bindings, why=why)
            job.outcome = BatchOutcome(values=_own_copies(values, job.owned))
        job.outcome.batch_size = len(jobs)
        job.ns, job.mediator, job.generated, job.owned = {}, None, None, weakref.WeakValueDictionary()
        outcomes[job.index] = job.outcome
        if on_done is not None:
            on_done(job.index, job.outcome)

    live, texts = [], {}
    for job in states:
        try:
            _prepare_job(model, job, texts)
            live.append(job)
        except BaseException as error:
            job.fail(error)
            conclude(job)
    if live:
        with scope, local_handler(_local_of_current_job), cancel_scope(None):
            _run_jobs(model, live, conclude, on_start)
    return outcomes


def _prepare_job(model: Any, job: _Job, texts: dict[str, tuple]) -> None:
    """The job's block, tracer and namespace; `texts` maps the file names taken so far to their programs' text
    (nested blocks are found by file and line, so two different texts must not share a name)."""
    spec = job.spec
    program = spec.program
    why = batchable(program)
    if why:
        raise ValueError(f"This program cannot share a batched run: {why}. Run it with `execute`.")
    filename = spec.filename or program.filename
    text = (program.first_line, program.source)
    if texts.setdefault(filename, text) != text:
        filename = f"{filename} (job {job.index + 1})"
        texts[filename] = text
    job.block = block_of(program, filename)
    job.tracer = context_of(model if spec.model is None else spec.model, program, spec.log)
    job.tracer._block = job.block
    job.ns = {**spec.bindings, OPS_NAME: ops, "print": spec.log}
    if program.tracer_name:
        job.ns[program.tracer_name] = job.tracer
    job.max_steps = job.tracer._max_iterations()


def _run_jobs(model: Any, jobs: list[_Job], conclude: Callable[[_Job], None],
              on_start: Callable[[Callable[[], int | None]], None] | None) -> None:
    mode = jobs[0].tracer._mode
    run_kwargs = dict(jobs[0].tracer._run_kwargs)
    for job in jobs[1:]:
        other = {k: v for k, v in job.tracer._run_kwargs.items() if k != "max_new_tokens"}
        if job.tracer._mode != mode or other != {k: v for k, v in run_kwargs.items() if k != "max_new_tokens"}:
            raise ValueError("execute_batch needs jobs of the same kind and run options (see batch_key).")
    model._dispatch()
    prepared = [job.tracer.invoker.inputs for job in jobs]
    width = 0
    if is_language_model(model):
        rows = [r for p in prepared for r in p.args[0]]
        ids, mask, positions = pad_rows(rows, model._pad_id(), _device(model))
        width, start = ids.shape[1], 0
        for job, p in zip(jobs, prepared):
            own = max(len(r) for r in p.args[0])
            job.window = Window(slice(start, start + p.rows), width - own, width)
            start += p.rows
        args, kwargs, batch_size = (), {"input_ids": ids, "attention_mask": mask}, len(rows)
        if mode == "trace" and _accepts(model._module, "position_ids"):
            kwargs["position_ids"] = positions
    else:
        args, kwargs, slices, batch_size = model._batch(prepared)
        for job, rows_of in zip(jobs, slices):
            job.window = Window(rows_of)
    for job in jobs:
        job.mediator = _JobMediator(job.block, job.block.code(), job.ns, job.window.rows)
        job.mediator.job = job
    max_steps = max(job.max_steps for job in jobs)
    interleaver = _BatchInterleaver(model, jobs, batch_size, max_steps, width, conclude)
    if on_start is not None:
        on_start(interleaver.running)
    if mode == "generate":
        run_kwargs["max_new_tokens"] = max_steps
        run_kwargs["stopping_criteria"] = _criteria(_Steps(jobs, width, batch_size, _eos_ids(model, run_kwargs)))

    def forward() -> Any:
        interleaver.check_jobs()
        interleaver.settle()  # bodies that failed (or jobs cancelled) before the model ran
        return model._run(mode, args, kwargs, run_kwargs)

    try:
        result = interleaver.run(forward)
    except BaseException as error:  # the model itself failed: no job can have its solo result
        interleaver.kill()
        for job in jobs:
            job.fail(error)
            conclude(job)
        return
    for job in jobs:
        interleaver.close(job, result if mode == "generate" else None)


def _local_of_current_job(block: Any, ns: dict) -> dict:
    """The `local()` handler of the job whose body is running."""
    job = getattr(current_mediator(), "job", None)
    handler = job.spec.local if job is not None else None
    return (handler or run_local_block)(block, ns)


def _own_copies(values: dict[str, Any], owned: weakref.WeakValueDictionary) -> dict[str, Any]:
    """Saved tensors that are views into the batch's tensors (also inside lists, tuples and dicts), as tensors
    of their own: a view would keep the whole batch's activation alive. A view of a copy lent to the job
    (`owned`, see job_rows.lend), e.g. each step's `output[0, -1]`, is the job's own already, as its solo run's
    view of the model's tensor is: copying it again would cost a copy per saved step."""
    memo: dict[int, Any] = {}

    def own(value: Any, depth: int = 0) -> Any:
        if id(value) in memo:
            return memo[id(value)]
        out = value
        if isinstance(value, torch.Tensor):
            base = value._base
            if base is not None and owned.get(id(base)) is not base:
                out = value.clone().as_subclass(type(value))
        elif depth < 4 and type(value) in (list, tuple):
            items = [own(v, depth + 1) for v in value]
            if any(a is not b for a, b in zip(items, value)):
                out = type(value)(items)
        elif depth < 4 and type(value) is dict:
            items = {k: own(v, depth + 1) for k, v in value.items()}
            if any(items[k] is not value[k] for k in value):
                out = items
        memo[id(value)] = out
        return out

    return {name: own(value) for name, value in values.items()}


def _accepts(module: torch.nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _device(model: Any) -> torch.device:
    for param in model._module.parameters():
        return param.device
    return torch.device("cpu")
