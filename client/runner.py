"""`remote=True`: run a captured context on a tether server and put its results in the caller's names.

`run_remote` is the seam the engine calls. `RemoteBackend` holds where jobs go and, in non-blocking mode,
which job is out; the calls themselves are the one job driver's (`driver.py`), waited for in the caller's
thread.
"""

from __future__ import annotations

from typing import Any

from tether.runtime.errors import TetherError
from tether.runtime.saving import NotReached, UnsavedValue, finalize_saved
from tether.v1 import jobs_pb2

from .channel import auth_metadata, connect, resolve_api_key, resolve_host
from .display import StatusDisplay
from .driver import Waiting, follow, new_events, read_result, run_blocking, run_job, submit_and_wait, unary
from .encode import Job, build_job
from .events import apply_result, decode_result, mark_pending, state_name

__all__ = ["RemoteBackend", "run_remote", "values_of"]


def run_remote(context: Any, ns: dict) -> None:
    """The engine's seam: run `context` remotely with the caller's names `ns`, and fill `ns` with results."""
    options = context.remote_request().options
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
        io, metadata = self._connect(api_key)
        display = StatusDisplay(verbose=self.verbose)
        context.backend = self
        try:
            if self.job_id is None and self._fetched is not None and context.block is self._block:
                data, self._fetched = self._fetched, None  # result() read it: hand it over, submit nothing
                apply_result(job, data, ns)
                context.job_id = self.last_job_id
            elif self.job_id is not None:
                context.job_id = self.job_id
                run_blocking(self._fetch(io, metadata, job, ns, display, wait=blocking))
            elif blocking:
                context.job_id = None
                self._run(io, metadata, job, ns, display, context)
            else:
                run_blocking(self._submit(io, metadata, job, ns, display, context))
                context.job_id = self.job_id
        finally:
            display.close()

    def _run(self, io: Waiting, metadata: tuple, job: Job, ns: dict, display: StatusDisplay,
             context: Any) -> None:
        """A blocking job: one RunJob stream when it has local() blocks, else a SubmitJob that waits."""
        events = new_events(display)

        def on_job_id(job_id: str) -> None:
            context.job_id = job_id

        if job.has_local_blocks:
            local = run_blocking(run_job(io, metadata, job, ns, events, on_job_id))
        else:
            local = run_blocking(submit_and_wait(io, metadata, job, events, on_job_id))
        apply_result(job, events.result, ns, kept=local.kept if local is not None else None)
        self.last_job_id, self.state = events.job_id, state_name(events.state)

    # ---- non-blocking ---------------------------------------------------------------------------
    async def _submit(self, io: Waiting, metadata: tuple, job: Job, ns: dict, display: StatusDisplay,
                      context: Any) -> None:
        if job.has_local_blocks:
            raise TetherError(
                "This body has `local()` blocks, which run on this machine while the job runs, so it needs a "
                "blocking job: drop `blocking=False` (or use tether.client.aio for an awaitable job)."
            )
        request = jobs_pb2.SubmitJobRequest(job=job.spec)
        response = await unary(io, io.conn.jobs.SubmitJob, request, metadata)
        self.job_id = self.last_job_id = response.job_id
        self.state = state_name(response.state)
        self._job, self._block, self._fetched = job, getattr(context, "block", None), None
        display.update(response.job_id, self.state, "submitted; fetch with backend=tracer.backend")
        mark_pending(job, ns, f"job {response.job_id} was submitted with blocking=False and is {self.state}")

    async def _fetch(self, io: Waiting, metadata: tuple, job: Job, ns: dict, display: StatusDisplay, *,
                     wait: bool) -> None:
        job_id = self.job_id
        events = new_events(display, job_id)
        if wait:
            await follow(io, metadata, events)
        else:
            info = (await unary(io, io.conn.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id), metadata,
                                job_id=job_id)).job
            events.state, events.status = info.status.state, info.status
            display.update(job_id, state_name(info.status.state), info.status.message)
        self.state = state_name(events.state)
        if not events.done:
            mark_pending(job, ns, f"job {job_id} is {self.state}")
            return
        self.job_id = None  # fetched (or failed): the next call with this backend submits a new job
        events.raise_if_failed()
        await read_result(io, metadata, events)
        apply_result(job, events.result, ns)

    def status(self) -> str:
        """The state of the job that is out (QUEUED, RUNNING, COMPLETED...), asked of the server now."""
        job_id = self._require_job()
        io, metadata = self._connect(None)
        info = run_blocking(unary(io, io.conn.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id), metadata,
                                  job_id=job_id)).job
        self.state = state_name(info.status.state)
        return self.state

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job that is out (at most `timeout` seconds, then TimeoutError) and return its values
        by name (saved values, and stand-ins).

        Running the block that submitted it again with `backend=` afterwards fills its names from this
        result; it submits no second job.
        """
        job_id = self._require_job()
        io, metadata = self._connect(None)
        display = StatusDisplay(verbose=self.verbose)
        events = new_events(display, job_id)
        try:
            run_blocking(self.wait_for_result(io, metadata, events, timeout))
        finally:
            display.close()
        self._fetched = events.result if self._block is not None else None
        return values_of(events.result, self._job)

    async def wait_for_result(self, io: Waiting, metadata: tuple, events: Any, timeout: float | None) -> None:
        """Follow the job that is out (`events.job_id`) to its end and read its result into `events`; the
        backend then forgets it. Used by `result()` and by `await tether.client.aio.fetch(backend)`."""
        await follow(io, metadata, events, timeout=timeout)
        self.state = state_name(events.state)
        if not events.done:
            raise TimeoutError(f"job {events.job_id} is still {self.state} after {timeout} s")
        if self.job_id == events.job_id:
            self.job_id = None
        events.raise_if_failed()
        await read_result(io, metadata, events)

    def cancel(self, reason: str = "cancelled by the client") -> str:
        """Cancel the job that is out, telling the server `reason`; returns its state afterwards."""
        job_id = self._require_job()
        io, metadata = self._connect(None)
        response = run_blocking(unary(io, io.conn.jobs.CancelJob,
                                      jobs_pb2.CancelJobRequest(job_id=job_id, reason=reason), metadata,
                                      job_id=job_id))
        self.state = state_name(response.state)
        return self.state

    def _require_job(self) -> str:
        if self.job_id is None:
            raise TetherError("This backend has no job out: submit one with `blocking=False` first.")
        return self.job_id

    def _connect(self, api_key: str | None) -> tuple[Waiting, tuple]:
        return Waiting.blocking(connect(self.host)), auth_metadata(resolve_api_key(api_key or self.api_key))


def values_of(data: bytes, job: Job | None) -> dict[str, Any]:
    """A serialized JobResult as a dict of what the caller would see by name."""
    saved, unsaved, unreached, reason, _ = decode_result(data, job)
    out = {name: finalize_saved(value) for name, value in saved.items()}
    out.update({name: UnsavedValue(name) for name in unsaved})
    out.update({name: NotReached(name, reason) for name in unreached})
    return out
