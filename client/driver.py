"""The client's one job driver: submit or stream a job, answer its local() calls, follow it, read its result.

Blocking, non-blocking and asyncio modes all run these coroutines on the one shared `Connection` of their
host (so a dropped connection fails every pending call, whichever mode made it). What differs is only how
the caller waits, which `Waiting` says: `Waiting.blocking(conn)` waits in the caller's thread (the
coroutines then never suspend, and `run_blocking` drives them to the end at once); `Waiting.awaiting(conn)`
awaits in the caller's asyncio loop, so nothing blocks it while the job queues and runs. Either way the gRPC
calls themselves run on the connection's loop thread, and local() blocks run in the caller's thread.
Must not import runner.py or aio.py (they import this).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from tether.protocol import JOB_ID_METADATA
from tether.runtime.errors import RemoteError
from tether.v1 import jobs_pb2, models_pb2

from .channel import CONNECT_WAIT_S, UNARY_TIMEOUT_S, Connection, Stream
from .display import StatusDisplay
from .encode import Job
from .errors import from_rpc_error
from .events import JobEvents, print_log, state_name
from .local import LocalCalls

__all__ = ["Waiting", "run_blocking", "run_job", "submit_and_wait", "follow", "read_result", "unary",
           "cancel_interrupted", "for_job", "new_events", "SUBMIT_WAIT_S"]

_ENDED = object()  # handed to the RunJob reader with the job's last event
_DROPPED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)  # a lost stream
SUBMIT_WAIT_S = 1.0  # how long a blocking job's SubmitJob waits for its end before following it with WatchJob
_SLOW_LINK_BYTES_S = 10e6  # a SubmitJob's deadline allows its upload at this rate
CANCEL_WRITE_S = 2.0  # s: after Ctrl-C, the longest wait for the stream's cancel message to be written
_STOPPED = (KeyboardInterrupt, asyncio.CancelledError)  # the caller stopped waiting: Ctrl-C, a cancelled task


class Waiting:
    """How the driver waits for the shared connection's calls: in the caller's thread, or in its asyncio loop."""

    def __init__(self, conn: Connection, awaiting: bool):
        self.conn = conn
        self.awaiting = awaiting

    @classmethod
    def blocking(cls, conn: Connection) -> Waiting:
        return cls(conn, awaiting=False)

    @classmethod
    def awaiting_in_loop(cls, conn: Connection) -> Waiting:
        """For a coroutine running in the caller's asyncio loop (not the connection's own loop thread)."""
        return cls(conn, awaiting=True)

    async def unary(self, method: Any, request: Any, metadata: tuple, timeout: float | None) -> Any:
        """A unary call (a stub attribute) and its response; raises grpc.RpcError."""
        if not self.awaiting:
            return self.conn.unary(method, request, metadata, timeout=timeout)
        await self._ready(timeout)

        async def call() -> Any:
            return await method(request, metadata=metadata, timeout=timeout)

        return await asyncio.wrap_future(self.conn.loop.submit(call()))

    async def stream(self, method: Any, request: Any = None, *, metadata: tuple = (),
                     timeout: float | None = None, on_response: Callable[[Any], Any] | None = None,
                     first: Any = None) -> Stream:
        """Start a streaming call (see Connection.stream); read it with `next`."""
        if not self.awaiting:
            return self.conn.stream(method, request, metadata=metadata, timeout=timeout,
                                    on_response=on_response, first=first)
        await self._ready(timeout)
        return Stream(self.conn, method, request, metadata, timeout, on_response, first,
                      wake_loop=asyncio.get_running_loop())

    async def next(self, call: Stream) -> Any:
        """The call's next item, or `Stream.END` once it ended; its failure raises."""
        return await call.next_async() if self.awaiting else call.next()

    async def _ready(self, timeout: float | None) -> None:
        wait = CONNECT_WAIT_S if timeout is None else min(timeout, CONNECT_WAIT_S)
        if self.conn.needs_wait():
            await asyncio.wrap_future(self.conn.loop.submit(self.conn.ready(wait)))


def run_blocking(coro: Coroutine) -> Any:
    """Drive a coroutine that waits with `Waiting.blocking` (it never suspends) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a blocking job driver suspended; it must wait with Waiting.blocking")


def new_events(display: StatusDisplay, job_id: str | None = None) -> JobEvents:
    """A job's event fold, printing its log lines (CONFIG.APP.REMOTE_LOGGING) and debug output as configured."""
    from tether.config import CONFIG

    log = print_log if CONFIG.APP.REMOTE_LOGGING else None
    return JobEvents(display, job_id=job_id, log=log, debug=bool(CONFIG.APP.DEBUG))


async def _models(io: Waiting, metadata: tuple) -> list[str]:
    try:
        response = await io.unary(io.conn.models.ListModels, models_pb2.ListModelsRequest(), metadata, 5.0)
    except grpc.RpcError:
        return []
    return [m.name for m in response.models]


