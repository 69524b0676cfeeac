"""A replica's supervisor: starts its worker process (forkserver, weights from shared_weights.py), hands it one
job or one batch of compatible jobs at a time (job_relay.py relays it), and restarts the worker when it dies or
has to be killed. Imports multiprocessing, the job records and the protocol; never runs user code.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions: CUDA tensors go as IPC handles)

from tether.runtime.envoy import module_of
from tether.runtime.numerics import warm_vector_math

from . import worker_protocol as wp
from .job_relay import KILL_GRACE, TICK, JobRelay
from .result_areas import DoorAreas
from .shared_weights import pack
from .workers import ModelQueue

__all__ = ["Replica", "KILL_GRACE", "START_TIMEOUT", "preload_for"]

_log = logging.getLogger("tether.server")
START_TIMEOUT = 300.0  # seconds a worker may take to receive its replica and report Ready
_context_lock = threading.Lock()
_preload = {"tether.server.worker_main"}  # guarded by _context_lock: what the forkserver imports once
_context: Any = None  # guarded by _context_lock: the 'forkserver' multiprocessing context, made once


def preload_for(models: list[Any]) -> None:
    """Have the forkserver (started once, by the first worker) import what unpickling these models needs
    (torch, transformers...) and tether's worker, so each worker process forks warm."""
    with _context_lock:
        for payload in models:
            _preload.update(_class_modules(payload))


def _mp_context():
    """The 'forkserver' context: workers fork from a clean single-threaded server process, never from this
    threaded gRPC process."""
    global _context
    with _context_lock:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            main = getattr(sys.modules.get("__main__"), "__spec__", None)
            if main is not None and main.parent:  # `python -m pkg.mod`: each worker imports pkg.mod again
                _preload.add(main.parent)
            _context.set_forkserver_preload(sorted(_preload))
        return _context


def _class_modules(payload: Any) -> set[str]:
    """Modules that unpickling `payload` (a module, or (module, tokenizer)) imports."""
    module, tokenizer = payload if isinstance(payload, tuple) else (payload, None)
    names = {type(m).__module__ for m in module.modules()}
    if tokenizer is not None:
        names.add(type(tokenizer).__module__)
    return {n for n in names if n != "__main__" and not n.startswith("__mp_main__")}


