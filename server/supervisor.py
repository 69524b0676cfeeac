"""A replica's supervisor: starts its worker process, relays one job (or one batch of compatible jobs) at a time
over the worker protocol, and
restarts the worker when it dies or has to be killed (a job past its grace after a time limit or cancel, or
over its memory limit: a kill ends every job of its batch). Imports multiprocessing, the job records and the protocol; never runs user code.
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
from typing import Any

import grpc
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions: tensors go as shared memory)

from tether.v1 import failure_pb2, jobs_pb2

from . import worker_protocol as wp
from .errors import (
    JobCancelledError,
    JobMemoryExceeded,
    JobTimeout,
    LocalBlockFailed,
    LocalCallFailed,
    WorkerCrashed,
)
from .failures import failure_of
from .interrupts import GRACE
from .jobs import ResultBytes
from .local_calls import NO_STREAM
from .workers import Entry, ModelQueue

__all__ = ["Replica", "KILL_GRACE", "START_TIMEOUT", "preload_for"]

_log = logging.getLogger("tether.server")
KILL_GRACE = GRACE + 2.0  # seconds a job past its time limit, or cancelled, may run before its worker is killed
START_TIMEOUT = 300.0  # seconds a worker may take to receive its replica and report Ready
TICK = 0.05  # seconds between checks of a running job's time and memory (messages wake the relay at once)
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
    return (model._module, tokenizer) if tokenizer is not None else model._module


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
        self.process: Any = None  # the worker process (None: not started, or a thread worker)
        self.conn: Any = None  # the front door's end of the worker's pipe
        self.restarts = 0  # how often the worker was started again after dying or being killed
        self._ready = threading.Condition()
        self._wake_in, self._wake_out = multiprocessing.Pipe(duplex=False)  # a cancel wakes the relay at once
        self._pid: int | None = None  # guarded by _ready: the pid of the worker that said Ready (None: none now)
        self._thread = threading.Thread(target=self._work, name=f"tether-replica-{self.name}", daemon=True)
        self._thread.start()

    # ---- the worker ---------------------------------------------------------------------------
    def _start(self) -> None:
        """Start the worker and wait for Ready. The weights go as shared memory: a restart maps them again."""
        hosted, limits = self.queue.hosted, self.queue.limits
        with self._ready:
            self._pid = None
        ours, theirs = multiprocessing.Pipe(duplex=True)
        args = (theirs, hosted.name, self._payload, hosted.source, self.policy)
        self.process = None
        if limits.isolate:
            context = _mp_context()
            process = context.Process(target=_process_main, args=(torch.get_num_threads(), *args),
                                      name=f"tether-worker-{self.name}", daemon=True)
            try:
                process.start()
                self.process = process
            except Exception as error:  # the model (or its source) cannot be sent to a process
                _log.warning("model %s runs in the server process, without isolation: %s", hosted.name, error)
        if self.process is None:
            from .worker_main import serve

            threading.Thread(target=serve, args=args, name=f"tether-worker-{self.name}", daemon=True).start()
        if self.process is not None:
            theirs.close()  # the child has its own copy; closing ours lets a dead child read as EOF
        self.conn = ours
        give_up = time.monotonic() + START_TIMEOUT
        try:
            while not ours.poll(TICK * 4):
                if self.queue.closed:
                    raise RuntimeError("the server stopped while the worker started")
                if self.process is not None and not self.process.is_alive():
                    raise RuntimeError(f"its process {self._how_it_ended()} while it started (see the server's log)")
                if time.monotonic() > give_up:
                    raise RuntimeError(f"it did not start within {START_TIMEOUT:g} s")
            ready = ours.recv()
        except BaseException:
            self._kill()
            raise
        assert isinstance(ready, wp.Ready), ready
        _log.debug("the worker of %s (pid %s) is ready after %.2f s", self.name, ready.pid,
                   time.monotonic() - give_up + START_TIMEOUT)
        with self._ready:
            self._pid = ready.pid
            self._ready.notify_all()

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
            return
        try:
            while (entries := self.queue.take()) is not None:
                try:
                    retire = _JobRelay(self, entries).run()
                finally:
                    self.queue.done(entries)
                if retire:
                    self.queue.retire(retire)
                    break
        finally:
            try:
                self.conn.send(wp.Stop())
            except (OSError, ValueError):
                pass
            if self.process is not None:
                self.process.join(2.0)
            self._kill()

    def wake(self) -> None:
        """Have the relay look at its jobs now (a cancel was requested): called from any thread."""
        try:
            self._wake_out.send_bytes(b"!")
        except (OSError, ValueError):
            pass

    def restart(self) -> None:
        """Replace a dead (or killed) worker; its queued jobs then run on the new one."""
        self._kill()
        self.conn.close()
        if self.queue.closed:  # the server is stopping: no new worker
            return
        self.restarts += 1
        started = time.monotonic()
        self._start()
        _log.info("restarted the worker of %s in %.2f s", self.name, time.monotonic() - started)


def _process_main(threads: int, *args) -> None:
    """The worker process: torch's intra-op threads as the server has them (the forkserver's default may
    differ), since a reduction split over another number of threads rounds differently: a job's values must
    equal the same code run where the server was started."""
    torch.set_num_threads(threads)
    from .worker_main import process_main

    process_main(*args)


class _Track:
    """One job of what a replica runs now: its entry, its clock (from its Running), cancel and last line."""

    def __init__(self, entry: Entry):
        self.entry, self.job, self.limits = entry, entry.job, entry.limits
        self.started = time.monotonic()
        self.deadline = self.started + self.limits.timeout
        self.running = False
        self.ended = False
        self.cancel_sent = 0.0  # time.monotonic() when the cancel went to the worker
        self.last_log = ""
        self.program: bytes | wp.Blob = b""

    def message(self) -> wp.RunJob:
        self.program = wp.pack([self.entry.program])  # the worker unlinks it (a Blob) once it reads it
        return wp.RunJob(self.job.id, self.program, self.limits.timeout, self.limits.max_result_bytes,
                         self.entry.link is not None)

    def timed_out(self) -> JobTimeout:
        return JobTimeout(
            f"the job ran longer than its time limit of {self.limits.timeout:g} s and was stopped. Ask for a "
            "longer JobSpec.timeout (the server's --job-timeout caps it), or do less per job."
        )

    def past_grace(self, now: float) -> Exception | None:
        """The error to kill the worker with when this job runs past its grace after its limit or cancel."""
        stop_at = min(self.deadline, self.cancel_sent) if self.cancel_sent else self.deadline
        if now <= stop_at + KILL_GRACE:
            return None
        if self.cancel_sent:
            return JobCancelledError(self.job.cancel_reason or "cancelled by the client")
        return JobTimeout(
            f"the job ran past its time limit of {self.limits.timeout:g} s and did not stop within "
            f"{KILL_GRACE:g} s after it (a loop that swallows interrupts, or one long torch call), so its "
            "worker was stopped and restarted. Ask for a longer JobSpec.timeout, or do less per job."
        )

    def doing(self) -> str:
        if not self.running:
            return "preparing the job (decoding its program)"
        doing = f"running the program ({time.monotonic() - self.started:.1f} s in"
        return doing + (f"; its last printed line: {self.last_log!r})" if self.last_log else ")")


class _JobRelay:
    """What a replica runs now (one job, or a batch of compatible jobs in one RunBatch): sends it, relays what
    the worker says to each job, enforces each job's time (with a grace) and the worker's memory."""

    def __init__(self, replica: Replica, entries: list[Entry]):
        self.replica, self.entries = replica, entries
        self.ttl, self.chunk_size = replica.queue.limits.result_ttl, replica.queue.limits.chunk_size
        self.conn = replica.conn
        self.tracks: dict[str, _Track] = {}  # job id -> its track, for the jobs sent to the worker
        self.retire = ""
        self.baseline = 0
        self.checked = 0.0  # time.monotonic() of the last look at the jobs' clocks and the worker's memory

    def run(self) -> str:
        """Relay the jobs to their ends; returns why the replica must retire ("" normally)."""
        replica = self.replica
        if replica.process is not None and not replica.process.is_alive():  # it died while idle
            _log.warning("the idle worker of %s %s", replica.name, replica._how_it_ended())
            replica.restart()
            self.conn = replica.conn
        pid = replica.process.pid if replica.process is not None else None
        where = f"on worker {replica.name}" + (f" (pid {pid})" if pid else "")
        for entry in self.entries:
            job = entry.job
            if not job.set_state(jobs_pb2.JOB_STATE_DISPATCHED, where, notify=False):
                continue
            if job.cancel_requested:
                job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled by the client",
                           code=grpc.StatusCode.CANCELLED, ttl=self.ttl)
                continue
            self.tracks[job.id] = _Track(entry)
            job.on_cancel = replica.wake
        if not self.tracks:
            return ""
        self.baseline = self.replica.private_memory(pid) if pid else 0
        self.checked = time.monotonic()  # (the baseline is the first look: the next is due a TICK later)
        runs = [track.message() for track in self.tracks.values()]
        try:
            self.conn.send(runs[0] if len(runs) == 1 else wp.RunBatch(tuple(runs)))
            return self._relay(pid)
        except (EOFError, OSError, BrokenPipeError):
            self._ended_with_worker(WorkerCrashed, None)
            return ""

    def _live(self) -> list[_Track]:
        return [track for track in self.tracks.values() if not track.ended]

    def _relay(self, pid: int | None) -> str:
        wake = self.replica._wake_in
        while wake.poll():  # wakes for jobs that have ended since
            wake.recv_bytes()
        waitables = [self.conn, wake] + ([self.replica.process.sentinel] if pid else [])
        while self._live():
            ready = multiprocessing.connection.wait(waitables, TICK)
            if wake in ready:
                while wake.poll():
                    wake.recv_bytes()
                self._forward_cancels()
            if self.conn in ready:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    message = None
                if message is None:
                    self._ended_with_worker(WorkerCrashed, None)
                    return ""
                self._handle(message)
                if not self._live():
                    break
            elif pid and self.replica.process.sentinel in ready and not self.conn.poll():
                self._ended_with_worker(WorkerCrashed, None)
                return ""
            killed = self._check(pid)  # (after messages too: a job that logs all the time is still timed)
            if killed is not None:
                self.replica._kill()
                self._ended_with_worker(*killed)
                return ""
        return self.retire

    def _handle(self, message) -> None:
        """Apply one worker message to its job."""
        track = self.tracks.get(getattr(message, "job_id", ""))
        if track is None or track.ended:
            return
        job = track.job
        if isinstance(message, wp.Running):
            track.running, track.started = True, time.monotonic()
            track.deadline = track.started + track.limits.timeout
            job.set_state(jobs_pb2.JOB_STATE_RUNNING, batch_size=message.batch_size if message.batch_size > 1 else 0)
        elif isinstance(message, wp.Log):
            track.last_log = message.text
            job.event(log=jobs_pb2.LogLine(text=message.text))
        elif isinstance(message, wp.Progress):
            job.event(progress=jobs_pb2.Progress(step=message.step, total_steps=message.total))
        elif isinstance(message, wp.LocalCall):
            self._local(track, message)
        elif isinstance(message, wp.Done):
            track.ended = True
            self.retire = self.retire or message.retire
            if job.cancel_requested:  # cancelled (an evict, a client) while its last step ran: it ends CANCELLED
                wp.discard(message.result)
                job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled by the client",
                           code=grpc.StatusCode.CANCELLED, ttl=self.ttl)
            else:
                job.complete(ResultBytes([wp.unpack(message.result)]), self.chunk_size, self.ttl)
        elif isinstance(message, wp.Failed):
            track.ended = True
            self.retire = self.retire or message.retire
            if message.cancelled or job.cancel_requested:
                job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled by the client",
                           code=grpc.StatusCode.CANCELLED, ttl=self.ttl)
            else:
                failure = failure_pb2.Failure.FromString(message.failure)
                code = grpc.StatusCode[message.code] if message.code else None
                job.finish(jobs_pb2.JOB_STATE_ERROR, failure.message, failure=failure, code=code, ttl=self.ttl)

    def _local(self, track: _Track, call: wp.LocalCall) -> None:
        """A local() call: up the job's RunJob stream, and its answer (or why there is none) back."""
        link = track.entry.link
        try:
            if link is None:
                raise LocalCallFailed(NO_STREAM)
            data = link.call(call.call_id, call.block_id, [wp.unpack(call.payload)], track.deadline,
                             track.limits.local_call_timeout, track.timed_out)
            answer = wp.LocalAnswer(call.call_id, wp.pack([data]))
        except (LocalBlockFailed, LocalCallFailed, JobTimeout, JobCancelledError) as error:
            failure = error.failure.SerializeToString() if isinstance(error, LocalBlockFailed) else b""
            answer = wp.LocalAnswer(call.call_id, error=type(error).__name__, message=str(error), failure=failure)
        self.conn.send(answer)

    def _check(self, pid: int | None) -> tuple[Any, _Track | None] | None:
        """Between messages: forward cancels; (the error, the job that caused it: None for all) to kill the
        worker with, if a job must be stopped."""
        now = time.monotonic()
        live = self._forward_cancels()
        if pid is None or now - self.checked < TICK:
            return None  # (a thread worker cannot be killed: its watchdog stops what it can)
        self.checked = now
        for track in live:
            error = track.past_grace(now)
            if error is not None:
                return error, track
        limit = self.replica.queue.limits.job_memory
        used = self.replica.private_memory(pid) - self.baseline
        if used > limit:
            jobs = "the job" if len(self.tracks) == 1 else f"the batch of {len(self.tracks)} jobs this job ran in"
            return JobMemoryExceeded(
                f"{jobs} allocated {used / 2**20:.0f} MiB, more than the server's per-job memory limit of "
                f"{limit / 2**20:.0f} MiB (--job-memory), so its worker was stopped and restarted. Use smaller "
                "inputs or batches, or save less."
            ), None
        return None

    def _forward_cancels(self) -> list[_Track]:
        """Send the worker a Cancel for each live job asked to stop since; returns the live jobs."""
        live = self._live()
        for track in live:
            job = track.job
            if job.cancel_requested and not track.cancel_sent:
                track.cancel_sent = time.monotonic()
                self.conn.send(wp.Cancel(job.id, job.cancel_reason or "cancelled by the client"))
        return live

    def _crash_message(self, track: _Track, how: str) -> str:
        others = ("other jobs were not affected" if len(self.tracks) == 1 else
                  f"the other jobs of its batch of {len(self.tracks)} ended with it, other jobs were not affected")
        return (f"the worker process running this job crashed ({how}) while {track.doing()}. The server restarted "
                f"the worker; {others}. If the program caused it (a C extension, an enormous allocation...), change "
                "it; otherwise submit the job again.")

    def _ended_with_worker(self, error: Any, culprit: _Track | None) -> None:
        """The worker died or was killed: end every job it still ran, then start the worker again. `error` is
        the exception (or WorkerCrashed, the class: each job gets its own crash message); `culprit` the job
        whose kill it was (the other jobs of its batch end with WorkerCrashed naming it)."""
        self.replica._kill()  # (already dead: reaped, so its exit status is known)
        how = self.replica._how_it_ended() if error is WorkerCrashed else ""
        for track in self._live():
            track.ended = True
            job = track.job
            if not track.running:
                wp.discard(track.program)  # it may have died before reading the program
            if error is WorkerCrashed:
                own: Exception = WorkerCrashed(self._crash_message(track, how))
            elif culprit is not None and track is not culprit:
                own = WorkerCrashed(
                    f"this job shared a batched run with job {culprit.job.id}, which did not stop after its "
                    f"{'cancel' if culprit.cancel_sent else 'time limit'}, so the batch's worker was stopped and "
                    "restarted. Submit this job again.")
            else:
                own = error
            if isinstance(own, JobCancelledError) or (job.cancel_requested and not isinstance(own, JobMemoryExceeded)):
                job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled by the client",
                           code=grpc.StatusCode.CANCELLED, ttl=self.ttl)
            else:
                failure = failure_of(own, {})
                job.finish(jobs_pb2.JOB_STATE_ERROR, failure.message, failure=failure, code=own.code, ttl=self.ttl)
            _log.warning("job %s on %s: %s", job.id, self.replica.name, own)
        try:
            self.replica.restart()
        except Exception as failed:
            self.replica.queue.retire(f"its worker could not be restarted: {failed}")