async def _error(io: Waiting, metadata: tuple, error: grpc.RpcError) -> RemoteError:
    models = await _models(io, metadata) if error.code() is grpc.StatusCode.NOT_FOUND else None
    return from_rpc_error(error, io.conn.host, models=models)


async def unary(io: Waiting, method: Any, request: Any, metadata: tuple, wait: float = 0.0,
                job_id: str | None = None) -> Any:
    """A unary call with UNARY_TIMEOUT_S (plus `wait` seconds) to answer; its failure as a RemoteError (naming
    `job_id`, the job the call is about, if any)."""
    try:
        return await io.unary(method, request, metadata, UNARY_TIMEOUT_S + wait)
    except grpc.RpcError as error:
        raise for_job(await _error(io, metadata, error), job_id) from None


def for_job(error: RemoteError, job_id: str | None) -> RemoteError:
    """An error after the server accepted a job names the job and how to re-attach to it."""
    if not job_id or "RemoteBackend(job_id=" in str(error):
        return error
    return RemoteError(
        f"{error}\n(Job {job_id} was accepted by the server; while the server keeps it, re-attach with "
        f"tether.client.RemoteBackend(job_id={job_id!r}) or `await tether.client.aio.fetch({job_id!r})`.)",
        remote_type=error.remote_type, remote_traceback=error.remote_traceback, code=error.code)


