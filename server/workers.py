"""Model queues and workers: a bounded queue per model, one named thread per replica running one job at a time.

A worker runs the Executor with the job's limits: its time (checked at module boundaries and while waiting
for local() answers), its result size, cancellation, its log lines, and the job's local() handler.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import grpc

from tether.runtime.errors import RunStopped
from tether.runtime.program import execute
from tether.v1 import jobs_pb2
from tether.wire import CHUNK_SIZE

from .errors import JobCancelledError, JobTimeout, OutOfService, QueueFull, ServerError, WeightsChanged
from .failures import failure_of
from .interrupts import Watchdog
from .job_state import JobState
from .jobs import Job
from .local_calls import LocalCaller, LocalLink
from .program_codec import DecodedProgram
from .registry import HostedModel
from .results import encode_result_pieces
from .weights import WeightWatch

__all__ = ["Limits", "JobLimits", "ModelQueue", "JobLog"]

_log = logging.getLogger("tether.server")


@dataclass(frozen=True)
class Limits:
    """The server's limits (the CLI's --queue-size, --job-timeout...); jobs may ask for less, never more."""

    queue_size: int = 16  # jobs waiting per model, not counting running ones
    job_timeout: float = 600.0  # seconds a job may run once RUNNING
    max_result_bytes: int = 1 << 30  # bytes of one serialized JobResult
    result_ttl: float = 600.0  # seconds a finished job's record and result are kept
    local_call_timeout: float = 60.0  # seconds to wait for the answer to one local() call
    chunk_size: int = CHUNK_SIZE  # bytes per result / local-value Chunk

    def replace(self, **changes) -> Limits:
        return dataclasses.replace(self, **changes)


def seconds(duration) -> float:
    """A google.protobuf.Duration in seconds."""
    return duration.seconds + duration.nanos / 1e9


@dataclass(frozen=True)
class JobLimits:
    """One job's limits: the server's, lowered by what its JobSpec asked for."""

    timeout: float
    max_result_bytes: int
    local_call_timeout: float

    @classmethod
    def of(cls, spec: jobs_pb2.JobSpec, limits: Limits) -> JobLimits:
        timeout = seconds(spec.timeout) if spec.HasField("timeout") else 0.0
        local = seconds(spec.local_call_timeout) if spec.HasField("local_call_timeout") else 0.0
        return cls(
            timeout=min(timeout, limits.job_timeout) if timeout > 0 else limits.job_timeout,
            max_result_bytes=min(spec.max_result_bytes, limits.max_result_bytes)
            if spec.max_result_bytes > 0 else limits.max_result_bytes,
            local_call_timeout=local if local > 0 else limits.local_call_timeout,
        )


class JobLog:
    """`print` for a job's program: complete lines become LOG events (a partial line waits for its end or
    for flush=True). Only the job's worker thread calls it."""

    def __init__(self, job: Job):
        self._job = job
        self._partial = ""

    def __call__(self, *args, sep: str | None = " ", end: str | None = "\n", file=None, flush: bool = False) -> None:
        text = self._partial + (" " if sep is None else sep).join(map(str, args)) + ("\n" if end is None else end)
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._job.event(log=jobs_pb2.LogLine(text=line))
        if flush:
            self.flush()

    def flush(self) -> None:
        if self._partial:
            self._job.event(log=jobs_pb2.LogLine(text=self._partial))
            self._partial = ""


@dataclass
class _Entry:
    job: Job
    decoded: DecodedProgram
    limits: JobLimits
    link: LocalLink | None


def _queued_message(waiting: int, running: int) -> str:
    """What a queued job waits for: the jobs running now and those queued ahead of it."""
    ahead = waiting + running
    if not ahead:
        return "waiting for a free worker"
    return f"queued behind {ahead} job{'s' if ahead != 1 else ''} ({running} running, {waiting} waiting)"


