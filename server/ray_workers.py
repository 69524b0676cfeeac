"""Replicas on a Ray cluster (`tether serve --ray ADDRESS`): each replica's worker runs as a Ray actor hosting
the same job loop as a local worker process (`worker_main.serve`), and the front door's supervisor
(`supervisor.Replica`) relays it through a connection with the Pipe's send/recv/poll/fileno, so its relay,
time limits, cancels and crash handling are the ones local workers get.

Bulky bytes (`worker_protocol.Blob`s: programs with inputs, results, local() values) cross as objects in Ray's
object store (one `ray.put` of the bytes), never inside a message. Imports ray (lazily), the protocol and the
supervisor; never grpc's server nor the job store.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any

from . import worker_protocol as wp
from .supervisor import Replica

__all__ = ["connect", "RayReplica", "ReplicaActor", "ActorConnection", "PickledModel", "gpus_of"]

_log = logging.getLogger("tether.server")
TAKE_WAIT = 0.5  # seconds one poll of an actor's outbox waits for a message (a dead actor is seen within this)
PULLS = 2  # polls of an actor's outbox in flight at once: a message never waits for the next poll to arrive
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_connect_lock = threading.Lock()


def connect(address: str) -> None:
    """Join the Ray cluster at `address` once per process: `auto` (RAY_ADDRESS, else the one `ray start` started
    on this machine), `host:port`, or `local` (a private Ray instance for this server, on loopback). A loopback
    address stays on loopback (Ray would otherwise swap it for the machine's network address)."""
    if _host_of(_resolved(address)) in _LOOPBACK:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # (read when ray is first imported)
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray on this machine: pip install 'tether[cluster]'") from None

    with _connect_lock:
        if ray.is_initialized():
            return
        if address != "local":
            _check_reachable(address, _resolved(address))
        if address == "local":
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address)


def _check_reachable(address: str, resolved: str) -> None:
    """Fail at once, with the fix, where no Ray head answers (Ray itself would retry for minutes)."""
    if resolved.startswith("ray://"):
        return
    if not resolved:
        raise ConnectionError(f"--ray {address}: no Ray cluster found on this machine (no RAY_ADDRESS, nothing "
                              "started by `ray start --head`); start one, or give its head's HOST:PORT")
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        raise ConnectionError(f"--ray {address}: no Ray head answers at {resolved} ({error}); start one with "
                              "`ray start --head`, or give the HOST:PORT of a running one") from None


