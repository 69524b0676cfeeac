"""A worker: one model replica serving jobs over the worker protocol; the one place a job is executed (`JobRun`).

Runs in its own process (workers.py starts it with multiprocessing 'forkserver'), or as a thread where the
model cannot be sent to a process. Imports torch, tether.runtime and the server's job-side modules; never grpc's
server, the job store or the front door.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from tether.runtime.envoy import module_of
from tether.runtime.errors import RunStopped
from tether.runtime.program import execute
from tether.v1 import failure_pb2, program_pb2

from . import errors
from . import worker_protocol as wp
from .errors import JobCancelledError, JobTimeout, ServerError, WeightsChanged
from .failures import failure_of
from .interrupts import Watchdog
from .job_state import JobState
from .local_calls import LocalCaller
from .program_codec import DecodedProgram, decode_program
from .registry import HostedModel, wrap
from .result_areas import WorkerAreas
from .results import encode_result_pieces
from .weights import WeightWatch

__all__ = ["serve", "process_main", "JobRun"]

_log = logging.getLogger("tether.server")
_LOCAL_ERRORS = ("LocalBlockFailed", "LocalCallFailed", "JobTimeout", "JobCancelledError")
HELD_LINES = 1000  # lines a job may print after a one-way local() call before it waits for that call's answer


def process_main(conn, name: str, model: Any, source: Callable[[], Any] | None, policy, direct=None) -> None:
    """The worker process's entry point (multiprocessing target): large results leave through result areas."""
    serve(conn, name, model, source, policy, direct, WorkerAreas())


def serve(conn, name: str, model: Any, source: Callable[[], Any] | None, policy, direct=None,
          areas: WorkerAreas | None = None) -> None:
    """Serve jobs on `model` (a torch module or (module, tokenizer)) until Stop or the connection closes.
    `direct`: the read end of the direct pipe (worker_protocol.DirectPipe), if the front door has one.
    `areas`: where large results go (a worker process's own); without, each goes as a Blob."""
    conn = wp.plain_pickle(conn)
    hosted = HostedModel(name, wrap(model), source)
    inbox = _Inbox(conn, direct, areas)
    watch = WeightWatch(hosted.module, source)
    served = JobState.of(hosted.module)
    watchdog = Watchdog(f"tether-watchdog-{name}")
    conn.send(wp.Ready(os.getpid()))
    try:
        while (job := inbox.next_job()) is not None:
            try:
                if isinstance(job, wp.RunBatch):
                    from .worker_batch import BatchRun  # (worker_batch imports this module)

                    BatchRun(job, hosted, policy, conn, inbox, watch, watchdog).run()
                else:
                    JobRun(job, hosted, policy, conn, inbox, watch, watchdog).run()
            finally:
                served.reset()  # no job sees what an earlier one left on the model (.grad, modes)
            if watch.broken:  # (Done / Failed said so): serve nothing wrong
                return
    finally:
        watchdog.close()


class _Inbox:
    """The front door's messages, read by one named thread: jobs queue up; cancels and local() answers go to the
    job that runs; result areas handed back go to `areas`. With a direct pipe, jobs, the Reclaims before them and
    answers come on it instead, read by the job's thread itself."""

    def __init__(self, conn, direct=None, areas: WorkerAreas | None = None):
        self._conn = conn
        self._direct = direct
        self.areas = areas
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # RunJob or RunBatch, or None to end
        self.answers: queue.SimpleQueue = queue.SimpleQueue()  # LocalAnswer, or None when the front door left
        self.cancel: dict[str, str] = {}  # job id -> reason; written by the reader thread only
        threading.Thread(target=self._read, name="tether-worker-inbox", daemon=True).start()

    def next_job(self) -> wp.RunJob | wp.RunBatch | None:
        """The next job (None: Stop, or the front door left)."""
        if self._direct is None:
            return self._jobs.get()
        while isinstance(message := self._direct_message(), (wp.LocalAnswer, wp.Reclaim)):
            if isinstance(message, wp.Reclaim):
                if self.areas is not None:
                    self.areas.reclaim(message)
            else:
                wp.discard(message.data)  # an answer to a call whose job had already ended
        return message if isinstance(message, (wp.RunJob, wp.RunBatch)) else None

    def next_answer(self) -> wp.LocalAnswer | None:
        """The next LocalAnswer (None: the front door left)."""
        if self._direct is None:
            return self.answers.get()
        message = self._direct_message()
        return message if isinstance(message, wp.LocalAnswer) else None

    def answer_ready(self) -> bool:
        """Whether a LocalAnswer waits to be read (while a job runs, nothing else comes on its path)."""
        return self._direct.poll() if self._direct is not None else not self.answers.empty()

    def _direct_message(self) -> Any:
        try:
            return self._direct.recv()
        except (EOFError, OSError):
            return None

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if isinstance(message, (wp.RunJob, wp.RunBatch)):
                    self._jobs.put(message)
                elif isinstance(message, wp.LocalAnswer):
                    self.answers.put(message)
                elif isinstance(message, wp.Cancel):
                    self.cancel[message.job_id] = message.reason
                elif isinstance(message, wp.Reclaim) and self.areas is not None:
                    self.areas.reclaim(message)
                elif isinstance(message, wp.Stop):
                    break
        except (EOFError, OSError):
            pass
        self._jobs.put(None)
        self.answers.put(None)