class ModelQueue:
    """One model's bounded FIFO of jobs and its worker threads."""

    def __init__(self, hosted: HostedModel, limits: Limits, *, replicas: int = 1):
        self.hosted, self.limits = hosted, limits
        self._cond = threading.Condition()
        self._pending: collections.deque[_Entry] = collections.deque()  # guarded by _cond
        self._closed = False  # guarded by _cond
        self._broken = ""  # guarded by _cond: why the model no longer runs jobs (see WeightWatch)
        self._running: set[Job] = set()  # guarded by _cond
        self._watchdog = Watchdog(f"tether-watchdog-{hosted.name}")  # stops jobs stuck in pure Python
        self._threads = [
            threading.Thread(target=self._work, args=(hosted.replica(i),), name=f"tether-worker-{hosted.name}-{i}",
                             daemon=True)
            for i in range(replicas)
        ]
        for thread in self._threads:
            thread.start()

    # ---- the queue ----------------------------------------------------------------------------
    def submit(self, job: Job, decoded: DecodedProgram, limits: JobLimits, link: LocalLink | None) -> None:
        """Queue `job` (QUEUED with its position); QueueFull when the model's queue has no room."""
        with self._cond:
            if self._broken:
                raise OutOfService(self._out_of_service())
            if self._closed:
                raise QueueFull(f"model {self.hosted.name!r} is shutting down; retry on another server")
            if len(self._pending) >= self.limits.queue_size:
                raise QueueFull(
                    f"model {self.hosted.name!r} has {len(self._pending)} jobs waiting, its queue's limit "
                    f"(--queue-size {self.limits.queue_size}); retry later, or wait for your earlier jobs."
                )
            self._pending.append(_Entry(job, decoded, limits, link))
            position = len(self._pending) - 1
            job.set_state(jobs_pb2.JOB_STATE_QUEUED, _queued_message(position, len(self._running)),
                          queue_position=position + len(self._running))
            self._cond.notify()

    @property
    def serving(self) -> bool:
        """Whether the model runs jobs (ModelInfo.ready)."""
        with self._cond:
            return not (self._closed or self._broken)

    def _out_of_service(self) -> str:
        return (f"model {self.hosted.name!r} is out of service: {self._broken}. The server's operator must "
                "restart `tether serve`; other models on this server still run jobs.")

    def _retire(self, reason: str) -> None:
        """Stop running jobs on this model for good: those waiting fail with the reason, workers end."""
        with self._cond:
            self._broken = reason
            pending, self._pending = list(self._pending), collections.deque()
            self._cond.notify_all()
            message = self._out_of_service()
        for entry in pending:
            failure = failure_of(OutOfService(message), entry.decoded.user_files)
            entry.job.finish(jobs_pb2.JOB_STATE_ERROR, message, failure=failure, code=OutOfService.code,
                             ttl=self.limits.result_ttl)
            entry.decoded.release()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def position(self, job: Job) -> int:
        """Jobs ahead of `job`: those waiting before it and those running (0 once it left the queue)."""
        with self._cond:
            for i, entry in enumerate(self._pending):
                if entry.job is job:
                    return i + len(self._running)
            return 0

    def withdraw(self, job: Job) -> bool:
        """Take a job out of the queue (a cancel before it started); False if it is not waiting."""
        with self._cond:
            for entry in self._pending:
                if entry.job is job:
                    self._pending.remove(entry)
                    entry.decoded.release()
                    return True
            return False

    def status_message(self) -> str:
        """Why the model does not run jobs (empty while it does)."""
        with self._cond:
            return self._out_of_service() if self._broken else "shut down" if self._closed else ""

    def close(self, reason: str = "the server is shutting down") -> int:
        """Stop taking jobs, cancel those waiting and running (with `reason`); workers end after their current
        job. Returns how many jobs were cancelled."""
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), collections.deque()
            running = list(self._running)
            self._cond.notify_all()
        for entry in pending:
            entry.job.request_cancel(reason)
            entry.job.finish(jobs_pb2.JOB_STATE_CANCELLED, reason, code=grpc.StatusCode.CANCELLED,
                             ttl=self.limits.result_ttl)
            entry.decoded.release()
        stopped = sum(job.request_cancel(reason) for job in running)  # (False for one that just ended)
        self._watchdog.close()
        return len(pending) + stopped

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # ---- the workers --------------------------------------------------------------------------
    def _take(self) -> _Entry | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._closed or self._broken)
            if self._closed or self._broken:
                return None
            entry = self._pending.popleft()
            self._running.add(entry.job)
            return entry

    def _work(self, replica) -> None:
        watch = WeightWatch(replica._module, self.hosted.source)
        served = JobState.of(replica._module)
        while (entry := self._take()) is not None:
            try:
                # run() logs RUNNING (or the job's end) right after: watchers wake once for both
                if entry.job.set_state(jobs_pb2.JOB_STATE_DISPATCHED, f"on worker {threading.current_thread().name}",
                                       notify=False):
                    _Run(entry, replica, self.limits, watch, self._watchdog).run()
            finally:
                served.reset()  # no job sees what an earlier one left on the model (.grad, modes)
                entry.decoded.release()
                with self._cond:
                    self._running.discard(entry.job)
            if watch.broken:  # weights a job wrote into could not be put back: serve nothing wrong
                self._retire(watch.broken)


