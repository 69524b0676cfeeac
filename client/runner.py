"""`remote=True`: run a captured context on a tether server and put its results in the caller's names.

`run_remote` is the seam the engine calls. `RemoteBackend` holds where jobs go and, in non-blocking mode,
which job is out. A blocking job with local() blocks is one RunJob stream: status, logs, local() calls and
the result. One without is a SubmitJob that waits for the job's end and brings its events (a unary call
costs about half a stream), followed by WatchJob if the job outlasts the wait.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from tether.runtime.errors import RemoteError, TetherError
from tether.runtime.saving import NotReached, UnsavedValue, finalize_saved
from tether.v1 import jobs_pb2, models_pb2

from .channel import UNARY_TIMEOUT_S, Connection, auth_metadata, connect, resolve_api_key, resolve_host
from .display import StatusDisplay
from .encode import Job, build_job
from .errors import from_rpc_error
from .events import JobEvents, apply_result, decode_result, mark_pending, print_log, state_name
from .local import LocalCalls

__all__ = ["RemoteBackend", "run_remote"]

_ENDED = object()  # handed to the RunJob reader with the job's last event
_DROPPED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)  # a lost stream
SUBMIT_WAIT_S = 1.0  # how long a blocking job's SubmitJob waits for its end before following it with WatchJob
_SLOW_LINK_BYTES_S = 10e6  # a SubmitJob's deadline allows its upload at this rate


def run_remote(context: Any, ns: dict) -> None:
    """The engine's seam: run `context` remotely with the caller's names `ns`, and fill `ns` with results."""
    options = context._remote_options
    backend = options.get("backend")
    if backend is None or isinstance(backend, str):
        backend = RemoteBackend(backend, api_key=options.get("api_key"), blocking=options.get("blocking", True),
                                verbose=bool(options.get("verbose", False)))
    elif not callable(backend):
        raise TetherError(
            f"backend= must be 'host:port' or a tether.client.RemoteBackend, not {type(backend).__name__}."
        )
    backend(context, ns, blocking=options.get("blocking"), api_key=options.get("api_key"))


class RemoteBackend:
    """Where remote jobs go, and (non-blocking) the job that is out.

    `RemoteBackend()` uses CONFIG.API.HOST; `RemoteBackend("host:port", blocking=False)` submits and
    returns at once. Passing the same backend (`backend=tracer.backend`, with remote=True) to the same
    block again fetches that job instead of submitting a new one: its result when it is done (the names
    are filled and the backend forgets the job), its status otherwise. `RemoteBackend(job_id=...)`
    picks up a job submitted elsewhere with the same API key. `api_key=` is sent with its calls (default
    CONFIG.API.APIKEY); `verbose=True` keeps each job state on its own status line.
    """

    def __init__(self, host: str | None = None, *, api_key: str | None = None, blocking: bool = True,
                 job_id: str | None = None, verbose: bool = False):
        self.host = host
        self.api_key = api_key
        self.blocking = blocking
        self.job_id = job_id  # the job a later call fetches instead of submitting a new one
        self.verbose = verbose
        self.last_job_id: str | None = None  # the most recent job, kept after it is fetched
        self.state = ""  # its last known state name
        self._job: Job | None = None  # what was submitted, to read its result without a context
        self._block: Any = None  # the block that submitted it (a capture.Block)
        self._fetched: bytes | bytearray | memoryview | None = None  # its result, read by result() and not
        # yet handed to a run of that block: running the block again fills its names from this, no new job

    def __repr__(self) -> str:
        return f"RemoteBackend(host={resolve_host(self.host)!r}, job_id={self.job_id!r}, state={self.state!r})"

    # ---- the seam -------------------------------------------------------------------------------
    def __call__(self, context: Any, ns: dict, *, blocking: bool | None = None, api_key: str | None = None) -> None:
        """Run (or submit, or fetch) `context`'s job and fill `ns` with what the caller gets back."""
        blocking = self.blocking if blocking is None else blocking
        job = build_job(context, ns)
        conn, metadata = self._connect(api_key)
        display = StatusDisplay(verbose=self.verbose)
        context.backend = self
        try:
            if self.job_id is None and self._fetched is not None and context.block is self._block:
                data, self._fetched = self._fetched, None  # result() read it: hand it over, submit nothing
                apply_result(job, data, ns)
                context.job_id = self.last_job_id
            elif self.job_id is not None:
                context.job_id = self.job_id
                self._fetch(conn, metadata, job, ns, display, wait=blocking)
            elif blocking:
                context.job_id = None
                run = _run_job if job.has_local_blocks else _submit_and_wait
                events = run(conn, metadata, job, ns, display, context)
                self.last_job_id, self.state = events.job_id, state_name(events.state)
            else:
                self._submit(conn, metadata, job, ns, display, context)
                context.job_id = self.job_id
        finally:
            display.close()

    # ---- non-blocking ---------------------------------------------------------------------------
    def _submit(self, conn: Connection, metadata: tuple, job: Job, ns: dict, display: StatusDisplay,
                context: Any) -> None:
        if job.has_local_blocks:
            raise TetherError(
                "This body has `local()` blocks, which run on this machine while the job runs, so it needs a "
                "blocking job: drop `blocking=False` (or use tether.client.aio for an awaitable job)."
            )
        request = jobs_pb2.SubmitJobRequest(job=job.spec)
        response = _unary(conn, conn.jobs.SubmitJob, request, metadata)
        self.job_id = self.last_job_id = response.job_id
        self.state = state_name(response.state)
        self._job, self._block, self._fetched = job, getattr(context, "block", None), None
        display.update(response.job_id, self.state, "submitted; fetch with backend=tracer.backend")
        mark_pending(job, ns, f"job {response.job_id} was submitted with blocking=False and is {self.state}")

    def _fetch(self, conn: Connection, metadata: tuple, job: Job, ns: dict, display: StatusDisplay, *,
               wait: bool) -> None:
        job_id = self.job_id
        events = JobEvents(display, job_id=job_id, log=_logger(), debug=_debug())
        if wait:
            _follow(conn, metadata, events)
        else:
            info = _unary(conn, conn.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id), metadata,
                          job_id=job_id).job
            events.state, events.status = info.status.state, info.status
            display.update(job_id, state_name(info.status.state), info.status.message)
        self.state = state_name(events.state)
        if not events.done:
            mark_pending(job, ns, f"job {job_id} is {self.state}")
            return
        self.job_id = None  # fetched (or failed): the next call with this backend submits a new job
        events.raise_if_failed()
        _read_result(conn, metadata, events)
        apply_result(job, events.result, ns)

    def status(self) -> str:
        """The state of the job that is out (QUEUED, RUNNING, COMPLETED...), asked of the server now."""
        job_id = self._require_job()
        conn, metadata = self._connect(None)
        info = _unary(conn, conn.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id), metadata, job_id=job_id).job
        self.state = state_name(info.status.state)
        return self.state

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job that is out (at most `timeout` seconds, then TimeoutError) and return its values
        by name (saved values, and stand-ins).

        Running the block that submitted it again with `backend=` afterwards fills its names from this
        result; it submits no second job.
        """
        job_id = self._require_job()
        conn, metadata = self._connect(None)
        display = StatusDisplay(verbose=self.verbose)
        events = JobEvents(display, job_id=job_id, log=_logger(), debug=_debug())
        try:
            _follow(conn, metadata, events, timeout=timeout)
            self.state = state_name(events.state)
            if not events.done:
                raise TimeoutError(f"job {job_id} is still {self.state} after {timeout} s")
            self.job_id = None
            events.raise_if_failed()
            _read_result(conn, metadata, events)
        finally:
            display.close()
        self._fetched = events.result if self._block is not None else None
        return values_of(events.result, self._job)

    def cancel(self, reason: str = "cancelled by the client") -> str:
        """Cancel the job that is out, telling the server `reason`; returns its state afterwards."""
        job_id = self._require_job()
        conn, metadata = self._connect(None)
        response = _unary(conn, conn.jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id, reason=reason),
                          metadata, job_id=job_id)
        self.state = state_name(response.state)
        return self.state

    def _require_job(self) -> str:
        if self.job_id is None:
            raise TetherError("This backend has no job out: submit one with `blocking=False` first.")
        return self.job_id

    def _connect(self, api_key: str | None) -> tuple[Connection, tuple]:
        return connect(self.host), auth_metadata(resolve_api_key(api_key or self.api_key))


def values_of(data: bytes, job: Job | None) -> dict[str, Any]:
    """A serialized JobResult as a dict of what the caller would see by name."""
    saved, unsaved, unreached, reason, _ = decode_result(data, job)
    out = {name: finalize_saved(value) for name, value in saved.items()}
    out.update({name: UnsavedValue(name) for name in unsaved})
    out.update({name: NotReached(name, reason) for name in unreached})
    return out


# ---------------------------------------------------------------------------------------------- calls


def _logger() -> Callable[[str], None] | None:
    from tether.config import CONFIG

    return print_log if CONFIG.APP.REMOTE_LOGGING else None


def _debug() -> bool:
    from tether.config import CONFIG

    return bool(CONFIG.APP.DEBUG)


def _models(conn: Connection, metadata: tuple) -> list[str]:
    try:
        response = conn.unary(conn.models.ListModels, models_pb2.ListModelsRequest(), metadata, timeout=5.0)
    except grpc.RpcError:
        return []
    return [m.name for m in response.models]


def _error(conn: Connection, metadata: tuple, error: grpc.RpcError) -> RemoteError:
    models = _models(conn, metadata) if error.code() is grpc.StatusCode.NOT_FOUND else None
    return from_rpc_error(error, conn.host, models=models)


def _unary(conn: Connection, method: Any, request: Any, metadata: tuple, wait: float = 0.0,
           job_id: str | None = None) -> Any:
    """A unary call with UNARY_TIMEOUT_S (plus `wait` seconds) to answer; its failure as a RemoteError (naming
    `job_id`, the job the call is about, if any)."""
    try:
        return conn.unary(method, request, metadata, timeout=UNARY_TIMEOUT_S + wait)
    except grpc.RpcError as error:
        raise for_job(_error(conn, metadata, error), job_id) from None


def for_job(error: RemoteError, job_id: str | None) -> RemoteError:
    """An error after the server accepted a job names the job and how to re-attach to it."""
    if not job_id or "RemoteBackend(job_id=" in str(error):
        return error
    return RemoteError(
        f"{error}\n(Job {job_id} was accepted by the server; while the server keeps it, re-attach with "
        f"tether.client.RemoteBackend(job_id={job_id!r}) or `await tether.client.aio.fetch({job_id!r})`.)",
        remote_type=error.remote_type, remote_traceback=error.remote_traceback, code=error.code)


def _submit_and_wait(conn: Connection, metadata: tuple, job: Job, ns: dict, display: StatusDisplay,
                     context: Any) -> JobEvents:
    """Run a blocking job that has no local() blocks and fill `ns` with its result.

    SubmitJob waits up to SUBMIT_WAIT_S for the job to end and then carries all its events; a job still
    running is followed with WatchJob (live status and logs). Ctrl-C cancels the job.
    """
    events = JobEvents(display, log=_logger(), debug=_debug())
    display.update(state="SUBMITTING")
    request = jobs_pb2.SubmitJobRequest(job=job.spec)
    request.wait.FromNanoseconds(int(SUBMIT_WAIT_S * 1e9))
    upload_s = request.ByteSize() / _SLOW_LINK_BYTES_S
    try:
        try:
            response = conn.unary(conn.jobs.SubmitJob, request, metadata,
                                  timeout=UNARY_TIMEOUT_S + SUBMIT_WAIT_S + upload_s)
        except grpc.RpcError as error:
            if error.code() not in (*_DROPPED, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _error(conn, metadata, error) from None
            # the answer was lost, not refused: the job's request_id finds it (or submits it, once)
            response = _unary(conn, conn.jobs.SubmitJob, jobs_pb2.SubmitJobRequest(job=job.spec), metadata,
                              wait=upload_s)
        events.job_id = context.job_id = response.job_id
        for update in response.events:
            events.feed_response(update)
        if not events.done:
            display.update(response.job_id, state_name(response.state), "")
            _follow(conn, metadata, events)
    except KeyboardInterrupt:
        _cancel_interrupted(conn, metadata, job, events.job_id)
        raise
    events.raise_if_failed()
    _read_result(conn, metadata, events)
    apply_result(job, events.result, ns)
    return events


def _cancel_interrupted(conn: Connection, metadata: tuple, job: Job, job_id: str | None) -> None:
    """Cancel a job the user interrupted; without its id yet, SubmitJob with the same request_id names it."""
    try:
        if not job_id:
            job_id = conn.unary(conn.jobs.SubmitJob, jobs_pb2.SubmitJobRequest(job=job.spec), metadata,
                                timeout=2.0).job_id
        conn.unary(conn.jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id, reason="interrupted by the user"),
                   metadata, timeout=2.0)
    except grpc.RpcError:
        pass


def _run_job(conn: Connection, metadata: tuple, job: Job, ns: dict, display: StatusDisplay,
             context: Any) -> JobEvents:
    """Run a blocking job on one RunJob stream, answer its local() calls, and fill `ns` with its result.

    `context.job_id` is set as soon as the server names the job (local() blocks can read it).
    """
    events = JobEvents(display, log=_logger(), debug=_debug())
    local: LocalCalls | None = None  # made when the first local() call arrives (most jobs have none)
    display.update(state="SUBMITTING")

    def on_response(response: jobs_pb2.RunJobResponse) -> list[jobs_pb2.LocalCall] | None:
        """On the loop thread: status, logs and result chunks are handled there; local() calls come here,
        and so does the job's end (the reader need not wait for the server to close the stream)."""
        local_calls = events.feed_response(response)
        if context.job_id is None and events.job_id:
            context.job_id = events.job_id
        if events.done:
            if started:
                started[0].send(None)
            local_calls.append(_ENDED)
        return local_calls or None

    started: list[Any] = []  # the call, once started (a fast job can end before `call` is bound)

    call = conn.stream(conn.jobs.RunJob, metadata=metadata, on_response=on_response,
                       first=jobs_pb2.RunJobRequest(job=job.spec))
    started.append(call)
    try:
        with conn.track(call, lambda: events.job_id):
            for local_calls in call:
                if local_calls[-1] is _ENDED:  # the job ended: nothing is left to answer
                    break
                for local_call in local_calls:
                    if local is None:
                        local = LocalCalls(job, ns, display)
                    for message in local.answer(local_call):
                        call.send(message)
    except grpc.RpcError as error:
        if not events.job_id or error.code() not in _DROPPED:
            raise for_job(_error(conn, metadata, error), events.job_id) from None
        # the stream dropped after the job started: the job runs on, so pick up its events where we stopped
    except KeyboardInterrupt:
        call.send(jobs_pb2.RunJobRequest(cancel=jobs_pb2.CancelRequest(reason="interrupted by the user")))
        if events.job_id:
            _cancel_interrupted(conn, metadata, job, events.job_id)
        call.cancel("interrupted by the user")
        raise
    except BaseException:
        call.cancel("the client stopped reading the job")
        raise
    finally:
        call.send(None)
    if not events.done:
        _follow(conn, metadata, events)
    if local is not None and local.error is not None:
        raise local.error
    events.raise_if_failed()
    _read_result(conn, metadata, events)
    apply_result(job, events.result, ns, kept=local.kept if local is not None else None)
    return events


