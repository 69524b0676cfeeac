"""Relaying what a replica runs now (one job, or one batch of compatible jobs) to its worker: sending it,
forwarding events, local() calls and cancels, watching time and memory limits, and saying when the worker must
be restarted (supervisor.py restarts it). Imports the job records and the worker protocol; never runs user code.
"""

from __future__ import annotations

import logging
import select
import time
from typing import TYPE_CHECKING, Any

import grpc

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
from .jobs import STATUS_LINGER
from .local_calls import NO_STREAM, StillOpen
from .reruns import BatchRelay, Sent
from .workers import Entry

if TYPE_CHECKING:
    from .supervisor import Replica

__all__ = ["JobRelay", "Track", "KILL_GRACE", "TICK"]

_log = logging.getLogger("tether.server")
KILL_GRACE = GRACE + 2.0  # seconds a job past its time limit, or cancelled, may run before its worker is killed
TICK = 0.05  # seconds between checks of a running job's time and memory (messages wake the relay at once)


class Track:
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
        self.sent = entry.rerun or Sent()  # what its client got from earlier runs (reruns.py)
        self.sent.begin()
        self.left = False  # it left its batch (runs again alone): this run only waits for the worker to drop it
        self.posted = ""  # call id of its last one-way local() call (`_post`), watched by `_forward_cancels`
        self.block_failed: Exception | None = None  # why that call failed: the job stopped, and ends with it

    def message(self) -> wp.RunJob:
        self.program = wp.pack([self.entry.program])  # the worker unlinks it (a Blob) once it reads it
        return wp.RunJob(self.job.id, self.program, self.limits.timeout, self.limits.max_result_bytes,
                         self.entry.link is not None)

    def timed_out(self) -> JobTimeout:
        return JobTimeout(
            f"the job ran longer than its time limit of {self.limits.timeout:g} s and was stopped. Ask for a "
            "longer JobSpec.timeout (the server's --job-timeout caps it), or do less per job."
        )

    def past_grace(self, now: float, resumed: float = 0.0) -> Exception | None:
        """The error to kill the worker with when this job runs past its grace after its limit or cancel (or
        after `resumed`: a worker waiting for a local() answer could not stop)."""
        stop_at = min(self.deadline, self.cancel_sent) if self.cancel_sent else self.deadline
        stop_at = max(stop_at, resumed)
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


def _answer(call_id: str, outcome: bytes | bytearray | Exception) -> wp.LocalAnswer:
    """The LocalAnswer for a local() call's outcome: the answer's bytes, or the error to raise in the worker."""
    if not isinstance(outcome, Exception):
        return wp.LocalAnswer(call_id, wp.pack([outcome]))
    failure = outcome.failure.SerializeToString() if isinstance(outcome, LocalBlockFailed) else b""
    return wp.LocalAnswer(call_id, error=type(outcome).__name__, message=str(outcome), failure=failure)


