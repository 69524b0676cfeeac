"""Model queues: a bounded queue per model, taken from by its replicas' supervisors (supervisor.py), and limits.

Each replica runs in its own worker process (worker_main.py), one job at a time; the queue holds jobs as the
front door checked them (serialized programs), so no user code or model runs here.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass

import grpc

from tether.v1 import jobs_pb2
from tether.wire import CHUNK_SIZE

from .batching import BatchPolicy, Company, Tokens, gather
from .errors import OutOfService, QueueFull
from .failures import failure_of
from .jobs import Job
from .local_calls import LocalLink
from .policy import DEFAULT_POLICY, Policy
from .registry import HostedModel
from .reruns import Sent

__all__ = ["Limits", "JobLimits", "ModelQueue", "Entry", "default_job_memory", "stop_job"]

_log = logging.getLogger("tether.server")


def default_job_memory() -> int:
    """Bytes a job may allocate by default: half this machine's memory, at most 8 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return min(8 << 30, total // 2)


@dataclass(frozen=True)
class Limits:
    """The server's limits (the CLI's --queue-size, --job-timeout...); jobs may ask for less, never more."""

    queue_size: int = 16  # jobs waiting per model, not counting running ones
    job_timeout: float = 600.0  # seconds a job may run once RUNNING
    max_result_bytes: int = 1 << 30  # bytes of one serialized JobResult
    result_ttl: float = 600.0  # seconds a finished job's record and result are kept
    local_call_timeout: float = 60.0  # seconds to wait for the answer to one local() call
    chunk_size: int = CHUNK_SIZE  # bytes per result / local-value Chunk
    max_program_bytes: int = 1 << 20  # bytes of program text in one job (body and shipped functions)
    max_value_depth: int = 32  # lists / tuples / dicts nested in one value of a program
    max_values: int = 100_000  # values in one program (each element of a container counts; a tensor is one)
    job_memory: int = dataclasses.field(default_factory=default_job_memory)  # bytes a job may allocate
    isolate: bool = True  # each replica in its own worker process (False: a thread, for models that cannot move)
    max_batch: int = 16  # jobs one batched run may take (1: every job runs alone), see batching.py
    batch_wait: float = 0.005  # seconds a supervisor waits for more compatible jobs once it took one
    batch_tokens: int = 8192  # rows x positions one batched run may take
    batch_local_wait: float = 1.0  # seconds a batched job's local() blocks may keep its batch waiting, in all
    ray: str = ""  # a Ray cluster's address (auto, host:port, local): each replica's worker is an actor there
    ray_namespace: str = "tether"  # front doors on one cluster with the same namespace share models and jobs
    ray_lanes: bool = True  # a job's messages over sockets between the cluster's processes (lanes.py), not Ray calls

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


@dataclass
class Entry:
    """A queued job: its record, its serialized (checked) Program, its limits and its RunJob streams; which
    jobs it may share a batched run with (`batch_key`, None: it runs alone) and what it adds to one (`tokens`)."""

    job: Job
    program: bytes
    limits: JobLimits
    link: LocalLink | None
    batch_key: tuple | None = None
    tokens: int | Tokens = 0
    rerun: Sent | None = None  # a job of a batch queued again to run alone: what its client got already
    requeued: bool = False  # this entry was queued again (as a new Entry): its job is still running


def _queued_message(waiting: int, running: int) -> str:
    """What a queued job waits for: the jobs running now and those queued ahead of it."""
    ahead = waiting + running
    if not ahead:
        return "waiting for a free worker"
    return f"queued behind {ahead} job{'s' if ahead != 1 else ''} ({running} running, {waiting} waiting)"


