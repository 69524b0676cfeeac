"""Stops a job stuck in pure Python (`while True: pass`), which has no module boundary to stop at.

Cancellation and the time limit normally stop a job at its next module boundary. When a running job is
past its deadline, or was cancelled, and is still running GRACE seconds later, the watchdog raises
`Interrupted` in its worker thread (CPython's PyThreadState_SetAsyncExc: it lands at the thread's next
Python instruction). `Interrupted` is a BaseException, so a program's `except Exception:` cannot keep
the job alive; the worker then ends the job as cancelled or timed out, and takes the next one.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Interrupted", "Interruptible", "Watchdog", "GRACE"]

GRACE = 1.0  # seconds a cancelled or overdue job gets to stop at a module boundary before it is interrupted


def _raise_in(thread: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(Interrupted))


class Interrupted(BaseException):
    """Raised in a worker thread whose job had to be stopped outside any module boundary."""


class Interruptible:
    """One job's run on a worker thread: the part of it the watchdog may interrupt, at most once.

    `should_stop()` says whether the job is over its time or cancelled (the worker's own check). The
    interrupt is raised only while `call` runs, and a pending one lands at the thread's next instruction,
    so at the latest in `call`'s own `finally`, before it takes the guard. (It is never "cleared": in
    CPython 3.11 clearing one leaves every thread's eval loop flagged for good.)
    """

    def __init__(self, should_stop: Callable[[], bool]):
        self._should_stop = should_stop
        self._guard = threading.Lock()
        self._thread: int | None = None  # the worker thread, while `call` runs
        self._since: float | None = None  # when should_stop() was first seen true
        self.interrupted = False

    def call(self, fn: Callable[[], Any]) -> Any:
        with self._guard:
            self._thread = threading.get_ident()
        try:
            return fn()
        finally:
            with self._guard:
                self._thread = None

    def check(self, now: float) -> None:
        """Interrupt the run if it should have stopped GRACE seconds ago."""
        with self._guard:
            if self._thread is None or self.interrupted:
                return
            if not self._should_stop():
                self._since = None
            elif self._since is None:
                self._since = now
            elif now - self._since >= GRACE:
                self.interrupted = True
                _raise_in(self._thread)


class Watchdog:
    """One thread that checks the running jobs of a model's workers a few times a second.

    It polls rather than being woken at each job's start, so a short job never shares the GIL with it."""

    def __init__(self, name: str):
        self._cond = threading.Condition()
        self._runs: set[Interruptible] = set()  # guarded by _cond
        self._closed = False  # guarded by _cond
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)
        self._thread.start()

    def call(self, should_stop: Callable[[], bool], fn: Callable[[], Any]) -> Any:
        """Run `fn` in this thread, interruptible once `should_stop()` has held for GRACE seconds."""
        run = Interruptible(should_stop)
        with self._cond:
            self._runs.add(run)
        try:
            return run.call(fn)
        finally:
            with self._cond:
                self._runs.discard(run)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for run in list(self._runs):
                    run.check(now)
                self._cond.wait(GRACE / 4)
