"""The one place the client opens gRPC channels: host, message limits, keepalive, API key metadata.

A `Connection` tracks its calls in flight; when the channel drops out of READY while calls are
pending, every one of them is cancelled at once and reports the same clear error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from tether.runtime.errors import RemoteError
from tether.v1 import jobs_pb2_grpc, models_pb2_grpc

__all__ = ["Connection", "connect", "resolve_host", "resolve_api_key", "channel_options", "close_all",
           "MAX_MESSAGE_BYTES"]

MAX_MESSAGE_BYTES = 256 << 20  # bytes: largest message sent or received (jobs with big inputs, specs)
KEEPALIVE_MS = 300_000  # ping a silent connection every 5 min (the gRPC server default minimum interval)
KEEPALIVE_TIMEOUT_MS = 20_000  # a ping unanswered this long means the server is gone


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 1),
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


class Connection:
    """One channel to one server, its stubs, and the streaming calls in flight on it."""

    def __init__(self, host: str):
        self.host = host
        self.channel = grpc.insecure_channel(host, options=channel_options())
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)
        self._lock = threading.Lock()
        self._pending: dict[Any, str] = {}  # guarded by _lock: call -> why it was cancelled ("" while live)
        self._pending_changed = threading.Condition(self._lock)  # notified when _pending gains or loses a call
        self._was_ready = False  # only touched by gRPC's connectivity thread
        self.channel.subscribe(self._on_state, try_to_connect=False)

    @contextmanager
    def track(self, call: Any, job_id: Callable[[], str] | str = "") -> Iterator[Any]:
        """Register a call (an RPC stream or future) for the block.

        If it fails with UNAVAILABLE (the connection dropped), or the channel drops while it is pending,
        it and every other pending call fail at once with the same RemoteError, naming `job_id` if known.
        """
        with self._lock:
            self._pending[call] = ""
            self._pending_changed.notify_all()
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

    def _lost_error(self, reason: str, job_id: str) -> RemoteError:
        job = (f"Job {job_id} may still be running there: re-attach with "
               f"tether.client.RemoteBackend(job_id={job_id!r}) once the server is reachable." if job_id else
               "A job already submitted may still be running there.")
        return RemoteError(
            f"Lost the connection to the tether server at {self.host} ({reason}); every call in flight was "
            f"stopped. {job}",
            code="UNAVAILABLE",
        )

    def ready(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the channel to connect; whether it did."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        return True

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self._was_ready = True
            return
        if not self._was_ready or state is grpc.ChannelConnectivity.CONNECTING:
            return
        self._was_ready = False
        self.fail_pending(f"the channel went {state.name.lower()}")

    def fail_pending(self, reason: str) -> None:
        """Cancel every pending call at once; each then raises the same clear RemoteError."""
        with self._lock:
            calls = [call for call, why in self._pending.items() if not why]
            for call in calls:
                self._pending[call] = reason
        for call in calls:
            call.cancel()

    def close(self) -> None:
        """Fail every pending call, close the channel and forget it: the next `connect` opens a new one."""
        with _connections_lock:
            if _connections.get(self.host) is self:
                del _connections[self.host]
        self.fail_pending("the client closed the connection")
        self.channel.unsubscribe(self._on_state)
        self.channel.close()


_connections: dict[str, Connection] = {}  # guarded by _connections_lock: one per host, reused by every job
_connections_lock = threading.Lock()


def connect(host: str | None = None) -> Connection:
    """The shared connection to `host` (default CONFIG.API.HOST), opened on first use."""
    host = resolve_host(host)
    with _connections_lock:
        conn = _connections.get(host)
        if conn is None:
            conn = _connections[host] = Connection(host)
        return conn


def close_all() -> None:
    """Close every shared connection (tests; a later `connect` opens fresh ones)."""
    with _connections_lock:
        conns = list(_connections.values())
    for conn in conns:
        conn.close()
