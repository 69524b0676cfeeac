"""The worker side of `local()` blocks: send a LocalCall up the job's RunJob stream, wait for the LocalResult.

`LocalLink` is the job's client end in the front door (answers arrive there from the stream's reader thread,
which sends a complete one straight on to the waiting worker when the relay gave it the worker's direct path);
`LocalCaller` is the handler the Executor calls at each block, in the worker, through a link with LocalLink's
`call` (worker_main.WorkerLink relays it over the worker protocol). Calls are strictly sequential: one open call per job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from tether.runtime.batching import to_device
from tether.runtime.capture import Block
from tether.v1 import jobs_pb2
from tether.wire import encode_value_map, join_chunks, split_pieces

from .errors import JobCancelledError, JobTimeout, LocalBlockFailed, LocalCallFailed
from .jobs import Job
from .program_codec import DecodedProgram, LocalSite
from .reruns import KEEP_BYTES

__all__ = ["LocalLink", "LocalCaller", "StillOpen", "is_data"]

NO_STREAM = (
    "local() blocks need the blocking RunJob stream: this job was submitted without one (SubmitJob), so "
    "the server cannot ask the client to run the block. Run it with blocking=True (RunJob)."
)


class StillOpen(Exception):
    """A batched job's local() call was not answered within its hold: the call stays open (its client still runs
    the block) and the job leaves its batch; its re-run alone gets the answer (LocalLink.call, same call_id)."""


class LocalLink:
    """The RunJob streams of one job, as its worker sees them. All fields are guarded by `job.cond`; the call that
    waits for its answer waits on `_cond` (the job's lock), so an answer wakes it alone, never the job's readers."""

    def __init__(self, job: Job):
        self._job = job
        self._cond = threading.Condition(job.lock)
        self._streams = 0  # open RunJob streams attached to the job
        self._closed: str | None = None  # why no stream can answer any more
        self._open: tuple[str, str] | None = None  # (call_id, block_id) of the call waiting for its answer
        self._answer_by = 0.0  # time.monotonic() by which the open call must be answered (local_call_timeout)
        self._local_timeout = 0.0  # that timeout, for its message
        self._posted = False  # the open call was posted (`post`): no caller waits for its answer
        self._parts: list[jobs_pb2.Chunk] = []  # chunks of the open call's answer so far
        self._failure = None  # the open call's Failure, if the block raised on the client
        self._direct: Callable[[Any], None] | None = None  # sends the open call's outcome to its waiting worker
        self._answered = False  # the open call's outcome went to its worker from `deliver` (through _direct)
        self._kept: dict[str, tuple[str, Any]] | None = None  # call_id -> (block_id, answer or Failure): see keep
        self._kept_bytes = 0
        self.replayable = True  # False once the kept answers grew past KEEP_BYTES (they were dropped)

    def attach(self) -> None:
        """A RunJob stream of this job opened (the first, or a re-attach with the same request_id)."""
        with self._job.cond:
            self._streams += 1
            self._closed = None

    def detach(self, reason: str) -> None:
        """A stream ended; once none is left, an open call and every later one fail at once."""
        with self._job.cond:
            self._streams = max(0, self._streams - 1)
            if self._streams == 0:
                self._closed = reason
                self._cond.notify_all()

    def notify(self) -> None:
        """Have a call waiting for its answer look again (the job was asked to stop)."""
        with self._cond:
            self._cond.notify_all()

    def keep(self) -> None:
        """The job runs in a batch: keep the answers from now on, so that a re-run alone replays them."""
        with self._job.cond:
            if self._kept is None:
                self._kept = {}

    def deliver(self, answer: jobs_pb2.LocalResult) -> None:
        """An answer (or one chunk of it) from the client; answers to calls not open are dropped. The chunk that
        completes a call whose caller gave `direct` sends the outcome from here (the stream's reader thread)
        straight to the worker: no hand-off to the waiting relay thread on the way."""
        with self._job.cond:
            if self._open is None or answer.call_id != self._open[0] or self._answered:
                return
            if answer.WhichOneof("outcome") == "failure":
                self._failure = answer.failure
            else:
                self._parts.append(answer.values)
            send, outcome = self._direct, None
            if send is not None and (outcome := self._outcome()) is not None:
                self._answered, self._direct = True, None
                if self._posted:  # (no caller waits to forget its values: the log lets go of them now)
                    self._job.forget_payload(answer.call_id)
            self._cond.notify_all()
        if outcome is not None:
            send(outcome)  # (outside the lock: the relay, woken, sees the call answered and sends nothing)

    def _outcome(self) -> bytearray | LocalBlockFailed | None:
        """With the lock held: the open call's complete answer, or its block's failure (kept for a re-run);
        None while chunks are missing."""
        call_id, block_id = self._open
        if self._failure is not None:
            self._keep_answer(call_id, block_id, self._failure, 0)
            return _block_failed(block_id, self._failure)
        if self._parts and _complete(self._parts):
            data = join_chunks(self._parts)
            self._keep_answer(call_id, block_id, data, len(data))
            return data
        return None

    def call(self, call_id: str, block_id: str, payload: list, deadline: float,
             local_timeout: float, timed_out: Callable[[], BaseException], hold: float | None = None,
             direct: Callable[[Any], None] | None = None) -> bytearray | None:
        """Send one LocalCall (payload: serialized ValueMap pieces, see tether.wire.encode_value_map) and
        wait for its answer: the serialized ValueMap of the block's writes.

        A call a re-run makes again is not sent again: a kept answer is replayed, an open call is waited for.
        `hold`: seconds after which an unanswered call raises StillOpen and stays open (a batched job).
        `direct(outcome)`: while this waits, `deliver` hands the answer (bytes, or the LocalBlockFailed) to it
        instead, and this returns None. Raises LocalBlockFailed (the block raised on the client),
        LocalCallFailed (no stream left), JobTimeout (no answer in time, or the job's own limit came first) or
        JobCancelledError.
        """
        job = self._job
        with job.cond:
            self._close_answered()
            if self._kept is not None and call_id in self._kept:
                return self._replay(call_id, block_id)
            if self._open is not None and self._open != (call_id, block_id):  # (a re-run's call: the first
                raise _diverged(block_id, self._open[1])  # run left one open, and the client may answer it)
            if self._open is None:
                self._send_call(call_id, block_id, payload, local_timeout)
            answer_by = min(deadline, self._answer_by)
            held_until = None if hold is None else time.monotonic() + hold
            still_open = False
            self._direct = direct
            try:
                while True:
                    if self._answered:
                        return None
                    outcome = self._outcome()
                    if isinstance(outcome, LocalBlockFailed):
                        raise outcome
                    if outcome is not None:
                        return outcome
                    if job.cancel_requested:
                        raise JobCancelledError(f"cancelled while waiting for local() block {block_id}")
                    if self._closed is not None:
                        raise LocalCallFailed(
                            f"the client stopped before answering the local() block {block_id}: {self._closed}"
                        )
                    now = time.monotonic()
                    if held_until is not None and now >= held_until and now < answer_by:
                        still_open = True
                        raise StillOpen(block_id)
                    left = answer_by - now
                    if left <= 0:
                        raise timed_out() if answer_by >= deadline else _unanswered(block_id, local_timeout)
                    self._cond.wait(left if held_until is None else min(left, held_until - now))
            finally:
                self._direct = None
                if not still_open:
                    self._open, self._parts, self._answered = None, [], False
                    job.forget_payload(call_id)  # answered or not, the log need not keep the values

    def post(self, call_id: str, block_id: str, payload: list, local_timeout: float,
             direct: Callable[[Any], None]) -> bytes | bytearray | None:
        """Send a LocalCall whose worker went on without waiting (it needs no values back): `deliver` hands its
        answer to `direct` when it comes (the worker reads it before its next call or its end), or `expire`
        fails it. Returns the answer at once where it is known already (a re-run's call: kept, or answered
        while that run was away; a kept failure raises). Raises LocalCallFailed when no stream can answer."""
        with self._job.cond:
            self._close_answered()
            if self._kept is not None and call_id in self._kept:
                return self._replay(call_id, block_id)
            if self._open is not None and self._open != (call_id, block_id):
                raise _diverged(block_id, self._open[1])
            if self._open is None:
                self._send_call(call_id, block_id, payload, local_timeout)
            elif (outcome := self._outcome()) is not None:  # (a re-run's open call, answered meanwhile)
                self._answered = True
                self._close_answered()
                if isinstance(outcome, LocalBlockFailed):
                    raise outcome
                return outcome
            self._direct, self._posted = direct, True
            return None

    def expire(self, deadline: float, timed_out: Callable[[], BaseException]) -> BaseException | None:
        """For a posted call still unanswered: the error to give its worker instead, once the job was cancelled,
        its client is gone, or its time (the call's, the job's) ran out; the answer is then no longer taken."""
        with self._job.cond:
            if self._open is None or self._answered:
                return None
            block_id, now = self._open[1], time.monotonic()
            error: BaseException | None = None
            if self._job.cancel_requested:
                error = JobCancelledError(f"cancelled while waiting for local() block {block_id}")
            elif self._closed is not None:
                error = LocalCallFailed(f"the client stopped before answering the local() block {block_id}: "
                                        f"{self._closed}")
            elif now >= self._answer_by:
                error = _unanswered(block_id, self._local_timeout)
            elif now >= deadline:
                error = timed_out()
            if error is not None:
                self._answered, self._direct = True, None
                self._job.forget_payload(self._open[0])
            return error

    def _close_answered(self) -> None:
        """Forget a posted call that was answered (or expired): its worker has the outcome, and may call again."""
        if self._open is not None and self._answered:
            call_id = self._open[0]
            self._open, self._parts, self._answered, self._direct, self._posted = None, [], False, None, False
            self._job.forget_payload(call_id)

    def _send_call(self, call_id: str, block_id: str, payload: list, local_timeout: float) -> None:
        """Open the call and send it to the client (the caller holds the job's condition)."""
        if self._closed is not None:
            raise LocalCallFailed(f"cannot run the local() block {block_id}: {self._closed}")
        if self._job.cancel_requested:  # (no block runs on the client once the job was asked to stop)
            raise JobCancelledError(f"cancelled before local() block {block_id}")
        self._open, self._parts, self._failure, self._answered = (call_id, block_id), [], None, False
        self._posted = False
        self._answer_by, self._local_timeout = time.monotonic() + local_timeout, local_timeout
        for offset, data, total in split_pieces(payload):
            self._job.local_call(call_id, block_id, offset, data, total)

    def _keep_answer(self, call_id: str, block_id: str, answer: Any, size: int) -> None:
        if self._kept is None:  # the job runs alone: it is never run again
            return
        self._kept_bytes += size
        if self._kept_bytes > KEEP_BYTES:
            self._kept, self.replayable = {}, False
            return
        self._kept[call_id] = (block_id, answer)

    def _replay(self, call_id: str, block_id: str) -> bytes | bytearray:
        kept_block, answer = self._kept[call_id]
        if kept_block != block_id:
            raise _diverged(block_id, kept_block)
        if isinstance(answer, (bytes, bytearray)):
            return answer
        raise _block_failed(block_id, answer)


def _unanswered(block_id: str, local_timeout: float) -> JobTimeout:
    return JobTimeout(
        f"the client did not answer the local() block {block_id} within {local_timeout:g} s (the job's "
        "local_call_timeout), so the job was stopped: the client may have been disconnected or stuck in the "
        "block. Raise local_call_timeout for slow blocks."
    )


def _diverged(block_id: str, first_block: str) -> LocalCallFailed:
    return LocalCallFailed(
        f"this job runs again alone (see its status) and its re-run reached the local() block {block_id} where "
        f"its first run had reached the block {first_block}, so the client's earlier answers do not apply and the "
        "server does not ask it again. Submit the job again."
    )


def _block_failed(block_id: str, failure: Any) -> LocalBlockFailed:
    return LocalBlockFailed(f"the local() block {block_id} raised on the client: {failure.message}", failure)


def _complete(parts: list[jobs_pb2.Chunk]) -> bool:
    return sum(len(p.data) for p in parts) >= parts[0].total_size


def is_data(value: Any, depth: int = 0) -> bool:
    """Whether a value is data a local() block may receive: tensors, numbers, text, and containers of them
    (not models, modules, functions or tether's own objects)."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.Tensor, torch.Size,
                                           torch.dtype)):
        return True
    if type(value).__module__ == "numpy":
        return True
    if depth > 8:
        return False
    if isinstance(value, (list, tuple)):
        return all(is_data(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(is_data(k, depth + 1) and is_data(v, depth + 1) for k, v in value.items())
    return False


class LocalCaller:
    """The Executor's handler for `local()` blocks in one job: `(block, ns) -> names the client assigned`."""

    def __init__(self, link, decoded: DecodedProgram, *, deadline: float = 0.0, local_timeout: float = 0.0,
                 timed_out: Callable[[], BaseException] | None = None):
        self._link, self._decoded = link, decoded
        self._deadline, self._local_timeout, self._timed_out = deadline, local_timeout, timed_out
        self._calls = 0  # only the worker thread running the job touches this
        self._answer_due: Block | None = None  # the one-way block whose answer is read later

    def __call__(self, block: Block, ns: dict) -> dict[str, Any]:
        site = self._decoded.local_sites.get((block.filename, block.first_line))
        needs_answer = site is None or not self._decoded.needs_no_answer(site)
        if site is None:  # a block the server did not cut: describe it from the runtime's view
            user_file = self._decoded.user_files.get(block.filename, block.filename)
            site = LocalSite(str(block.first_line), user_file, block.first_line, tuple(sorted(block.loaded)))
        if self._link is None:
            raise LocalCallFailed(NO_STREAM)
        self.settle()
        self._calls += 1
        reads = {name: ns[name] for name in site.reads if name in ns and is_data(ns[name])}
        codec = self._decoded.codec
        payload = encode_value_map(reads, default=codec.model_reference)  # pieces: tensors are views
        call_id = str(self._calls)
        answer = self._link.call(call_id, site.block_id, payload, self._deadline, self._local_timeout,
                                 self._timed_out, needs_answer=needs_answer)
        self._answer_due = None if needs_answer else block
        values = codec.decode_answer(answer)
        device = _gpu_of(reads)  # as in a local run on that GPU, what the block computed from it lands there
        return to_device(values, device) if device is not None else values

    def settle(self) -> None:
        """Read the answer to the job's last one-way call (before its next call, and at its end): the block's
        error raises here, at the block's own line, as where the job waits for each answer."""
        if self._link is None:
            return
        due, self._answer_due = self._answer_due, None
        try:
            self._link.settle()
        except LocalBlockFailed as failed:
            if due is None:
                raise
            code = compile("\n" * (due.with_line - 1) + "raise failed", due.filename, "exec")
            names = {"co_name": due.scope} | ({"co_qualname": due.scope} if hasattr(code, "co_qualname") else {})
            exec(code.replace(**names), {"failed": failed})  # (a frame at the block's line, in its function)

    def settle_after(self, error: BaseException) -> BaseException:
        """What the job ends with when `error` stopped it: the failure of a one-way block that ran before (it came
        first), else `error` (the lines printed after that block go out)."""
        try:
            self.settle()
        except LocalBlockFailed as failed:
            return failed
        except Exception:  # (no answer will come: a cancel, a time limit, a client gone; `error` says why)
            pass
        return error


def _gpu_of(values: Any) -> torch.device | None:
    """The one non-CPU device of the tensors in `values` (None if they are all on the CPU, or on several)."""
    found: set[torch.device] = set()
    stack = [values]
    while stack and len(found) < 2:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                found.add(value.device)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return found.pop() if len(found) == 1 else None
