"""Re-runs in the front door: a job of a batch that leaves it (its local() blocks held the batch past
--batch-local-wait) or outlives its batch's worker (stopped because of another job, crashed, over the memory
limit) runs again alone, and its client is sent nothing twice (`Sent`). Imports the worker protocol; never torch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from tether.v1 import jobs_pb2

from . import worker_protocol as wp
from .errors import WorkerCrashed
from .failures import failure_of

_log = logging.getLogger("tether.server")
KEEP_BYTES = 64 << 20  # bytes of local() answers kept per batched job, so that a re-run replays them

__all__ = ["BatchRelay", "KEEP_BYTES", "Sent", "not_replayable", "why_left", "why_killed", "why_crashed", "why_memory"]



def not_replayable(why: str) -> str:
    """Why a job that was to run again alone ended instead: its client's local() answers were not kept."""
    return (f"this job was to run again alone ({why}), but the answers its client gave to its local() blocks were "
            f"too large to keep for a re-run (more than {KEEP_BYTES >> 20} MiB), and the server never asks a client "
            "to run a block twice, so the job was stopped instead. Submit it again.")


@dataclass
class Sent:
    """What a job's client was sent by the runs before this one (log lines, the last progress step), and why it
    runs again: a re-run's first `replayed` lines and its steps up to `step` are not sent again (the same program
    prints the same lines at the same points). Touched only by the relay thread that runs the job (one at a time)."""

    logs: int = 0  # log lines the client got, from every run so far
    step: int = 0  # the last generation step the client got
    why: str = ""  # why the job runs again ("" on its first run)
    held: float = 0.0  # seconds its local() blocks kept its batch waiting (see --batch-local-wait)
    replayed: int = 0  # lines of this run that earlier runs had already sent
    seen: int = 0  # lines this run printed so far

    def begin(self) -> None:
        """A run of the job starts: its first `logs` lines were sent already."""
        self.replayed, self.seen = self.logs, 0

    def line(self) -> bool:
        """This run printed a line: whether the client gets it (False: an earlier run sent it already)."""
        self.seen += 1
        if self.seen <= self.replayed:
            return False
        self.logs += 1
        return True

    def progress(self, step: int) -> bool:
        """This run started generation step `step`: whether the client hears of it."""
        if step <= self.step:
            return False
        self.step = step
        return True


def why_left(size: int, bound: float) -> str:
    return (f"its local() blocks kept the batch of {size} jobs it ran in waiting longer than the server allows "
            f"(--batch-local-wait, {bound:g} s in all), so it left the batch to run alone; its client is not asked "
            "to run any block again")


def why_killed(culprit: str, cancelled: bool) -> str:
    return (f"it shared a batched run with job {culprit}, which did not stop after its "
            f"{'cancel' if cancelled else 'time limit'}, so the batch's worker was stopped and restarted; this job "
            "runs again alone, from the start (its client gets no log line or local() call twice)")


def why_crashed(size: int, how: str) -> str:
    return (f"the worker of the batch of {size} jobs it ran in crashed ({how}); each of them runs again alone, so "
            "only the job that crashes it fails")


def why_memory(size: int) -> str:
    return (f"the batch of {size} jobs it ran in allocated more than the server's per-job memory limit "
            "(--job-memory) together; each of them runs again alone")


class BatchRelay:
    """What job_relay.JobRelay does for the jobs of a batch that run again alone (its fields: `tracks`,
    `replica`, `conn`, `send_direct`; each track's `entry`, `job`, `sent`, `left`, `cancel_sent`). Only the relay thread calls it."""

    tracks: dict
    replica: Any
    conn: Any
    send_direct: Any  # sends a LocalAnswer to the worker's job thread

    def _keep_answers(self) -> None:
        """Jobs of a batch keep their local() answers: a re-run alone replays them instead of asking again."""
        if len(self.tracks) > 1:
            for track in self.tracks.values():
                if track.entry.link is not None:
                    track.entry.link.keep()

    def _hold(self, track: Any) -> float | None:
        """Seconds this job's local() call may keep its batch waiting (None: no other job waits on it)."""
        bound = self.replica.queue.limits.batch_local_wait
        others = any(t is not track and not t.left for t in self._live())
        return max(0.0, bound - track.sent.held) if others and bound >= 0 else None

    def _leave(self, track: Any, call: wp.LocalCall) -> wp.LocalAnswer:
        """The job's local() call held its batch too long: the worker drops it (a cancel, and this answer), and
        it runs again alone, where the still open call (or its answer) is waited for, never asked again."""
        bound = self.replica.queue.limits.batch_local_wait
        why = why_left(len(self.tracks), bound)
        if not self._requeue(track, why):  # its answers were not kept (too large), or the server stops
            link = track.entry.link
            message = not_replayable(why) if link is not None and not link.replayable else "the server stops"
            return wp.LocalAnswer(call.call_id, error="LocalCallFailed", message=message)
        track.left, track.cancel_sent = True, time.monotonic()
        self.conn.send(wp.Cancel(track.job.id, why))
        return wp.LocalAnswer(call.call_id, error="JobCancelledError", message=f"the job left its batch: {why}")

    def _requeue(self, track: Any, why: str) -> bool:
        """Queue the job again, first, to run alone; False when it cannot (its answers were not kept, the queue
        closed): the caller ends it."""
        link = track.entry.link
        if link is not None and not link.replayable:
            return False
        track.sent.why = why
        return self.replica.queue.requeue(track.entry, track.sent)

    def _dropped(self, track: Any | None, message: Any) -> None:
        """A message of a job this run no longer relays (it ended, or left its batch)."""
        if isinstance(message, wp.LocalCall):  # (its body caught the cancel and went on): never leave it waiting
            self.send_direct(wp.LocalAnswer(message.call_id, error="JobCancelledError",
                                            message="the job no longer runs in this batch"))
        elif isinstance(message, (wp.Done, wp.Failed)) and track is not None:
            track.ended = True
            if isinstance(message, wp.Done):
                self.replica.areas.discard(message.result)

    def _again(self, track: Any, error: Any, culprit: Any | None, how: str, running: int) -> bool:
        """A job of a batch the worker still ran when it died or was killed (`running` of them) runs again alone
        (True), unless it is the culprit, was cancelled, or was the one job left running (False: it ends with
        the worker's error). True also when it was to run again but could not replay its local() answers: it ends
        here, saying so."""
        if len(self.tracks) == 1 or track is culprit or track.job.cancel_requested:
            return False
        if culprit is not None:
            why = why_killed(culprit.job.id, bool(culprit.cancel_sent))
        elif running < 2:  # the one job left running is what crashed it (or allocated too much)
            return False
        else:
            why = why_crashed(running, how) if error is WorkerCrashed else why_memory(running)
        if self._requeue(track, why):
            _log.info("job %s on %s runs again alone: %s", track.job.id, self.replica.name, why)
            return True
        if track.entry.link is None or track.entry.link.replayable:  # (the queue closed): the caller ends it
            return False
        failure = failure_of(WorkerCrashed(not_replayable(why)), {})
        track.job.finish(jobs_pb2.JOB_STATE_ERROR, failure.message, failure=failure, code=WorkerCrashed.code,
                         ttl=self.replica.queue.limits.result_ttl)
        return True

