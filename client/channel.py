"""The one place the client opens gRPC channels: host, message limits, keepalive, API key metadata.

asyncio callers' calls run on one named thread ("tether-grpc") with grpc.aio. A blocking caller's calls run on
a second, blocking channel while the server is connected: unary ones (SubmitJob, GetJob, CancelJob, the model
calls) in its own thread, a job's streams on a reader thread of their own (blocking_stream.py), so no message
passes through the event loop; the caller blocks on a queue. When a channel drops, every pending call on it
fails at once, with one clear error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from tether.protocol import MAX_MESSAGE_BYTES
from tether.runtime.errors import RemoteError
from tether.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2_grpc

from .blocking_stream import (
    END,
    SIGNAL_CHECK_S,
    BlockingStream,
    Cancelled,
    Sending,
    Written,
    failure,
    hand_over,
    item_of,
    next_item,
)
from .wire import chunk_deserializer, event_deserializer

__all__ = ["Connection", "Stream", "connect", "resolve_host", "resolve_api_key", "auth_metadata",
           "channel_options", "close_all", "MAX_MESSAGE_BYTES"]

KEEPALIVE_MS = 300_000  # ping a silent connection every 5 min (the gRPC server default minimum interval)
KEEPALIVE_TIMEOUT_MS = 20_000  # a ping unanswered this long means the server is gone
UNARY_TIMEOUT_S = 30.0  # default deadline of unary calls, seconds
CONNECT_WAIT_S = 10.0  # seconds a streaming call (no deadline of its own) waits for an unreachable server
RECONNECT_BACKOFF_MS = (100, 500)  # first and longest wait between reconnect attempts: a restarted server is
# used again within about half a second of coming back (gRPC's defaults grow to 120 s)
NEVER_IDLE_MS = 2**31 - 1  # a channel without calls stays connected (gRPC's default idles it after 30 min): the
# loop's channel may carry none while a blocking caller's calls run on the twin, and its leaving READY means the
# server went away (_watch_state fails every pending call then)


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        ("grpc.client_idle_timeout_ms", NEVER_IDLE_MS),
    ]


def resolve_host(host: str | None = None) -> str:
    """`host` if given, else CONFIG.API.HOST (which falls back to TETHER_HOST, the user file, the default)."""
    if host:
        return host.removeprefix("grpc://").removeprefix("http://").rstrip("/")
    from tether.config import CONFIG

    return CONFIG.API.HOST


def resolve_api_key(api_key: str | None = None) -> str | None:
    if api_key:
        return api_key
    from tether.config import CONFIG

    return CONFIG.API.APIKEY


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The key as jobs.proto specifies: `authorization: Bearer <key>` (none: loopback-only servers)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


# ------------------------------------------------------------------------------------------- the loop


class _LoopThread:
    """The client's asyncio loop, run by one named daemon thread; everything grpc happens there."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tether-grpc", daemon=True)
        self.thread.start()
        self.ident = self.thread.ident

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Run `coro` on the loop and wait for its result (Ctrl-C cancels it: the wait runs in slices, see
        blocking_stream.next_item)."""
        future = self.submit(coro)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = SIGNAL_CHECK_S if deadline is None else min(SIGNAL_CHECK_S, deadline - time.monotonic())
                try:
                    return future.result(max(0.0, left))
                except concurrent.futures.TimeoutError:  # (also what a coroutine that timed out raises)
                    if future.done():  # (it may have ended just after the slice did: its result, or its error)
                        return future.result()
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
        except BaseException:
            future.cancel()
            raise


_loop_lock = threading.Lock()
_loop_thread: _LoopThread | None = None  # guarded by _loop_lock; replaced in a forked child


def _loop() -> _LoopThread:
    global _loop_thread
    with _loop_lock:
        if _loop_thread is None or _loop_thread.pid != os.getpid():  # first use, or a forked child
            _loop_thread = _LoopThread()
        return _loop_thread


_UNARY = {jobs_pb2_grpc.JobServiceStub: ("SubmitJob", "GetJob", "CancelJob"),
          models_pb2_grpc.ModelServiceStub: ("ListModels", "GetModel")}  # what `_blocking_twin` calls blocking
_RAW_STREAMS = (("RunJob", "stream_stream", jobs_pb2.RunJobResponse, event_deserializer),
                ("WatchJob", "unary_stream", jobs_pb2.WatchJobResponse, event_deserializer),
                ("ReadResult", "unary_stream", jobs_pb2.ReadResultResponse, chunk_deserializer))


class Stream(Sending):
    """One streaming call, run on the loop thread and read (and for RunJob written) from the caller's: by
    blocking (`next`, iteration) or, given `wake_loop` (the caller's asyncio loop), by awaiting (`next_async`)."""

    END = END  # what next() returns once the call ended

    def __init__(self, conn: Connection, method: Any, request: Any, metadata: tuple, timeout: float | None,
                 on_response: Callable[[Any], Any] | None = None, first: Any = None,
                 wake_loop: asyncio.AbstractEventLoop | None = None):
        self._loop = conn.loop
        self._on_response = on_response  # runs on the loop thread: what to hand the reader (None: nothing)
        self._inbox: queue.SimpleQueue = (queue.SimpleQueue() if wake_loop is None else _Inbox(wake_loop))
        # responses, then END or the RpcError
        self._outbox: asyncio.Queue | None = None  # loop thread only: messages to write; None ends
        self._writer: asyncio.Future | None = None  # loop thread only: writes the outbox, from the first send()
        self._call: Any = None  # loop thread only
        self._cancelled = ""  # why cancel() was called; read by the loop thread after the call ends
        self._closed = False  # the client's side was ended (send(None)); later sends are dropped
        self.finished = False  # the call ended (every response is in the inbox)
        self._written = Written()
        self._loop.loop.call_soon_threadsafe(self._start, method, request, metadata, timeout, first)

    def _start(self, method: Any, request: Any, metadata: tuple, timeout: float | None, first: Any) -> None:
        """On the loop thread: start the call (so a send() queued after this finds it) and its reader."""
        try:
            if request is None:  # bidirectional: `first`, then messages from send()
                self._call = method(metadata=metadata, timeout=timeout)
            else:
                self._call = method(request, metadata=metadata, timeout=timeout)
        except BaseException as error:
            self.finished = True
            self._inbox.put(error)
            return
        self._task = self._loop.loop.create_task(self._run(first))

    async def _run(self, first: Any) -> None:
        try:
            if self._cancelled:
                self._call.cancel()
            if first is not None:
                await self._call.write(first)
            inbox, on_response = self._inbox, self._on_response
            async for response in self._call:
                hand_over(inbox, on_response, response)
            self.finished = True
            inbox.put(END)
        except grpc.RpcError as error:
            self.finished = True
            self._inbox.put(failure(error, self._cancelled))
        except asyncio.CancelledError:
            self.finished = True
            self._inbox.put(Cancelled(self._cancelled or "cancelled"))
        except BaseException as error:  # on_response failed: stop the call, never leave the reader waiting
            self.finished = True
            if self._call is not None:
                self._call.cancel()
            self._inbox.put(error)
        finally:
            if self._writer is not None:
                self._writer.cancel()
            self._written.ended()

    async def _write(self, call: Any) -> None:
        while (message := await self._outbox.get()) is not None:
            await call.write(message)
            self._written.written()
        await call.done_writing()

    def send(self, message: Any) -> None:
        """Write one message on a bidirectional stream; `None` ends the client's side."""
        if not self._accept(message):
            return
        if threading.get_ident() == self._loop.ident:
            self._put(message)
        else:
            self._loop.loop.call_soon_threadsafe(self._put, message)

    def _put(self, message: Any) -> None:
        if self.finished or self._call is None:  # ended (or failed to start): nothing more goes out
            if message is not None:
                self._written.written()
            return
        if self._writer is None:
            if message is None:
                return  # nothing was written after `first`: the call ends without a half-close of ours
            self._outbox = asyncio.Queue()
            self._writer = asyncio.ensure_future(self._write(self._call))
        self._outbox.put_nowait(message)

    def cancel(self, reason: str = "cancelled by the client") -> None:
        self._cancelled = self._cancelled or reason
        self._loop.loop.call_soon_threadsafe(self._cancel_on_loop)

    def _cancel_on_loop(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def next(self) -> Any:
        """The next item (blocking the caller's thread), or END; the call's failure raises."""
        return next_item(self._inbox)

    async def next_async(self) -> Any:
        """The next item, awaited in the `wake_loop` the stream was made with, or END; its failure raises."""
        return item_of(await self._inbox.get_async())

    def __iter__(self) -> Iterator[Any]:
        while (item := self.next()) is not END:
            yield item


class _Inbox(queue.SimpleQueue):
    """A stream's responses, put by the loop thread; awaitable in the caller's asyncio loop when it has one."""

    def __init__(self, wake_loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._wake_loop = wake_loop
        self._wake = asyncio.Event()  # set (in wake_loop) after each put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item)
        try:
            self._wake_loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the caller's loop was closed: nobody awaits this stream any more
            pass

    async def get_async(self) -> Any:
        while True:
            self._wake.clear()
            try:
                return self.get_nowait()
            except queue.Empty:
                await self._wake.wait()


# ------------------------------------------------------------------------------------------ connections


def _raw_streams(channel: Any) -> dict[str, Any]:
    """RunJob, WatchJob and ReadResult on `channel` (asyncio or blocking), handing large result chunks over as
    views of the bytes received."""
    return {name: getattr(channel, kind)(
        f"/tether.v1.JobService/{name}", request_serializer=getattr(jobs_pb2, f"{name}Request").SerializeToString,
        response_deserializer=deserializer(response), _registered_method=True)
        for name, kind, response, deserializer in _RAW_STREAMS}


class Connection:
    """One channel to one server, its stubs, and the streaming calls in flight on it."""

    def __init__(self, host: str):
        self.host = host
        self.loop = _loop()
        self.channel = self.loop.call(self._open())
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self._raw_result_methods()
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)
        self._direct_channel: grpc.Channel | None = None  # guarded by _lock: see _blocking_twin
        self._direct: dict[Any, Any] = {}  # guarded by _lock: an aio stub's method -> the same, blocking
        self._lock = threading.Lock()
        self._closed = False  # guarded by _lock: close() was called
        self._pending: dict[Any, str] = {}  # guarded by _lock: call -> why it was cancelled ("" while live)
        self._pending_changed = threading.Condition(self._lock)  # notified when _pending gains or loses a call
        self._ready = False  # written by the loop thread (_watch_state): whether the channel is READY
        self._was_ready = False  # written by the loop thread (_watch_state): whether it ever was (a server is there)
        self._watcher = self.loop.submit(self._watch_state())

    def _raw_result_methods(self) -> None:
        """RunJob, WatchJob and ReadResult hand large result chunks over as views of the bytes received."""
        for name, method in _raw_streams(self.channel).items():
            setattr(self.jobs, name, method)

    async def _open(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.host, options=channel_options())

    def unary(self, method: Any, request: Any, metadata: tuple, timeout: float | None = UNARY_TIMEOUT_S) -> Any:
        """Call a unary method (a stub attribute) and return its response; raises grpc.RpcError.

        While the server is connected, a job's and a model's unary calls run in the caller's thread on a blocking
        channel of their own (`_blocking_twin`): no hand-off to the loop thread and back, ~0.2 ms of a tiny job."""
        if timeout is not None and (direct := self._connected_twin(method)) is not None:
            return direct(request, metadata=metadata, timeout=timeout, wait_for_ready=True)

        async def call() -> Any:
            return await method(request, metadata=metadata, timeout=timeout)

        self.wait_ready(CONNECT_WAIT_S if timeout is None else min(timeout, CONNECT_WAIT_S))
        return self.loop.call(call())

    def _connected_twin(self, method: Any) -> Any:
        """The blocking twin of `method` for a caller outside the loop thread while the server is connected, else
        None (the call then goes on the loop). Twins are called with wait_for_ready: the blocking channel may
        still be reconnecting after a restart that the loop's channel has already seen the end of."""
        if self._ready and threading.get_ident() != self.loop.ident:
            return self._blocking_twin(method)
        return None

    def _blocking_twin(self, method: Any) -> Any:
        """The blocking twin of one of this connection's own job and model methods (None for any other), on one
        blocking channel to the same host, opened at first use."""
        with self._lock:
            if self._direct_channel is None:
                if self._closed:
                    return None
                self._direct_channel = grpc.insecure_channel(self.host, options=channel_options())
                for stub, aio in ((jobs_pb2_grpc.JobServiceStub, self.jobs), (models_pb2_grpc.ModelServiceStub,
                                                                              self.models)):
                    blocking = stub(self._direct_channel)
                    for name in _UNARY[stub]:
                        self._direct[getattr(aio, name)] = getattr(blocking, name)
                for name, blocking_stream in _raw_streams(self._direct_channel).items():
                    self._direct[getattr(self.jobs, name)] = blocking_stream
            return self._direct.get(method)

    def wait_ready(self, timeout: float = CONNECT_WAIT_S) -> None:
        """Before a call: if the server this channel reached is not connected now (it is restarting), wait for
        it at most `timeout`; a call that follows fails as before if it is still away. A channel that never
        connected (no server at that address) does not wait: its first call says so at once."""
        if self.needs_wait() and threading.get_ident() != self.loop.ident:
            self.loop.call(self.ready(timeout))

    def needs_wait(self) -> bool:
        """Whether a call should wait for the channel first: the server it reached is away now."""
        return not self._ready and self._was_ready

    async def ready(self, timeout: float) -> None:
        """On the loop thread: wait at most `timeout` for the channel to be connected."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except (asyncio.TimeoutError, RuntimeError):
            pass

    def stream(self, method: Any, request: Any = None, *, metadata: tuple = (), timeout: float | None = None,
               on_response: Callable[[Any], Any] | None = None, first: Any = None) -> Stream:
        """Start a streaming call: server streaming with `request`, bidirectional without (`first`: its
        first message, written as the call starts), once the channel is connected (see wait_ready).

        `on_response(response)`, if given, runs as each response arrives (on the thread that reads the call)
        and returns what to hand to the reader (None: nothing), so routine events cost no thread switch.
        While the server is connected, a job's streams run on the blocking channel (BlockingStream: no event
        loop between the caller and each message it answers); otherwise on the loop thread.
        """
        if (direct := self._connected_twin(method)) is not None:
            return BlockingStream(direct, request, metadata, timeout, on_response, first)
        self.wait_ready(CONNECT_WAIT_S if timeout is None else min(timeout, CONNECT_WAIT_S))
        return Stream(self, method, request, metadata, timeout, on_response, first)

    @contextmanager
    def track(self, call: Any, job_id: Callable[[], str] | str = "") -> Iterator[Any]:
        """Register a call (a Stream) for the block.

        If it fails with UNAVAILABLE (the connection dropped), or the channel drops while it is pending,
        it and every other pending call fail at once with the same RemoteError, naming `job_id` if known.
        """
        with self._lock:
            self._pending[call] = ""
            self._pending_changed.notify_all()
        if isinstance(call, BlockingStream) and not self._ready:  # dropped before it was tracked: it would wait
            self.fail_pending("the channel went away as the call started")  # for the server with no deadline
        try:
            yield call
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.UNAVAILABLE:
                self.fail_pending(error.details() or "the connection dropped")
            with self._lock:
                reason = self._pending.get(call, "")
            if reason:
                raise self._lost_error(reason, job_id() if callable(job_id) else job_id) from None
            raise
        finally:
            with self._lock:
                self._pending.pop(call, None)
                self._pending_changed.notify_all()

    def wait_pending(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` calls are in flight (diagnostics and tests); whether they were."""
        with self._lock:
            return self._pending_changed.wait_for(lambda: len(self._pending) >= count, timeout)

    def fail_pending(self, reason: str) -> None:
        """Cancel every pending call at once; each then raises the same clear RemoteError."""
        with self._lock:
            calls = [call for call, why in self._pending.items() if not why]
            for call in calls:
                self._pending[call] = reason
        for call in calls:
            call.cancel(reason)

    def _lost_error(self, reason: str, job_id: str) -> RemoteError:
        job = (f"Job {job_id} may still be running there: re-attach with "
               f"tether.client.RemoteBackend(job_id={job_id!r}) once the server is reachable." if job_id else
               "A job already submitted may still be running there.")
        return RemoteError(
            f"Lost the connection to the tether server at {self.host} ({reason}); every call in flight was "
            f"stopped. {job}",
            code="UNAVAILABLE",
        )

    async def _watch_state(self) -> None:
        """Fail the pending calls when the channel leaves READY (the server or the network went away)."""
        state = self.channel.get_state(try_to_connect=False)
        try:
            while True:
                self._ready = state is grpc.ChannelConnectivity.READY
                self._was_ready = self._was_ready or self._ready
                await self.channel.wait_for_state_change(state)
                new = self.channel.get_state(try_to_connect=False)
                if state is grpc.ChannelConnectivity.READY and new is not grpc.ChannelConnectivity.READY:
                    self.fail_pending(f"the channel went {new.name.lower()}")
                state = new
        except (asyncio.CancelledError, RuntimeError, grpc.RpcError):
            return  # the channel was closed

    def close(self) -> None:
        """Fail every pending call, close the channel and forget it: the next `connect` opens a new one."""
        with _connections_lock:
            if _connections.get(self.host) is self:
                del _connections[self.host]
        self.fail_pending("the client closed the connection")
        self._watcher.cancel()
        with self._lock:
            self._closed = True
            direct, self._direct_channel, self._direct = self._direct_channel, None, {}
        if direct is not None:
            direct.close()
        try:
            self.loop.call(self.channel.close(), timeout=5.0)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass


_connections: dict[str, Connection] = {}  # guarded by _connections_lock: one per host, reused by every job
_connections_lock = threading.Lock()


def connect(host: str | None = None) -> Connection:
    """The shared connection to `host` (default CONFIG.API.HOST), opened on first use."""
    host = resolve_host(host)
    loop = _loop()
    with _connections_lock:
        conn = _connections.get(host)
        if conn is None or conn.loop is not loop:  # a forked child cannot use its parent's channels
            conn = _connections[host] = Connection(host)
        return conn


def close_all() -> None:
    """Close every shared connection (tests; a later `connect` opens fresh ones)."""
    with _connections_lock:
        conns = list(_connections.values())
    for conn in conns:
        conn.close()