class JobRelay(BatchRelay):
    """What a replica runs now (one job, or a batch of compatible jobs in one RunBatch): sends it, relays what
    the worker says to each job, enforces each job's time (with a grace) and the worker's memory."""

    def __init__(self, replica: Replica, entries: list[Entry]):
        self.replica, self.entries = replica, entries
        self.ttl, self.chunk_size = replica.queue.limits.result_ttl, replica.queue.limits.chunk_size
        self.conn = replica.conn
        self.tracks: dict[str, Track] = {}  # job id -> its track, for the jobs sent to the worker
        self.retire = ""
        self.baseline = 0
        self.checked = 0.0  # time.monotonic() of the last look at the jobs' clocks and the worker's memory
        self.resumed = 0.0  # time.monotonic() when the worker last got a local() answer

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
            if not job.set_state(jobs_pb2.JOB_STATE_DISPATCHED, where, notify=False) and (
                    entry.rerun is None or job.done):  # (a re-run is RUNNING already)
                continue
            if job.cancel_requested:
                job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled by the client",
                           code=grpc.StatusCode.CANCELLED, ttl=self.ttl)
                continue
            self.tracks[job.id] = Track(entry)
            job.on_cancel = replica.wake
        if not self.tracks:
            return ""
        self._keep_answers()
        self.baseline = self.replica.private_memory(pid) if pid else 0
        self.checked = time.monotonic()  # (the baseline is the first look: the next is due a TICK later)
        runs = [track.message() for track in self.tracks.values()]
        try:
            reclaim = self.replica.areas.reclaim()  # (before the job: the worker may write them again for it)
            if reclaim is not None:
                self.send_direct(reclaim)
            self.send_direct(runs[0] if len(runs) == 1 else wp.RunBatch(tuple(runs)))
            return self._relay(pid)
        except (EOFError, OSError, BrokenPipeError):
            self._ended_with_worker(WorkerCrashed, None)
            return ""

    def _live(self) -> list[Track]:
        return [track for track in self.tracks.values() if not track.ended]

    def _relay(self, pid: int | None) -> str:
        wake = self.replica._wake_in
        while wake.poll():  # wakes for jobs that have ended since
            wake.recv_bytes()
        # one poll object for the whole run (multiprocessing.connection.wait builds a selector at each call)
        conn_fd, wake_fd = self.conn.fileno(), wake.fileno()
        sentinel = self.replica.process.sentinel if pid else -1
        poller = select.poll()
        for fd in (conn_fd, wake_fd, sentinel) if pid else (conn_fd, wake_fd):
            poller.register(fd, select.POLLIN)
        while self._live():
            ready = [fd for fd, _ in poller.poll(TICK * 1000)]  # (a hang-up counts as ready: recv says EOF)
            if wake_fd in ready:
                while wake.poll():
                    wake.recv_bytes()
                self._forward_cancels()
            if conn_fd in ready:
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
            elif sentinel in ready and not self.conn.poll():
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
        if track is None or track.ended or track.left:
            self._dropped(track, message)
            return
        job = track.job
        if isinstance(message, wp.Running):
            track.running, track.started = True, time.monotonic()
            track.deadline = track.started + track.limits.timeout
            again = f"running again, alone: {track.sent.why}" if track.sent.why else ""
            job.set_state(jobs_pb2.JOB_STATE_RUNNING, again,
                          batch_size=message.batch_size if message.batch_size > 1 else 0)
        elif isinstance(message, wp.Log):
            track.last_log = message.text
            if track.sent.line():
                job.event(log=jobs_pb2.LogLine(text=message.text))
        elif isinstance(message, wp.Progress):  # (wakes no reader: it lingers anyway; see Job.wake_late)
            if track.sent.progress(message.step):
                job.event(progress=jobs_pb2.Progress(step=message.step, total_steps=message.total), notify=False)
        elif isinstance(message, wp.LocalCall):
            self._local(track, message)
        elif isinstance(message, wp.Done):
            track.ended = True
            self.retire = self.retire or message.retire
            if job.cancel_requested:  # cancelled (an evict, a client) while its last step ran: it ends CANCELLED
                self.replica.areas.discard(message.result)
                job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled by the client",
                           code=grpc.StatusCode.CANCELLED, ttl=self.ttl)
            else:
                job.complete(self.replica.areas.result(message.result), self.chunk_size, self.ttl)
        elif isinstance(message, wp.Failed):
            track.ended = True
            self.retire = self.retire or message.retire
            if track.block_failed is not None:  # (its worker was stopped: its one-way call can get no answer)
                self._end_with(track, track.block_failed)
            elif message.cancelled or job.cancel_requested:
                job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled by the client",
                           code=grpc.StatusCode.CANCELLED, ttl=self.ttl)
            else:
                failure = failure_pb2.Failure.FromString(message.failure)
                code = grpc.StatusCode[message.code] if message.code else None
                job.finish(jobs_pb2.JOB_STATE_ERROR, failure.message, failure=failure, code=code, ttl=self.ttl)

    def _local(self, track: Track, call: wp.LocalCall) -> None:
        """A local() call: up the job's RunJob stream, and its answer (or why there is none) back. A batched job
        may hold its batch for --batch-local-wait in all; past that it leaves the batch (`_leave`)."""
        track.posted = ""  # (a worker calls again only once it has read the answer to its one-way call)
        if call.one_way and self.replica.direct is not None:
            self._post(track, call)
            return
        link, hold = track.entry.link, self._hold(track)
        asked = time.monotonic()
        pipe = self.replica.direct
        direct = None if pipe is None else lambda outcome: pipe.send(_answer(call.call_id, outcome))
        answer: wp.LocalAnswer | None
        try:
            if link is None:
                raise LocalCallFailed(NO_STREAM)
            data = link.call(call.call_id, call.block_id, [wp.unpack(call.payload)], track.deadline,
                             track.limits.local_call_timeout, track.timed_out, hold=hold, direct=direct)
            answer = None if data is None else _answer(call.call_id, data)  # (None: it went to the worker directly)
        except StillOpen:
            answer = self._leave(track, call)
        except (LocalBlockFailed, LocalCallFailed, JobTimeout, JobCancelledError) as error:
            answer = _answer(call.call_id, error)
        finally:
            self.resumed = time.monotonic()
            if hold is not None and not track.left:
                track.sent.held += self.resumed - asked
        if answer is not None:
            self.send_direct(answer)

    def _post(self, track: Track, call: wp.LocalCall) -> None:
        """A one-way call (its worker went on): sent up; its answer goes from the stream's reader straight to
        the worker, which reads it before its next call or its end. Nothing here waits for it."""
        link, pipe = track.entry.link, self.replica.direct
        if link is None:
            wp.discard(call.payload)
            self.send_direct(_answer(call.call_id, LocalCallFailed(NO_STREAM)))
            return
        try:
            known = link.post(call.call_id, call.block_id, [wp.unpack(call.payload)], track.limits.local_call_timeout,
                              lambda outcome: pipe.send(_answer(call.call_id, outcome)))
        except (LocalBlockFailed, LocalCallFailed, JobCancelledError) as error:
            known = error
        if known is None:
            track.posted = call.call_id
        else:
            self.send_direct(_answer(call.call_id, known))

    def send_direct(self, message: wp.LocalAnswer | wp.RunJob | wp.RunBatch | wp.Reclaim) -> None:
        """Send the worker's job thread a LocalAnswer, or its job(s) and the Reclaim before them: on its direct pipe
        if it has one."""
        pipe = self.replica.direct
        if pipe is None:
            self.conn.send(message)
        else:
            pipe.send(message)

    def _check(self, pid: int | None) -> tuple[Any, Track | None] | None:
        """Between messages: forward cancels; (the error, the job that caused it: None for all) to kill the
        worker with, if a job must be stopped."""
        now = time.monotonic()
        live = self._forward_cancels()
        for track in live:
            track.job.wake_late(now, STATUS_LINGER)
        if pid is None or now - self.checked < TICK:
            return None  # (a thread worker cannot be killed: its watchdog stops what it can)
        self.checked = now
        for track in live:
            error = track.past_grace(now, self.resumed)
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

    def _forward_cancels(self) -> list[Track]:
        """Send the worker a Cancel for each live job asked to stop since, or whose one-way local() call can get
        no answer (its worker gets the error in its place); returns the live jobs."""
        live = self._live()
        for track in live:
            job = track.job
            if track.posted and (error := track.entry.link.expire(track.deadline, track.timed_out)) is not None:
                self.send_direct(_answer(track.posted, error))
                track.posted = ""
                if not isinstance(error, JobCancelledError):
                    track.block_failed = error  # (the job stops now, as if it had waited for the answer)
            stop = job.cancel_requested or track.block_failed is not None
            if stop and not track.cancel_sent:
                track.cancel_sent = time.monotonic()
                reason = str(track.block_failed) if track.block_failed else job.cancel_reason
                self.conn.send(wp.Cancel(job.id, reason or "cancelled by the client"))
        return live

    def _end_with(self, track: Track, error: Exception) -> None:
        """End the job in ERROR with a server-side error (its Failure, and its status code)."""
        failure = failure_of(error, {})
        track.job.finish(jobs_pb2.JOB_STATE_ERROR, failure.message, failure=failure, code=error.code, ttl=self.ttl)

    def _crash_message(self, track: Track, how: str) -> str:
        again = f" It ran alone because {track.sent.why}." if track.sent.why else ""
        return (f"the worker process running this job crashed ({how}) while {track.doing()}.{again} The server "
                "restarted the worker; other jobs were not affected. If the program caused it (a C extension, an "
                "enormous allocation...), change it; otherwise submit the job again.")

    def _ended_with_worker(self, error: Any, culprit: Track | None) -> None:
        """The worker died or was killed: end every job it still ran (the others of a batch run again alone:
        `_again`), then start the worker again. `error` is the exception (or WorkerCrashed, the class: each job
        gets its own crash message); `culprit` the job whose kill it was."""
        self.replica._kill()  # (already dead: reaped, so its exit status is known)
        how = self.replica._how_it_ended() if error is WorkerCrashed else ""
        running = sum(not t.left for t in self._live())
        for track in reversed(self._live()):  # (re-runs go first in the queue, in the batch's order)
            track.ended = True
            job = track.job
            if not track.running:
                wp.discard(track.program)  # it may have died before reading the program
            if track.left or self._again(track, error, culprit, how, running):
                continue  # it runs again alone (reruns.py)
            own: Exception
            if error is WorkerCrashed:
                own = WorkerCrashed(self._crash_message(track, how))
            elif culprit is not None and track is not culprit:
                own = WorkerCrashed(
                    f"this job shared a batched run with job {culprit.job.id}, which did not stop after its "
                    f"{'cancel' if culprit.cancel_sent else 'time limit'}, so the batch's worker was stopped and "
                    "restarted. Submit this job again.")
            else:
                own = error
            own = track.block_failed or own
            if isinstance(own, JobCancelledError) or (job.cancel_requested and not isinstance(own, JobMemoryExceeded)):
                job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled by the client",
                           code=grpc.StatusCode.CANCELLED, ttl=self.ttl)
            else:
                self._end_with(track, own)
            _log.warning("job %s on %s: %s", job.id, self.replica.name, own)
        try:
            self.replica.restart()
        except Exception as failed:
            self.replica.queue.retire(f"its worker could not be restarted: {failed}")