def _weights_changed(watch: WeightWatch, versions: list[int]) -> WeightsChanged | None:
    """The error to report instead of a failed job's own when it had also written into the weights."""
    try:
        watch.check(versions)
    except WeightsChanged as changed:
        _log.warning("%s", changed)
        return changed
    return None


class _Run:
    """One job on one worker: the Executor call with limits, then the job's end state."""

    def __init__(self, entry: _Entry, replica, limits: Limits, watch: WeightWatch, watchdog: Watchdog):
        self.job, self.decoded, self.limits, self.link = entry.job, entry.decoded, entry.limits, entry.link
        self.replica, self.ttl, self.chunk_size = replica, limits.result_ttl, limits.chunk_size
        self.watch = watch  # the replica's parameters, to notice a job that wrote into them
        self.watchdog = watchdog
        self.deadline = 0.0
        self.step = 0  # forward passes of the model so far (generation steps)

    def timed_out(self) -> JobTimeout:
        return JobTimeout(
            f"the job ran longer than its time limit of {self.limits.timeout:g} s and was stopped at a module "
            "boundary. Ask for a longer JobSpec.timeout (the server's --job-timeout caps it), or do less per job."
        )

    def _stop_requested(self) -> bool:
        return self.job.cancel_requested or time.monotonic() > self.deadline

    def _check_stop(self, module, args) -> None:
        """A forward pre-hook on the model's root: stop at the next forward (generation step) when asked,
        else report the step to the client (generation only: "step k/N")."""
        if self._stop_requested():
            raise RunStopped("The job was stopped before this forward pass.")
        if self.decoded.program.kind == "generate":
            self.step += 1
            total = self.decoded.program.kwargs.get("max_new_tokens", 20)
            self.job.event(progress=jobs_pb2.Progress(step=self.step, total_steps=total if isinstance(total, int) else 0))

    def run(self) -> None:
        job, decoded = self.job, self.decoded
        if job.cancel_requested:
            self._end(JobCancelledError(job.cancel_reason or ""))
            return
        self.deadline = time.monotonic() + self.limits.timeout
        if not job.set_state(jobs_pb2.JOB_STATE_RUNNING):
            return
        log = JobLog(job)
        handler = LocalCaller(job, self.link, decoded, deadline=self.deadline,
                              local_timeout=self.limits.local_call_timeout, timed_out=self.timed_out)
        hook = self.replica._module.register_forward_pre_hook(self._check_stop)
        watch = self.watch
        versions = watch.snapshot()
        try:
            root = decoded.bind(self.replica)
            decoded.define_functions(log)
            values = self.watchdog.call(self._stop_requested, lambda: execute(
                root, decoded.program, decoded.bindings, filename=decoded.body_filename, local=handler, log=log,
                cancel=self._stop_requested))
            watch.check(versions)
            values = decoded.with_outside_changes(values, log)
            log.flush()
            result = encode_result_pieces(values, decoded.codec.encode, self.limits.max_result_bytes, log)
            log.flush()
        except BaseException as error:  # the worker survives anything a program does (SystemExit included)
            log.flush()
            if not isinstance(error, WeightsChanged):  # (check() already put the weights back: never twice)
                error = _weights_changed(watch, versions) or error
            self._end(error)
            return
        finally:
            hook.remove()
        job.complete(result, self.chunk_size, self.ttl)

    def _end(self, error: BaseException) -> None:
        job = self.job
        if job.cancel_requested:
            reason = job.cancel_reason or "cancelled by the client"
            job.finish(jobs_pb2.JOB_STATE_CANCELLED, reason, code=grpc.StatusCode.CANCELLED, ttl=self.ttl)
            return
        if isinstance(error, RunStopped) or (time.monotonic() > self.deadline and not isinstance(error, ServerError)):
            error = self.timed_out()  # the time limit stopped it at a module boundary
        code = error.code if isinstance(error, ServerError) else None
        _log.debug("job %s failed", job.id, exc_info=error)  # the full traceback, tether's frames included
        failure = failure_of(error, self.decoded.user_files)
        job.finish(jobs_pb2.JOB_STATE_ERROR, failure.message, failure=failure, code=code, ttl=self.ttl)