class WorkerLink:
    """The worker's end of a job's local() calls (LocalLink.call's signature): the call goes to the front door,
    which sends it up the RunJob stream and enforces the time limits; its answer, or error, comes back.

    A call that needs no answer (its block binds nothing the job reads) goes one-way in a job running alone:
    the job goes on, and reads the answer before its next call and before it ends (`settle`: a block that
    raised raises there), so the stream still carries one open call at a time and at most one call's values
    wait in the front door. Lines the job prints meanwhile are held until that answer: they reach the client
    after the block's own output, and never if the block raised."""

    def __init__(self, job_id: str, conn, inbox: _Inbox, *, one_way: bool = False):
        self._job_id, self._conn, self._inbox = job_id, conn, inbox
        self._one_way = one_way
        self._unanswered = ""  # call id of the one-way call sent last, until its answer is read
        self._held: list[wp.Log] = []

    def call(self, call_id: str, block_id: str, payload: list, deadline: float, local_timeout: float,
             timed_out, *, needs_answer: bool = True) -> bytes | memoryview:
        self.settle()
        if not needs_answer and self._one_way:
            self._conn.send(wp.LocalCall(self._job_id, call_id, block_id, wp.pack(payload), one_way=True))
            self._unanswered = call_id
            return b""  # (no values come back: an empty ValueMap)
        self._conn.send(wp.LocalCall(self._job_id, call_id, block_id, wp.pack(payload)))
        return self._answer(call_id, block_id)

    def settle(self) -> None:
        """Read the answer to the one-way call sent last (its error raises here), then send the lines held."""
        held, self._held = self._held, []  # (dropped if the block raised)
        if self._unanswered:
            call_id, self._unanswered = self._unanswered, ""
            self._answer(call_id, "")  # (no values: the job reads none of its block's names)
        for line in held:
            self._conn.send(line)

    def log(self, line: wp.Log) -> None:
        """A line the job printed: sent, or held while a one-way call's answer has not been read (it is read now
        when it came, or when too many lines wait)."""
        if self._unanswered and (self._inbox.answer_ready() or len(self._held) >= HELD_LINES):
            self.settle()
        if self._unanswered:
            self._held.append(line)
        else:
            self._conn.send(line)

    def _answer(self, call_id: str, block_id: str) -> bytes | memoryview:
        while True:
            answer = self._inbox.next_answer()
            if answer is None:
                raise JobCancelledError(f"the server stopped while the local() block {block_id or call_id} ran")
            if answer.call_id == call_id:
                break
            wp.discard(answer.data)  # an answer to an earlier call that had already ended
        if answer.error in _LOCAL_ERRORS:
            cls = getattr(errors, answer.error)
            if answer.error == "LocalBlockFailed":
                raise cls(answer.message, failure_pb2.Failure.FromString(answer.failure))
            raise cls(answer.message)
        return wp.unpack(answer.data)


class JobLog:
    """`print` for a job's program: complete lines go to the front door as Log messages (a partial line waits
    for its end or for flush=True), through its local() link where it has one (which may hold them). Only the
    thread running the job calls it."""

    def __init__(self, job_id: str, conn, link: WorkerLink | None = None):
        self._job_id = job_id
        self._send = conn.send if link is None else link.log
        self._partial = ""

    def __call__(self, *args, sep: str | None = " ", end: str | None = "\n", file=None, flush: bool = False) -> None:
        text = self._partial + (" " if sep is None else sep).join(map(str, args)) + ("\n" if end is None else end)
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._send(wp.Log(self._job_id, line))
        if flush:
            self.flush()

    def flush(self) -> None:
        if self._partial:
            self._send(wp.Log(self._job_id, self._partial))
            self._partial = ""


def _weights_changed(watch: WeightWatch, versions: list[int]) -> WeightsChanged | None:
    """The error to report instead of a failed job's own when it had also written into the weights."""
    try:
        watch.check(versions)
    except WeightsChanged as changed:
        _log.warning("%s", changed)
        return changed
    return None


