"""Job records and their lifecycle: states, the append-only event log, results and their retention.

RECEIVED -> QUEUED -> DISPATCHED -> RUNNING -> COMPLETED | ERROR | CANCELLED. Watchers wait on each
job's condition variable (never polling); sequences start at 1 and increase by 1 per event.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial

import grpc
from google.protobuf import timestamp_pb2

from tether.framing import as_more_events
from tether.protocol import TERMINAL, state_name
from tether.sizes import format_bytes
from tether.v1 import failure_pb2, jobs_pb2

from .errors import NotFound, ServerError
from .result_bytes import Frame, ResultBytes, ResultChunk

__all__ = ["Job", "JobStore", "TERMINAL", "state_name", "new_job_id", "unknown_job"]

_log = logging.getLogger("tether.server")
_ORDER = {
    jobs_pb2.JOB_STATE_RECEIVED: 1,
    jobs_pb2.JOB_STATE_QUEUED: 2,
    jobs_pb2.JOB_STATE_DISPATCHED: 3,
    jobs_pb2.JOB_STATE_RUNNING: 4,
}


BATCH_BYTES = 1 << 20  # an event stream message holds at most about this much payload (see wait_frames)
SMALL_EVENT = 64 << 10  # events smaller than this may ride along with a full message
STATUS_LINGER = 0.05  # s: a status change (or progress step) waits this long for the next event, to share its message
_LINGERING = ("status", "progress")  # the events that may wait for a later one (wait_frames' linger)


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def unknown_job(job_id: str) -> NotFound:
    """The error for a job id that no record answers to (or that belongs to another API key)."""
    return NotFound(
        f"no job {job_id!r}: it never existed here, belongs to another API key, or ended long "
        "enough ago that its record and result were discarded (see the server's --result-ttl)."
    )


def _now() -> timestamp_pb2.Timestamp:
    ns = time.time_ns()  # (GetCurrentTime goes through datetime: ~5x slower)
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


class Job:
    """One job. Every mutable field is guarded by `cond`; waiters use `cond` to hear of new events."""

    def __init__(self, owner: str, model: str, kind: int, request_id: str = "", job_id: str = ""):
        self.id = job_id or new_job_id()
        self.owner, self.model, self.kind, self.request_id = owner, model, kind, request_id
        self.create_time = _now()
        self.lock = threading.RLock()  # guards every mutable field; `cond` and the LocalLink's condition wait on it
        self.cond = threading.Condition(self.lock)  # woken by events while someone reads them, and by the end
        self._readers = 0  # guarded by cond: threads waiting in wait_events / wait_frames (see set_state)
        self._unwoken = 0.0  # guarded by cond: time.monotonic() of the first event not notified yet (0: none)
        self.status = jobs_pb2.JobStatus()  # guarded by cond: the latest status
        self.update_time = self.create_time  # guarded by cond
        self.result: ResultBytes | None = None  # guarded by cond: the serialized JobResult once COMPLETED
        self.failure_code: grpc.StatusCode | None = None  # guarded by cond: how ERROR/CANCELLED is reported
        self.cancel_reason: str | None = None  # guarded by cond: set once a cancel was requested
        self.expire_at: float | None = None  # guarded by cond: time.monotonic() when the record is dropped
        self.expire_time: timestamp_pb2.Timestamp | None = None  # guarded by cond: the same, as wall time
        # guarded by cond; index = sequence - 1. Entries are never changed once appended (forget_payload
        # replaces them), so readers may serialize them outside the lock.
        # Events are kept inside their RunJobResponse (the same bytes as a WatchJobResponse): serialized once
        # per send, with no copy into a response message.
        self._events: list[jobs_pb2.RunJobResponse | ResultChunk] = []
        self._local_calls: dict[str, list[int]] = {}  # guarded by cond: call_id -> indexes of its events
        self.link = None  # set once, before the job is queued: its LocalLink (RunJob jobs only)
        self.on_end: Callable[[Job], None] | None = None  # set once by JobStore.add: learns the expiry time
        self.on_cancel: Callable[[], None] | None = None  # set by the supervisor running it: wakes its relay
        self.state_times: dict[int, float] = {}  # guarded by cond: state -> time.monotonic() it was entered
        self.set_state(jobs_pb2.JOB_STATE_RECEIVED, "the server accepted and checked the program")

    # ---- writing ------------------------------------------------------------------------------
    @property
    def state(self) -> int:
        return self.status.state

    @property
    def done(self) -> bool:
        return self.status.state in TERMINAL

    def event(self, *, notify: bool = True, **fields) -> int:
        """Append an event (status=, log=, local_call=); returns its sequence. notify=False leaves waking the
        watchers to the next event (one that follows at once), so they take both in one pass."""
        with self.cond:
            response = self._response(len(self._events) + 1)
            for name, value in fields.items():
                getattr(response.event, name).CopyFrom(value)
            return self._append(response, notify)

    def local_call(self, call_id: str, block_id: str, offset: int, data: bytes, total: int) -> int:
        """Append a local_call event carrying one chunk of the call's values (built in place: one copy)."""
        with self.cond:
            response = self._response(len(self._events) + 1)
            call = response.event.local_call
            call.call_id, call.block_id = call_id, block_id
            call.values.offset, call.values.data, call.values.total_size = offset, data, total
            return self._append(response, True)

    def _response(self, sequence: int, stamp: timestamp_pb2.Timestamp | None = None) -> jobs_pb2.RunJobResponse:
        response = jobs_pb2.RunJobResponse()
        event = response.event
        event.job_id, event.sequence = self.id, sequence
        if stamp is None:
            ns = time.time_ns()
            event.time.seconds, event.time.nanos = ns // 1_000_000_000, ns % 1_000_000_000
        else:
            event.time.CopyFrom(stamp)
        return response

    def _append(self, response: jobs_pb2.RunJobResponse, notify: bool) -> int:
        if response.event.WhichOneof("event") == "local_call":  # indexed for forget_payload
            self._local_calls.setdefault(response.event.local_call.call_id, []).append(len(self._events))
        self._events.append(response)
        if notify:
            self._unwoken = 0.0
            self.cond.notify_all()
        elif not self._unwoken:
            self._unwoken = time.monotonic()
        return len(self._events)

    def wake_late(self, now: float, after: float) -> None:
        """Wake the readers for events appended `after` s ago or more without waking them (progress steps: a step
        never wakes a reader by itself); the relay calls this between messages and at least every TICK."""
        if self._unwoken and now - self._unwoken >= after:  # (a plain read first: most calls find nothing)
            with self.cond:
                if self._unwoken and now - self._unwoken >= after:
                    self._unwoken = 0.0
                    self.cond.notify_all()

    def set_state(self, state: int, message: str = "", *, failure: failure_pb2.Failure | None = None,
                  queue_position: int = 0, code: grpc.StatusCode | None = None, notify: bool = True,
                  batch_size: int = 0) -> bool:
        """Move to `state` and log it; False (nothing changes) once the job is terminal or for a step back.
        notify=False: the caller logs another event at once, which wakes the watchers (see `event`)."""
        with self.cond:
            if self.done or _ORDER.get(state, 9) < _ORDER.get(self.status.state, 0):
                return False
            self.status = jobs_pb2.JobStatus(
                state=state, message=message, failure=failure, queue_position=queue_position, batch_size=batch_size
            )
            self.update_time = _now()
            self.state_times[state] = time.monotonic()
            if state in TERMINAL:
                self.failure_code = code
            # (a step on the way wakes only readers of events, not those waiting for the end: frames_when_done...)
            self.event(status=self.status, notify=notify and (self._readers > 0 or state in TERMINAL))
            return True

    def complete(self, result: bytes | list | ResultBytes, chunk_size: int, ttl: float) -> None:
        """Store the serialized result (bytes, or its pieces as encode_result returns them), log its chunks,
        then COMPLETED (nothing if already terminal)."""
        if not isinstance(result, ResultBytes):
            result = ResultBytes(result)
        stamp = _now()
        with self.cond:
            if self.done:
                return
            self.result = result
            for offset in range(0, max(len(result), 1), chunk_size):
                self._events.append(
                    ResultChunk(len(self._events) + 1, stamp, offset, min(chunk_size, len(result) - offset))
                )
            self.set_state(jobs_pb2.JOB_STATE_COMPLETED, f"result of {format_bytes(len(result))}")
            self._retain(ttl)
        self._ended()

    def finish(self, state: int, message: str, *, failure: failure_pb2.Failure | None = None,
               code: grpc.StatusCode | None = None, ttl: float) -> bool:
        """End the job in ERROR or CANCELLED (no-op if it already ended)."""
        with self.cond:
            changed = self.set_state(state, message, failure=failure, code=code)
            if changed:
                self._retain(ttl)
        if changed:
            self._ended()
        return changed

    def summary(self) -> str:
        """The job's one line in the server log: id, model, key id, final state, queue and run time."""
        with self.cond:
            times, state = self.state_times, self.status.state
            start = times.get(jobs_pb2.JOB_STATE_RECEIVED, 0.0)
            running = times.get(jobs_pb2.JOB_STATE_RUNNING)
            end = times.get(state, time.monotonic())
            queued = (running if running is not None else end) - start
            ran = end - running if running is not None else 0.0
            detail = (self.status.message.splitlines() or [""])[0][:160]
            return (f"job {self.id} model={self.model} key={self.owner} {state_name(state)} "
                    f"queued={queued:.2f}s ran={ran:.2f}s{' (' + detail + ')' if detail else ''}")

    def _retain(self, ttl: float) -> None:
        self.expire_at = time.monotonic() + ttl
        self.expire_time = timestamp_pb2.Timestamp()
        self.expire_time.FromNanoseconds(time.time_ns() + int(ttl * 1e9))

    def _ended(self) -> None:
        """Tell the store the job ended (its log line, its expiry), after `cond` is released: the watchers that
        the end woke read it meanwhile."""
        if self.on_end is not None:
            self.on_end(self)

    def request_cancel(self, reason: str) -> bool:
        """Ask the job to stop; True if it had not ended. The worker (or the queue) ends it."""
        with self.cond:
            if self.done:
                return False
            if self.cancel_reason is None:
                self.cancel_reason = reason or "cancelled by the client"
            self.cond.notify_all()
            if self.link is not None:
                self.link.notify()  # a local() call waiting for its answer stops
            wake = self.on_cancel
        if wake is not None:
            wake()  # the relay forwards the cancel to the worker now, not at its next idle tick
        return True

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_reason is not None  # a single read: no lock needed

    def wait_done(self, timeout: float) -> int:
        """Wait up to `timeout` s for the job to end; its state then."""
        with self.cond:
            self.cond.wait_for(lambda: self.done, timeout)
            return self.status.state

    def outcome(self) -> tuple[int, str, grpc.StatusCode | None, ResultBytes | None]:
        """(state, its message, the status code of an ERROR/CANCELLED, the result once COMPLETED), read together."""
        with self.cond:
            return self.status.state, self.status.message, self.failure_code, self.result

    # ---- reading ------------------------------------------------------------------------------
    @property
    def last_sequence(self) -> int:
        with self.cond:
            return len(self._events)

    def wait_events(self, after: int, stop: Callable[[], bool], timeout: float | None = None,
                    limit: int = 16) -> tuple[list[jobs_pb2.JobEvent], bool]:
        """Up to `limit` events with sequence > `after`, waiting until there is one, the job ended or `stop()`.

        Returns (events, finished): finished is True once the job ended and every event is returned. The
        limit bounds what one call copies (result chunks are built from `result` on the way out).
        """
        with self.cond:
            self._wait_moved(after, stop, timeout)
            entries = self._events[after : after + limit]
            finished = self.done and after + len(entries) == len(self._events)
            result = self.result
        return [self._materialize(e, result) for e in entries], finished

    def _wait_moved(self, seen: int, stop: Callable[[], bool], timeout: float | None) -> bool:
        """With the lock held: wait, as a reader (new events wake it), until `_moved(seen, stop)`."""
        self._readers += 1
        try:
            return self.cond.wait_for(partial(self._moved, seen, stop), timeout)
        finally:
            self._readers -= 1

    def _linger(self, after: int, stop: Callable[[], bool], deadline: float) -> None:
        """With the lock held: wait while every unsent event is a status change or a progress step of a live job
        (a generation step's progress then rides with the step's local() call, or with the next steps)."""
        while not self.done and not stop() and all(
            isinstance(e, jobs_pb2.RunJobResponse) and e.event.WhichOneof("event") in _LINGERING
            for e in self._events[after:]
        ):
            left = deadline - time.monotonic()
            if left <= 0 or not self._wait_moved(len(self._events), stop, left):
                return

    def _moved(self, seen: int, stop: Callable[[], bool]) -> bool:
        """Whether there are events after `seen`, the job ended, or `stop()` (what readers wait for)."""
        return len(self._events) > seen or self.done or stop()

    def wait_frames(self, after: int, stop: Callable[[], bool], timeout: float | None = None, limit: int = 16,
                    linger: float = 0.0, lazy: bool = False) -> tuple[list[bytes] | list[Frame], int, bool]:
        """As wait_events, but as serialized RunJobResponses / WatchJobResponses (the same bytes), built
        outside the lock: result chunks straight from the result's pieces, one copy each (`lazy`: not yet,
        as Frames, each joined as it is sent).

        Events ready together share a message (the first as `event`, the rest as `more_events`): its large
        events (SMALL_EVENT bytes or more, e.g. result chunks) hold at most BATCH_BYTES together, and small
        ones may ride along up to BATCH_BYTES + SMALL_EVENT in all. With `linger`, status changes and progress
        steps that are ready wait up to that long for a later event (a short job's RECEIVED ... COMPLETED and result
        then travel as one message, a generation step's progress with its local() call); logs, local() calls and
        result chunks never wait.
        Returns (frames, count of events they hold, finished)."""
        with self.cond:
            self._wait_moved(after, stop, timeout)
            if linger:
                self._linger(after, stop, time.monotonic() + linger)
            entries = self._events[after : after + limit]
            finished = self.done and after + len(entries) == len(self._events)
            result = self.result
        frames: list[Frame] = []
        parts = Frame([], result)
        size = large = 0  # bytes of events in `parts`, all and large ones
        for entry in entries:
            chunk = isinstance(entry, ResultChunk)
            serialized = b"" if chunk else entry.SerializeToString()  # the event as `event`
            length = entry.size if chunk else len(serialized)
            big = length >= SMALL_EVENT
            if parts and (big and large + length > BATCH_BYTES or size + length > BATCH_BYTES + SMALL_EVENT):
                frames.append(parts)  # full: this event starts the next message
                parts, size, large = Frame([], result), 0, 0
            if chunk:
                parts.extend(entry.parts(self.id, result, more=bool(parts)))
            else:
                parts.extend(as_more_events(serialized) if parts else [serialized])
            size += length
            large += length if big else 0
        if parts:
            frames.append(parts)
        return (frames if lazy else [b"".join(frame) for frame in frames]), len(entries), finished

    def frames_when_done(self, stop: Callable[[], bool], timeout: float, max_bytes: int) -> list[bytes] | None:
        """Every event of the job, framed as wait_frames frames them, once it ended within `timeout`.

        None if it is still running then (or `stop()`), or if its events hold more than `max_bytes`."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.done or stop(), timeout) or not self.done:
                return None
            if self.result is not None and len(self.result) > max_bytes:
                return None
        frames: list[bytes] = []
        after, size, finished = 0, 0, False
        while not finished:
            more, count, finished = self.wait_frames(after, stop, limit=64)
            frames += more
            after += count
            size += sum(len(f) for f in more)
            if size > max_bytes:
                return None
        return frames

    def _materialize(self, entry: jobs_pb2.RunJobResponse | ResultChunk,
                     result: ResultBytes | None) -> jobs_pb2.JobEvent:
        if not isinstance(entry, ResultChunk):
            return entry.event
        chunk = jobs_pb2.Chunk(
            offset=entry.offset,
            data=b"".join(result.views(entry.offset, entry.size)),
            total_size=len(result),
        )
        return jobs_pb2.JobEvent(job_id=self.id, sequence=entry.sequence, time=entry.time, result=chunk)

    def forget_payload(self, call_id: str) -> None:
        """Drop the bulky data of the logged events of an answered local() call: replays keep their sequence
        and call ids, with empty value chunks, so the log does not hold every exchanged tensor. The log is
        indexed by call id (no scan); entries are replaced, not changed, as readers may be serializing them."""
        with self.cond:
            for index in self._local_calls.pop(call_id, ()):
                old = self._events[index].event
                call = old.local_call
                response = self._response(old.sequence, old.time)
                kept = response.event.local_call
                kept.call_id, kept.block_id = call.call_id, call.block_id
                kept.values.offset, kept.values.total_size = call.values.offset, call.values.total_size
                self._events[index] = response

    def info(self, queue_position: int = 0) -> jobs_pb2.JobInfo:
        with self.cond:
            status = jobs_pb2.JobStatus()
            status.CopyFrom(self.status)
            if status.state == jobs_pb2.JOB_STATE_QUEUED:
                status.queue_position = queue_position
            return jobs_pb2.JobInfo(
                job_id=self.id, model=self.model, kind=self.kind, status=status, create_time=self.create_time,
                update_time=self.update_time, last_sequence=len(self._events),
                result_size=len(self.result) if self.result is not None else 0, result_expire_time=self.expire_time)


class JobStore:
    """Every job the server still remembers, by id, and the request ids that made them (idempotency). Lock
    order: a job's `cond` may be held while taking the store's `_lock`, never the reverse."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # guarded by _lock
        self._by_request: dict[tuple[str, str], Job] = {}  # guarded by _lock: (owner, request_id) -> job
        self._expiring: list[tuple[float, int, Job]] = []  # guarded by _lock: a heap of (expire_at, n, job)
        self._ended = 0  # guarded by _lock: tie-breaker for the heap

    def create(self, owner: str, model: str, kind: int, request_id: str, stream: bool, job_id: str = "") -> Job:
        """A new job (not yet published: see `add`); with `stream`, its RunJob stream attached as its LocalLink."""
        job = Job(owner, model, kind, request_id, job_id)
        if stream:
            from .local_calls import LocalLink  # (local_calls imports this module)

            job.link = LocalLink(job)
            job.link.attach()
        return job

    def find_request(self, owner: str, request_id: str) -> Job | None:
        """The job an earlier request with this id (from this owner) created, if it is still known."""
        if not request_id:
            return None
        with self._lock:
            self._sweep()
            return self._by_request.get((owner, request_id))

    def add(self, job: Job) -> Job:
        """Publish `job`; if a job with its request id appeared meanwhile, that one is returned instead."""
        with self._lock:
            self._sweep()
            if job.request_id:
                earlier = self._by_request.get((job.owner, job.request_id))
                if earlier is not None:
                    return earlier
                self._by_request[(job.owner, job.request_id)] = job
            self._jobs[job.id] = job
            job.on_end = self._job_ended
            return job

    def start(self, job: Job, queue, program: bytes, limits, batch: tuple,
              wait: tuple[float, int] = (0.0, 0)) -> Job:
        """Publish `job` and put it in `queue` (a workers.ModelQueue); the job with its request id if one appeared
        meanwhile (not queued again). Refused (queue full, model out of service): no record is kept. `wait`:
        (seconds, max_bytes) of the caller's frames_when_done next (a cluster's store waits in this call; here
        that wait costs nothing, so it is the caller's)."""
        published = self.add(job)
        if published is not job:
            return published
        try:
            queue.submit(job, program, limits, job.link, batch)
        except ServerError:
            self.remove(job)
            raise
        return job

    def _job_ended(self, job: Job) -> None:
        if _log.isEnabledFor(logging.INFO):
            _log.info("%s", job.summary())
        with self._lock:
            self._ended += 1
            heapq.heappush(self._expiring, (job.expire_at, self._ended, job))

    def remove(self, job: Job) -> None:
        with self._lock:
            self._forget(job)

    def get(self, job_id: str, owner: str) -> Job:
        """The job, if it exists and belongs to `owner`; NotFound otherwise (other owners' jobs included)."""
        with self._lock:
            self._sweep()
            job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise unknown_job(job_id)
        return job

    def find(self, job_id: str) -> Job | None:
        """The job `job_id`, whoever owns it (operators: AdminService); None if unknown."""
        with self._lock:
            self._sweep()
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """Every job still remembered, oldest first (dicts keep insertion order)."""
        with self._lock:
            self._sweep()
            return list(self._jobs.values())

    def __len__(self) -> int:
        with self._lock:
            self._sweep()
            return len(self._jobs)

    def _sweep(self) -> None:
        """Forget jobs whose retention time is over (the earliest first; cheap when none is due)."""
        now = time.monotonic()
        while self._expiring and self._expiring[0][0] <= now:
            self._forget(heapq.heappop(self._expiring)[2])

    def _forget(self, job: Job) -> None:
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
        if self._by_request.get((job.owner, job.request_id)) is job:
            del self._by_request[(job.owner, job.request_id)]
