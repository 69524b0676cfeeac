"""Awaitable remote jobs, for notebooks and asyncio servers: nothing blocks the event loop while the job
queues and runs. The job runs on the one job driver (`driver.py`) and the host's shared connection, awaited in
the caller's loop; local() blocks run in that loop's thread when the server reaches them.

    backend = tether.client.aio.AsyncBackend()
    with model.trace("Hello", remote=True, backend=backend):
        h = model.transformer.h[0].output.save()
    values = await backend          # {"h": tensor}; also backend.job_id
    values = await tether.client.aio.fetch(job_id)   # a job submitted with blocking=False
"""

from __future__ import annotations

import sys
from typing import Any

from tether.runtime.cpython import is_tether_frame
from tether.runtime.errors import TetherError

from .channel import auth_metadata, connect, resolve_api_key
from .display import StatusDisplay
from .driver import Waiting, new_events, run_job, submit_and_wait
from .encode import Job, build_job
from .events import AwaitedValue, mark_pending, state_name
from .runner import RemoteBackend, values_of
from .wire import split_value_map

__all__ = ["AsyncBackend", "fetch"]


class AsyncBackend:
    """A backend whose block is captured, not run: `await backend` (or `await backend.run()`) runs it.

    The names the block assigns hold pending stand-ins until then; the awaited dict has their values, and a
    block at module or notebook level gets its names filled. `host=` ("host:port", default
    CONFIG.API.HOST), `api_key=` (default CONFIG.API.APIKEY), `verbose=True` keeps every state's line.
    """

    def __init__(self, host: str | None = None, *, api_key: str | None = None, verbose: bool = False):
        self.host = host
        self.api_key = api_key
        self.verbose = verbose
        self.job_id: str | None = None  # set once the server accepted the job
        self.state = ""
        self._job: Job | None = None  # the captured job, until it runs
        self._ns: dict | None = None  # the caller's names when it was captured
        self._globals: dict | None = None  # the module (notebook) namespace of a block written at its top level

    def __call__(self, context: Any, ns: dict, *, blocking: bool | None = None, api_key: str | None = None) -> None:
        """The engine's seam: capture the job; it runs when awaited."""
        self._job, self._ns = build_job(context, ns), dict(ns)
        self._globals = _module_namespace()
        self.api_key = api_key or self.api_key
        context.backend = self
        mark_pending(self._job, ns, "the job runs when you `await` its AsyncBackend", AwaitedValue)

    def __await__(self):
        return self.run().__await__()

    async def run(self) -> dict[str, Any]:
        """Run the captured job as a blocking run would (one RunJob stream when it has local() blocks, else a
        SubmitJob that waits); returns its values by name."""
        if self._job is None:
            raise TetherError("Nothing to run: use this backend in a `with model.trace(..., remote=True, "
                              "backend=backend):` block first.")
        job, ns = self._job, self._ns
        self._job = None
        display = StatusDisplay(verbose=self.verbose)
        events = new_events(display)
        io = Waiting.awaiting_in_loop(connect(self.host))
        metadata = auth_metadata(resolve_api_key(self.api_key))

        def on_job_id(job_id: str) -> None:
            self.job_id = job_id

        try:
            if job.has_local_blocks:
                local = await run_job(io, metadata, job, ns, events, on_job_id)
            else:
                local = await submit_and_wait(io, metadata, job, events, on_job_id)
        finally:
            display.close()
        self.state = state_name(events.state)
        values = values_of(events.result, job)
        saved = set(split_value_map(events.result)[0])
        kept = local.kept if local is not None else {}  # assigned by local() blocks, never sent to the server
        for name, value in kept.items():
            if name in job.assigned and name not in saved:
                values[name] = value
        if self._globals is not None:  # fill the names the block left pending, as a blocking run would have
            for name in job.assigned:
                if isinstance(self._globals.get(name), AwaitedValue) and name in values:
                    self._globals[name] = values[name]
        return values


async def fetch(job: str | RemoteBackend, *, host: str | None = None, api_key: str | None = None,
                timeout: float | None = None) -> dict[str, Any]:
    """Wait for a job (its id, or the RemoteBackend that submitted it) and return its values by name.

    `host=` and `api_key=` default to the backend's, then CONFIG; after `timeout` seconds, TimeoutError.
    """
    if isinstance(job, RemoteBackend):
        backend = job
        job_id = backend.job_id or backend.last_job_id
        host, api_key, submitted = host or backend.host, api_key or backend.api_key, backend._job
    else:
        backend, job_id, submitted = RemoteBackend(host, api_key=api_key, job_id=job), job, None
    if not job_id:
        raise TetherError("fetch() needs a job id, or a RemoteBackend that submitted a job.")
    io = Waiting.awaiting_in_loop(connect(host))
    metadata = auth_metadata(resolve_api_key(api_key))
    display = StatusDisplay()
    events = new_events(display, job_id)
    try:
        await backend.wait_for_result(io, metadata, events, timeout)
    finally:
        display.close()
    return values_of(events.result, submitted)


def _module_namespace() -> dict | None:
    """The globals of the user's frame that holds the `with` block, when the block is at module level (a
    script or a notebook cell); None inside a function, whose locals cannot be filled later."""
    frame = sys._getframe(2)
    while frame is not None and is_tether_frame(frame):
        frame = frame.f_back
    if frame is None or frame.f_locals is not frame.f_globals:
        return None
    return frame.f_globals