class JobRun:
    """One job on this worker: decode, run the Executor within its limits, encode the result, report the end."""

    def __init__(self, job: wp.RunJob, hosted: HostedModel, policy, conn, inbox: _Inbox, watch: WeightWatch,
                 watchdog: Watchdog):
        self.job, self.hosted, self.policy, self.conn, self.inbox = job, hosted, policy, conn, inbox
        self.watch = watch  # the replica's parameters, to notice a job that wrote into them
        self.watchdog = watchdog
        self.deadline = 0.0
        self.user_files: dict[str, str] = {}
        self.step, self.total_steps = 0, 0  # forward passes so far (generation steps), and how many are asked

    @property
    def cancelled(self) -> bool:
        return self.job.job_id in self.inbox.cancel

    def timed_out(self) -> JobTimeout:
        return JobTimeout(
            f"the job ran longer than its time limit of {self.job.timeout:g} s and was stopped at a module "
            "boundary. Ask for a longer JobSpec.timeout (the server's --job-timeout caps it), or do less per job."
        )

    def _stop_requested(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline

    def _check_stop(self, module, args) -> None:
        """A forward pre-hook on the model's root: stop at the next forward (generation step) when asked,
        else report the step to the client (generation only: "step k/N")."""
        if self._stop_requested():
            raise RunStopped("The job was stopped before this forward pass.")
        self.tick()

    def tick(self) -> None:
        """A forward pass started: report the step to the client (generation only: "step k/N")."""
        if self.total_steps:
            self.step += 1
            self.conn.send(wp.Progress(self.job.job_id, self.step, max(self.total_steps, 0)))

    def run(self) -> None:
        decoded: DecodedProgram | None = None
        try:
            decoded = self.decode()
            self._execute(decoded)
        except BaseException as error:  # the worker survives anything a program does (SystemExit included)
            self._end(error)
        finally:
            self.release(decoded)

    def decode(self) -> DecodedProgram:
        """The job's program, decoded for this replica (JobCancelledError: cancelled while it waited)."""
        job = self.job
        decoded = decode_program(program_pb2.Program.FromString(wp.unpack(job.program)), self.hosted, self.policy)
        self.user_files = dict(decoded.user_files)
        if self.cancelled:
            decoded.release()
            raise JobCancelledError(self.inbox.cancel[job.job_id])
        return decoded

    def release(self, decoded: DecodedProgram | None) -> None:
        if decoded is not None:
            decoded.release()
        self.inbox.cancel.pop(self.job.job_id, None)

    def start(self, decoded: DecodedProgram, batch_size: int = 0) -> tuple[JobLog, LocalCaller]:
        """The job starts running (its deadline from now): Running, and its log and local() handler.
        batch_size: the jobs of its RunBatch that run (0: a RunJob, alone; only then do calls go on at once)."""
        job = self.job
        self.deadline = time.monotonic() + job.timeout
        if decoded.program.kind == "generate":
            total = decoded.program.kwargs.get("max_new_tokens", 20)
            self.total_steps = total if isinstance(total, int) and total > 0 else -1  # -1: steps of unknown total
        self.conn.send(wp.Running(job.job_id, max(batch_size, 1)))
        link = WorkerLink(job.job_id, self.conn, self.inbox, one_way=batch_size == 0) if job.has_stream else None
        return JobLog(job.job_id, self.conn, link), LocalCaller(link, decoded, deadline=self.deadline)

    def encode(self, decoded: DecodedProgram, values: dict, log: JobLog) -> list:
        """The job's values (with what it changed outside) as result pieces within its size limit."""
        values = decoded.with_outside_changes(values, log)
        log.flush()
        result = encode_result_pieces(values, decoded.codec.encode, self.job.max_result_bytes, log)
        log.flush()
        return result

    def done(self, result: list) -> None:
        areas = self.inbox.areas
        data = areas.pack(result) if areas is not None else wp.pack(result)
        self.conn.send(wp.Done(self.job.job_id, data, self.watch.broken))

    def _execute(self, decoded: DecodedProgram) -> None:
        watch = self.watch
        log, handler = self.start(decoded)
        replica = self.hosted.model
        hook = module_of(replica).register_forward_pre_hook(self._check_stop)
        versions = watch.snapshot()
        try:
            root = decoded.bind(replica)
            decoded.define_functions(log)
            values = self.watchdog.call(self._stop_requested, lambda: execute(
                root, decoded.program, decoded.bindings, filename=decoded.body_filename, local=handler, log=log,
                cancel=self._stop_requested))
            handler.settle()
            watch.check(versions)
            result = self.encode(decoded, values, log)
        except BaseException as error:
            error = handler.settle_after(error)
            log.flush()
            if not isinstance(error, WeightsChanged):  # (check() already put the weights back: never twice)
                error = _weights_changed(watch, versions) or error
            self._end(error)
            return
        finally:
            hook.remove()
        self.done(result)

    def _end(self, error: BaseException) -> None:
        if self.cancelled:
            self.conn.send(wp.Failed(self.job.job_id, b"", "CANCELLED", True, self.watch.broken))
            return
        if isinstance(error, RunStopped) or (self.deadline and time.monotonic() > self.deadline
                                               and not isinstance(error, ServerError)):
            error = self.timed_out()  # the time limit stopped it at a module boundary
        code = error.code.name if isinstance(error, ServerError) else ""
        _log.debug("job %s failed", self.job.job_id, exc_info=error)  # the full traceback, tether's frames included
        failure = failure_of(error, self.user_files)
        self.conn.send(wp.Failed(self.job.job_id, failure.SerializeToString(), code, False, self.watch.broken))
