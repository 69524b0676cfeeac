"""Awaitable remote jobs with grpc.aio, for notebooks and asyncio servers: nothing blocks the event loop
while the job queues and runs. local() blocks run in the loop's thread when the server reaches them.

    backend = tether.client.aio.AsyncBackend()
    with model.trace("Hello", remote=True, backend=backend):
        h = model.transformer.h[0].output.save()
    values = await backend          # {"h": tensor}; also backend.job_id
    values = await tether.client.aio.fetch(job_id)   # a job submitted with blocking=False
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from tether.runtime.cpython import is_tether_frame
from tether.runtime.errors import RemoteError, TetherError
from tether.v1 import jobs_pb2, jobs_pb2_grpc

from .channel import CONNECT_WAIT_S, auth_metadata, channel_options, resolve_api_key, resolve_host
from .display import StatusDisplay
from .encode import Job, build_job
from .errors import from_rpc_error
from .events import AwaitedValue, JobEvents, mark_pending, state_name
from .local import LocalCalls
from .runner import RemoteBackend, _debug, _logger, for_job, values_of
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
        """Run the captured job on one RunJob stream; returns its values by name."""
        if self._job is None:
            raise TetherError("Nothing to run: use this backend in a `with model.trace(..., remote=True, "
                              "backend=backend):` block first.")
        job, ns = self._job, self._ns
        self._job = None
        display = StatusDisplay(verbose=self.verbose)
        events = JobEvents(display, log=_logger(), debug=_debug())
        local = LocalCalls(job, ns, display)
        host = resolve_host(self.host)
        metadata = auth_metadata(resolve_api_key(self.api_key))
        try:
            async with grpc.aio.insecure_channel(host, options=channel_options()) as channel:
                await _connected(channel)
                stub = jobs_pb2_grpc.JobServiceStub(channel)
                call = stub.RunJob(metadata=metadata)
                try:
                    await call.write(jobs_pb2.RunJobRequest(job=job.spec))
                    async for response in call:
                        local_calls = events.feed_response(response)
                        self.job_id = events.job_id or self.job_id
                        for local_call in local_calls:
                            for message in local.answer(local_call):
                                await call.write(message)
                        if events.done:
                            await call.done_writing()
                    if not events.done:
                        await _watch(stub, metadata, events)
                    if local.error is not None:
                        raise local.error
                    events.raise_if_failed()
                    await _read_result(stub, metadata, events)
                except grpc.RpcError as error:
                    raise for_job(from_rpc_error(error, host), self.job_id) from None
        finally:
            display.close()
        self.state = state_name(events.state)
        values = values_of(events.result, job)
        saved = set(split_value_map(events.result)[0])
        for name, value in local.kept.items():  # assigned by local() blocks, never sent to the server
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
    submitted = None
    if isinstance(job, RemoteBackend):
        backend = job
        job_id = backend.job_id or backend.last_job_id
        host, api_key, submitted = host or backend.host, api_key or backend.api_key, backend._job
    else:
        backend, job_id = None, job
    if not job_id:
        raise TetherError("fetch() needs a job id, or a RemoteBackend that submitted a job.")
    host = resolve_host(host)
    metadata = auth_metadata(resolve_api_key(api_key))
    display = StatusDisplay()
    events = JobEvents(display, job_id=job_id, log=_logger(), debug=_debug())
    try:
        async with grpc.aio.insecure_channel(host, options=channel_options()) as channel:
            await _connected(channel)
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            try:
                await _watch(stub, metadata, events, timeout=timeout)
                if not events.done:
                    raise TimeoutError(f"job {job_id} is still {state_name(events.state)} after {timeout} s")
                events.raise_if_failed()
                await _read_result(stub, metadata, events)
            except grpc.RpcError as error:
                raise for_job(from_rpc_error(error, host), job_id) from None
    finally:
        display.close()
    if backend is not None and backend.job_id == job_id:
        backend.job_id, backend.state = None, state_name(events.state)
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


async def _connected(channel: grpc.aio.Channel) -> None:
    """Wait up to CONNECT_WAIT_S for the channel: a server being restarted is waited for, an unreachable one
    fails the call that follows."""
    try:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_WAIT_S)
    except asyncio.TimeoutError:
        pass


async def _watch(stub: Any, metadata: tuple, events: JobEvents, *, timeout: float | None = None) -> None:
    request = jobs_pb2.WatchJobRequest(job_id=events.job_id, after_sequence=events.last_sequence)
    try:
        async for response in stub.WatchJob(request, metadata=metadata, timeout=timeout):
            events.feed_response(response)
    except grpc.RpcError as error:
        if error.code() is not grpc.StatusCode.DEADLINE_EXCEEDED or timeout is None:
            raise


async def _read_result(stub: Any, metadata: tuple, events: JobEvents) -> None:
    if events.result_complete:
        return
    request = jobs_pb2.ReadResultRequest(job_id=events.job_id, offset=events.received)
    async for response in stub.ReadResult(request, metadata=metadata):
        events.add_result_chunk(response.chunk)
    if not events.result_complete:
        raise RemoteError(f"job {events.job_id}: the result ended after {events.received} bytes.")
