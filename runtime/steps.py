"""Step loops of a generation: `tracer.iter[...]`, `tracer.all()` / `module.all()`, and their `with` spellings.

A step is one call of the model (one generated token); a body's cursor says which call its reads refer to.
Imports the interleaver and contexts; nothing of networks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from .contexts import Context, Iterator
from .errors import NotInTraceError, TetherError
from .mediator import Mediator, current_mediator

__all__ = ["Steps", "StepRange", "AllSteps", "all_steps", "body_mediator"]


def body_mediator(what: str) -> Mediator:
    """The mediator of the body running now, or a clear error naming `what` outside any body."""
    mediator = current_mediator()
    if mediator is None:
        raise NotInTraceError(f"`{what}` only works inside the body of a trace or invoke.")
    return mediator


def _walk(mediator: Mediator, steps: Iterable[int]):
    for step in steps:
        mediator.at(step)
        yield step


class Steps:
    """`tracer.iter[0:3]`, `tracer.iter[:]`, `tracer.iter[[0, 2]]`, `tracer.iter[1]` — a range of steps;
    `tracer.iter(seq)` — a loop block over any sequence."""

    def __init__(self, limit: int, log: Callable[..., None]):
        self._limit, self._log = limit, log

    def __getitem__(self, index: int | slice | list | tuple) -> StepRange:
        mediator = body_mediator("tracer.iter[...]")
        if isinstance(index, slice):
            return StepRange(mediator, range(self._limit)[index], open_ended=index.stop is None)
        if isinstance(index, (list, tuple)):
            if not all(isinstance(i, int) for i in index):
                raise TetherError(f"tracer.iter[{index!r}]: give a list of step numbers, e.g. tracer.iter[[0, 2]].")
            return StepRange(mediator, list(index))
        if isinstance(index, int):
            return StepRange(mediator, [index])
        raise TetherError(f"tracer.iter[{index!r}]: give a step, a slice (tracer.iter[0:3]) or a list of steps.")

    def __call__(self, items, return_context: bool = False) -> Iterator:
        return Iterator(items, return_context=return_context, log=self._log)


class StepRange(Context):
    """Some steps: `for step in tracer.iter[...]:` runs the loop body at each, as does `with tracer.iter[...]:`
    (nnsight's older spelling) for its block. An open range (`[2:]`) goes on after the loop when generation
    ends first."""

    _hands_back = False

    def __init__(self, mediator: Mediator, steps: Iterable[int], *, open_ended: bool = False):
        self._mediator, self._steps, self._open_ended = mediator, steps, open_ended

    def __iter__(self):
        if self._open_ended:
            self._mediator.open_loop_from(sys._getframe(1))
        return _walk(self._mediator, self._steps)

    def __enter__(self) -> StepRange:
        frame = sys._getframe(1)
        if self._open_ended:
            self._mediator.open_loop_from(frame)
        return self._enter_from(frame)

    def _execute(self, ns: dict) -> None:
        code = self._block.code()
        for _ in _walk(self._mediator, self._steps):
            exec(code, ns)


class AllSteps(StepRange):
    """What `tracer.all()` and `module.all()` return: as a statement it turns on every-step mode for the rest
    of the body; iterated (`for step in tracer.all():`) it loops over steps; as `with tracer.all():` it runs its
    block at every step (nnsight 0.8's spelling)."""

    def __init__(self, mediator: Mediator, limit: int):
        mediator.enable_all()
        super().__init__(mediator, range(mediator.iteration, limit), open_ended=True)

    def __iter__(self):
        self._mediator.all_tail = None
        return super().__iter__()

    def __enter__(self) -> AllSteps:
        self._mediator.all_tail = None
        frame = sys._getframe(1)
        self._mediator.open_loop_from(frame)
        return self._enter_from(frame)


def all_steps() -> AllSteps:
    """`tracer.all()` / `module.all()`, called from the body."""
    mediator = body_mediator("all()")
    return AllSteps(mediator, mediator.limit)