def _resolved(address: str) -> str:
    """What Ray will dial for `address` (`auto`: RAY_ADDRESS, else the address file `ray start` wrote)."""
    if address == "local":
        return "127.0.0.1"
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        with open(os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")) as file:
            return file.read().strip()
    except OSError:
        return ""


def _host_of(address: str) -> str:
    address = address.removeprefix("ray://")
    return address.rpartition(":")[0].strip("[]") if address.count(":") >= 1 else address


@dataclasses.dataclass(frozen=True)
class _Stored:
    """Bytes in Ray's object store, standing for a Blob while a message crosses to another process or node."""

    ref: Any
    size: int


def _outgoing(value: Any) -> Any:
    """`value` (a message) with each Blob, or large bytes, moved into the object store; also inside lists,
    tuples and nested messages (a batch's programs)."""
    import ray

    if isinstance(value, wp.Blob) or (isinstance(value, bytes) and len(value) >= wp.SHM_THRESHOLD):
        data = bytes(wp.unpack(value))
        return _Stored(ray.put(data), len(data))
    return _mapped(value, _outgoing)


def _incoming(value: Any) -> Any:
    """`value` with its stored bytes back as bytes."""
    import ray

    if isinstance(value, _Stored):
        return ray.get(value.ref)
    return _mapped(value, _incoming)


def _mapped(value: Any, convert) -> Any:
    if type(value) in (list, tuple):
        return type(value)(convert(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for field in dataclasses.fields(value):
            old = getattr(value, field.name)
            new = convert(old)
            if new is not old:
                changes[field.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value


@dataclasses.dataclass(frozen=True)
class PickledModel:
    """A replica's payload as bytes (Ray's cloudpickle): what the cluster's core keeps of a model in the object
    store without ever loading it (it may need GPUs, or memory, that the core does not have)."""

    data: bytes

    @classmethod
    def of(cls, payload: Any) -> PickledModel:
        from ray import cloudpickle

        return cls(cloudpickle.dumps(payload))

    def load(self) -> Any:
        import pickle

        return pickle.loads(self.data)


class _ActorSide:
    """The worker's end inside the actor: what `serve` sends goes to the actor's outbox; what the front door
    put arrives in order through `recv`."""

    def __init__(self):
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # (sequence, message): PULLS takes read it at once
        self._sent = itertools.count()  # guarded by _send_lock, with the outbox's order
        self._send_lock = threading.Lock()
        self._inbox: dict[int, Any] = {}
        self._next = 0
        self._cond = threading.Condition()

    def send(self, message: Any) -> None:
        self.post(_outgoing(message))

    def post(self, message: Any) -> None:
        """Queue a message (None: the worker loop ended) with its sequence, so the front door reorders them."""
        with self._send_lock:
            self.outbox.put((next(self._sent), message))

    def deliver(self, seq: int, message: Any) -> None:
        with self._cond:
            self._inbox[seq] = message
            self._cond.notify_all()

    def recv(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._next in self._inbox)
            message = self._inbox.pop(self._next)
            self._next += 1
        if message is None:
            raise EOFError("the front door closed the connection")
        return _incoming(message)


class ReplicaActor:
    """A Ray actor hosting one replica's worker loop (`worker_main.serve`) in a thread. Made a Ray actor class
    by `_actor_class()` (so this module imports without ray)."""

    def __init__(self, name: str, payload: Any, source: Any, policy: Any):
        from .worker_main import serve

        if isinstance(payload, PickledModel):
            payload = payload.load()
        self._side = _ActorSide()

        def run() -> None:
            try:
                serve(self._side, name, payload, source, policy)
            except BaseException:
                _log.exception("the worker of %s failed", name)
            finally:
                self._side.post(None)

        threading.Thread(target=run, name=f"tether-worker-{name}", daemon=True).start()

    def put(self, seq: int, message: Any) -> None:
        """A message from the front door (`seq` orders them: the actor runs calls on several threads)."""
        self._side.deliver(seq, message)

    def take(self, timeout: float) -> list:
        """The worker's messages as (sequence, message): waits up to `timeout` for the first, then takes all that
        are ready (a message None: the worker loop has ended). PULLS takes wait at once, so one may return while
        the next is already waiting: the front door orders their messages by sequence."""
        out = self._side.outbox
        try:
            messages = [out.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(out.get_nowait())
            except queue.Empty:
                return messages

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()


_actor_cls: Any = None


def _actor_class():
    global _actor_cls
    if _actor_cls is None:
        import ray

        _actor_cls = ray.remote(max_concurrency=PULLS + 2, max_restarts=0)(ReplicaActor)  # (+ puts)
    return _actor_cls


class ActorConnection:
    """The front door's end: Pipe-like (send, recv, poll, fileno for `multiprocessing.connection.wait`). A pump
    thread polls the actor's outbox; a dead actor reads as EOF, like a dead process's pipe."""

    def __init__(self, actor: Any, name: str):
        self._actor = actor
        self._seq = itertools.count()
        self._send_lock = threading.Lock()
        self._messages: deque = deque()
        self._cond = threading.Condition()
        self._read_fd, self._write_fd = os.pipe()
        self._dead_read, self._dead_write = os.pipe()
        self.death = ""  # guarded by _cond: why the actor (or its worker loop) ended; "" while it runs
        self._closed = False  # guarded by _cond: close() was called (the supervisor is done with it)
        self._pumping = True  # guarded by _cond: the pump thread may still write to the pipes
        threading.Thread(target=self._pump, name=f"tether-ray-pump-{name}", daemon=True).start()

    def _pump(self) -> None:
        try:
            self._pump_messages()
        finally:
            with self._cond:
                self._pumping = False
                release = self._closed
            if release:
                self._close_pipes()

    def _pump_messages(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        polls = [self._actor.take.remote(TAKE_WAIT) for _ in range(PULLS)]
        held: dict[int, Any] = {}  # messages by sequence, until those before them arrived
        expected = 0
        while not self._closed:
            try:
                ready, _ = ray.wait(polls, num_returns=1)
                polls.remove(ready[0])
                polls.append(self._actor.take.remote(TAKE_WAIT))  # (before reading: the actor is never unpolled)
                held.update(ray.get(ready[0]))
            except RayActorError as error:
                self._end(_why(error))
                return
            except Exception as error:  # the cluster went away
                self._end(f"its Ray actor could not be reached ({type(error).__name__}: {_first_line(error)})")
                return
            while expected in held:
                message = held.pop(expected)
                expected += 1
                if message is None:
                    self._end("its worker loop ended")
                    return
                with self._cond:
                    self._messages.append(message)
                    self._cond.notify_all()
                os.write(self._write_fd, b"m")

    def _end(self, why: str) -> None:
        with self._cond:
            if not self.death:
                self.death = why
            self._cond.notify_all()
        os.write(self._write_fd, b"e")
        os.write(self._dead_write, b"e")

    @property
    def sentinel(self) -> int:
        """A file descriptor readable once the actor has died."""
        return self._dead_read

    def fileno(self) -> int:
        return self._read_fd

    def send(self, message: Any) -> None:
        if self.death or self._closed:
            raise BrokenPipeError(self.death or "the connection is closed")
        with self._send_lock:
            self._actor.put.remote(next(self._seq), _outgoing(message))

    def poll(self, timeout: float | None = 0.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._messages or self.death, timeout)

    def recv(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._messages or self.death)
            if not self._messages:
                raise EOFError(self.death)
            message = self._messages.popleft()
        os.read(self._read_fd, 1)
        try:
            return _incoming(message)
        except Exception as error:  # its bytes were lost with the actor (their owner) before we read them
            raise EOFError(f"its Ray actor's message was lost ({type(error).__name__}: {_first_line(error)})") \
                from error

    def close(self) -> None:
        """The supervisor is done with this connection: its pipes are closed once the pump has stopped."""
        with self._cond:
            self._closed = True
            release = not self._pumping
        if release:
            self._close_pipes()

    def _close_pipes(self) -> None:
        for fd in (self._read_fd, self._write_fd, self._dead_read, self._dead_write):
            try:
                os.close(fd)
            except OSError:
                pass


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _why(error: BaseException) -> str:
    """A dead actor's story, from Ray's error (its first line names the cause: killed, exited, node died...)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in lines if "reason" in line.lower() or "died" in line.lower()), lines[0] if lines
                 else type(error).__name__)
    return f"its Ray actor died: {cause[:300]}"


class _ActorProcess:
    """What the supervisor reads of a worker process, for an actor: pid, is_alive, sentinel, kill, join."""

    def __init__(self, actor: Any, conn: ActorConnection, pid: int | None):
        self.actor, self.conn, self.pid = actor, conn, pid
        self.exitcode = None

    @property
    def sentinel(self) -> int:
        return self.conn.sentinel

    def is_alive(self) -> bool:
        return not self.conn.death

    def kill(self) -> None:
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone
            pass

    def join(self, timeout: float | None = None) -> None:
        with self.conn._cond:
            self.conn._cond.wait_for(lambda: self.conn.death, timeout)


class RayReplica(Replica):
    """A replica whose worker is a Ray actor (with the model's GPUs as its resources); the relay is Replica's."""

    def __init__(self, queue, index: int, policy):
        self._stored_payload: Any = None  # the replica's model in the object store, put once (restarts reuse it)
        self._here = False  # whether the actor runs on this machine (its memory is then read from /proc)
        connect(queue.limits.ray)
        super().__init__(queue, index, policy)

    def _start(self) -> None:
        import ray

        hosted = self.queue.hosted
        with self._ready:
            self._pid = None
        if self._stored_payload is None:  # (a model the cluster holds is in the object store already)
            shipped = isinstance(self._payload, ray.ObjectRef)
            self._stored_payload = self._payload if shipped else ray.put(self._payload)
        gpus = getattr(hosted, "gpus", None)
        # listed by `ray list actors`: the front doors' namespace, the replica, and this start of it
        name = f"tether/{self.queue.limits.ray_namespace}/{self.name}/{uuid.uuid4().hex[:8]}"
        actor = _actor_class().options(num_cpus=1, num_gpus=gpus_of(self._payload) if gpus is None else gpus,
                                       name=name).remote(hosted.name, self._stored_payload, hosted.source,
                                                         self.policy)
        conn = ActorConnection(actor, self.name)
        self.conn = conn
        self.process = _ActorProcess(actor, conn, None)
        give_up = time.monotonic() + _start_timeout()
        try:
            while not conn.poll(0.2):
                if self.queue.closed:
                    raise RuntimeError("the server stopped while the worker started")
                if time.monotonic() > give_up:
                    raise RuntimeError(f"its Ray actor did not start within {_start_timeout():g} s")
            if conn.death and not conn.poll(0):
                raise RuntimeError(f"{conn.death} while it started (see the Ray logs)")
            ready = conn.recv()
        except BaseException:
            self._kill()
            raise
        assert isinstance(ready, wp.Ready), ready
        self._here = ray.util.get_node_ip_address() == _actor_node_ip(actor)
        self.process.pid = ready.pid
        with self._ready:
            self._pid = ready.pid
            self._ready.notify_all()

    def private_memory(self, pid: int) -> int:
        """An actor on this machine is measured like a worker process; one on another node is left to Ray's
        memory monitor (it kills the actor: the job then fails as crashed)."""
        return super().private_memory(pid) if self._here else 0

    def _kill(self) -> None:
        with self._ready:
            self._pid = None
        if self.process is not None:
            self.process.kill()
            self.process.join(5.0)
            self.process.conn.close()

    def _how_it_ended(self) -> str:
        if self.process is None:
            return "its Ray actor was not started"
        self.process.join(1.0)
        return self.process.conn.death or "its Ray actor stopped"


def _actor_node_ip(actor: Any) -> str | None:
    import ray

    try:
        return ray.get(actor.node_ip.remote(), timeout=10)
    except Exception:
        return None


def _start_timeout() -> float:
    from .supervisor import START_TIMEOUT

    return START_TIMEOUT


def gpus_of(payload: Any) -> int:
    """GPUs the actor asks Ray for: the CUDA devices the model's parameters are on (its device options)."""
    module = payload[0] if isinstance(payload, tuple) else payload
    return len({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
