"""Large programs' source checks in a process of their own, so that parsing one never stalls the front door.

Parsing and checking a program near the 1 MiB limit takes seconds, mostly in single calls that hold the GIL
(`compile`), and every other RPC of the front door waits meanwhile. A program whose texts reach OFFLOAD_BYTES
is checked here instead: a child process runs program_texts.check_sources and sends back its cached calls
(tether.caching.recording), which the front door keeps (tether.caching.seed), so its own decode_program then
finds them done. Owns that process; imports the standard library, tether.caching, program_texts and tether.v1.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tether.caching import recording, seed
from tether.v1 import program_pb2

from .errors import InvalidProgram, ServerError
from .policy import Policy
from .program_texts import check_sources

__all__ = ["OFFLOAD_BYTES", "SourceChecker", "source_bytes"]

OFFLOAD_BYTES = 64 << 10  # bytes of program text from which the check runs in the checking process
_log = logging.getLogger("tether.server")


def source_bytes(program: program_pb2.Program) -> int:
    """The length of every text a program carries: its body, shipped functions and model edits."""
    return (len(program.source) + sum(len(fn.source) for fn in program.functions)
            + sum(len(edit.source) for edit in program.edits))


class SourceChecker:
    """The front door's checking process, started at the first large program and restarted if it dies."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None  # guarded by _lock
        self._closed = False  # guarded by _lock

    def check(self, program: program_pb2.Program, policy: Policy) -> None:
        """Have a large `program`'s texts checked in the checking process (InvalidProgram as decode_program
        raises it) and keep the results here; a small one is left to decode_program."""
        if source_bytes(program) < OFFLOAD_BYTES:
            return
        pool = self._started()
        try:
            outcome = pool.submit(_checked, program.SerializeToString(), policy).result()
        except BrokenProcessPool:
            self._discard(pool)
            raise ServerError("the server's program checker stopped while it checked this program (it is "
                              "restarted for the next one); send it again, or send less code per job.") from None
        if isinstance(outcome, str):
            raise InvalidProgram(outcome)
        seed(outcome)

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
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("forkserver"))
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        _log.warning("the program checker's process died; starting another for the next large program")
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)


def _checked(program_bytes: bytes, policy: Policy) -> list[tuple[Any, tuple, dict, Any]] | str:
    """In the checking process: the program's checked calls, or why it is refused."""
    with recording() as calls:
        try:
            check_sources(program_pb2.Program.FromString(program_bytes), policy)
        except InvalidProgram as error:
            return str(error)
    return calls
