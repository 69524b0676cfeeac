"""Large programs' source checks in a process of their own, so that parsing one never stalls the front door.

Parsing and checking a program near the 1 MiB limit takes seconds, mostly in single calls that hold the GIL
(`compile`), and every other RPC of the front door waits meanwhile. A program whose texts reach OFFLOAD_BYTES
is checked here instead: a child process runs program_texts.check_sources and sends back its cached calls
(tether.caching.recording), which the front door keeps (tether.caching.seed), so its own decode_program then
finds them done. Owns that process; imports the standard library, grpc's status codes, tether.caching,
program_texts and tether.v1.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import grpc

from tether.caching import recording, seed
from tether.v1 import program_pb2

from .errors import InvalidProgram, ServerError
from .limits import program_sources
from .policy import Policy
from .program_texts import check_sources

__all__ = ["MAX_WAITING", "OFFLOAD_BYTES", "SourceChecker"]

OFFLOAD_BYTES = 64 << 10  # bytes of program text from which the check runs in the checking process
MAX_WAITING = 8  # large programs being checked or waiting for it; past that, RESOURCE_EXHAUSTED
DOOR_CHECK_S = 1.0  # s: how often the checking process looks whether its front door still runs
_log = logging.getLogger("tether.server")


class SourceChecker:
    """The front door's checking process, started at the first large program and restarted if it dies."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting = threading.BoundedSemaphore(MAX_WAITING)  # large programs in or waiting for the checker
        self._pool: ProcessPoolExecutor | None = None  # guarded by _lock
        self._closed = False  # guarded by _lock

    def check(self, program: program_pb2.Program, policy: Policy) -> None:
        """Have a large `program`'s texts checked in the checking process (InvalidProgram as decode_program
        raises it) and keep the results here; a small one is left to decode_program."""
        if sum(len(source) for _, source, _, _ in program_sources(program)) < OFFLOAD_BYTES:
            return
        if not self._waiting.acquire(blocking=False):
            raise ServerError(f"the server is already checking {MAX_WAITING} large programs; send this one again "
                              "shortly, or send less code per job.", code=grpc.StatusCode.RESOURCE_EXHAUSTED)
        pool = self._started()
        try:
            outcome = pool.submit(_checked, program.SerializeToString(), policy).result()
        except BrokenProcessPool:
            self._discard(pool)
            raise ServerError("the server's program checker stopped while it checked this program (it is "
                              "restarted for the next one); send it again, or send less code per job.") from None
        finally:
            self._waiting.release()
        if isinstance(outcome, str):
            raise InvalidProgram(outcome)
        # (keyed by this process's own policy: the child's unpickled copy would stay in every key)
        seed([(fn, tuple(policy if isinstance(a, Policy) else a for a in args), kwargs, value)
              for fn, args, kwargs, value in outcome])

    def close(self) -> None:
        with self._lock:
            self._closed, pool, self._pool = True, self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise ServerError("the server is stopping")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("forkserver"),
                                                 initializer=_end_with_door, initargs=(os.getpid(),))
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        _log.warning("the program checker's process died; starting another for the next large program")
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)


def _end_with_door(door: int) -> None:
    """In the checking process: end once the front door `door` (a pid) is gone. Its parent is the forkserver,
    and its end of the task queue stays open in itself, so nothing else would tell it (a door killed outright)."""

    def watch() -> None:
        while True:
            time.sleep(DOOR_CHECK_S)
            try:
                os.kill(door, 0)
            except (ProcessLookupError, PermissionError):  # (PermissionError: its pid reused by another user's)
                os._exit(0)

    threading.Thread(target=watch, name="tether-checker-door", daemon=True).start()


def _checked(program_bytes: bytes, policy: Policy) -> list[tuple[Any, tuple, dict, Any]] | str:
    """In the checking process: the program's checked calls, or why it is refused."""
    with recording() as calls:
        try:
            check_sources(program_pb2.Program.FromString(program_bytes), policy)
        except InvalidProgram as error:
            return str(error)
    return calls