class ModelQueue:
    """One model's bounded FIFO of jobs and its replicas (each a worker process and its supervisor)."""

    def __init__(self, hosted: HostedModel, limits: Limits, *, replicas: int = 1, policy: Policy = DEFAULT_POLICY):
        self.hosted, self.limits = hosted, limits
        self._cond = threading.Condition()
        self._pending: collections.deque[Entry] = collections.deque()  # guarded by _cond
        self._closed = False  # guarded by _cond
        self._broken = ""  # guarded by _cond: why the model no longer runs jobs (see WeightWatch)
        self._running: set[Job] = set()  # guarded by _cond
        self._batching = BatchPolicy(limits.max_batch, limits.batch_wait, limits.batch_tokens)
        self._company = Company()  # guarded by _cond
        from .supervisor import Replica  # (supervisor imports this module)

        if limits.ray:
            from .ray_workers import RayReplica as Replica
        self._replicas = [Replica(self, i, policy) for i in range(replicas)]

    # ---- the queue ----------------------------------------------------------------------------
    def submit(self, job: Job, program: bytes, limits: JobLimits, link: LocalLink | None,
               batch: tuple[tuple | None, int] = (None, 0)) -> None:
        """Queue `job` (QUEUED with its position); QueueFull when the model's queue has no room. `batch`: its
        batch key and tokens (batching.batch_info)."""
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
            self._pending.append(Entry(job, program, limits, link, *batch))
            position = len(self._pending) - 1
            job.set_state(jobs_pb2.JOB_STATE_QUEUED, _queued_message(position, len(self._running)),
                          queue_position=position + len(self._running))
            if len(self._replicas) > 1:  # a replica gathering a batch must hear of it, not only an idle one
                self._cond.notify_all()
            else:
                self._cond.notify()

    @property
    def closed(self) -> bool:
        """Whether the server is stopping (supervisors stop starting workers)."""
        with self._cond:
            return self._closed

    @property
    def serving(self) -> bool:
        """Whether the model runs jobs (ModelInfo.ready)."""
        with self._cond:
            return not (self._closed or self._broken)

    def _out_of_service(self) -> str:
        return (f"model {self.hosted.name!r} is out of service: {self._broken}. The server's operator must "
                "restart `tether serve`; other models on this server still run jobs.")

    def retire(self, reason: str) -> None:
        """Stop running jobs on this model for good: those waiting fail with the reason, workers end."""
        with self._cond:
            self._broken = reason
            pending, self._pending = list(self._pending), collections.deque()
            self._cond.notify_all()
            message = self._out_of_service()
        for entry in pending:
            failure = failure_of(OutOfService(message), {})
            entry.job.finish(jobs_pb2.JOB_STATE_ERROR, message, failure=failure, code=OutOfService.code,
                             ttl=self.limits.result_ttl)

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
                    if entry.rerun is not None:  # (a job queued again counts as running until it ends)
                        self._running.discard(job)
                    return True
            return False

    def status_message(self) -> str:
        """Why the model does not run jobs (empty while it does)."""
        with self._cond:
            return self._out_of_service() if self._broken else "shut down" if self._closed else ""

    def close(self, reason: str = "the server is shutting down") -> int:
        """Stop taking jobs, cancel those waiting and running (with `reason`); workers end after their current
        job (or are killed once it is past the grace for stopping). Returns how many jobs were cancelled."""
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), collections.deque()
            running = list(self._running)
            self._cond.notify_all()
        for entry in pending:
            entry.job.request_cancel(reason)
            entry.job.finish(jobs_pb2.JOB_STATE_CANCELLED, reason, code=grpc.StatusCode.CANCELLED,
                             ttl=self.limits.result_ttl)
        return len(pending) + sum(job.request_cancel(reason) for job in running)  # (False: one that just ended)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for replica in self._replicas:
            replica.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def replicas(self) -> list:
        """The replicas' supervisors (supervisor.Replica): their worker processes, for operators and tests."""
        return list(self._replicas)

    # ---- for the replicas' supervisors ----------------------------------------------------------
    def take(self) -> list[Entry] | None:
        """The next job for a replica, with the compatible ones waiting that may share its batched run
        (batching.gather; blocks); None once the queue is closed or the model retired."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._closed or self._broken)
            if self._closed or self._broken:
                return None
            entry = self._pending.popleft()
            self._running.add(entry.job)
            return gather(entry, self._pending, self._cond, self._batching,
                          lambda taken: self._running.add(taken.job), self._company.expected())

    def done(self, entries: list[Entry], seconds: float) -> None:
        """The run of `entries` (taken by `take`) ended after `seconds`."""
        with self._cond:
            self._company.ran(len(entries), seconds, len(self._pending), self._batching.wait)
            self._running.difference_update(entry.job for entry in entries if not entry.requeued)

    def requeue(self, entry: Entry, sent: Sent) -> bool:
        """Queue a running job of a batch again, first, to run alone (reruns.py); False once the queue is closed.
        Its job stays RUNNING (and counted as running) until its re-run ends."""
        with self._cond:
            if self._closed or self._broken:
                return False
            entry.requeued = True
            self._pending.appendleft(dataclasses.replace(entry, batch_key=None, tokens=0, rerun=sent, requeued=False))
            self._cond.notify()
            return True



def stop_job(job: Job, queue: ModelQueue | None, reason: str) -> bool:
    """Ask `job` to stop: one still in `queue` ends CANCELLED at once, a running one at its next module boundary.
    False if it had ended already."""
    asked = job.request_cancel(reason)
    if asked and queue is not None and queue.withdraw(job):
        job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or reason, code=grpc.StatusCode.CANCELLED,
                   ttl=queue.limits.result_ttl)
    return asked