def _follow(conn: Connection, metadata: tuple, events: JobEvents, *, timeout: float | None = None) -> None:
    """Re-attach to a job with WatchJob (after the last event seen) until it ends or `timeout` passes.

    A local() call seen here cannot be answered (only RunJob carries answers); the server times it out.
    """
    request = jobs_pb2.WatchJobRequest(job_id=events.job_id, after_sequence=events.last_sequence)
    call = conn.stream(conn.jobs.WatchJob, request, metadata=metadata, timeout=timeout,
                       on_response=lambda response: events.feed_response(response) and None)
    try:
        with conn.track(call, events.job_id):
            for _ in call:
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
        raise for_job(_error(conn, metadata, error), events.job_id) from None


def _read_result(conn: Connection, metadata: tuple, events: JobEvents) -> None:
    """Complete `events.result` with ReadResult from where the event stream stopped."""
    if events.result_complete:
        return
    request = jobs_pb2.ReadResultRequest(job_id=events.job_id, offset=events.received)
    call = conn.stream(conn.jobs.ReadResult, request, metadata=metadata,
                       on_response=lambda response: events.add_result_chunk(response.chunk))
    try:
        with conn.track(call, events.job_id):
            for _ in call:
                pass
    except grpc.RpcError as error:
        raise for_job(_error(conn, metadata, error), events.job_id) from None
    if not events.result_complete:
        raise RemoteError(f"job {events.job_id}: the result ended after {events.received} bytes "
                          f"of {events.result_total}.")