async def submit_and_wait(io: Waiting, metadata: tuple, job: Job, events: JobEvents,
                          on_job_id: Callable[[str], None]) -> None:
    """Run a job that has no local() blocks to its end, its result included, into `events`.

    SubmitJob waits up to SUBMIT_WAIT_S for the job to end and then carries all its events; a job still
    running is followed with WatchJob (live status and logs). Ctrl-C (or cancelling the awaiting task)
    cancels the job.
    """
    conn = io.conn
    events.display.update(state="SUBMITTING")
    request = jobs_pb2.SubmitJobRequest(job=job.spec)
    request.wait.FromNanoseconds(int(SUBMIT_WAIT_S * 1e9))
    upload_s = request.ByteSize() / _SLOW_LINK_BYTES_S
    try:
        response = None
        try:
            response = await io.unary(conn.jobs.SubmitJob, request, metadata,
                                      UNARY_TIMEOUT_S + SUBMIT_WAIT_S + upload_s)
        except grpc.RpcError as error:
            accepted = accepted_job_id(error)
            if error.code() not in (*_DROPPED, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise for_job(await _error(io, metadata, error), accepted) from None
            if accepted:  # the server had accepted it and the answer was lost: follow the job it named
                events.job_id = accepted
                on_job_id(accepted)
                events.display.update(accepted, "RUNNING", "re-attaching")
            else:  # lost before the server named a job: its request_id finds it (or submits it, once)
                response = await unary(io, conn.jobs.SubmitJob, jobs_pb2.SubmitJobRequest(job=job.spec), metadata,
                                       wait=upload_s)
        if response is not None:
            events.job_id = response.job_id
            on_job_id(response.job_id)
            for update in response.events:
                events.feed_response(update)
        if not events.done:
            if response is not None:
                events.display.update(response.job_id, state_name(response.state), "")
            await follow(io, metadata, events)
    except _STOPPED:
        await cancel_interrupted(io, metadata, job, events.job_id)
        raise
    events.raise_if_failed()
    await read_result(io, metadata, events)


def accepted_job_id(error: grpc.RpcError) -> str | None:
    """The id of the job a failed SubmitJob had been accepted as (its initial metadata), if the server got so far."""
    try:
        metadata = error.initial_metadata() or ()
    except Exception:  # an error that is not a call (raised before one started)
        return None
    return next((value for key, value in metadata if key == JOB_ID_METADATA), None)


async def cancel_interrupted(io: Waiting, metadata: tuple, job: Job, job_id: str | None) -> None:
    """Cancel a job the user interrupted; without its id yet, SubmitJob with the same request_id names it."""
    conn = io.conn
    try:
        if not job_id:
            job_id = (await io.unary(conn.jobs.SubmitJob, jobs_pb2.SubmitJobRequest(job=job.spec), metadata,
                                     2.0)).job_id
        await io.unary(conn.jobs.CancelJob,
                       jobs_pb2.CancelJobRequest(job_id=job_id, reason="interrupted by the user"), metadata, 2.0)
    except (grpc.RpcError, asyncio.CancelledError):
        pass


async def run_job(io: Waiting, metadata: tuple, job: Job, ns: dict, events: JobEvents,
                  on_job_id: Callable[[str], None]) -> LocalCalls | None:
    """Run a job on one RunJob stream, answer its local() calls (in the caller's thread, in `ns`'s copy) and
    read its result into `events`; returns the local() calls' state (what they kept), if any came.

    `on_job_id` is called as soon as the server names the job (local() blocks can read it). Long on purpose:
    the stream's callback, its reader and the Ctrl-C path share the job's state as closures.
    """
    conn = io.conn
    local: LocalCalls | None = None  # made when the first local() call arrives (most jobs have none)
    named: list[str] = []  # the job id once handed to on_job_id (on the caller's side)
    events.display.update(state="SUBMITTING")

    def on_response(response: jobs_pb2.RunJobResponse) -> list[Any] | None:
        """On the loop thread: status, logs and result chunks are handled there; local() calls come here,
        and so does the job's end (the reader need not wait for the server to close the stream)."""
        local_calls = events.feed_response(response)
        if events.done:
            if started:
                started[0].send(None)
            local_calls.append(_ENDED)
        return local_calls or None

    def name_job() -> None:
        if events.job_id and not named:
            named.append(events.job_id)
            on_job_id(events.job_id)

    started: list[Any] = []  # the call, once started (a fast job can end before `call` is bound)
    call = await io.stream(conn.jobs.RunJob, metadata=metadata, on_response=on_response,
                           first=jobs_pb2.RunJobRequest(job=job.spec))
    started.append(call)
    try:
        with conn.track(call, lambda: events.job_id):
            while (local_calls := await io.next(call)) is not Stream.END:
                name_job()
                if local_calls[-1] is _ENDED:  # the job ended: nothing is left to answer
                    break
                for local_call in local_calls:
                    if local is None:
                        local = LocalCalls(job, ns, events.display)
                    for message in local.answer(local_call):
                        call.send(message)
    except grpc.RpcError as error:
        if not events.job_id or error.code() not in _DROPPED:
            raise for_job(await _error(io, metadata, error), events.job_id) from None
        # the stream dropped after the job started: the job runs on, so pick up its events where we stopped
    except _STOPPED:  # the stream's cancel may not be written before the call's own: CancelJob says it too
        call.send(jobs_pb2.RunJobRequest(cancel=jobs_pb2.CancelRequest(reason="interrupted by the user")))
        call.flush(CANCEL_WRITE_S)  # (the call's own cancel must not overtake it: the server reads it first)
        await cancel_interrupted(io, metadata, job, events.job_id)
        call.cancel("interrupted by the user")
        raise
    except BaseException:
        call.cancel("the client stopped reading the job")
        raise
    finally:
        call.send(None)
    name_job()
    if not events.done:
        await follow(io, metadata, events)
    if local is not None and local.error is not None:
        raise local.error
    events.raise_if_failed()
    await read_result(io, metadata, events)
    return local


async def follow(io: Waiting, metadata: tuple, events: JobEvents, *, timeout: float | None = None) -> None:
    """Re-attach to a job with WatchJob (after the last event seen) until it ends or `timeout` passes.

    A local() call seen here cannot be answered (only RunJob carries answers); the server times it out.
    """
    conn = io.conn
    request = jobs_pb2.WatchJobRequest(job_id=events.job_id, after_sequence=events.last_sequence)
    call = await io.stream(conn.jobs.WatchJob, request, metadata=metadata, timeout=timeout,
                           on_response=lambda response: events.feed_response(response) and None)
    try:
        with conn.track(call, events.job_id):
            while await io.next(call) is not Stream.END:
                pass
    except grpc.RpcError as error:
        if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
            return
        if error.code() in _DROPPED:
            raise RemoteError(
                f"Lost job {events.job_id} and could not re-attach to the server at {conn.host}: "
                f"{error.details()}. The job may still run there: fetch it later with "
                f"tether.client.RemoteBackend(job_id={events.job_id!r}).",
                code=error.code().name,
            ) from None
        raise for_job(await _error(io, metadata, error), events.job_id) from None
    except BaseException:  # Ctrl-C, an awaiting task cancelled: the call (and its reader) stop too
        call.cancel("the client stopped waiting for the job")
        raise


async def read_result(io: Waiting, metadata: tuple, events: JobEvents) -> None:
    """Complete `events.result` with ReadResult from where the event stream stopped."""
    if events.result_complete:
        return
    conn = io.conn
    request = jobs_pb2.ReadResultRequest(job_id=events.job_id, offset=events.received)
    call = await io.stream(conn.jobs.ReadResult, request, metadata=metadata,
                           on_response=lambda response: events.add_result_chunk(response.chunk))
    try:
        with conn.track(call, events.job_id):
            while await io.next(call) is not Stream.END:
                pass
    except grpc.RpcError as error:
        raise for_job(await _error(io, metadata, error), events.job_id) from None
    except BaseException:  # Ctrl-C, an awaiting task cancelled: the call (and its reader) stop too
        call.cancel("the client stopped reading the result")
        raise
    if not events.result_complete:
        raise RemoteError(f"job {events.job_id}: the result ended after {events.received} bytes "
                          f"of {events.result_total}.")

