"""`tracer.barrier(n)`: a meeting point for n invoke bodies; the last to arrive releases them all.

The interleaver holds the bodies that wait at one (see Interleaver._drive). Imports the interleaver only.
"""

from __future__ import annotations

from .errors import NotInTraceError
from .mediator import Request, current_mediator

__all__ = ["Barrier"]


class Barrier:
    """Call it from each of `n` invoke bodies: everything above the call has run in every body before any of
    them goes on (e.g. one invoke takes a value the other then writes)."""

    def __init__(self, n: int):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"tracer.barrier(n) needs a positive number of invokes, got {n!r}.")
        self.n = n
        self.waiting: list = []  # mediators that called it and wait (emptied when released)

    def __call__(self) -> None:
        mediator = current_mediator()
        if mediator is None:
            raise NotInTraceError("`barrier()` only works inside the body of an invoke.")
        mediator.request(Request(self, "control", mediator.iteration, "barrier", path="tracer.barrier"))