def payload_of(model: Any) -> Any:
    """What a worker receives of a replica (an NNsight): its torch module, with its tokenizer if it has one."""
    tokenizer = getattr(model, "tokenizer", None)
    module = module_of(model)
    return (module, tokenizer) if tokenizer is not None else module


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _anon_rss(pid: int) -> int:
    """Bytes of private (anonymous) memory the process has: what a job allocates, not the shared weights.

    /proc/PID/statm's resident minus shared pages is status's RssAnon (shared = file + shmem pages), ~5x
    cheaper to read than status (read before every job)."""
    try:
        fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
        try:
            fields = os.read(fd, 256).split()
        finally:
            os.close(fd)
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class Replica:
    """One model replica: its worker (a process, or a thread where the model cannot move) and the named thread
    that relays its jobs. Fields are touched only by that thread, except `process` (read by tests, operators)."""

    def __init__(self, queue: ModelQueue, index: int, policy):
        self.queue, self.index, self.policy = queue, index, policy
        hosted = queue.hosted
        self._payload = payload_of(hosted.replica(index))
        self.name = f"{hosted.name}-{index}"
        # what a worker process receives of the replica, packed here, before any thread: the next replica's
        # deep copy (or the caller's own use of the module once start_server returned) never reads a storage
        # while it moves; or why the model cannot be sent to a process
        self._sent: Any = None
        self._unsendable = ""
        if queue.limits.isolate and not queue.limits.ray:
            try:
                self._sent = self._pack()
            except Exception as error:
                self._unsendable = f"{type(error).__name__}: {error}"
        self.process: Any = None  # the worker process (None: not started, or a thread worker)
        self.conn: Any = None  # the front door's end of the worker's pipe
        self.direct: wp.DirectPipe | None = None  # the front door's end of its direct pipe (None: all goes on conn)
        self.areas = DoorAreas()  # the result areas of the worker process (a new one with each start)
        self.restarts = 0  # how often the worker was started again after dying or being killed
        self._ready = threading.Condition()
        self._wake_in, self._wake_out = multiprocessing.Pipe(duplex=False)  # a cancel wakes the relay at once
        self._pid: int | None = None  # guarded by _ready: the pid of the worker that said Ready (None: none now)
        self._thread = threading.Thread(target=self._work, name=f"tether-replica-{self.name}", daemon=True)
        self._thread.start()

    # ---- the worker ---------------------------------------------------------------------------
    def _start(self) -> None:
        """Start the worker and wait for Ready. The weights go as one sealed memfd: a restart maps them again."""
        hosted, limits = self.queue.hosted, self.queue.limits
        with self._ready:
            self._pid = None
        ours, theirs = multiprocessing.Pipe(duplex=True)
        direct_in, direct_out = multiprocessing.Pipe(duplex=False)
        args = (theirs, hosted.name, self._payload, hosted.source, self.policy, direct_in)
        self.process = None
        if limits.isolate:
            unsendable = self._unsendable
            if not unsendable:
                process = _mp_context().Process(
                    target=_process_main, args=(torch.get_num_threads(), theirs, hosted.name, self._sent,
                                                hosted.source, self.policy, direct_in),
                    name=f"tether-worker-{self.name}", daemon=True)
                try:
                    process.start()
                    self.process = process
                    self.areas = DoorAreas(process.pid)
                except Exception as error:  # its source (or policy) cannot be sent to a process
                    unsendable = f"{type(error).__name__}: {error}"
            if unsendable:
                _log.warning("model %s runs in the server process, WITHOUT ISOLATION (a job that crashes or "
                             "wedges it stops the whole server): it cannot be sent to a worker process: %s",
                             hosted.name, unsendable)
        if self.process is None:
            from .worker_main import serve

            threading.Thread(target=_serve_in_thread, args=(serve, args), name=f"tether-worker-{self.name}",
                             daemon=True).start()
        if self.process is not None:
            theirs.close()  # the child has its own copy; closing ours lets a dead child read as EOF
            direct_in.close()
        self.conn, self.direct = wp.plain_pickle(ours), wp.DirectPipe(direct_out)
        give_up = time.monotonic() + START_TIMEOUT
        try:
            while not ours.poll(TICK * 4):
                if self.queue.closed:
                    raise RuntimeError("the server stopped while the worker started")
                if self.process is not None and not self.process.is_alive():
                    raise RuntimeError(self._died_starting())
                if time.monotonic() > give_up:
                    raise RuntimeError(f"it did not start within {START_TIMEOUT:g} s")
            try:
                ready = ours.recv()
            except EOFError:  # the process ended between the poll and the read
                raise RuntimeError(self._died_starting()) from None
        except BaseException:
            self._kill()
            raise
        assert isinstance(ready, wp.Ready), ready
        _log.debug("the worker of %s (pid %s) is ready after %.2f s", self.name, ready.pid,
                   time.monotonic() - give_up + START_TIMEOUT)
        with self._ready:
            self._pid = ready.pid
            self._ready.notify_all()

    def _pack(self) -> Any:
        """The replica's weights packed into one sealed memfd (one file descriptor whatever the tensor count;
        every start maps the same pages), the rest pickled at each start; raises if it cannot be pickled."""
        started = time.monotonic()
        packed = pack(self._payload, self.name)
        if packed is None:  # no CPU tensors (a model on a GPU: its tensors go as torch's IPC handles)
            return self._payload
        _log.debug("the weights of %s: %.0f MiB in one memfd (%.2f s)", self.name, packed.size / 2**20,
                   time.monotonic() - started)
        return packed

    def worker_pid(self, timeout: float | None = None) -> int | None:
        """The pid of the worker once it is ready (waits up to `timeout`; None if none is ready by then)."""
        with self._ready:
            self._ready.wait_for(lambda: self._pid is not None, timeout)
            return self._pid

    def _kill(self) -> None:
        with self._ready:
            self._pid = None
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        if self.process is not None:
            self.process.join(5.0)
            self.areas.close()  # (the files of a result it was writing as it died)

    def _died_starting(self) -> str:
        """Why the worker is gone before Ready; a script that starts the server unguarded is the usual cause."""
        why = f"its process {self._how_it_ended()} while it started (its error is in the server's log)"
        main = sys.modules.get("__main__")
        if getattr(main, "__file__", None) and getattr(main, "__spec__", None) is None:
            why += (f". A server started from a script must be started under `if __name__ == \"__main__\":` in "
                    f"{main.__file__}: each worker process imports that script first, as Python's "
                    "multiprocessing does, and would otherwise run it again")
        return why

    def _how_it_ended(self) -> str:
        if self.process is None:
            return "its thread stopped"
        self.process.join(1.0)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def private_memory(self, pid: int) -> int:
        """Bytes of private memory the worker has (what its job allocated; the memory limit is checked on it)."""
        return _anon_rss(pid)

    def join(self, timeout: float | None) -> None:
        """Wait for the relay thread (it ends once the queue is closed); kill a worker still running after."""
        self._thread.join(timeout)
        self._kill()

    # ---- the relay ----------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._start()
        except Exception as error:
            if not self.queue.closed:
                _log.error("cannot start the worker of %s: %s", self.name, error)
                self.queue.retire(f"its worker could not start: {error}")
            self._kill()
            self._hang_up()
            return
        try:
            idle = time.monotonic()
            while (entries := self.queue.take()) is not None:
                taken = time.monotonic()
                try:
                    retire = JobRelay(self, entries).run()
                finally:
                    ended = time.monotonic()
                    self.queue.done(entries, ended - taken)
                    _log_run(self.name, len(entries), taken - idle, ended - taken)
                    idle = ended
                if retire:
                    self.queue.retire(retire)
                    break
        finally:
            try:
                self.conn.send(wp.Stop())
            except (OSError, ValueError):
                pass
            if self.direct is not None:
                self.direct.send(wp.Stop())  # (the job thread waits for its next job there)
            if self.process is not None:
                self.process.join(2.0)
            self._kill()
            self._hang_up()

    def _hang_up(self) -> None:
        """Close the front door's ends of the worker's pipes (the worker is gone, or stopping)."""
        if self.conn is not None:
            self.conn.close()
        if self.direct is not None:
            self.direct.close()

    def wake(self) -> None:
        """Have the relay look at its jobs now (a cancel was requested): called from any thread."""
        try:
            self._wake_out.send_bytes(b"!")
        except (OSError, ValueError):
            pass

    def restart(self) -> None:
        """Replace a dead (or killed) worker; its queued jobs then run on the new one."""
        self._kill()
        self._hang_up()
        if self.queue.closed:  # the server is stopping: no new worker
            return
        self.restarts += 1
        started = time.monotonic()
        self._start()
        _log.info("restarted the worker of %s in %.2f s", self.name, time.monotonic() - started)


def _serve_in_thread(serve: Callable[..., None], args: tuple) -> None:
    """A worker kept in the server process: its end of the direct pipe (args[-1], read by this thread only) is
    closed once it ends, as a worker process's is with the process. Its end of the main pipe (args[0]) is not:
    its inbox thread may still be about to read it, and a descriptor closed under a reader can be reused by
    another file before that read (it is closed when the Connection is collected)."""
    try:
        serve(*args)
    finally:
        args[-1].close()


def _process_main(threads: int, *args) -> None:
    """The worker process: torch's intra-op threads as the server has them (the forkserver's default may
    differ), since a reduction split over another number of threads rounds differently: a job's values must
    equal the same code run where the server was started; and torch's vector math set up before any job."""
    torch.set_num_threads(threads)
    warm_vector_math()  # (runtime/numerics.py says why)
    from .worker_main import process_main

    process_main(*args)


def _log_run(name: str, size: int, waited: float, seconds: float) -> None:
    """A debug line per run: how long the replica waited for it and ran it (what batching tuning reads)."""
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("%s ran %d job%s in %.3f s, %.1f ms after its previous run", name, size, "s" if size != 1 else "",
                   seconds, waited * 1000)
